"""One stage of ``prefixpo train``: setup in named functions, then one loop (``train_loop``).

Setup, in order (``setup``): the accelerator and its engine (``prefixpo.engine``: one process or
DDP, FSDP2, DeepSpeed), the checkpoint to resume, the tokenizer and the data, the model (switched
to prefix-shared attention), the optimizer and the schedule, the reference. The loop then, for
every optimizer step, lays out the step's groups, runs ``preference_step`` or ``sft_step``, clips
and steps through the engine, and logs, evaluates and checkpoints on schedule. It never asks
which engine it runs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.utils import logging as transformers_logging

from prefixpo.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    checkpoint_sharding,
    finish_checkpoint,
    list_checkpoints,
    load_state,
    resolve_checkpoint,
    rng_state,
    save_model,
    set_rng_state,
    start_checkpoint,
    verify_checkpoint,
)
from prefixpo.config import ConfigError, TrainConfig, save_config
from prefixpo.data.mixture import load_mixture
from prefixpo.engine.plain import Engine
from prefixpo.guards import Divergence, StopSignals, TrainingError, written_whole
from prefixpo.layout import Batch, Group, round_up
from prefixpo.logprobs import ResponseLogps
from prefixpo.losses import get_loss
from prefixpo.metrics import (
    Window,
    forward_flops,
    memory,
    model_dims,
    peak_flops,
    summed_over_ranks,
    synchronize,
    truncate_metrics,
    write_metrics,
)
from prefixpo.modeling import (
    ScoredLM,
    build_attention_masks,
    compile_layers,
    compiled_graphs,
    is_config_file,
    load_model,
    resolve_backend,
    uses_cuda_graphs,
    weights_dtype,
)
from prefixpo.packing import (
    PackingConfig,
    Step,
    batch_rows,
    data_buckets,
    packing_stats,
    plan_epoch_ranks,
)
from prefixpo.pairs import PairConfig, batch_pair_indices
from prefixpo.plot import plot_quietly
from prefixpo.reference import (
    ReferenceFn,
    ReferenceSync,
    build_reference,
    check_start_agreement,
    reference_for_step,
    reference_sync,
)
from prefixpo.rundir import DONE_MARKER, RUN_CONFIG, finished_record
from prefixpo.samples import eval_samples, sample_model_of
from prefixpo.step import StepResult, activation_offload, preference_step, sft_step
from prefixpo.train_config import SCHEDULERS

# --- loading ------------------------------------------------------------------------------------


def load_tokenizer(cfg: TrainConfig) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                                              trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_data(cfg: TrainConfig, tokenizer: Any, evaluation: bool = False) -> list[Group]:
    """The train (or eval) groups of every dataset of ``dataset`` (``eval_dataset``), concatenated;
    each dataset's report, and with several the mixture's counts, on stderr (prefixpo.data.mixture)."""
    mixture = load_mixture(cfg.data_sources(evaluation), tokenizer, on_report=lambda s: print(s, file=sys.stderr))
    if len(mixture.counts) > 1:
        print(mixture.line(), file=sys.stderr)
    groups = mixture.groups  # never empty: a dataset without usable rows is a DataError (load_groups)
    if cfg.stage == "sft":  # SFT trains the first (chosen) response of each group
        groups = [Group(g.prompt_ids, [g.response_ids[0]]) for g in groups]
    return groups


def router_loss_note(config: Any) -> str | None:
    """A line for a Mixture-of-Experts model: TRL 1.16 adds its router load-balancing loss
    (``router_aux_loss_coef`` x aux loss, the config's own coefficient by default); prefixpo adds none.

    >>> from types import SimpleNamespace as C
    >>> router_loss_note(C(output_router_logits=False, router_aux_loss_coef=0.001))[:60]
    'note: a Mixture-of-Experts model: prefixpo adds no router lo'
    >>> router_loss_note(C()) is None, router_loss_note(C(output_router_logits=False, router_aux_loss_coef=0.0))
    (True, None)
    """
    config = getattr(config, "text_config", None) or config
    coef = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
    if not hasattr(config, "output_router_logits") or not coef:
        return None
    return (f"note: a Mixture-of-Experts model: prefixpo adds no router load-balancing loss, where TRL 1.16's DPOTrainer "
            f"adds router_aux_loss_coef ({coef:g}, the model's) x the aux loss; losses and gradients differ from TRL's")


def upcast_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """fp32 master weights: trainable parameters in fp32 (bf16 compute comes from autocast, or
    from FSDP2's mixed precision policy, which does the same upcast itself). Loaded in bf16 first,
    so random weights are those of the bf16 reference."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def apply_lora(model: torch.nn.Module, cfg: TrainConfig, resume_from: Path | None = None) -> torch.nn.Module:
    try:
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        raise ConfigError("config key `use_peft`: needs the `peft` package (pip install peft)") from None
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if resume_from is not None:
        return PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def disable_dropout(model: torch.nn.Module) -> None:
    """TRL's default (``disable_dropout``): every ``nn.Dropout`` gets p = 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# --- batches ------------------------------------------------------------------------------------

def group_lengths(groups: list[Group], cfg: TrainConfig) -> list[int]:
    return [g.num_tokens if cfg.prefix_sharing else g.num_separate_tokens for g in groups]


def epoch_plans(groups: list[Group], cfg: TrainConfig, epoch: int, world: int, capacity: int | None,
                train: bool = True) -> list[list[Step]]:
    """Every rank's steps of an epoch (``packing.plan_epoch_ranks``): TRL's batch of groups per step,
    packed into rows of ``capacity`` tokens (None: unpacked)."""
    packing = PackingConfig(capacity=capacity) if capacity else None
    per_micro = cfg.per_device_train_batch_size if train else cfg.per_device_eval_batch_size
    return plan_epoch_ranks(group_lengths(groups, cfg), seed=cfg.seed, epoch=epoch if train else 0, packing=packing,
                            micro_batch_size=per_micro,
                            gradient_accumulation_steps=cfg.gradient_accumulation_steps if train else 1,
                            world_size=world)


def epoch_plan(groups: list[Group], cfg: TrainConfig, epoch: int, world: int, rank: int, capacity: int | None,
               train: bool = True) -> list[Step]:
    """This rank's steps of an epoch (``epoch_plans``)."""
    return epoch_plans(groups, cfg, epoch, world, capacity, train)[rank]


def packs(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether groups are packed: ``packing: auto`` packs where the attention runs through
    FlexAttention (CUDA), whose mask skips the blocks between packed groups; with a dense mask (CPU,
    ``attention_backend: sdpa``) a packed row's attention costs its length squared."""
    return cfg.packing is True or (cfg.packing == "auto" and resolve_backend(cfg.attention_backend, device) == "flex")


def row_layout(cfg: TrainConfig, train_groups: list[Group], eval_groups: list[Group], world: int,
               packed: bool = True) -> tuple[int | None, list[int] | None]:
    """``(capacity, row lengths)`` of packed rows, or ``(None, None)`` unpacked. ``packing_capacity:
    auto`` is the training micro-batch size times the longest training group, at least the longest
    eval group (so a training row holds no more tokens than TRL's micro-batch of the longest groups,
    padded); the row lengths are ``packing_num_buckets`` quantiles of the first epoch's rows of every
    rank (``packing.data_buckets``), the capacity the last of them (with ``packing_num_buckets: 0``,
    the default, up to 4 such lengths and the shortest row's, which the warm-up runs while rows take
    any multiple of 128)."""
    if not packed:
        return None, None
    longest = max(group_lengths(train_groups + eval_groups, cfg))
    capacity = cfg.packing_capacity
    if capacity == "auto":  # from the training batch: evaluation packs into as many rows as it needs
        capacity = round_up(max(cfg.per_device_train_batch_size * max(group_lengths(train_groups, cfg)), longest),
                            128)
    elif longest > capacity:
        raise ConfigError(f"config key `packing_capacity`: a group of {longest} tokens does not fit in {capacity}; "
                          "raise it or lower max_length")
    lengths = group_lengths(train_groups, cfg)
    used = [sum(lengths[i] for i in row) for plan in epoch_plans(train_groups, cfg, 0, world, capacity)
            for step in plan for mb in step for row in mb]
    lengths = data_buckets(used, capacity, cfg.packing_num_buckets or 4)
    if not cfg.packing_num_buckets and used:  # rows of any length: the warm-up runs the shortest too
        lengths = sorted({round_up(min(used), 128), *lengths})
    return capacity, lengths


def make_batch(groups: list[Group], rows: list[list[int]], cfg: TrainConfig, device: torch.device,
               buckets: list[int] | None) -> Batch:
    """The batch of ``rows`` (group indices per row), on the host: packed rows padded to the
    smallest of ``buckets`` that holds them, others (unpacked, or no buckets) to ``pad_multiple``."""
    return batch_rows(groups, rows, prefix_sharing=cfg.prefix_sharing, buckets=buckets,
                      pad_to_multiple_of=pad_multiple(device))


def pad_multiple(device: torch.device) -> int:
    """Rows without a bucket are padded to a multiple of this: FlexAttention's block (128) on CUDA."""
    return 128 if device.type == "cuda" else 8


# --- the run ------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything one stage's loop works with, built by ``setup``."""

    cfg: TrainConfig
    accelerator: Any
    engine: Engine
    tokenizer: Any
    train_groups: list[Group]
    eval_groups: list[Group]
    policy: torch.nn.Module
    optimizer: Any
    scheduler: Any
    steps_per_epoch: int
    total_steps: int
    capacity: int | None = None  # packed rows: at most this many tokens (None: unpacked)
    buckets: list[int] | None = None  # packed rows' lengths (None: unpacked, or any multiple of pad_multiple)
    compiled: bool = False
    loss_fn: Any = None
    train_ref: ReferenceFn | None = None
    eval_ref: ReferenceFn | None = None
    ref_mode: str = "none"
    sync: ReferenceSync | None = None
    checks_start_agreement: bool = False
    step: int = 0
    last_saved: Path | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    window: Window = field(default_factory=Window)
    guard: Divergence = field(default_factory=Divergence)
    plans: dict[int, list[Step]] = field(default_factory=dict)
    group_flops: list[float] = field(default_factory=list)  # model FLOPs of a step's work on each group
    peak_flops: float | None = None  # of the device, for MFU
    graphs: int | None = None  # graphs compiled when the first step began (recompiles counted from there)
    warm_lengths: list[int] = field(default_factory=list)  # packed row lengths the warm-up runs
    startup: dict[str, float] = field(default_factory=dict)  # seconds of each start-up phase

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def rows_of_step(self, step: int) -> Step:
        """This rank's micro-batches of optimizer step ``step`` (0-based), planned an epoch at a time."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch not in self.plans:
            self.plans = {epoch: epoch_plan(self.train_groups, self.cfg, epoch, self.accelerator.num_processes,
                                            self.accelerator.process_index, self.capacity)}
        return self.plans[epoch][index]


# --- setup --------------------------------------------------------------------------------------

def choose_engine(accelerator: Any, cfg: TrainConfig) -> Engine:
    """The engine of accelerate's launch configuration, chosen once; its checks of ``cfg`` and its
    settings (the DeepSpeed config, FSDP2's precision) come before any model loads."""
    if accelerator.distributed_type == DistributedType.FSDP:  # imported here: torch's FSDP takes a second to import
        from prefixpo.engine.fsdp import FSDPEngine

        return FSDPEngine(accelerator, cfg)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from prefixpo.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(accelerator, cfg)
    return Engine(accelerator, cfg)


def setup_accelerator(cfg: TrainConfig) -> tuple[Any, Engine]:
    out = Path(cfg.output_dir)
    # trackers name the run after output_dir; tensorboard writes its events into output_dir itself
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", log_with=cfg.reports or None,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out.parent)))
    engine = choose_engine(accelerator, cfg)
    if cfg.torch_num_threads:
        torch.set_num_threads(cfg.torch_num_threads)
    transformers_logging.disable_progress_bar()  # no loading and saving bars between the trainer's own lines
    set_seed(cfg.seed)
    return accelerator, engine


def resume_point(cfg: TrainConfig, accelerator: Any) -> Path | None:
    """The output directory made and the config saved; the checkpoint to resume from, every file of
    it whole as saved (the main process reads, every rank learns), or None."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    if not cfg.resume_from_checkpoint:
        return None
    checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, out)
    problem = broadcast_object_list([verify_checkpoint(checkpoint) if accelerator.is_main_process else None])[0]
    if problem:
        others = [p.name for p in list_checkpoints(out) if p != checkpoint]
        raise CheckpointError(problem + (f"; resume from another checkpoint ({', '.join(others)} in {out})"
                                         if others else "; no other checkpoint to resume from"))
    return checkpoint


def setup_model(cfg: TrainConfig, engine: Engine, checkpoint: Path | None) -> ScoredLM:
    """The policy: loaded (a checkpoint's full weights on resume, except LoRA's adapters, which
    load on top of the base model), adapted, placed and switched to prefix-shared attention."""
    resume_weights = checkpoint is not None and not cfg.use_peft
    source = str(checkpoint) if resume_weights else cfg.model_name_or_path
    master = engine.master_weights()
    # a checkpoint holds the fp32 master weights: loaded as they are, not rounded to bf16. Random
    # weights are drawn whole (not by ZeRO-3's partitioned init), so a seed gives one model everywhere
    with engine.loading(whole=is_config_file(source)):
        model = load_model(source, dtype=torch.float32 if resume_weights and master else weights_dtype(cfg.bf16),
                           seed=cfg.seed, load_in_4bit=cfg.load_in_4bit, trust_remote_code=cfg.trust_remote_code)
    if cfg.use_peft:
        model = apply_lora(model, cfg, checkpoint)
    if cfg.disable_dropout:  # after the adapters, as TRL does
        disable_dropout(model)
    if master:
        upcast_trainable(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = engine.apply_attention(engine.place(model))
    if engine.accelerator.is_main_process and cfg.stage == "preference" and (note := router_loss_note(model.config)):
        print(note, file=sys.stderr)
    if compiles(cfg, engine):
        compile_layers(model, dynamic=cfg.torch_compile_dynamic, mode=cfg.torch_compile_mode,
                       eager_numerics=cfg.torch_compile_eager_numerics)
    elif engine.accelerator.is_main_process:
        for key, value, default in (("torch_compile_mode", cfg.torch_compile_mode, "default"),
                                    ("torch_compile_eager_numerics", cfg.torch_compile_eager_numerics, True)):
            if value != default:
                print(f"note: {key} {str(value).lower()} has no effect: the layers are not compiled (torch_compile: auto "
                      "compiles them on CUDA with packing, not under DeepSpeed; true compiles them)", file=sys.stderr)
    return ScoredLM(model)


def compiles(cfg: TrainConfig, engine: Engine) -> bool:
    """Whether the decoder layers are compiled: ``torch_compile: auto`` does it on CUDA with packing
    (rows then come in a few lengths, all run before step 1), except under DeepSpeed, whose
    parameter hooks the compiler traces into and recompiles for."""
    return cfg.torch_compile is True or (cfg.torch_compile == "auto" and engine.device.type == "cuda"
                                         and packs(cfg, engine.device) and engine.name != "deepspeed")


def setup_optimizer(cfg: TrainConfig, engine: Engine, policy: torch.nn.Module,
                    total_steps: int) -> tuple[torch.nn.Module, Any, Any]:
    """AdamW and the learning-rate schedule; the policy and optimizer prepared by the engine."""
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  weight_decay=cfg.weight_decay, fused=engine.device.type == "cuda")
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = lr_schedule(cfg.lr_scheduler_type, optimizer, warmup, total_steps)
    policy = engine.prepare(policy, optimizer)
    return policy, engine.optimizer, scheduler


def lr_schedule(name: str, optimizer: torch.optim.Optimizer, warmup: int,
                total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate factor of transformers' ``get_scheduler`` for ``linear``, ``cosine`` (half a
    cycle), ``constant`` (no warm-up, as there) and ``constant_with_warmup``, written here because
    importing ``transformers.optimization`` imports peft and model code, seconds of every start-up
    (tests/test_train.py compares the two step by step)."""

    def factor(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if name == "constant_with_warmup":
            return 1.0
        if name == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    if name not in SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler_type {name!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup(cfg: TrainConfig) -> tuple[Run, Path | None]:
    """The stage's ``Run`` and the checkpoint it resumes from (restored by ``restore``)."""
    age, mark = process_age(), time.perf_counter()
    earlier = STAGES_ENDED[-1] if STAGES_ENDED else 0.0  # the stages this process trained before this one
    startup = {"earlier stages": earlier, "before setup": age - earlier} if earlier else {"before setup": age}

    def phase(name: str) -> None:
        nonlocal mark
        startup[name], mark = time.perf_counter() - mark, time.perf_counter()

    accelerator, engine = setup_accelerator(cfg)
    checkpoint = resume_point(cfg, accelerator)
    tokenizer = load_tokenizer(cfg)
    train_groups = load_data(cfg, tokenizer)
    eval_groups = load_data(cfg, tokenizer, evaluation=True) if cfg.eval_dataset else []
    capacity, lengths = row_layout(cfg, train_groups, eval_groups, accelerator.num_processes,
                                   packs(cfg, accelerator.device))
    phase("data")
    policy = setup_model(cfg, engine, checkpoint)
    steps_per_epoch = len(epoch_plan(train_groups, cfg, 0, accelerator.num_processes, accelerator.process_index,
                                     capacity))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_train_epochs)
    policy, optimizer, scheduler = setup_optimizer(cfg, engine, policy, total_steps)
    run = Run(cfg, accelerator, engine, tokenizer, train_groups, eval_groups, policy, optimizer, scheduler,
              steps_per_epoch, total_steps, capacity, lengths if cfg.packing_num_buckets else None,
              compiles(cfg, engine), warm_lengths=lengths or [], startup=startup)
    phase("policy")
    if cfg.stage == "preference":
        run.loss_fn = get_loss(cfg.loss_type, **cfg.loss_kwargs())
    run.train_ref, run.eval_ref, run.ref_mode = build_reference(cfg, engine, train_groups, eval_groups)
    # a fresh run whose policy and reference start from the same weights: their log-probs must agree at step 1
    run.checks_start_agreement = (run.ref_mode != "none" and checkpoint is None
                                  and cfg.ref_model_name_or_path in (None, cfg.model_name_or_path))
    reference_model = sample_model_of(run.train_ref)
    if run.compiled and run.ref_mode == "model" and reference_model is not None:
        compile_layers(reference_model.model, dynamic=cfg.torch_compile_dynamic, mode=cfg.torch_compile_mode,
                       eager_numerics=cfg.torch_compile_eager_numerics)
    run.peak_flops = peak_flops(engine.device)
    dims = model_dims(engine.inner())
    forwards = 3 + (run.ref_mode in ("model", "adapters_off"))  # policy forward and backward, reference forward
    run.group_flops = [forwards * forward_flops(dims, g, cfg.prefix_sharing) for g in train_groups]
    if cfg.sync_ref_model and run.ref_mode != "none":
        run.sync = reference_sync(engine.inner(), run.train_ref, cfg.ref_model_mixup_alpha, cfg.ref_model_sync_steps,
                                  engine.zero3)
    phase("reference")
    return run, checkpoint


def restore(run: Run, checkpoint: Path | None) -> None:
    """Resume ``run`` from ``checkpoint`` (optimizer, RNG, schedule, step, TR-DPO's reference);
    a fresh run starts a new metrics file."""
    if checkpoint is None:
        if run.main and run.metrics_path.exists():
            run.metrics_path.unlink()
        return
    state = load_state(checkpoint)
    saved = checkpoint_sharding(state)
    if saved != run.engine.name:
        names = {"none": "without FSDP or DeepSpeed", "fsdp": "with FSDP", "deepspeed": "with DeepSpeed"}
        raise TrainingError(f"{checkpoint} was saved {names[saved]}; resume it {names[saved]} too (this run "
                            f"is {run.engine.description})")
    run.engine.load_state(checkpoint, state)
    if run.sync is not None:  # TR-DPO: the reference as it was at that step
        run.sync.load(checkpoint)
    run.scheduler.load_state_dict(state["scheduler"])
    run.step = state["step"]
    run.last_saved = checkpoint
    if run.main:
        truncate_metrics(run.metrics_path, run.step)
        (run.out / DONE_MARKER).unlink(missing_ok=True)  # continuing a finished run: not finished until it ends
    print(f"resumed from {checkpoint} at step {run.step}", file=sys.stderr)


# --- checkpoints, evaluation, logging -----------------------------------------------------------

def save(run: Run, at_step: int) -> Path:
    """Every rank calls it. The main process writes the whole model (and TR-DPO's reference) into a
    temporary directory, every rank its engine's part (an optimizer shard, an engine checkpoint),
    and the main process renames it into place with the training state and the manifest."""
    started = time.perf_counter()
    state = {"scheduler": run.scheduler.state_dict(), "rng": rng_state(), "step": at_step,
             "epoch": at_step // max(run.steps_per_epoch, 1), "sharding": run.engine.name,
             **run.engine.checkpoint_state()}
    run.accelerator.wait_for_everyone()
    weights = run.engine.full_weights()
    ref_weights = run.sync.full_weights() if run.sync is not None else None  # every rank
    tmp, path = checkpoint_dirs(run.out, at_step)[1], None
    if run.main:
        with written_whole(tmp, run.last_saved):
            save_model(run.engine.inner(), run.tokenizer, start_checkpoint(run.out, at_step), state_dict=weights)
            save_config(run.cfg, tmp / RUN_CONFIG, world_size=run.accelerator.num_processes)  # a resume's check
            if run.sync is not None:
                run.sync.save(tmp, ref_weights)
    run.accelerator.wait_for_everyone()  # the temporary directory exists
    with written_whole(tmp, run.last_saved):  # a full shared disk stops every rank
        run.engine.save_state(tmp)
    run.accelerator.wait_for_everyone()  # every rank wrote its part
    if run.main:
        with written_whole(tmp, run.last_saved):
            path = finish_checkpoint(run.out, at_step, state, run.cfg.save_total_limit)
    run.accelerator.wait_for_everyone()
    took = time.perf_counter() - started
    run.window.pause(took)  # throughput counts training time only
    if run.main:
        print(f"saved {path} in {took:.1f}s", file=sys.stderr)
    run.last_saved = path or run.out / f"checkpoint-{at_step}"
    return run.last_saved


def log(run: Run, record: dict[str, Any]) -> None:
    if run.main:
        write_metrics(run.metrics_path, record)
        if run.cfg.reports:
            run.accelerator.log({f"{record['split']}/{k}": v for k, v in record.items() if isinstance(v, float)},
                                step=record["step"])


COUNT = " count"  # evaluate's pair (or token) count among its sums; no metric is named so


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """The eval loss (and, for preference losses, the mean of every per-pair metric) over the eval
    set: the training step without its backward, summed over every rank's batches."""
    cfg, policy = run.cfg, run.policy
    was_training = policy.training
    policy.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0.0
    for step in epoch_plan(run.eval_groups, cfg, 0, run.accelerator.num_processes, run.accelerator.process_index,
                           run.capacity, train=False):
        result = forward_backward(run, step, run.eval_groups, run.eval_ref, train=False)
        for k, v in {"loss": result.loss_sum, **result.metric_sums}.items():
            sums[k] = sums.get(k, 0.0) + v.double()
        count += result.count
    policy.train(was_training)
    totals = summed_over_ranks(run.accelerator, {**{k: float(v) for k, v in sums.items()}, COUNT: count})
    n = totals.pop(COUNT)
    return {k: v / n for k, v in totals.items()} if n else {}


def run_eval(run: Run, at_step: int) -> dict[str, float]:
    started = time.perf_counter()
    result = evaluate(run)
    run.last_eval = {**result, "step": at_step}
    log(run, {"step": at_step, "stage": run.cfg.stage, "split": "eval", **result})
    if run.cfg.generate_during_eval:  # every rank: a sharded model generates on all of them; generation's
        with torch.compiler.set_stance("force_eager"):  # new lengths run the layers uncompiled
            eval_samples(run.policy, run.eval_ref, run.tokenizer,
                         [g.prompt_ids for g in run.eval_groups[: run.cfg.num_generations]], at_step, run.cfg,
                         run.accelerator, run.out)
    run.window.pause(time.perf_counter() - started)  # throughput counts training time only
    return result


def log_window(run: Run, grad_norm: float) -> dict[str, Any]:
    """The train record of the steps since the last one, to metrics.jsonl, the trackers and the bar."""
    cfg, window = run.cfg, run.window
    sums = summed_over_ranks(run.accelerator, window.metrics)
    seconds = time.perf_counter() - window.started
    unit = "tokens" if cfg.stage == "sft" else "pairs"
    record = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4), "stage": cfg.stage,
              "split": "train", "loss": window.loss / window.steps,
              "learning_rate": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
              "target_tokens" if cfg.stage == "sft" else "pairs": window.count,
              f"{unit}_per_s": window.count / seconds, "tokens_per_s": sum(window.rank_tokens) / seconds,
              "step_time_s": seconds / window.steps, **window.balance(), **memory(run.device),
              **({"mfu": window.flops / seconds / (run.peak_flops * run.accelerator.num_processes)}
                 if run.peak_flops else {}),
              **({"recompiles": compiled_graphs() - run.graphs} if run.graphs is not None else {}),
              "elapsed_s": round(process_age(), 2),
              **{k: v / window.count for k, v in sums.items()}}
    log(run, record)
    run.window = Window()
    return record


# --- one step -----------------------------------------------------------------------------------

def forward_backward(run: Run, step: Step, groups: list[Group], reference: ReferenceFn | None,
                     train: bool = True) -> StepResult:
    """The forwards (and, when ``train``, the backwards, through the engine) of one step's micro-batches.
    Batches are laid out on the host and pairs found there (on the device it would wait for the GPU);
    each micro-batch's attention masks are built once, for the policy and the reference."""
    cfg, engine = run.cfg, run.engine
    if run.compiled and uses_cuda_graphs(cfg.torch_compile_mode):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may now be overwritten
    on_host = [make_batch(groups, rows, cfg, run.device, run.buckets) for rows in step]
    micro_batches = [mb.to(run.device) for mb in on_host]
    backward, no_sync = (engine.backward, engine.no_sync) if train else (None, None)
    with activation_offload(cfg.activation_offloading and backward is not None, run.device):
        if cfg.stage == "sft":
            return sft_step(run.policy, micro_batches, cfg.logps_chunk_size, no_sync=no_sync, backward=backward)
        pair_config = PairConfig(cfg.pair_strategy, cfg.pair_min_gap)
        pairs = [batch_pair_indices(mb, pair_config) for mb in on_host]
        reference, masks = reference_for_step(reference, micro_batches,
                                              lambda mb: build_attention_masks(run.policy, mb))
        return preference_step(run.policy, micro_batches, run.loss_fn, reference, pair_config, cfg.logps_chunk_size,
                               no_sync=no_sync, pairs=pairs, backward=backward, masks=masks)


def optimizer_step(run: Run, loss: float, result: StepResult) -> float:
    """Check the step's loss, clip and step through the engine, check the gradient; a sign of
    divergence stops the run before the optimizer step (DeepSpeed: the engine steps first)."""
    guard, cfg = run.guard, run.cfg
    stop = guard.check_loss(loss, cfg.loss_spike_factor)
    grad_norm = float("nan")
    if not stop:
        if run.step == 0 and run.checks_start_agreement:
            check_start_agreement(result.metrics, cfg.beta, run.accelerator)
        grad_norm, stop = run.engine.clip_and_step(lambda norm: guard.check_gradient(norm, loss))
    if stop:
        raise TrainingError(f"{stop} at step {run.step + 1}; stopping before the optimizer step, without saving. "
                            f"The last good checkpoint is {run.last_saved or 'none (no checkpoint was saved yet)'}. "
                            "Lower learning_rate, or check the data and bf16 settings.")
    guard.update(loss, grad_norm)
    run.scheduler.step()
    run.engine.zero_grad()
    return grad_norm


def stop_for_signal(run: Run, received: int, bar: Any) -> None:
    """A signal reached some rank during the step: checkpoint (unless this step's is saved) and stop."""
    saved = run.last_saved if run.last_saved and run.last_saved.name == f"checkpoint-{run.step}" else save(run, run.step)
    bar.close()
    raise TrainingError(f"stopped by {signal.Signals(received).name}: saved {saved} at step {run.step}; resume "
                        "with --resume_from_checkpoint latest", exit_code=128 + received)


def warm_up(run: Run) -> None:
    """Compile every shape before step 1, so no step after it waits for a compile: one training
    step's forward and backward (and the evaluation's forward) on a row of each packed row length
    (the layers' graph has a symbolic length and compiles at the first; the rest checks that
    nothing else recompiles for a length),
    in training mode, the gradients then dropped and the RNG state put back. The rows' scored
    tokens differ from length to length (and twice at the first), so the output layer's kernels
    are compiled for any count. DeepSpeed's engine cannot drop gradients between steps: under it
    the first steps compile."""
    if not (run.compiled and run.warm_lengths) or run.engine.name == "deepspeed":
        return
    started, state = time.perf_counter(), rng_state()
    run.policy.train()  # the layers' graphs depend on the training flag
    rows = [(length, 4) for length in run.warm_lengths] + [(run.warm_lengths[0], 8)]
    for k, (length, share) in enumerate(rows):
        if run.main:
            print(f"compiling: row length {length} ({k + 1}/{len(rows)}), "
                  f"{time.perf_counter() - started:.0f}s so far", file=sys.stderr)
        dummy = [filler_group(length, run.cfg, share)]
        # a precomputed reference knows only the data's groups: the filler gets zeros (no model runs)
        train_ref, eval_ref = (zero_reference, zero_reference) if run.ref_mode == "precomputed" else \
            (run.train_ref, run.eval_ref)
        forward_backward(run, [[[0]]], dummy, train_ref)
        if run.eval_groups:
            run.policy.eval()
            with torch.no_grad():
                forward_backward(run, [[[0]]], dummy, eval_ref, train=False)
            run.policy.train()
        run.engine.zero_grad()
    synchronize(run.device)
    set_rng_state(state)
    if run.main:
        print(f"warm-up: {len(run.warm_lengths)} row lengths in {time.perf_counter() - started:.0f}s", file=sys.stderr)


def zero_reference(batch: Batch, masks: object) -> ResponseLogps:
    """Reference log-probs of 0 for every response of ``batch`` (the warm-up's stand-in)."""
    zeros = torch.zeros(batch.response_lengths.shape, device=batch.response_lengths.device)
    return ResponseLogps(sums=zeros, means=zeros, counts=batch.response_lengths, token_logps=zeros.new_zeros(0))


def filler_group(length: int, cfg: TrainConfig, share: int = 4) -> Group:
    """A group of ``length`` tokens as laid out (one response for SFT, a pair otherwise), each
    response ``length / share`` tokens long.

    >>> from types import SimpleNamespace as C
    >>> g = filler_group(1024, C(stage="preference", prefix_sharing=True))
    >>> g.num_tokens, [len(r) for r in g.response_ids]
    (1024, [256, 256])
    """
    responses = 1 if cfg.stage == "sft" else 2
    response = max(length // share, 1)
    prompt = length - responses * response if cfg.prefix_sharing else length // responses - response
    return Group([0] * max(prompt, 1), [[0] * response for _ in range(responses)])


STAGES_ENDED: list[float] = []  # process_age() at the end of each stage this process trained


def process_age() -> float:
    """Seconds since this process started (Linux's /proc; elsewhere since prefixpo.trainer loaded)."""
    return time.time() - process_start()


@functools.cache
def process_start() -> float:
    """When this process started, in ``time.time()`` seconds (read once: every log line asks)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return LOADED


LOADED = time.time()


# --- the loop -----------------------------------------------------------------------------------

def train_loop(run: Run) -> None:
    """Optimizer steps from ``run.step`` to ``run.total_steps``; a signal stops the run at the end of
    a step, with a checkpoint (a second one at once, without)."""
    cfg = run.cfg
    lengths = group_lengths(run.train_groups, cfg)
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not run.main or cfg.disable_progress_bar,
               desc=cfg.stage, unit="step", dynamic_ncols=True)
    run.policy.train()
    run.window = Window()  # throughput from here: setup and compilation left out
    # each rank's compute time (for slowest_rank_idle) needs the GPU drained around its work; one
    # rank has no one to wait for, and its host prepares the next step while the GPU still steps
    timed = run.accelerator.num_processes > 1
    with StopSignals() as signals:
        try:
            if run.eval_groups and run.step == 0:
                run_eval(run, 0)
            while run.step < run.total_steps:
                if timed:
                    synchronize(run.device)
                started = time.perf_counter()
                step_rows = run.rows_of_step(run.step)
                result = forward_backward(run, step_rows, run.train_groups, run.train_ref)
                if timed:
                    synchronize(run.device)
                compute_s = time.perf_counter() - started  # this rank's work, before the optimizer step
                tokens = sum(lengths[i] for mb in step_rows for row in mb for i in row)
                flops = sum(run.group_flops[i] for mb in step_rows for row in mb for i in row)
                # read before the optimizer step is queued: waiting for them then waits for the forward only
                loss_share, metrics = result.loss, result.metrics
                # one gather: every rank's loss share, real tokens, compute time, FLOPs and a stop signal received
                ranks = torch.tensor([[loss_share, tokens, compute_s, flops, signals.received or 0]],
                                     dtype=torch.float64)
                if timed:  # (one process has nothing to gather, even where a process group exists)
                    ranks = run.accelerator.gather(ranks.to(run.device)).cpu()
                loss = ranks[:, 0].sum().item()
                grad_norm = optimizer_step(run, loss, result)
                run.step += 1
                if run.sync is not None:  # TR-DPO: every ref_model_sync_steps steps, the policy mixed in
                    run.sync(run.step)
                run.window.add(loss, result.count, ranks[:, 1].tolist(), ranks[:, 2].tolist(), metrics,
                               ranks[:, 3].sum().item())
                bar.update(1)
                if run.step % cfg.logging_steps == 0 or run.step == run.total_steps:
                    record = log_window(run, grad_norm)
                    unit = "tokens" if cfg.stage == "sft" else "pairs"
                    bar.set_postfix(loss=f"{record['loss']:.4f}", **{f"{unit}/s": f"{record[f'{unit}_per_s']:.1f}"},
                                    **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
                if run.eval_groups and cfg.eval_steps and run.step % cfg.eval_steps == 0:
                    run_eval(run, run.step)
                if cfg.save_steps and run.step % cfg.save_steps == 0:
                    save(run, run.step)
                if received := int(ranks[:, 4].max().item()):  # any rank's signal stops every rank at this step
                    stop_for_signal(run, received, bar)
        except KeyboardInterrupt:  # a second signal: now, without a checkpoint
            bar.close()
            raise TrainingError(f"stopped at once by a second {signals.name or 'interrupt'}, without saving; the "
                                f"last checkpoint is {run.last_saved or 'none'}", exit_code=signals.exit_code) from None
    bar.close()


def finish(run: Run) -> dict[str, Any]:
    """The end's checkpoint (when saving), the last evaluation, ``final/`` and the done marker."""
    cfg = run.cfg
    if cfg.save_steps and (run.last_saved is None or run.last_saved.name != f"checkpoint-{run.step}"):
        save(run, run.step)  # a finished run can be continued to a larger max_steps from it
    if run.eval_groups and run.last_eval.get("step") != run.step:
        run_eval(run, run.step)
    final_metrics = dict(run.last_eval)
    run.accelerator.wait_for_everyone()
    weights = run.engine.full_weights()
    record = {**finished_record(cfg, run.step), "reference": run.ref_mode, "eval": final_metrics}
    if run.main:
        with written_whole(run.out / "final", run.last_saved):
            save_model(run.engine.inner(), run.tokenizer, run.out / "final", state_dict=weights)
        (run.out / DONE_MARKER).write_text(json.dumps(record))
        plot_quietly(run.out)
    run.accelerator.wait_for_everyone()
    if cfg.reports:
        run.accelerator.end_training()
    return record


def train_stage(cfg: TrainConfig) -> dict[str, Any]:
    """Train one stage; returns what ``OUTPUT_DIR/training_done.json`` records (``steps``, the
    length settings, ``reference``, the last ``eval`` metrics). The final model goes to OUTPUT_DIR/final."""
    run, checkpoint = setup(cfg)
    restore(run, checkpoint)
    if cfg.reports:
        run.accelerator.init_trackers(run.out.name, config={k: str(v) for k, v in vars(cfg).items()})
    if run.main and run.capacity:
        rows = [r for s in epoch_plan(run.train_groups, cfg, 0, 1, 0, run.capacity) for m in s for r in m]
        multiple = 0 if run.buckets else pad_multiple(run.device)
        stats = packing_stats(run.train_groups, rows, PackingConfig(capacity=run.capacity), run.buckets, multiple)
        print(f"packing: {stats.as_dict()}, row lengths {run.buckets or f'any multiple of {multiple}'}",
              file=sys.stderr)
    started = time.perf_counter()
    warm_up(run)
    run.startup["warm-up"] = time.perf_counter() - started
    if run.main:
        print(f"start-up: {process_age():.1f}s since launch (" + ", ".join(f"{k} {v:.1f}s" for k, v in
                                                                  run.startup.items()) + ")", file=sys.stderr)
    run.graphs = compiled_graphs() if run.compiled else None
    train_loop(run)
    done = finish(run)
    STAGES_ENDED.append(process_age())  # a later stage's start-up line counts from here
    return done
