"""
Tests for tokenizer.py's Hugging Face tokenizers, trained here with the `tokenizers` library in the
styles of Qwen2.5, Qwen3 and Llama-3 (byte-level BPE), Gemma-3 (SentencePiece-style BPE with byte
fallback) and DeepSeek-Math (several split rules), all run by the `tokenizers` library: every kind
gives the ids of Hugging Face's tokenizers and decodes back to the text; chat templates render as
transformers' apply_chat_template; end-of-text / end-of-turn ids; byte-level tokenizers edited
into other kinds; chat prompts in the data pipeline; grading of instruct models' answers.
"""

import json
import os
import random
import shutil
import unicodedata
from types import SimpleNamespace

# before anything imports huggingface_hub: tests never touch the network
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

import data
from tiny_hf import END_OF_TURN, NFC, STYLES, corpus, train_tokenizer
from machinery.tokenizer import HFTokenizer, get_tokenizer, has_hf_tokenizer, uses_chat

pytest.importorskip("transformers")

TEXTS = [
    "Tom has 12 pens. He buys 7, then gives away 5.\n#### 14",
    "1234567890 3.14159 -42 $1,000,000 2024-07-26",               # digits: 1 (Qwen) or 3 (Llama)
    "héllo wörld 東京タワー 😀🙂 naïve Ünïcödé",                    # multi-byte, unseen characters
    "e\u0301 vs \u00e9",                                          # NFC changes the first (Qwen)
    "  two   spaces\t\ttabs\n\n\nnewlines   \r\n trailing  ",     # whitespace runs
    "it's they're WE'LL I'M",                                     # contractions, case-insensitive
    "<|im_start|>user\nhi<|im_end|>\n<think>\nx\n</think> <tool_call>",  # special and added tokens
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "never seen: 🦀 Ω ж ♞ \x00\x7f",                                # byte fallback (Gemma)
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module", params=sorted(END_OF_TURN))
def tok_folder(request, tmp_path_factory):
    """(style, folder holding tokenizer.json + tokenizer_config.json + chat_template.jinja)"""
    folder = tmp_path_factory.mktemp(request.param.replace(".", ""))
    train_tokenizer(request.param, folder)
    return request.param, folder


def test_ids_match_hugging_face_and_decode_back(tok_folder):
    from tokenizers import Tokenizer
    style, folder = tok_folder
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = get_tokenizer(str(folder))
    assert tok.n_vocab == hf.get_vocab_size()
    assert isinstance(tok, HFTokenizer) and uses_chat(tok)
    for text in TEXTS:
        ids = tok.encode(text, allowed_special="all")  # Hugging Face matches special tokens too
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == (unicodedata.normalize("NFC", text) if style in NFC else text)
    # random pieces of the training text and of text it never saw (this file's source)
    rng = random.Random(0)
    source = "".join(corpus()[-5:]) + open(data.__file__, encoding="utf-8").read()
    for _ in range(300):
        start = rng.randrange(len(source))
        text = source[start:start + rng.randint(1, 120)]
        want = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, allowed_special="all") == want, text
        if "<|" not in text:  # no special token to treat as text: encode_ordinary is the same
            assert tok.encode_ordinary(text) == want, text
    end = END_OF_TURN[style]
    assert len(tok.encode_ordinary(end)) > 1  # special tokens: only when allowed
    with pytest.raises(ValueError):  # tiktoken's rule: a special token in encode() is an error
        tok.encode(f"a {end}")
    want = hf.encode(f"a {end} b", add_special_tokens=False).ids
    assert tok.encode(f"a {end} b", allowed_special={end}) == want
    if style == "qwen3":  # added tokens that are not special are matched, as Hugging Face does
        assert tok.encode_ordinary("<think>") == [hf.token_to_id("<think>")]


def test_prompt_ids_and_special_ids_match_transformers(tok_folder):
    from transformers import AutoTokenizer
    style, folder = tok_folder
    auto = AutoTokenizer.from_pretrained(folder)
    tok = get_tokenizer(str(folder))
    bos = tok.decode(tok.bos)  # Llama-3's, Gemma-3's, DeepSeek's; Qwen has none
    assert bool(bos) == (style in ("llama3", "gemma3", "deepseek"))
    for text in TEXTS:  # the BOS Llama-3 puts in front...
        if not (bos and text.startswith(bos)):
            assert tok.encode_prompt(text) == auto(text).input_ids, text
    if bos:  # ...once (a rendered chat template starts with it: see below)
        assert tok.encode_prompt(bos + "hi") == tok.encode_prompt("hi")
    assert tok.eos_token_id == auto.eos_token_id
    end_of_turn = END_OF_TURN[style]
    assert tok.eot_token == tok.end_of_turn_id == auto.convert_tokens_to_ids(end_of_turn)
    plain = get_tokenizer(str(folder), chat_template="none")
    assert plain.chat_template is None and not uses_chat(plain)
    assert plain.eot_token == plain.eos_token_id == auto.eos_token_id
    with pytest.raises(ValueError, match="chat_template must be 'auto' or 'none'"):
        get_tokenizer(str(folder), chat_template="yes")


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 東京"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


