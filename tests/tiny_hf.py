"""
Tiny Hugging Face checkpoints built on the spot (the hub is never contacted): tokenizers trained
with the `tokenizers` library in the styles of Qwen2.5 / Qwen3 and Llama-3 (byte-level BPE: their
split regexes, special tokens, chat templates), Gemma-3 (SentencePiece-style BPE with byte
fallback) and DeepSeek-Math (byte-level BPE after a Sequence of Split rules); random-init
LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and Gemma3ForCausalLM folders written by
transformers' save_pretrained, in the layout transformers 5 writes or in the hub's. Shared by
test_tokenizers_vs_hf.py, test_llama_qwen_vs_transformers.py and test_gemma_deepseek_vs_transformers.py.
"""

import json
import os

import torch

import data

QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5-Instruct's template, without its tool-calling branches
QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. '
        + 'You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
           or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3's way of switching thinking off, on a ChatML template
QWEN3_TEMPLATE = """{%- for message in messages %}
    {%- if message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'
            + message.content.lstrip('\\n') + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Llama-3.1/3.2-Instruct's template, without its tool-calling branches
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
        + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

STYLES = {  # split regex, NFC?, special tokens, non-special added tokens, template, bos, eos, pad
    "qwen2.5": (QWEN2_PAT, True, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                ["<tool_call>", "</tool_call>"], QWEN25_TEMPLATE, None, "<|im_end|>",
                "<|endoftext|>"),
    "qwen3": (QWEN2_PAT, True, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              ["<think>", "</think>"], QWEN3_TEMPLATE, None, "<|im_end|>", "<|endoftext|>"),
    "llama3": (LLAMA3_PAT, False, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                   "<|end_header_id|>", "<|eot_id|>"],
               [], LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", None),
}


def corpus():
    """Text to train the tiny tokenizers on: arithmetic problems, prose, unicode, code."""
    problems = [ex["prompt"] + ex["response"] for ex in data.generate_arith("train", n=300)]
    return problems + [
        "The quick brown fox jumps over the lazy dog. It's 3.14, isn't it? We'll see; I'm sure.",
        "héllo wörld Ünïcödé façade naïve 東京タワー ∑∫√ 😀🙂 e\u0301 — «quotes» ‘single’",
        "def f(x):\n    return x ** 2  # square\n\n\tindented\r\nwindows line\n" * 3,
        "$1,000,000 and 12.50% of 7/8 equals -0.4375; 2024-07-26 12:30:45",
        "Please reason step by step, and put your final answer within \\boxed{}.",
    ] * 5


def train_tokenizer(style, folder, vocab_size=700):
    """A tokenizer in `style` (STYLES' byte-level ones, gemma3 or deepseek), saved by transformers
    (tokenizer.json, tokenizer_config.json, chat_template.jinja); returns the transformers
    tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers
    from transformers import PreTrainedTokenizerFast
    if style == "gemma3":
        return train_gemma3_tokenizer(folder, vocab_size)
    if style == "deepseek":
        return train_deepseek_tokenizer(folder, vocab_size)
    pattern, nfc, specials, plain, template, bos, eos, pad = STYLES[style]
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(specials)  # after the vocabulary, as in the real checkpoints
    tok.add_tokens(plain)
    if bos:  # Llama-3's tokenizer puts <|begin_of_text|> before every text
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                 pad_token=pad)
    hf.chat_template = template
    hf.save_pretrained(folder)
    return hf


# Gemma-3's template (text turns only): the assistant is "model", a system message is put in
# front of the first user turn, every turn ends with <end_of_turn>
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# DeepSeek-Math-7B-Instruct's template: the reply ends with the end-of-text token itself
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}")
# DeepSeek's pre-tokenizer: newlines, letters, punctuation, trailing spaces and CJK split off in
# turn (simplified character classes), then single digits, then bytes
DEEPSEEK_SPLITS = [r"[\r\n]", r"\s?\p{L}+", r"\s?[!-/:-~]+", r"\s+$", r"[一-龥ࠀ-一가-퟿]+"]
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# every style: its end-of-turn token, and whether it NFC-normalizes (decode gives NFC text)
END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>",
               "gemma3": "<end_of_turn>", "deepseek": DEEPSEEK_EOS}
NFC = {"qwen2.5", "qwen3"}


