#!/usr/bin/env bash
# FSDP2 on one GPU against NGPU (default 2), the same global batch: the "Several GPUs: FSDP2 on 2 H200"
# table and notes of docs/benchmarks.md (raw: docs/results/multi-gpu-h200/) and the 2-GPU check of
# docs/training.md "Several GPUs". Needs NGPU CUDA GPUs with torch, transformers, accelerate and
# datasets (and matplotlib for the loss plot). From the repository root, the two published runs:
#
#   STEPS=30 SAVE=20 RESUME_STEPS=4 BUCKETS=1 BUDGET=545 PLAIN_STEPS=12 OUT=$OUT bash scripts/gpu_multi_run.sh
#   STEPS=14 SAVE=10 RESUME_STEPS=4 GA=8 BUCKETS=1 BUDGET=500 PLAIN_STEPS=10 OUT=$OUT bash scripts/gpu_multi_run.sh
#
# (4 and 8 packed rows per optimizer step). Another model shape, profile or GPU count: SHAPE
# (llama-1b), PROFILE (capybara), ROWS (512), MAX_LENGTH (2842, above capybara's longest pair),
# NGPU (2; GA must be a multiple of it), WEIGHTS_DEVICE (cpu, the published weights; cuda draws an
# 8B model's in seconds, other weights), PORT (29530, the first of four rendezvous ports). A larger
# model needs its own EXTRA (e.g. --gradient_checkpointing true), BUDGET and part limits
# (ONE_LIMIT, MULTI_LIMIT, RESUME_LIMIT, LOAD_LIMIT, PLAIN_LIMIT); none but the defaults has run.
# TITLE names the loss plot (default "DPO on SHAPE, PROFILE profile"). Parts:
#   0. the SHAPE shape of the benchmark profiles with random weights (seed 0), saved to $MODEL by
#      scripts/make_bench_model.py; ROWS synthetic PROFILE-profile rows
#      (scripts/make_synthetic_pairs.py) unless TRAIN names a dataset
#   1. one:    FSDP2 on 1 GPU (the same mixed precision recipe: fp32 master weights, bf16 compute),
#              DPO (sigmoid) with prefix sharing, packing (8192), bf16, FlexAttention, eager model,
#              a frozen reference; 1 packed row per micro-batch x GA accumulation steps
#   2. multi:  FSDP2 on NGPU GPUs (examples/accelerate/fsdp2.yaml), GA/NGPU accumulation steps: the same
#              rows per optimizer step; a sharded checkpoint at step SAVE
#   3. resume: from that checkpoint, RESUME_STEPS steps, in another directory; resume2: the same again
#   4. load:   the multi run's final model and its checkpoint with plain from_pretrained, a forward
#   5. plain:  1 GPU without FSDP (bf16 weights, the single-GPU default), PLAIN_STEPS steps: throughput only
#   6. summary (scripts/multi_gpu_summary.py): pairs/s and scaling, loss differences per step,
#              rank imbalance, loss_curves.png and multi_gpu_summary.json
# Parts 0-5 share BUDGET seconds (each also has its own limit) and print their exit codes; a failed
# part does not stop the later ones. Runs are written to $WORK; logs, metrics, the plot and the
# summary go to $OUT. A CPU dry run (tiny model, FSDP2 through tests/fsdp_cpu.py under torchrun):
# set LAUNCH1, LAUNCH, PORT_FLAG, ENTRY, ONE_GPU and EXTRA, below.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-multi-out}
BUDGET=${BUDGET:-500}            # seconds for parts 0-5; the summary gets its own 40
STEPS=${STEPS:-40} SAVE=${SAVE:-20} RESUME_STEPS=${RESUME_STEPS:-4} GA=${GA:-4} PLAIN_STEPS=${PLAIN_STEPS:-15}
NGPU=${NGPU:-2} SHAPE=${SHAPE:-llama-1b} PROFILE=${PROFILE:-capybara} ROWS=${ROWS:-512}
MAX_LENGTH=${MAX_LENGTH:-2842} WEIGHTS_DEVICE=${WEIGHTS_DEVICE:-cpu}
if ! [[ $NGPU =~ ^[1-9][0-9]*$ ]]; then echo "NGPU must be a positive whole number, got '$NGPU'"; exit 2; fi
PORT=${PORT:-29530}
if (( GA % NGPU != 0 )); then echo "GA ($GA) must be a multiple of NGPU ($NGPU): the same rows per step on 1 and NGPU GPUs"; exit 2; fi
MODEL=${MODEL:-/tmp/$SHAPE}
WORK=${WORK:-/tmp/multi}
PY=${PY:-python3}
# how the FSDP runs start, on 1 and NGPU GPUs (a CPU dry run: torchrun and tests/fsdp_cpu.py, docs/training.md)
LAUNCH1=${LAUNCH1:-$PY -m accelerate.commands.launch --config_file examples/accelerate/fsdp2.yaml --num_processes 1}
LAUNCH=${LAUNCH:-$PY -m accelerate.commands.launch --config_file examples/accelerate/fsdp2.yaml --num_processes $NGPU}
PORT_FLAG=${PORT_FLAG:---main_process_port}
ENTRY=${ENTRY:--m prefixpo.cli}  # what LAUNCH starts (a CPU dry run: tests/fsdp_cpu.py)
ONE_GPU=${ONE_GPU:-CUDA_VISIBLE_DEVICES=0}
EXTRA=${EXTRA:-}                 # further trainer overrides (a CPU dry run: tiny model, sdpa, no bf16)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off, as in the published runs
export PREFIXPO_CACHE=/tmp/prefixpo-cache TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
: > "$OUT/parts.txt"

