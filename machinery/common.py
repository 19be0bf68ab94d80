"""
Plumbing shared by train.py, eval.py and bench.py, so that each of them does these things one way:

    parse(Config, argv)      presets/NAME.json, then --key value flags, into a dataclass
    setup(device, dtype)     device, mixed precision, the DDP process group -> Run
    process_rank()           this process's rank under torchrun (0 alone): rank 0 writes the files
    peak_flops(device)       the GPU's dense bf16 peak, for MFU
    seed_for(...)            random draws as functions of (seed, stage, step, rank): no RNG state
    atomic_write(path, ...)  every file a run writes appears whole or not at all
    pin_inputs(out_dir, ...) a run folder pinned to the content of the inputs it read
    cli(main)                the command-line entry point: bad input is one line, no traceback
                             (under torchrun: from the first process to fail)

It imports nothing of the project.
"""
import argparse
import difflib
import glob
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import signal
import sys
import threading
import tokenize
import uuid
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, dataclass, fields, is_dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


class ConfigError(ValueError):
    """A bad flag, preset or run folder: the message names it and says what was expected."""


# -----------------------------------------------------------------------------
# flags: dataclass defaults < preset (or a run's config.json) < --key value


def convert(name, typ, value, text=False):
    """A flag's text (text=True), or a preset's (or a saved config's) JSON value, as the field's
    type; else a ConfigError naming it. Text is parsed ('2' -> 2, 'true' -> True); a JSON value
    must already be what it stands for: a bool is no int (nor an int a bool), a string no number,
    2.5 no int (a float field takes an int)."""
    if text and isinstance(value, str) and typ is not str:
        value = _from_text(name, typ, value)
    if typ is str and isinstance(value, str) and value.startswith("~"):
        # the one place paths are resolved: a shell leaves `--out_dir=~/x` (and a preset's
        # "~/x") unexpanded, and ~ must mean the same home in every flag that takes a path
        value = os.path.expanduser(value)
    if not (type(value) is typ or (typ is float and type(value) is int)):
        raise ConfigError(f"--{name} expects {typ.__name__}, got {value!r}")
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"--{name} must be a finite number, got {value}")
    return float(value) if typ is float else value


def _from_text(name, typ, text):
    """A flag's text as a bool, int or float (true/false, yes/no, on/off, 1/0 for a bool)."""
    if typ is bool:
        words = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}
        if text.lower() in words:
            return words[text.lower()]
    else:
        try:
            return typ(text)
        except (TypeError, ValueError, OverflowError):
            pass
    raise ConfigError(f"--{name} expects {typ.__name__}, got {text!r}")


def _read_preset(name):
    path = name if name.endswith(".json") else os.path.join(ROOT, "presets", f"{name}.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--preset {name}: no such preset file {path}")
    try:
        preset = read_json(path)
    except ValueError as e:
        raise ConfigError(f"preset {path}: not valid JSON ({e})") from None
    if not isinstance(preset, dict):
        raise ConfigError(f"preset {path}: expected a JSON object of Config fields, "
                          f"got {type(preset).__name__}")
    return {k: v for k, v in preset.items() if not k.startswith("_")}  # "_comment" keys