def train_gemma3_tokenizer(folder, vocab_size=700):
    """Gemma-3's kind: BPE over "▁"-for-space text with byte fallback (<0x00>..<0xFF> in the
    vocabulary for characters it never saw), built by transformers' own GemmaTokenizer from a
    vocabulary and merges trained here; <start_of_turn>/<end_of_turn> and its chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer
    base = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    base.normalizer = normalizers.Replace(" ", "▁")
    base.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    base.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size,
                                                           show_progress=False))
    trained = json.loads(base.to_str())["model"]
    head = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *(f"<0x{b:02X}>" for b in range(256))]
    vocab = {token: i for i, token in enumerate(head)}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    hf = GemmaTokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]],
                        add_bos_token=True)  # (as the real tokenizer.json: <bos> in front)
    hf.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    hf.chat_template = GEMMA3_TEMPLATE
    hf.save_pretrained(folder)
    return hf


def train_deepseek_tokenizer(folder, vocab_size=700):
    """DeepSeek-Math's kind: byte-level BPE after a Sequence of Split rules and single digits
    (more than one regex), BOS in front, its chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, \
        trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DEEPSEEK_SPLITS]
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        *splits, pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([DEEPSEEK_BOS, DEEPSEEK_EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{DEEPSEEK_BOS} $A", special_tokens=[(DEEPSEEK_BOS, tok.token_to_id(DEEPSEEK_BOS))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=DEEPSEEK_BOS,
                                 eos_token=DEEPSEEK_EOS)
    hf.chat_template = DEEPSEEK_TEMPLATE
    hf.save_pretrained(folder)
    return hf


def randomize_(model, seed, std=0.2):
    """Every weight random (norm gains around 1), so a weight that is not loaded shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + ("norm" in name))
    return model.eval()


SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
MODELS = {  # the three families, each with what makes it differ from the others
    "llama": dict(num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16)),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=False),
}


def hf_model(kind, vocab_size, seed=1):
    """A random-init transformers model of one family (float32, eval mode)."""
    import transformers
    classes = dict(llama=(transformers.LlamaConfig, transformers.LlamaForCausalLM),
                   qwen2=(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                   qwen3=(transformers.Qwen3Config, transformers.Qwen3ForCausalLM))
    config_class, model_class = classes[kind]
    config = config_class(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **SHAPE,
                          **MODELS[kind])
    torch.manual_seed(0)
    return randomize_(model_class(config), seed)


def to_hub_layout(folder):
    """Rewrite a config.json from transformers 5's layout (rope_parameters) to the hub's
    (rope_theta and rope_scaling at the top level, torch_dtype), as the Llama/Qwen repos have it."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.pop("rope_type") == "llama3" else None
    if cfg["rope_scaling"]:
        cfg["rope_scaling"]["rope_type"] = "llama3"
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg.pop("layer_types", None)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


# Gemma-3 (text): every way it differs from Llama made to matter at this size: a window (8)
# shorter than the test sequences, local and global layers (pattern 2) with their own rotary
# bases, linear rope scaling on the global ones, query_pre_attn_scalar != head_dim, soft-capped
# logits (Gemma-2's knob, kept by Gemma3ForCausalLM), GQA, tied embeddings
GEMMA3 = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=12,
              sliding_window_pattern=2, rope_local_base_freq=100.0, rope_theta=1000.0,
              rope_scaling=dict(rope_type="linear", factor=4.0), final_logit_softcapping=5.0,
              bos_token_id=2, eos_token_id=1, pad_token_id=0)


def hf_gemma3(seed=1, **over):
    """A random-init transformers Gemma3ForCausalLM (float32, eval mode); `over` edits GEMMA3."""
    import transformers
    config = transformers.Gemma3TextConfig(**{**GEMMA3, **over})
    torch.manual_seed(0)
    return randomize_(transformers.Gemma3ForCausalLM(config), seed)


def gemma3_to_hub_layout(folder):
    """Rewrite a Gemma-3 config.json from transformers 5's layout (rope_parameters per kind of
    layer, layer_types) to the one the hub's gemma-3-1b files have: rope_theta, rope_scaling
    (the global layers'), rope_local_base_freq, sliding_window_pattern, torch_dtype."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    full, local = rope["full_attention"], rope["sliding_attention"]
    cfg["rope_theta"] = full.pop("rope_theta")
    cfg["rope_local_base_freq"] = local["rope_theta"]
    cfg["rope_scaling"] = full if full["rope_type"] != "default" else None
    kinds = cfg.pop("layer_types")
    cfg.pop("_sliding_window_pattern", None)
    cfg["sliding_window_pattern"] = kinds.index("full_attention") + 1
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
