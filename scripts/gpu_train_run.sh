#!/usr/bin/env bash
# A short real training run on the GPU (docs/training.md): the llama-1b shape of bench_profiles.json,
# random weights, DPO with prefix sharing and packing on synthetic capybara-length data, bf16,
# FlexAttention. Run from the repository root on a GPU machine (wheels for `datasets` in .whl/ where it is not installed).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-train-out}
mkdir -p "$OUT" /tmp/llama-1b
if [ -d .whl ]; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
python scripts/make_bench_model.py --out /tmp/llama-1b
# the data: save_to_disk directories made with scripts/make_synthetic_pairs.py (see docs/training.md),
# or made here as JSONL
TRAIN=.data/capybara EVAL=.data/capybara-eval
if [ ! -d "$TRAIN" ]; then
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
