"""bench.py end to end on toy shapes (CPU): its report parses, and its numbers are sane. Not a
benchmark. And its flags: a bad one is one line naming it."""
import importlib.util
import math
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path.insert(0, SCRIPTS)
import bench  # noqa: E402  (scripts/bench.py)

# TRL's own calls into transformers 5 raise this deprecation warning; nothing bench.py can change
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LINE = re.compile(r"^([a-z0-9_]+): (n/a|[-+0-9.e]+|nan|inf)$")


def run_bench(capsys, *flags):
    """bench.main in this process (--inprocess: no interpreter start-ups, so the test stays
    fast). Bool flags stand alone: --toy is --toy true."""
    bench.main(["--device", "cpu", "--toy", "--inprocess", *flags])
    out = capsys.readouterr().out
    assert "| metric | nanoADPO | peer | ratio |" in out
    values = {}
    for line in out[out.index("| metric |"):].splitlines():
        m = LINE.match(line)
        if m:
            values[m.group(1)] = None if m.group(2) == "n/a" else float(m.group(2))
    return out, values


def test_logps_and_sampling_parts(capsys):
    pytest.importorskip("transformers")  # the sampling peer (HF generate) and the random checkpoint
    out, v = run_bench(capsys, "--parts", "logps,sampling")
    for name in ("sampling_speedup_vs_hf_generate", "sampling_speedup_vs_no_kv_cache",
                 "logps_speedup_vs_naive", "sampling_tokens_per_s", "hf_generate_tokens_per_s",
                 "no_kv_cache_tokens_per_s", "sampling_speedup_vs_hf_generate_llama_toy",
                 "bench_wall_s"):
        assert v.get(name) is not None and math.isfinite(v[name]) and v[name] > 0, (name, out)
    # in one process, at toy sizes, the allocator may reuse freed memory: the memory numbers only
    # have to parse
    for name in ("logps_peak_memory_ratio_vs_naive", "logps_peak_memory_mib",
                 "naive_logps_peak_memory_mib"):
        assert name in v, (name, out)
    assert "pref_step_speedup_vs_trl" not in v  # the part was not asked for


def test_preference_step_vs_trl(capsys):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed (bench-only peer: "
                    "pip install -r requirements-bench.txt)")
    out, v = run_bench(capsys, "--parts", "pref")
    for name in ("pref_step_speedup_vs_trl", "pref_step_memory_ratio_vs_trl",
                 "pref_step_tokens_per_s", "trl_pref_step_tokens_per_s"):
        assert v.get(name) is not None and v[name] > 0, (name, out)
    assert v["pref_step_mfu"] is None  # CPU: no peak FLOP/s to compare with


@pytest.mark.parametrize("flags, named", [(["--parts", "bogus"], "--parts"),
                                          (["--device", "tpu"], "--device"),
                                          (["--compile", "maybe"], "--compile"),
                                          (["--threads", "-1"], "--threads"),
                                          (["--threads", "two"], "--threads"),
                                          (["--models", "gpt2,gpt5"], "--models"),
                                          (["--quik"], "--quik")])
def test_a_bad_flag_is_one_line_naming_it(flags, named):
    with pytest.raises(ValueError) as e:  # (cli() prints it as one `error:` line)
        bench.main(flags)
    message = str(e.value)
    assert named in message and "\n" not in message, message
