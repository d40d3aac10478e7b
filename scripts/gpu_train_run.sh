#!/usr/bin/env bash
# A short training run on one GPU: docs/training.md "A short run on the GPU" (metrics:
# docs/results/gpu-train-capybara-metrics.jsonl, plot: docs/gpu-train-capybara.png). The llama-1b
# shape of the benchmark profiles with random weights (scripts/make_bench_model.py), DPO with prefix
# sharing and packing (8192) on 512 synthetic capybara-profile rows and a 64-row eval set
# (scripts/make_synthetic_pairs.py, unless TRAIN and EVAL name datasets), bf16, FlexAttention,
# 60 steps. Needs one CUDA GPU with torch, transformers, accelerate and datasets. From the
# repository root:
#
#   OUT=train-out bash scripts/gpu_train_run.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-train-out}
mkdir -p "$OUT" /tmp/llama-1b
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
python scripts/make_bench_model.py --out /tmp/llama-1b
TRAIN=${TRAIN:-} EVAL=${EVAL:-}
if [ -z "$TRAIN" ]; then
    python scripts/make_synthetic_pairs.py --profile capybara --num 512 --out /tmp/capybara.jsonl
    python scripts/make_synthetic_pairs.py --profile capybara --num 64 --seed 1 --out /tmp/capybara-eval.jsonl
    TRAIN=/tmp/capybara.jsonl EVAL=/tmp/capybara-eval.jsonl
fi
PREFIXPO_CACHE=/tmp/cache python -m prefixpo.cli train --model_name_or_path /tmp/llama-1b/config.json \
    --tokenizer_name_or_path examples/quickstart/tokenizer --stage preference \
    --dataset "$TRAIN" --eval_dataset "$EVAL" --data "{use_cache: false}" --max_length 2842 \
    --loss_type sigmoid --beta 0.1 --learning_rate 1e-5 --lr_scheduler_type cosine --warmup_steps 5 \
    --max_steps 60 --per_device_train_batch_size 1 --gradient_accumulation_steps 2 \
    --packing true --packing_capacity 8192 --bf16 true --attention_backend flex \
    --logging_steps 2 --eval_steps 20 --output_dir "$OUT/run" --disable_progress_bar true \
    > "$OUT/train.log" 2>&1; echo "train exit $?"; grep -v -i warn "$OUT/train.log" | tail -25
cp "$OUT/run/metrics.jsonl" "$OUT/train-metrics.jsonl" 2>/dev/null
cp "$OUT/run/curves.png" "$OUT/train-curves.png" 2>/dev/null
rm -rf "$OUT/run"
