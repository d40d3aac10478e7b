#!/usr/bin/env bash
# Bisect the step-1 disagreement between policy and reference under FSDP2 on the GPU
# (docs/benchmarks.md "Several GPUs": loss 137 instead of log 2). One GPU is enough: FSDP2 on 1 GPU
# shows it. Each variant trains 1 step of llama-1b (random weights saved to disk) on capybara-length
# data; the trainer stops at step 1 with "disagree by X%" when the two differ (train.check_start_agreement),
# so each log's last lines tell which path is broken. First, scripts/gpu_fsdp_probe.py compares one
# batch's log-probs through every model path (plain, sharded, accelerate-prepared; flex and sdpa; grad). Run from the repository root with .data/ and
# .whl/ present: OUT=$OUT bash scripts/gpu_fsdp_bisect.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bisect-out}
PY=${PY:-python3}
MODEL=/tmp/llama-1b
mkdir -p "$OUT"
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
export PREFIXPO_CACHE=/tmp/prefixpo-cache TOKENIZERS_PARALLELISM=false
$PY scripts/make_bench_model.py --out "$MODEL" --weights
COMMON=(train --model_name_or_path "$MODEL" --tokenizer_name_or_path examples/quickstart/tokenizer
    --stage preference --dataset .data/capybara --data "{use_cache: false}" --max_length 2842 --seed 0
    --loss_type sigmoid --beta 0.1 --learning_rate 1e-5 --max_steps 2 --per_device_train_batch_size 1
    --gradient_accumulation_steps 2 --packing true --packing_capacity 8192 --packing_num_buckets 1
    --bf16 true --logging_steps 1 --disable_progress_bar true)
FSDP=($PY -m accelerate.commands.launch --config_file examples/accelerate/fsdp2.yaml --num_processes 1 -m prefixpo.cli)
PLAIN=($PY -m prefixpo.cli)
variant() {  # NAME LAUNCHER... -- OPTIONS...
    local name=$1; shift
    timeout 150 "$@" --output_dir "/tmp/bisect/$name" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? =="
    grep -h -o "disagree by [0-9.]*%" "$OUT/$name.log" | head -1
    head -c 300 "/tmp/bisect/$name/metrics.jsonl" 2>/dev/null; echo
}
echo "== probe: one batch through each model path =="
timeout 240 $PY -m torch.distributed.run --nproc_per_node 1 scripts/gpu_fsdp_probe.py --model "$MODEL" \
    > "$OUT/probe.log" 2>&1
echo "exit $?"; grep -E "^[a-z-]+ +\{" "$OUT/probe.log"; tail -3 "$OUT/probe.log" | cut -c1-400
variant fsdp-flex "${FSDP[@]}" "${COMMON[@]}" --attention_backend flex
variant fsdp-sdpa "${FSDP[@]}" "${COMMON[@]}" --attention_backend sdpa
variant plain-flex-master "${PLAIN[@]}" "${COMMON[@]}" --attention_backend flex --fp32_master_weights true
variant plain-flex "${PLAIN[@]}" "${COMMON[@]}" --attention_backend flex
