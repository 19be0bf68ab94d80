#!/usr/bin/env bash
# One GPU session's numbers from one command, inside 9 minutes of wall time, all in one file.
#
#   bash scripts/gpu_check.sh                 # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --dry-run       # the same steps at CPU size (the test suite runs it)
#
# Options: --out FILE (default out/gpu_check.md), --wheels DIR (install offline from a folder of
# wheels: pip --no-index --find-links DIR), --budget SECONDS (default 540; dry run 840).
#
# The steps, in order:
#   environment           the GPU, its driver, the versions, the peak FLOP/s MFU is measured against
#   install               the README's way: pip install -r requirements.txt -r requirements-dev.txt
#                         -r requirements-bench.txt (already satisfied: a no-op)
#   gpu-tests             the GPU-only tests (pytest -m cuda), their printed numbers kept (-s)
#   bench-gpt2            scripts/bench.py --device cuda --quick on GPT-2 124M: the preference step
#                         (compiled) vs TRL: tokens/s, MFU, peak memory; the log-probs' memory
#   sampling-gpt2         its sampling vs HF generate: eager, and the compiled decode step
#   bench-gpt2-medium,    the same on gpt2-medium and on a Qwen2.5-0.5B shape, eager (compiling
#   sampling-gpt2-medium, each would not fit the time)
#   bench-qwen2.5-0.5b,
#   sampling-qwen2.5-0.5b
#   qwen-preference-step  the Qwen2.5-0.5B-shaped preference step of the qwen25_05b_gsm8k preset
#   arith-gpu-sweep       a shortened arith_gpu sweep and its projected full time
#                         (scripts/sweep_timing.py)
# Each step has a time box and fails soft: its status, seconds, command and output go to the
# results file and the next step runs, so that one short session gets every number it can. The
# dry run gives every step CPU sizes (toy shapes, a tiny sweep), so each is exercised before a GPU
# is; there a missing bench-only peer (trl) fails the install step alone.
set -u
cd "$(dirname "$0")/.." || exit 1

DRY=0
OUT=out/gpu_check.md
WHEELS=""
BUDGET=""
while (( $# )); do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT=$2; shift ;;
        --wheels) WHEELS=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        *) echo "error: unknown option $1 (expected --dry-run, --out FILE, --wheels DIR," \
                "--budget SECONDS)" >&2; exit 2 ;;
    esac
    shift