def test_chat_template_renders_like_apply_chat_template(tok_folder):
    from transformers import AutoTokenizer
    style, folder = tok_folder
    auto = AutoTokenizer.from_pretrained(folder)
    tok = get_tokenizer(str(folder))
    # transformers passes today's date to Llama-3's template; ours renders its fixed default
    extra = dict(date_string="26 Jul 2024", enable_thinking=False)
    for messages in CONVERSATIONS:
        text = tok.render_chat(messages)
        assert text == auto.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True, **extra)
        ids = auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                       return_dict=True, **extra)["input_ids"]
        assert tok.encode_prompt(text) == ids
    if style == "qwen3":
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # no thinking


def test_chat_prompts_and_masks_in_the_pipeline(tok_folder):
    style, folder = tok_folder
    tok = get_tokenizer(str(folder))
    cfg = SimpleNamespace(task="arith", arith_steps=2, arith_max_steps=0, arith_max_number=10,
                          arith_ops="+-", n_train=5, n_test=5, task_seed=0)
    plain = data.load_split(cfg, "train")
    chat = data.load_split(cfg, "train", tok)
    for p, c in zip(plain, chat):
        turn = [{"role": "user", "content": f"{p['question']}\n{data.CHAT_INSTRUCTION}"}]
        assert c["prompt"] == tok.render_chat(turn) and c["response"] == p["response"].lstrip()
    assert data.load_split(cfg, "train", get_tokenizer(str(folder), "none")) == plain
    rows, _ = data.encode_sft(chat, tok, max_len=512)
    batch = data.sft_batch(rows, pad_id=tok.eot_token)
    for b, (row, ex) in enumerate(zip(rows, chat)):
        assert row["prompt_ids"] == tok.encode_prompt(ex["prompt"])
        scored = batch["targets"][b][batch["loss_mask"][b]].tolist()
        assert scored == row["response_ids"] and scored[-1] == tok.end_of_turn_id
        assert tok.decode(scored[:-1]) == ex["response"]


def edited(folder, tmp_path, edit):
    """A copy of a tokenizer folder whose tokenizer.json went through edit(spec)."""
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    edit(spec)
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return str(out)


NOT_BYTE_LEVEL = {  # byte-level BPE tokenizers edited into other kinds
    "byte_fallback": lambda s: s["model"].update(byte_fallback=True),
    "metaspace": lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁",
                                                   "prepend_scheme": "always", "split": True}),
    "lowercase": lambda s: s.update(normalizer={"type": "Lowercase"}),
    "two_splits": lambda s: s["pre_tokenizer"]["pretokenizers"].insert(
        0, {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "Isolated",
            "invert": False}),
    "lstrip": lambda s: s["added_tokens"][1].update(lstrip=True),
}


@pytest.mark.parametrize("kind", sorted(NOT_BYTE_LEVEL))
@pytest.mark.parametrize("style", sorted(STYLES))
def test_a_tokenizer_json_of_another_kind_gives_hugging_faces_ids(tmp_path, style, kind):
    """Not refused, not approximated: the `tokenizers` library runs it, Hugging Face's ids."""
    from tokenizers import Tokenizer
    train_tokenizer(style, tmp_path / "base", vocab_size=400)
    folder = edited(tmp_path / "base", tmp_path, NOT_BYTE_LEVEL[kind])
    tok = get_tokenizer(folder)
    assert isinstance(tok, HFTokenizer)
    hf = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text, allowed_special="all") == \
            hf.encode(text, add_special_tokens=False).ids, text
    assert tok.chat_template is not None and tok.eot_token == tok.end_of_turn_id


def test_a_tokenizer_json_the_library_cannot_read_is_one_line(tok_folder, tmp_path):
    _, folder = tok_folder
    broken = edited(folder, tmp_path, lambda s: s["model"].update(type="NoSuchModel"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: the tokenizers library cannot read"):
        get_tokenizer(broken)


def test_missing_files_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        get_tokenizer(str(tmp_path))
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # real client, empty cache
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="hub cannot be reached.*pass its local folder"):
        get_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(ValueError, match="'gpt2', 'byte', or a Hugging Face folder or hub id"):
        get_tokenizer("qwen")


def test_has_hf_tokenizer(tok_folder, tmp_path):
    _, folder = tok_folder
    assert has_hf_tokenizer(str(folder))
    assert has_hf_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
    assert not has_hf_tokenizer("gpt2") and not has_hf_tokenizer("openai-community/gpt2")
    gpt2 = tmp_path / "gpt2"  # a GPT-2 folder keeps tiktoken's gpt2 encoding, as before
    shutil.copytree(folder, gpt2)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert not has_hf_tokenizer(str(gpt2))


@pytest.mark.parametrize("text,answer", [
    ("so 3+4=7.\nThe final answer is $\\boxed{7}$.", "7"),
    ("\\[\\boxed{1,080}\\] Note that 3 pens cost 12.", "1080"),       # numbers after the box
    ("first \\boxed{5}, then corrected: \\boxed{6}", "6"),           # the last box
    ("\\boxed{\\$18.00}", "18"),
    ("\\boxed{\\text{42 apples}}", "42"),                            # one level of nesting
    ("\\boxed{-3}", "-3"),
    ("#### 8\nso \\boxed{9}", "8"),                                   # GSM8K's #### comes first
])
def test_extract_answer_reads_boxed_answers(text, answer):
    assert data.extract_answer_ex(text) == (answer, False)
    assert data.is_correct(text, answer)