def _split_flags(argv, types):
    """['--a', '1', '--b=2', '--flag'] -> {'a': '1', 'b': '2', 'flag': True}. A bool field may
    stand alone (`--compile` is `--compile true`); every other flag takes a value."""
    flags, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags are --key value (see --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            bare = i + 1 == len(argv) or argv[i + 1].startswith("--")
            if bare and types.get(key) is not bool:
                raise ConfigError(f"--{key} needs a value")
            value = True if bare else argv[i + 1]
            i += 0 if bare else 1
        flags[key] = value
        i += 1
    return flags


def parse(cls, argv, base=None, presets=False):
    """An instance of the dataclass `cls` from its defaults, then `base` (e.g. a run's saved config;
    keys `cls` lacks are ignored), then --preset NAME (when `presets`), then the flags in argv.
    --help (or -h) prints the flags, generated from the dataclass, and exits."""
    types = {f.name: f.type for f in fields(cls)}
    if "--help" in argv or "-h" in argv:
        print(help_text(cls, presets))
        sys.exit(0)
    flags = _split_flags(list(argv), types)
    values = {k: v for k, v in (base or {}).items() if k in types}
    if presets and "preset" in flags:
        name = str(flags.pop("preset"))
        preset = _read_preset(name)
        for k in preset:
            if k not in types:
                raise ConfigError(f"preset {name}: unknown key {k!r} (expected a field of "
                                  f"{cls.__name__}){did_you_mean(k, types, quote=True)}")
        values.update(preset)
    for k, v in flags.items():
        if k not in types:
            raise ConfigError(f"unknown flag --{k} (expected one of the fields of {cls.__name__})"
                              f"{did_you_mean(k, types)}; see --help")
        values[k] = v
    return cls(**{k: convert(k, types[k], v, text=k in flags) for k, v in values.items()})


def did_you_mean(key, names, quote=False):
    """': did you mean --po_lr?' for a mistyped flag (difflib's close matches; a '-' for a '_',
    and 'learning_rate' for 'lr', count as no difference), or '' when nothing is close."""
    wanted = key.replace("-", "_")
    aliases = {n: n for n in names}
    aliases.update({n.replace("lr", "learning_rate"): n for n in names if "lr" in n.split("_")})
    close = [aliases[a] for a in difflib.get_close_matches(wanted, aliases, n=3, cutoff=0.6)]
    close += [n for n in names if n.endswith("_" + wanted)]  # --lr: sft_lr, po_lr, cdpo_lr
    close = list(dict.fromkeys(c for c in close if c != key))[:3]
    shown = [repr(c) if quote else f"--{c}" for c in close]
    return f": did you mean {' or '.join(shown)}?" if close else ""


def field_docs(cls):
    """{field: (section, comment)} from the source of the dataclass that defines each field (a
    base class's fields are read from the base): a field's comment is the one on its line and
    the comment lines aligned under it; its section, the `# section` comment line above it."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if is_dataclass(k)]):
        try:
            lines = inspect.getsource(klass).splitlines(keepends=True)
        except (OSError, TypeError):  # no source (e.g. defined in an interactive session)
            continue
        comments = {t.start[0]: t for t in tokenize.generate_tokens(iter(lines).__next__)
                    if t.type == tokenize.COMMENT}
        body = None  # the indentation of the class body
        section, last, last_col = None, None, None
        for lineno, line in enumerate(lines, 1):
            text = comments[lineno].string.lstrip("#").strip() if lineno in comments else ""
            field = re.match(r"( +)(\w+) *:", line)
            if field and field.group(2) in klass.__dataclass_fields__:
                body = len(field.group(1))
                last, last_col = field.group(2), comments.get(lineno, None)
                docs[last] = (section, text)
            elif lineno in comments and not line[:comments[lineno].start[1]].strip():
                col = comments[lineno].start[1]
                if last_col is not None and col == last_col.start[1]:  # a comment continued
                    docs[last] = (docs[last][0], f"{docs[last][1]} {text}")
                elif body is None or col == body:  # a section line (or its second line)
                    section = f"{section} {text}" if last is None and section else text
                    last, last_col = None, None
            elif line.strip():
                last_col = None
    return docs


def help_text(cls, presets=False):
    """The --help of a script whose flags are the fields of `cls`, grouped by the `# section`
    lines of its source, each with its comment and default (argparse formats it)."""
    script = os.path.basename(sys.argv[0]) or "script"
    doc = inspect.getdoc(cls) if cls.__doc__ else ""
    parser = argparse.ArgumentParser(
        prog=script, add_help=False, usage=f"%(prog)s{' [--preset NAME]' * presets} "
                                           f"[--key value | --key=value | --bool_flag] ...",
        description=(doc or "").replace("%", "%%"),
        epilog="A bool flag may stand alone (--compile is --compile true).")
    parser.add_argument("-h", "--help", action="store_true", help="show this message and exit")
    if presets:
        names = sorted(p[:-5] for p in os.listdir(os.path.join(ROOT, "presets"))
                       if p.endswith(".json"))
        parser.add_argument("--preset", metavar="NAME", help=f"presets/NAME.json (or a .json "
                            f"path) first; flags override it: {', '.join(names)}")
    docs, groups = field_docs(cls), {}
    for f in fields(cls):
        section, comment = docs.get(f.name, (None, ""))
        title = section or cls.__name__
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        default = f.default if f.default is not MISSING else None
        shown = f"(default: {default!r})" if default != "" else "(default: none)"
        metavar = "[BOOL]" if f.type is bool else getattr(f.type, "__name__", "VALUE").upper()
        groups[title].add_argument(f"--{f.name}", metavar=metavar,
                                   help=f"{comment} {shown}".strip().replace("%", "%%"))
    return parser.format_help()


def need(ok, message):
    """A one-line ConfigError unless ok: the validation idiom of every script."""
    if not ok:
        raise ConfigError(message)


# -----------------------------------------------------------------------------
# device, precision and data parallelism


@dataclass
class Run:
    device: str        # where the model lives: cpu, cuda:N, mps
    device_type: str   # cpu | cuda | mps (what torch.autocast wants)
    dtype: str         # the compute dtype: float32 | bfloat16 | float16 (fp16 needs a GradScaler)
    ctx: object        # torch.autocast(...) for the forward passes, or a no-op for float32
    rank: int = 0      # this process's rank under torchrun, and the number of processes
    world: int = 1

    @property
    def master(self):  # rank 0 prints and writes the files; every rank computes
        return self.rank == 0


def process_rank():
    """This process's rank under torchrun (0 in a single process): the one place it is read.
    Rank 0 prints and writes the files; it is known before setup() joins the process group.
    A RANK without a WORLD_SIZE that has room for it is no torchrun's: a leftover of a torchrun
    shell, under which this process would write nothing and wait for a rank 0 that never comes."""
    rank = os.environ.get("RANK", "0")
    world = os.environ.get("WORLD_SIZE", "1")
    need(rank.isdigit() and world.isdigit() and int(rank) < int(world),
         f"the environment has RANK={rank} and WORLD_SIZE={world}: expected RANK < WORLD_SIZE, "
         f"as torchrun sets them (unset RANK and WORLD_SIZE to run one process)")
    return int(rank)


def setup(device="auto", dtype="auto"):
    """Pick the device and precision, and join the process group under torchrun."""
    rank = process_rank()
    world = int(os.environ.get("WORLD_SIZE", 1))
    need(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is not None,
         f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    need(dtype in ("auto", "float32", "bfloat16", "float16"),
         f"--dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    need(not device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {device}: this machine has no CUDA GPU that torch can use "
         f"(expected --device auto or cpu)")
    need(device != "mps" or torch.backends.mps.is_available(),
         "--device mps: MPS is not available here (expected --device auto or cpu)")
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    device_type = device.split(":")[0]
    if dtype == "auto":  # bf16 where the GPU has it; fp16 on older GPUs; float32 elsewhere
        bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float16" if device_type == "cuda" else "float32"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext()
    if dtype != "float32":
        ctx = torch.autocast(device_type, dtype=getattr(torch, dtype))
    return Run(device, device_type, dtype, ctx, rank, world)


# dense bf16 tensor-core peak FLOP/s by GPU name, for MFU: the datasheets' figures without 2:4
# sparsity, which doubles them (H100 SXM: 989 TFLOP/s dense, 1,979 sparse); fp32 accumulation on
# the GeForce cards; fp16 for V100, which has no bf16. More specific names first: "H100 PCIe" must
# win over "H100", "GH200" over "H200".
GPU_PEAK_FLOPS = (
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12), ("gh200", 989e12),
    ("h200 nvl", 835e12), ("h200", 989e12), ("b200", 2250e12), ("a100", 312e12),
    ("a10g", 125e12), ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12), ("rtx 4090", 165e12),
    ("rtx 3090", 71e12), ("v100", 125e12),
)


def peak_flops(device=None):
    """Dense bf16 peak FLOP/s of a CUDA device (default: the current one) looked up by name;
    None if unknown (and on a CPU)."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)


def print0(*args, **kwargs):
    """print on rank 0 only (the others compute the same story), above any progress bar."""
    if process_rank() == 0:
        with tqdm.external_write_mode(file=kwargs.get("file", sys.stdout)):
            print(*args, **kwargs, flush=True)


class _Lines:
    """A log file's view of tqdm's redraws: each one a whole line, with no carriage returns."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text:
            self.f.write(text + "\n")

    def flush(self):
        self.f.flush()


def progress_bar(iterable=None, desc=None, *, disable=False, leave=True, **kwargs):
    """A tqdm bar on stderr (count, rate, elapsed, ETA) for a loop of known length. In a terminal
    it redraws in place; in a log file (stderr is not a terminal) it is a line at the start, at
    most one every 30 s, and one at the end, with no carriage returns."""
    if not sys.stderr.isatty():
        kwargs.update(file=_Lines(sys.stderr), mininterval=30, maxinterval=60, ascii=True)
        leave = True  # the line with the total time stays in the log
    return tqdm(iterable, desc=desc, disable=disable, leave=leave, dynamic_ncols=True, **kwargs)


def changed_flags(cfg):
    """'--sft_steps 0 --init_from F': the fields of a dataclass instance that differ from their
    defaults, as the flags that set them ('defaults' when none does)."""
    default = type(cfg)()
    changed = [f"--{f.name} {getattr(cfg, f.name)}" for f in fields(cfg)
               if getattr(cfg, f.name) != getattr(default, f.name)]
    return " ".join(changed) or "defaults"


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values):
    """A list of floats summed over all ranks (float64; every rank passes the same length)."""
    if not dist.is_initialized():
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors only
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj):
    """[rank 0's obj, rank 1's obj, ...] (just [obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def seed_for(*parts):
    """A 31-bit seed that is a pure function of its parts, e.g. seed_for(1337, "po", step, rank):
    the same in every process and every Python run (str hashes are salted; crc32 is not)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


# -----------------------------------------------------------------------------
# files: written atomically, read with errors that name the file


@contextmanager
def interrupts_deferred():
    """Hold Ctrl-C until the block is done. Python raises KeyboardInterrupt wherever it happens to
    be, even inside torch.save's C++ zip writer, which turns it into a RuntimeError and a traceback;
    a write finishes first instead. (Signal handlers live in the main thread only.)"""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # None: a handler set outside Python, which cannot be put back
        return
    caught = []
    signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(*caught[0])  # Python's own handler raises KeyboardInterrupt here, after the write
    elif caught and previous == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)


def atomic_write(path, write):
    """Call write(f) on a binary temp file beside `path`, fsync it, then rename it over `path`: a
    kill or a full disk leaves the previous file (or none), never half of one; Ctrl-C waits for the
    rename. The temp file of a write that was killed is removed by the next write of the file."""
    with interrupts_deferred():
        _atomic_write(path, write)


def _atomic_write(path, write):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        os.remove(stale)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: same folder, same file system
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        failed = write_failure(e)
        if failed:  # e.g. a full disk: say what is safe, in one line
            raise OSError(f"{path}: could not write it ({failed.strerror or failed}); nothing "
                          f"was changed: the previous version, if any, is intact") from None
        raise
    try:  # make the rename itself durable (POSIX; folders cannot be opened like this on Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_failure(e):
    """The OSError behind a failed write, or None. A full disk reaches torch.save's C++ zip writer
    as an OSError from the file's write(), which the writer turns into `RuntimeError: [enforce fail
    at inline_container.cc] ... unexpected pos`; the OSError stays on as its __context__."""
    while isinstance(e, RuntimeError):
        e = e.__cause__ or e.__context__
    return e if isinstance(e, OSError) else None


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def read_json(path):
    """The JSON in `path`; a broken file is a ValueError naming it."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_run_file(path):
    """A file a run wrote itself (JSON, or torch tensors for .pt). One that was damaged outside the
    run (truncated, emptied) is an error naming it and the way out: the run recomputes it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.endswith(".pt"):
            return torch.load(path, weights_only=True)
        return read_json(path)
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        reason = str(e).removeprefix(f"{path}: ").splitlines()[0][:120] if str(e) else "empty"
        raise ValueError(f"{path}: damaged ({reason}); delete it and re-run the same command to "
                         f"recompute it") from None


def write_jsonl(records, path):
    """Dicts one per line, atomically."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(lines.encode("utf-8")))


def append_jsonl(path, record):
    """One more line of a log (a kill mid-append tears the last line: see read_jsonl). A failed
    append (a full disk) names the file: the lines before it are intact."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as e:
        raise OSError(f"{path}: could not append to it ({e.strerror or e}); the lines before "
                      f"are intact (a torn last line is dropped when the run resumes)") from None


def read_jsonl(path, torn_tail=False):
    """A list of dicts, one JSON object a line: the one reader of JSON Lines (the run's own files,
    task and pair files). A line ends at "\n" only, as JSON Lines define it (str.splitlines also
    breaks at U+2028, U+0085, \\x0c..., which a JSON string may hold raw); blank lines are skipped,
    a UTF-8 BOM is ignored. A bad line is a ValueError naming the file and the (1-based) line.
    With torn_tail, reading stops at the first bad line instead: what a kill mid-append leaves."""
    out = []
    kind = os.path.splitext(str(path))[1][1:].lower() or "jsonl"  # a .json file may hold lines
    with open(path, encoding="utf-8-sig", errors="replace" if torn_tail else "strict",
              newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip(" \t\r\n"):  # JSON's whitespace
                continue
            try:
                row = json.loads(line, object_pairs_hook=unique_keys)
                problem = json_row_problem(row, "line")
            except json.JSONDecodeError as e:
                problem = f"invalid JSON, {e.msg}; expected one JSON object per line"
            except DuplicateKey as e:
                problem = str(e)
            if problem and torn_tail:
                break
            if problem:
                raise ValueError(f"{path}: could not read it as {kind} (line {lineno}: {problem})")
            out.append(row)
    return out


class DuplicateKey(ValueError):
    pass


def unique_keys(pairs):
    """json's object_pairs_hook: an object naming a field twice ({"chosen": "a", "chosen": "b"})
    is refused, not read as its last value (what json.loads does, silently)."""
    row = dict(pairs)
    if len(row) < len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKey(f"field {twice!r} appears twice in one object (expected each field "
                           f"once: which one is meant?)")
    return row


JSON_KINDS = {list: "a JSON array", str: "a JSON string", bool: "true or false", type(None): "null"}
SURROGATE = re.compile("[\ud800-\udfff]")


def json_row_problem(row, per):
    """What keeps a parsed JSON value from being a row of a table, or None: a row is an object
    whose strings are text. A lone UTF-16 surrogate (an escape like \\ud800 without the other
    half of its pair) parses in Python, but no UTF-8 file, Arrow table or tokenizer can hold it."""
    if not isinstance(row, dict):
        return f"{JSON_KINDS.get(type(row), 'a number')}; expected one JSON object per {per}"
    for key, value in row.items():
        lone = SURROGATE.search(key + json.dumps(value, ensure_ascii=False))
        if lone:
            return (f"field {key!r} holds a lone UTF-16 surrogate (\\u{ord(lone.group()):x}, "
                    f"half of a pair such as \\ud83d\\ude00), which is not text")
    return None


def file_digest(path):
    """The sha256 of a file's bytes (hex), or None if there is no such file."""
    if not os.path.isfile(path):
        return None
    return content_id("", [path])


def content_id(name, paths):
    """What identifies an input a run reads: the sha256 (hex) of its files' names and bytes, in
    order (the same files at another path have the same id), or, for an input that is not local
    files (the arith task, a hub id, 'scratch'), its name."""
    if not paths:
        return name
    h = hashlib.sha256()
    for path in paths:
        if len(paths) > 1:
            h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):  # (weight files are large: never read whole)
                h.update(chunk)
    return h.hexdigest()


def markdown_table(header, rows):
    """A GitHub-markdown table from a header list and row lists (cells formatted by str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_LOCKS = {}  # run folder -> the FileLock this process holds (released when it exits)


def lock_run_folder(out_dir):
    """One process (one torchrun job) per run folder: a second is refused, with the pid of the
    first. The lock is filelock's flock on DIR/.lock, which dies with its process, so a killed
    run never leaves the folder locked; the pid is kept beside it, in DIR/.lock.pid (filelock may
    truncate DIR/.lock each time a process tries it)."""
    if process_rank() != 0 or os.path.realpath(out_dir) in _LOCKS:
        return
    lock = FileLock(os.path.join(out_dir, ".lock"))
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock.acquire(timeout=0)
        with open(os.path.join(out_dir, ".lock.pid"), "w") as f:
            f.write(str(os.getpid()))
    except Timeout:  # (a TimeoutError: an OSError, so caught first)
        raise ConfigError(f"{out_dir} is in use by another run (pid {_lock_owner(out_dir)}): "
                          f"wait for it to end, or use another --out_dir") from None
    except OSError as e:  # e.g. a read-only folder
        lock.release()  # (a no-op if it was not taken)
        raise OSError(f"{out_dir}: cannot write in this run folder ({e.strerror or e}); a "
                      f"run writes its files there: use another --out_dir, or make it "
                      f"writable") from None
    _LOCKS[os.path.realpath(out_dir)] = lock


def _lock_owner(out_dir):
    """The pid in DIR/.lock.pid, or '?' where it cannot be read."""
    try:
        with open(os.path.join(out_dir, ".lock.pid")) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


# what a run folder may hold before a stage has computed anything
NOT_COMPUTED = (".lock", ".lock.pid", "config.json", "inputs.json", "tensorboard", "wandb")


def claim_run_folder(out_dir, config, free=(), defaults=None):
    """A run folder belongs to one config: a new folder gets config.json, an existing one must hold
    the same config (then the run resumes). Keys in `free` may differ between the runs of a folder
    (they change nothing a run computes: where it prints, when it checkpoints...); a key the saved
    config lacks counts as its value in `defaults` (a flag added since the run began changes
    nothing while it keeps its default). A folder whose run stopped before it computed anything
    (a model that failed to load, a bad task file) holds nothing to resume: a new config takes
    it. Rank 0 checks and writes; the other ranks wait for it."""
    if process_rank() == 0:
        need(not os.path.isfile(out_dir),
             f"--out_dir {out_dir} is a file (expected a run folder, new or to resume)")
        lock_run_folder(out_dir)
        path = os.path.join(out_dir, "config.json")
        others = sorted(set(os.listdir(out_dir)) - set(NOT_COMPUTED))
        diff = config_diff(path, config, free, defaults or {}) if os.path.exists(path) else None
        if diff is None:
            need(not others, f"{out_dir} holds files but no config.json ({', '.join(others[:4])}): "
                             f"nothing says which config made them; use another --out_dir")
            write_json(path, config)
        elif diff and not others:
            print(f"{out_dir}: the run there computed nothing (its config.json: {diff}); it "
                  f"starts anew with this config", flush=True)
            if os.path.exists(os.path.join(out_dir, "inputs.json")):  # (that config's inputs)
                os.remove(os.path.join(out_dir, "inputs.json"))
            write_json(path, config)
        else:
            need(not diff, f"{out_dir} holds a run with a different config ({diff}); use "
                           f"another --out_dir, or the same flags to resume it")
            print(f"resuming the run in {out_dir}", flush=True)
    barrier()


def pin_inputs(out_dir, inputs):
    """A run is pinned to the inputs it reads by their content: DIR/inputs.json keeps the
    content_id of each (its task file, the model it starts from...) from the first run of the
    folder that read it, and a later run whose input holds other content is refused before any
    work (the same content at another path is fine). inputs: {flag: (its value, its content_id,
    or None where there is nothing to check now)}. Rank 0 checks and writes; the others wait."""
    path = os.path.join(out_dir, "inputs.json")
    if process_rank() == 0:
        pinned = read_run_file(path) if os.path.exists(path) else {}
        for flag, (value, now) in inputs.items():
            then = pinned.get(flag)
            if then is None or now is None or then == now:
                continue
            short = [x[:12] + "…" if re.fullmatch(r"[0-9a-f]{64}", x) else x for x in (then, now)]
            raise ConfigError(f"--{flag} {value}: not what this run read from it before (content "
                              f"{short[0]} then, {short[1]} now; see {path}): its stages would "
                              f"mix the two; restore it, or start a new run with another "
                              f"--out_dir")
        new = {flag: now for flag, (_, now) in inputs.items() if now is not None}
        if {**pinned, **new} != pinned:
            write_json(path, {**pinned, **new})
    barrier()


def config_diff(path, config, free, defaults):
    """'lr: 0.1 -> 0.2, ...': how `config` differs from the run config in `path` ('' if not)."""
    try:
        saved = read_json(path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: not a readable run config ({e}); use another --out_dir")
    need(isinstance(saved, dict),
         f"{path}: not a run config (expected a JSON object); use another --out_dir")
    saved = {**defaults, **saved}
    diff = {k: (saved.get(k), v) for k, v in config.items() if k not in free and saved.get(k) != v}
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


# -----------------------------------------------------------------------------
# the command line


def first_to_fail():
    """Whether this process is the first of its torchrun job to fail: that one says why, and the
    others exit quietly (they fail the same way on the same flags and files, or fail because it
    left: gloo's "Connection closed by peer"). Counted in the job's key-value store, which torchrun
    serves at MASTER_ADDR:MASTER_PORT for its whole life; one process, or no store: True."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return True
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=5))
        key = f"nanoadpo/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        return store.add(key, 1) == 1
    except Exception:  # no store to ask (a launcher other than torchrun): every process reports
        return True


def peer_gone(e):
    """Whether `e` is what a collective raises when another process of the job is gone: gloo's
    "Connection reset by peer" (or "closed by peer") as a RuntimeError, or a DistNetworkError.
    (A DistBackendError may be this process's own failure, e.g. its GPU's: not this.)"""
    gloo = isinstance(e, RuntimeError) and "gloo" in str(e) and " by peer" in str(e)
    return dist.is_initialized() and (gloo or isinstance(e, dist.DistNetworkError))


def stopped_by_torchrun(signum, frame):
    """SIGTERM under torchrun: it stops the others when one process fails. When that one was
    SIGKILLed it said nothing, and this one may hear the SIGTERM before its own collective fails,
    so this one says why (or nothing, when the failed one already did). Then exit at once, as the
    default action would: what was saved is intact, as after any kill. (Python runs this handler
    between bytecodes: a process stuck inside one C call is SIGKILLed by torchrun 30 s later.)"""
    if first_to_fail():
        print("error: torchrun stopped this process: another process of this torchrun job died "
              "(killed: out of memory? torchrun's report below names it and its signal), or the "
              "job itself was stopped; what was saved is intact: the same command resumes the "
              "run", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def cli(main):
    """Run main() as a script: bad input (files, flags, numerics) is one `error:` line, exit 1;
    under torchrun, one line from the first process to fail."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        signal.signal(signal.SIGTERM, stopped_by_torchrun)
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        if first_to_fail():
            print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # exit at once: torch's threads may not survive the usual teardown
        if process_rank() == 0:  # (a terminal's Ctrl-C reaches every process)
            print("\ninterrupted: what was saved is intact; the same command resumes the run",
                  file=sys.stderr, flush=True)
        os._exit(130)
    except Exception as e:  # a bug: its traceback, unless another process failed and said why
        if not first_to_fail():
            sys.exit(1)
        if peer_gone(e):  # one that was killed (SIGKILL: the out-of-memory killer) says nothing
            print("error: another process of this torchrun job died while this one waited for it "
                  "(killed: out of memory? torchrun's report below names it and its signal); what "
                  "was saved is intact: the same command resumes the run", file=sys.stderr)
            sys.exit(1)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