done
(( DRY )) && BUDGET=${BUDGET:-840} || BUDGET=${BUDGET:-540}
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
START=$(date +%s)
DEADLINE=$(( START + BUDGET ))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"
{
    echo "# gpu_check: $( (( DRY )) && echo "dry run (CPU sizes)" || echo "GPU run" )"
    echo
    echo "started $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET}s, commit" \
         "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$OUT"

step() {  # step NAME SECONDS COMMAND...: COMMAND under a time box; its report appended to $OUT
    local name=$1 box=$2
    shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left < 15 )); then
        printf '\n## %s: SKIPPED (%ss of the budget left)\n' "$name" "$left" >> "$OUT"
        echo "[gpu_check] $name: skipped, out of time"
        return
    fi
    (( box > left )) && box=$left
    local t0 log="$WORK/$name.log"
    t0=$(date +%s)
    echo "[gpu_check] $name (at most ${box}s) ..."
    timeout --kill-after=10 "$box" "$@" > "$log" 2>&1  # (timeout signals the process group)
    local rc=$? status=ok took=$(( $(date +%s) - t0 )) command="$*"
    if (( rc == 124 || rc == 137 )); then status="TIMED OUT"; elif (( rc )); then status=FAILED; fi
    command=${command//$'\n'/ }
    (( ${#command} > 300 )) && command="${command:0:300} ..."
    {
        printf '\n## %s: %s (exit %s, %ss of %ss)\n\n    $ %s\n\n```\n' \
               "$name" "$status" "$rc" "$took" "$box" "$command"
        grep -a -v -E '^(Writing model shards|Loading weights)|it/s\]' "$log" | tail -n 150
        printf '```\n'
    } >> "$OUT"
    echo "[gpu_check] $name: $status (${took}s)"
}

ENVIRONMENT='
import platform, shutil, subprocess
from importlib import metadata
import torch
from machinery.common import peak_flops
if shutil.which("nvidia-smi"):
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"]
    print(subprocess.run(query, capture_output=True, text=True).stdout.strip())
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
print("device:", torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} thr.")
print("peak_flops_bf16:", peak_flops() if cuda else "n/a (cpu)")
for name in ("transformers", "trl", "accelerate", "datasets", "tiktoken", "safetensors"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
'

PIP=("$PY" -m pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-bench.txt)
[[ -n $WHEELS ]] && PIP+=(--no-index --find-links "$WHEELS")
if (( DRY )); then  # resolve against what is installed, download nothing
    [[ -z $WHEELS ]] && PIP+=(--no-index)
    PIP+=(--dry-run)
    DEVICE=(--device cpu --toy)
    SHAPES=(toy toy llama-toy)  # at CPU size: toy shapes in the GPU shapes' places
    COMPILE=(false true false false false false)  # (the decode step compiles; the rest is eager)
    QWEN_STEP=preference_step_runs_in_bf16_with_activation_checkpointing
    SWEEP=(--n_layer 1 --n_head 2 --n_embd 32 --block_size 128 --max_len 128 --arith_steps 1
           --arith_max_number 5 --n_train 200 --n_test 16 --sft_steps 8 --sft_batch_size 16
           --n_pair_questions 16 --max_new_tokens 32 --po_batch_size 4 --eval_batch_size 64
           --dtype float32 --compile false --pairs_source offline)
    BOX=(20 60 120 150 200 120 120 120 120 60 240)
else
    DEVICE=(--device cuda --quick)
    SHAPES=(gpt2 gpt2-medium qwen2.5-0.5b)
    COMPILE=(true true false false false false)  # compiling the larger two would not fit
    QWEN_STEP=qwen25_05b_shape_preference_step_in_bf16
    SWEEP=(--sft_steps 300 --n_test 500 --n_pair_questions 512)
    BOX=(15 30 50 90 70 45 35 55 40 30 80)
fi

step environment "${BOX[0]}" "$PY" - <<< "$ENVIRONMENT"  # (the report above, on stdin)
step install "${BOX[1]}" "${PIP[@]}"
step gpu-tests "${BOX[2]}" "$PY" -m pytest -q -rs -s -m cuda -k "not qwen25_05b_shape" tests
# each shape's preference step (and log-probs) and its sampling are steps of their own: a time-out
# costs one report, not both
NAMES=(gpt2 gpt2-medium qwen2.5-0.5b)
for i in 0 1 2; do
    parts=pref
    (( i == 0 )) && parts=pref,logps
    step "bench-${NAMES[i]}" "${BOX[3 + 2 * i]}" "$PY" scripts/bench.py "${DEVICE[@]}" \
        --models "${SHAPES[i]}" --parts "$parts" --compile "${COMPILE[2 * i]}"
    step "sampling-${NAMES[i]}" "${BOX[4 + 2 * i]}" "$PY" scripts/bench.py "${DEVICE[@]}" \
        --models "${SHAPES[i]}" --parts sampling --compile "${COMPILE[2 * i + 1]}"
done
step qwen-preference-step "${BOX[9]}" "$PY" -m pytest -q -rs -s tests/test_llama_qwen_vs_transformers.py -k "$QWEN_STEP"
step arith-gpu-sweep "${BOX[10]}" "$PY" scripts/sweep_timing.py --preset arith_gpu \
    --out_dir "$WORK/arith" --compare dpo,adpo:adaptive:256 --seeds 0 "${SWEEP[@]}"

printf '\n---\ntotal: %ss of wall time (budget %ss)\n' "$(( $(date +%s) - START ))" "$BUDGET" \
    >> "$OUT"
echo "[gpu_check] every number is in $OUT"
