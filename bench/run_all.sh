#!/usr/bin/env bash
# Run every benchmark, each writing bench/results/NAME.json, then draw bench/results/ratios.png.
#
#   bench/run_all.sh            # the full measurements (run on an otherwise idle machine)
#   bench/run_all.sh --quick    # a smoke test in seconds, written to bench/results/quick/
#
# Any other arguments (e.g. --threads 1) are passed to every benchmark. PYTHON picks the
# interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-.venv/bin/python}
results=bench/results
for arg in "$@"; do
    if [[ $arg == --quick ]]; then results=bench/results/quick; fi
done
mkdir -p "$results"

run() {  # run NAME SCRIPT ARGS...: the script's JSON to $results/NAME.json, written whole
    local name=$1 script=$2
    shift 2
    echo "== $name" >&2
    "$python" "$script" "$@" > "$results/$name.json.tmp"
    mv "$results/$name.json.tmp" "$results/$name.json"
}

run train_eager bench/train_throughput.py "$@"
run train_compile bench/train_throughput.py --compile "$@"
run generate bench/generate.py --shape all "$@"
run generate_compile bench/generate.py --shape all --compile "$@"
run generate_tied bench/generate.py --shape all --tied "$@"
run decode_kernels bench/decode_kernels.py "$@"
run chinchilla_fit bench/chinchilla_fit.py "$@"
run moe bench/moe.py "$@"  # ~3.5 hours: two 6,000-step runs of micro, then three seeds of
                           # five 3,000-step runs (distillation)
"$python" bench/plot.py --results "$results"
