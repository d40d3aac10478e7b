#!/usr/bin/env bash
# The benchmark of docs/benchmarks.md: the "Results: llama-1b, H100" table (training steps of the
# llama-1b shape on every length profile in the four modes, docs/results/bench-h100.jsonl) and the
# "Attention microbenchmark" table (docs/results/attention-h200.jsonl, docs/attention-h200.png).
# Needs one CUDA GPU with torch and transformers; matplotlib for the plot. From the repository root:
#
#   OUT=bench-out bash scripts/gpu_bench.sh
#
# It runs the three commands of docs/benchmarks.md "Commands" with this checkout's code, writes
# everything under $OUT (the GPU's name in gpu.txt, logs, JSON lines, the plot) and prints the step
# table last. --time-budget 400: no new profile x mode starts after 400 s (compilation included);
# TORCH_LOGS=recompiles lists any recompilation, and why, in bench.log. The packaged profiles are
# used, or the file named by $PREFIXPO_BENCH_PROFILES.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
TORCH_LOGS=recompiles python -m prefixpo.cli bench --profile all --model llama-1b \
    --steps 5 --warmup 2 --time-budget 400 --json "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1
echo "bench exit code $?"
python -m prefixpo.cli bench --attention --repeats 10 \
    --json "$OUT/attention.jsonl" --plot "$OUT/attention.png" > "$OUT/attention.log" 2>&1
echo "attention exit code $?"
tail -n 40 "$OUT/attention.log"
echo
if [ -s "$OUT/bench.jsonl" ]; then
    python -m prefixpo.cli bench --table-from "$OUT/bench.jsonl"
else
    echo "no step results; the end of $OUT/bench.log:"; tail -n 30 "$OUT/bench.log"
fi
