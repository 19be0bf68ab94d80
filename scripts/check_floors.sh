#!/usr/bin/env bash
# The floors of requirements.txt and requirements-dev.txt are true: a fresh virtual environment
# with every direct dependency at its floor (each NAME>=X installed as NAME==X, with what they
# pull in at its newest) runs the smoke preset and the tests. CI installs the newest versions, so
# only this sees a floor that has become false (torch>=2.5 was: every script failed to import on
# 2.5, where fully_shard had another path).
#
#   scripts/check_floors.sh          # the unit tests (-m "not slow"): ~4 min; .ci/run calls it
#   scripts/check_floors.sh tests    # the whole suite (~25 min on 2 CPU cores): after a floor
#                                    # changes (the slow tests hold the version-sensitive parts
#                                    # of torch: torchrun, FSDP, torch.compile)
#
# A floor the others rule out (one a dependency needs higher) fails the install, naming both.
# Old torch builds on PyPI are CUDA builds: the first run downloads a few GB (uv caches them).
set -euo pipefail
cd "$(dirname "$0")/.."
(( $# )) || set -- -m "not slow" tests

venv=${FLOORS_VENV:-.venv-floors}
rm -rf "$venv"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q uv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

floors() {  # a requirements file with every NAME>=X as NAME==X; a line without a floor fails
    grep -vE '^[[:space:]]*(#|$)' "$1" | sed -E 's/[[:space:]]*#.*//' | while read -r line; do
        if [[ $line != *">="* ]]; then
            echo "check_floors: $1: '$line' has no floor (expected NAME>=VERSION)" >&2
            return 1
        fi
        echo "${line/>=/==}"
    done
}
floors requirements.txt > "$work/runtime.txt"
floors requirements-dev.txt > "$work/dev.txt"
"$py" -m uv pip install --python "$py" -q -r "$work/runtime.txt" -r "$work/dev.txt"

# the installed version of every direct dependency, on one line
names=$(sed -E 's/[^A-Za-z0-9._-].*//; s/[-_.]/[-_.]/g' "$work/runtime.txt" "$work/dev.txt" \
        | paste -sd '|')
echo "[floors] $("$py" -m uv pip freeze --python "$py" 2>/dev/null | grep -iE "^($names)==" \
                 | paste -sd ' ')"

"$py" train.py --preset smoke --out_dir "$work/run" > "$work/log" 2>&1 \
    || { tail -20 "$work/log"; exit 1; }
echo "[floors] the smoke preset ran"
"$py" -m pytest -q -p no:cacheprovider "$@"
echo "[floors] the floors hold"
