#!/usr/bin/env bash
# DeepSpeed ZeRO-3 on 2 GPUs against 1 GPU without it, the same global batch: the numbers of
# docs/training.md "Several GPUs" ("DeepSpeed on 2 GPUs"; raw: docs/results/deepspeed-h200/).
# Needs 2 CUDA GPUs with torch, transformers, accelerate, datasets and deepspeed importable
# (`DS_BUILD_OPS=0 pip install deepspeed`: nothing is compiled). From the repository root:
#
#   OUT=$OUT bash scripts/gpu_deepspeed_run.sh
#
# Parts (each log in $OUT/NAME.log, its exit code in $OUT/parts.txt):
#   0. weights:   the quickstart's tiny Llama with random weights (seed 0) saved to $WORK/model
#   1. one:       1 GPU, no DeepSpeed, fp32, accumulation 4
#   2. zero3:     2 GPUs, examples/accelerate/zero3.yaml, fp32, accumulation 2, checkpoint at step SAVE
#   3. resume:    from that checkpoint, to the end
#   4. bf16:      2 GPUs, ZeRO-3 in bf16 (the example's recipe), and 5. bf16-one: 1 GPU, bf16 with
#                 fp32 master weights (the closest single-GPU recipe)
#   6. summary:   per-step loss and grad-norm differences, from_pretrained of the final models
#                 ($OUT/deepspeed_summary.json)
# DPO (sigmoid) on the quickstart's preference data, a frozen reference, prefix sharing, packing
# (256), FlexAttention, 8 steps, eval every 4. A CPU dry run:
#   LAUNCH2="python -m accelerate.commands.launch --config_file examples/accelerate/zero3.yaml
#   --num_processes 2" ENTRY=tests/deepspeed_cpu.py ONE_GPU= EXTRA="--attention_backend sdpa"
#   DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 bash scripts/gpu_deepspeed_run.sh
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-deepspeed-out}
PY=${PY:-python3}
WORK=${WORK:-/tmp/dsrun}
STEPS=${STEPS:-8} SAVE=${SAVE:-4}
LAUNCH2=${LAUNCH2:-$PY -m accelerate.commands.launch --config_file examples/accelerate/zero3.yaml --num_processes 2}
ENTRY=${ENTRY:--m prefixpo.cli}
ONE_GPU=${ONE_GPU:-CUDA_VISIBLE_DEVICES=0}
EXTRA=${EXTRA:-}
TRAIN=${TRAIN:-examples/quickstart/data/pref_train.jsonl} EVAL=${EVAL:-examples/quickstart/data/pref_eval.jsonl}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off, as in the published runs
export PREFIXPO_CACHE=$WORK/cache TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"

export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi -L 2>/dev/null; $PY -c "import sys, torch, transformers, accelerate, deepspeed, datasets; print('python',
sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate',
accelerate.__version__, 'deepspeed', deepspeed.__version__, 'datasets', datasets.__version__, 'gpus',
torch.cuda.device_count())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

part() {  # part NAME SECONDS COMMAND...: log in $OUT/NAME.log
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "part $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/parts.txt"
    grep -v -i -E "warn|^\s*$|return func" "$OUT/$name.log" | tail -n 4 | cut -c1-300
}

part weights 60 $PY -c "
from prefixpo.modeling import load_model
load_model('examples/quickstart/model/config.json', seed=0).save_pretrained('$WORK/model')"
read -r -a EXTRA_ARGS <<< "$EXTRA"
COMMON=(--model_name_or_path "$WORK/model" --tokenizer_name_or_path examples/quickstart/tokenizer --stage preference
    --dataset "$TRAIN" --eval_dataset "$EVAL" --data "{use_cache: false}" --max_length 128 --seed 0
    --loss_type sigmoid --beta 0.1 --reference_mode model --learning_rate 1e-3 --lr_scheduler_type constant
    --per_device_train_batch_size 2 --packing true --packing_capacity 256 --packing_num_buckets 1
    --max_steps "$STEPS" --eval_steps 4 --logging_steps 1 --disable_progress_bar true --torch_num_threads 4
    "${EXTRA_ARGS[@]}")