PARTS=${PARTS:-one multi resume resume2 load plain}  # which of the parts below to run

part() {  # part NAME SECONDS COMMAND...: at most SECONDS (and what is left of BUDGET); log in $OUT/NAME.log
    local name=$1 limit=$2 left
    shift 2
    if [ "$name" != summary ] && [[ " $PARTS " != *" $name "* ]]; then
        echo "part $name: not in PARTS" | tee -a "$OUT/parts.txt"
        return
    fi
    left=$(( BUDGET - ($(date +%s) - START) ))
    if (( left < limit )); then limit=$left; fi
    if (( limit < 15 )); then
        echo "part $name: skipped, ${left}s of the budget left" | tee -a "$OUT/parts.txt"
        return
    fi
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "part $name: exit $rc after $(( $(date +%s) - t0 ))s (limit ${limit}s)" | tee -a "$OUT/parts.txt"
    grep -v -i -E "warn|^\s*$" "$OUT/$name.log" | tail -n 6
}

export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi -L; timeout 60 $PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# real weights on disk (random, seed 0), as users have them: every process and both models load the
# same tensors (a directory given in MODEL with its own config.json is used as it is)
if [ ! -f "$MODEL/config.json" ]; then
    timeout 300 $PY scripts/make_bench_model.py --model "$SHAPE" --out "$MODEL" --weights --device "$WEIGHTS_DEVICE"
    echo "part weights: exit $?" | tee -a "$OUT/parts.txt"
