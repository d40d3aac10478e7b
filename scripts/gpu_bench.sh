#!/usr/bin/env bash
# The benchmark of docs/benchmarks.md in one run of under 10 minutes (compilation included):
# training steps of llama-1b on every profile in the four modes, then the attention
# microbenchmark. Run from the repository root on a GPU machine (torch + transformers
# installed, package not installed, no network). Uses the packaged profiles (or
# $PREFIXPO_BENCH_PROFILES); writes everything under $OUT.
# The step table is printed last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
# soft budget 400 s (no new profile x mode starts after it), hard stop 470 s; TORCH_LOGS lists
# any recompilation (and why) in bench.log
TORCH_LOGS=recompiles timeout 470 python -m prefixpo.cli bench --profile all --model llama-1b \
    --steps 5 --warmup 2 --time-budget 400 --json "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1
echo "bench exit code $?"
timeout 100 python -m prefixpo.cli bench --attention --repeats 10 \
    --json "$OUT/attention.jsonl" --plot "$OUT/attention.png" > "$OUT/attention.log" 2>&1
echo "attention exit code $?"
tail -n 40 "$OUT/attention.log"
echo
if [ -s "$OUT/bench.jsonl" ]; then
    python -m prefixpo.cli bench --table-from "$OUT/bench.jsonl"
else
    echo "no step results; the end of $OUT/bench.log:"; tail -n 30 "$OUT/bench.log"
fi