# shellcheck disable=SC2086
part one 110 env $ONE_GPU $PY -m prefixpo.cli train "${COMMON[@]}" --gradient_accumulation_steps 4 \
    --output_dir "$WORK/one"
# shellcheck disable=SC2086
part zero3 110 $LAUNCH2 --main_process_port 29541 $ENTRY train "${COMMON[@]}" --gradient_accumulation_steps 2 \
    --save_steps "$SAVE" --output_dir "$WORK/zero3"
ls -la "$WORK/zero3/checkpoint-$SAVE" "$WORK/zero3/checkpoint-$SAVE/deepspeed" > "$OUT/checkpoint-listing.txt" 2>&1
# shellcheck disable=SC2086
part resume 110 $LAUNCH2 --main_process_port 29542 $ENTRY train "${COMMON[@]}" --gradient_accumulation_steps 2 \
    --resume_from_checkpoint "$WORK/zero3/checkpoint-$SAVE" --output_dir "$WORK/resume"
# shellcheck disable=SC2086
part bf16 110 $LAUNCH2 --main_process_port 29543 $ENTRY train "${COMMON[@]}" --gradient_accumulation_steps 2 \
    --bf16 true --output_dir "$WORK/bf16"
# shellcheck disable=SC2086
part bf16-one 110 env $ONE_GPU $PY -m prefixpo.cli train "${COMMON[@]}" --gradient_accumulation_steps 4 \
    --bf16 true --fp32_master_weights true --output_dir "$WORK/bf16-one"
part summary 45 $PY - "$WORK" "$OUT/deepspeed_summary.json" <<'EOF'
import json, sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

work, out = Path(sys.argv[1]), Path(sys.argv[2])
timing = {"pairs_per_s", "tokens_per_s", "step_time_s", "slowest_rank_idle", "max_memory_gib"}

def lines(run):
    path = work / run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []

def diff(a, b, key):
    pairs = [(x[key], y[key]) for x, y in zip(lines(a), lines(b)) if key in x and key in y]
    return max((abs(x - y) / max(abs(x), 1e-12) for x, y in pairs), default=None)

def weights(run):
    try:
        return AutoModelForCausalLM.from_pretrained(work / run / "final").state_dict()
    except Exception as err:  # noqa: BLE001 - reported, not raised
        return str(err)

summary = {}
for a, b in (("one", "zero3"), ("bf16-one", "bf16")):
    summary[f"{b}_vs_{a}"] = {"lines": [len(lines(a)), len(lines(b))], "max_rel_loss": diff(a, b, "loss"),
                              "max_rel_grad_norm": diff(a, b, "grad_norm"),
                              "losses": [[x["split"], x["step"], x["loss"], y["loss"]]
                                         for x, y in zip(lines(a), lines(b))]}
later = [{k: v for k, v in r.items() if k not in timing} for r in lines("zero3") if r["step"] > int(lines("resume")[0]["step"]) - 1] if lines("resume") else []
summary["resume_equals_uninterrupted"] = later == [{k: v for k, v in r.items() if k not in timing} for r in lines("resume")]
for a, b in (("one", "zero3"), ("zero3", "resume"), ("bf16-one", "bf16")):
    wa, wb = weights(a), weights(b)
    summary[f"final_{b}_vs_{a}"] = (max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
                                    if isinstance(wa, dict) and isinstance(wb, dict) else [str(wa)[:200], str(wb)[:200]])
print(json.dumps(summary, indent=1))
out.write_text(json.dumps(summary, indent=1))
EOF
for run in one zero3 resume bf16 bf16-one; do
    cp "$WORK/$run/metrics.jsonl" "$OUT/$run-metrics.jsonl" 2>/dev/null
done
echo "total $(( $(date +%s) - START ))s"