elif ! ls "$MODEL"/*.safetensors > /dev/null 2>&1; then
    timeout 300 $PY scripts/make_bench_model.py --model "$MODEL" --out "$MODEL" --weights --device "$WEIGHTS_DEVICE"
    echo "part weights: exit $?" | tee -a "$OUT/parts.txt"
fi
TRAIN=${TRAIN:-}
if [ -z "$TRAIN" ]; then
    TRAIN=$WORK/$PROFILE.jsonl
    timeout 120 $PY scripts/make_synthetic_pairs.py --profile "$PROFILE" --num "$ROWS" --out "$TRAIN"
fi

# the same run on 1 and NGPU GPUs; no eval (evaluation across ranks is checked on CPU in tests/test_train.py).
# constant after warm-up: the resumed run's shorter max_steps does not change its learning rates
read -r -a EXTRA_ARGS <<< "$EXTRA"
COMMON=(--model_name_or_path "$MODEL" --tokenizer_name_or_path examples/quickstart/tokenizer --stage preference
    --dataset "$TRAIN" --data "{use_cache: false}" --max_length "$MAX_LENGTH" --seed 0
    --loss_type sigmoid --beta 0.1 --reference_mode model --learning_rate 1e-5
    --lr_scheduler_type constant_with_warmup --warmup_steps 5 --per_device_train_batch_size 1
    --packing true --packing_capacity 8192 --packing_num_buckets "${BUCKETS:-4}" --bf16 true --attention_backend flex --torch_compile false
    --logging_steps 1 --disable_progress_bar true "${EXTRA_ARGS[@]}")
# shellcheck disable=SC2086
part one ${ONE_LIMIT:-160} env $ONE_GPU $LAUNCH1 $PORT_FLAG "$PORT" $ENTRY train "${COMMON[@]}" --gradient_accumulation_steps "$GA" \
    --max_steps "$STEPS" --output_dir "$WORK/one"
# shellcheck disable=SC2086
part multi ${MULTI_LIMIT:-190} $LAUNCH $PORT_FLAG $(( PORT + 1 )) $ENTRY train "${COMMON[@]}" \
    --gradient_accumulation_steps $(( GA / NGPU )) --max_steps "$STEPS" --save_steps "$SAVE" --output_dir "$WORK/multi"
ls -la "$WORK/multi/checkpoint-$SAVE" "$WORK/multi/checkpoint-$SAVE/sharded" > "$OUT/checkpoint-listing.txt" 2>&1
# shellcheck disable=SC2086
part resume ${RESUME_LIMIT:-130} $LAUNCH $PORT_FLAG $(( PORT + 2 )) $ENTRY train "${COMMON[@]}" \
    --gradient_accumulation_steps $(( GA / NGPU )) --max_steps $(( SAVE + RESUME_STEPS )) --save_steps null \
    --resume_from_checkpoint "$WORK/multi/checkpoint-$SAVE" --output_dir "$WORK/resume"
# the same resume again: how far two runs of the same state drift apart (GPU kernels are not deterministic)
# shellcheck disable=SC2086
part resume2 ${RESUME_LIMIT:-130} $LAUNCH $PORT_FLAG $(( PORT + 3 )) $ENTRY train "${COMMON[@]}" \
    --gradient_accumulation_steps $(( GA / NGPU )) --max_steps $(( SAVE + RESUME_STEPS )) --save_steps null \
    --resume_from_checkpoint "$WORK/multi/checkpoint-$SAVE" --output_dir "$WORK/resume2"
CHECKPOINT=$WORK/multi/checkpoint-$SAVE
[ -d "$CHECKPOINT" ] || CHECKPOINT=  # not saved (SAVE beyond STEPS)
# shellcheck disable=SC2086
part load ${LOAD_LIMIT:-80} $PY scripts/multi_gpu_summary.py load "$WORK/multi/final" $CHECKPOINT \
    --out "$OUT/from_pretrained.json"
# shellcheck disable=SC2086
part plain ${PLAIN_LIMIT:-100} env $ONE_GPU $PY -m prefixpo.cli train "${COMMON[@]}" --gradient_accumulation_steps "$GA" \
    --max_steps "$PLAIN_STEPS" --output_dir "$WORK/plain"

BUDGET=$(( BUDGET + 40 ))
part summary 40 $PY scripts/multi_gpu_summary.py summary --gpus "$NGPU" --title "${TITLE:-DPO on $SHAPE, $PROFILE profile}" \
    --one "$WORK/one" --multi "$WORK/multi" \
    --resume "$WORK/resume" --resume2 "$WORK/resume2" --plain "$WORK/plain" --loaded "$OUT/from_pretrained.json" --out "$OUT"
for run in one multi resume resume2 plain; do
    cp "$WORK/$run/metrics.jsonl" "$OUT/$run-metrics.jsonl" 2>/dev/null
done
echo "total $(( $(date +%s) - START ))s"
