"""
Tokenizers: one interface (tiktoken's Encoding: encode_ordinary, encode, decode, n_vocab,
eot_token) whatever backs it.

    get_tokenizer("byte")     one token per UTF-8 byte + <|endoftext|> (257): digits are tokens
    get_tokenizer("gpt2")     GPT-2's BPE (50257), tiktoken's own
    get_tokenizer(folder)     a Hugging Face checkpoint's tokenizer.json with its chat template,
                              run by the `tokenizers` library (Hugging Face's own: its ids for
                              every kind, byte-level BPE as Llama-3.x's and Qwen's, Gemma-3's
                              SentencePiece-style BPE with byte fallback, DeepSeek's several
                              split rules) behind the same interface

A chat template is rendered the way transformers renders it (a Jinja sandbox), and the token that
closes an assistant turn becomes the EOS every response ends with.
"""

import json
import os
import re

import tiktoken

from machinery.common import read_json
from machinery.hf import TOKENIZER_FILES, hub_download, is_gpt2, is_hub_id  # the one hub client

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TOKENIZERS = ("gpt2", "byte")


def get_tokenizer(name="gpt2", chat_template="auto"):
    """'gpt2': GPT-2's BPE (50257 tokens). 'byte': one token per UTF-8 byte + <|endoftext|>=256
    (257 tokens), so every digit is its own token and digit-level arithmetic is learnable.
    A Hugging Face folder or hub id (Llama-3.x, Qwen2.5, Qwen3, Gemma-3...): its tokenizer.json
    as an HFTokenizer (below); chat_template: auto (use the checkpoint's, if it has one) | none."""
    if name == "gpt2":
        return tiktoken.get_encoding("gpt2")
    if name == "byte":
        return tiktoken.Encoding(name="byte", pat_str=GPT2_PAT,
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    if chat_template not in ("auto", "none"):
        raise ValueError(f"chat_template must be 'auto' or 'none', got {chat_template!r}")
    if os.path.isdir(name):
        return HFTokenizer(name, os.path.abspath(name), chat_template)
    if is_hub_id(name):
        folder = hub_download(name, ("config.json", *TOKENIZER_FILES))
        return HFTokenizer(folder, name, chat_template)
    raise ValueError(f"unknown tokenizer {name!r} "
                     f"(choices: {', '.join(repr(t) for t in TOKENIZERS)}, "
                     f"or a Hugging Face folder or hub id with a tokenizer.json)")


def has_hf_tokenizer(source):
    """Whether a model source brings its own Hugging Face tokenizer: a folder with a tokenizer.json,
    or a hub id, other than a GPT-2's (GPT-2 keeps tiktoken's "gpt2" encoding)."""
    if os.path.isdir(source):
        config = os.path.join(source, "config.json")
        gpt2 = os.path.isfile(config) and read_json(config).get("model_type", "gpt2") == "gpt2"
        return os.path.isfile(os.path.join(source, "tokenizer.json")) and not gpt2
    return is_hub_id(source) and not is_gpt2(source)


def _byte_decoder():
    """GPT-2's byte <-> unicode table, reversed: byte-level BPE writes every byte as a printable
    character (printable ASCII and Latin-1 as themselves, the rest from U+0100 on; a space is
    'Ġ'); this maps each such character back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


BYTE_DECODER = _byte_decoder()


class HFTokenizer:
    """A Hugging Face checkpoint's tokenizer.json, run by the `tokenizers` library (what
    transformers' fast tokenizers run), so its ids are Hugging Face's by construction, behind
    tiktoken's interface: encode_ordinary, encode, decode, n_vocab, eot_token,
    special_tokens_set (every added token), encode_single_token. From the checkpoint's configs it
    also knows
        eos_token_id     end of text (tokenizer_config.json's eos_token, or config.json's)
        end_of_turn_id   the token the chat template closes an assistant turn with
        eot_token        what every response ends with and generation stops at: end_of_turn_id
                         while the chat template is used, eos_token_id otherwise
        chat_template    the Jinja source in use (None: plain prompts)
        bos              the ids Hugging Face puts before a text (Llama-3's <|begin_of_text|>)
    As in Hugging Face, encode_ordinary matches the added tokens that are not special (Qwen3's
    <think>) and reads special ones as text; special tokens only come from
    encode(..., allowed_special) and encode_prompt."""

    def __init__(self, folder, name, chat_template="auto"):
        from tokenizers import Tokenizer  # (only a Hugging Face model needs it)
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no tokenizer.json (the file Hugging Face's fast "
                                    f"tokenizers are saved in)")
        spec = read_json(path)  # a broken file names itself
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the library's own parser: a message of its own, from Rust
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
            raise ValueError(f"{path}: the tokenizers library cannot read it ({reason})") from None
        self.name = name
        added = spec.get("added_tokens") or []
        self._special_tokens = {t["content"]: t["id"] for t in added}  # tiktoken's name for them
        self._plain_added = {t["content"] for t in added if not t.get("special")}
        self.n_vocab = max(self._tok.get_vocab().values(), default=-1) + 1  # the largest id + 1
        self.bos = _bos_ids(spec)
        self._read_configs(folder, path, chat_template)

    def _read_configs(self, folder, path, chat_template):
        """The end-of-text id and the chat template (and its end-of-turn id) from the configs."""
        configs = _token_configs(folder)
        self.eos_token_id = self._id_of(configs, "eos_token", path)
        self.chat_template = None
        self.end_of_turn_id = None
        if chat_template == "auto":
            self.chat_template = _chat_template_source(folder)
        if self.chat_template is not None:
            self._template = _compile_template(self.chat_template, path)
            self._template_tokens = {k: v for k, v in configs.items() if k.endswith("_token")}
            self.end_of_turn_id = self._end_of_turn(path)

    @property
    def eot_token(self):
        return self.end_of_turn_id if self.chat_template is not None else self.eos_token_id

    @property
    def special_tokens_set(self):
        return set(self._special_tokens)

    def _ids(self, text, specials):
        """The library's ids; specials=False reads special tokens as plain text."""
        self._tok.encode_special_tokens = not specials
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text):
        return self._ids(text, specials=False)

    def encode(self, text, *, allowed_special=frozenset(), disallowed_special="all"):
        """tiktoken's rules: a special token in the text is an error unless allowed."""
        if allowed_special == "all":
            return self._ids(text, specials=True)
        special = self.special_tokens_set - self._plain_added
        allowed = set(allowed_special) & special
        banned = special - allowed if disallowed_special == "all" else set(disallowed_special)
        found = next((t for t in sorted(banned) if t in text), None)
        if found is not None:
            raise ValueError(f"{self.name}: the text holds the special token {found!r}; pass "
                             f"allowed_special to encode it as one")
        if not allowed:
            return self._ids(text, specials=False)
        ids = []  # the allowed special tokens as their ids, the text between them as text
        for piece in re.split("(" + "|".join(map(re.escape, allowed)) + ")", text):
            ids += [self._special_tokens[piece]] if piece in allowed else self._ids(piece, False)
        return ids

    def encode_single_token(self, text):
        return self._special_tokens.get(text, self._tok.token_to_id(text))

    def decode(self, tokens, errors="replace"):
        return self._tok.decode(list(tokens), skip_special_tokens=False)

    def encode_prompt(self, prompt):
        """A prompt's ids as Hugging Face makes them: the special tokens a chat template wrote
        (<|im_start|>, ...) as their ids, and the BOS in front unless the text starts with it."""
        ids = self.encode(prompt, allowed_special="all")
        return ids if ids[:len(self.bos)] == self.bos else self.bos + ids

    def render_chat(self, messages, add_generation_prompt=True):
        """The chat template rendered like transformers' apply_chat_template(tokenize=False).
        decision: enable_thinking=False, so Qwen3 answers without a <think> block (the other
        templates ignore it); strftime_now is left undefined, so Llama-3's template writes its
        fixed default date and a prompt never depends on the day a run starts."""
        import jinja2
        try:
            return self._template.render(messages=messages, enable_thinking=False,
                                         add_generation_prompt=add_generation_prompt,
                                         **self._template_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.name}: the chat template failed: {e}") from None
        except Exception as e:  # a Python-level bug in the template (1 / 0, a bad method call)
            raise ValueError(f"{self.name}: the chat template failed: "
                             f"{type(e).__name__}: {e}") from None

    def _id_of(self, configs, key, path):
        """The id of a token the configs name as text (tokenizer_config.json) or as an id (or a
        list of ids, the first being the main one: config.json, generation_config.json)."""
        if isinstance(configs.get(key), str):
            ids = self.encode(configs[key], allowed_special="all")
        else:
            ids = configs.get(key + "_id")
            ids = ids[:1] if isinstance(ids, list) else [ids]
        if len(ids) != 1 or not isinstance(ids[0], int):
            raise ValueError(f"{path}: no single token for {key} (expected tokenizer_config.json's "
                             f"{key} or config.json's {key}_id)")
        return ids[0]

    def _end_of_turn(self, path):
        """The special token that follows an assistant's reply in the rendered template."""
        mark = "xq7 zv9"  # a reply no template rewrites
        text = self.render_chat([{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": mark}], False)
        after = text[text.rfind(mark) + len(mark):].lstrip() if mark in text else ""
        ends = [t for t in self.special_tokens_set if after.startswith(t)]
        if not ends:
            raise ValueError(f"{path}: the chat template closes an assistant turn with no "
                             f"special token (expected e.g. <|im_end|> or <|eot_id|>); "
                             f"use --chat_template none")
        return self._special_tokens[max(ends, key=len)]


def _bos_ids(spec):
    """The special tokens tokenizer.json's post-processor puts before a text (Llama-3: BOS)."""
    post = spec.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            ids = []
            for piece in step.get("single", []):
                if "Sequence" in piece:
                    return ids
                ids += step["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
    return []


def _token_configs(folder):
    """bos_token, eos_token, pad_token... as text, from tokenizer_config.json and
    special_tokens_map.json, else from the ids in config.json / generation_config.json."""
    out = {}
    for name in ("generation_config.json", "config.json"):  # ids, where no text names them
        if os.path.isfile(os.path.join(folder, name)):
            cfg = read_json(os.path.join(folder, name))
            out.update({k: v for k, v in cfg.items() if k.endswith("_token_id") and v is not None})
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(folder, name)):
            cfg = read_json(os.path.join(folder, name))
            for k, v in cfg.items():
                if k.endswith("_token") and isinstance(v, (str, dict)):
                    out[k] = v["content"] if isinstance(v, dict) else v
    return out


def _chat_template_source(folder):
    """The chat template where transformers saves it: chat_template.jinja, chat_template.json,
    or tokenizer_config.json (a string, or a list of named templates: 'default'); else None."""
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        template = read_json(path).get("chat_template") if os.path.isfile(path) else None
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if template:
            return template
    return None


def _compile_template(source, path):
    """A chat template compiled the way transformers does: a sandbox, trim_blocks, lstrip_blocks,
    loop controls, raise_exception() and a tojson filter that keeps non-ASCII text."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False,
                                                                    indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"{path}: the chat template does not compile: {e}") from None


def encode_prompt(tok, prompt):
    """A prompt's token ids. gpt2 / byte: plain text. A Hugging Face tokenizer: its BOS in front
    (Llama-3 has one) and the special tokens a chat template wrote as their ids."""
    if isinstance(tok, HFTokenizer):
        return tok.encode_prompt(prompt)
    return tok.encode_ordinary(prompt)


def encode_response(tok, text):
    """A response's token ids, by the rule prompts follow (encode_prompt) less the BOS: with a
    Hugging Face tokenizer, special-token text (<|im_start|>, <|endoftext|>...) is its special
    token, as transformers' tokenizer(text) and TRL make it, so a special token the model sampled
    (decoded to its text in the samples and pair files) is the token trained on and exported.
    GPT-2's and the byte tokenizer have one special token, the EOS, which ends a sample and is
    never part of its text."""
    if isinstance(tok, HFTokenizer):
        return tok.encode(text, allowed_special="all")
    return tok.encode_ordinary(text)


def uses_chat(tok):
    """Whether prompts go through a chat template (a Hugging Face tokenizer that has one, and
    --chat_template auto)."""
    return isinstance(tok, HFTokenizer) and tok.chat_template is not None
