"""``TrainConfig``: every training config key, its default and its checks.

Option names follow transformers' TrainingArguments and TRL's DPOConfig where one exists, so a
TRL config needs few changes (docs/training.md has the mapping). ``prefixpo.config`` reads YAML
files and command-line overrides into validated ``TrainConfig`` stages; ``prefixpo.trl_config``
maps a ``trl dpo`` YAML onto these keys.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

from prefixpo.errors import ConfigError
from prefixpo.losses import F_DIVERGENCES, LOSSES, get_loss, loss_requires_reference
from prefixpo.pairs import PairConfig

STAGES = ("sft", "preference")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REFERENCE_MODES = ("auto", "model", "precomputed", "none")
REPORT_TO = ("none", "tensorboard", "wandb")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
POSITIVE_INTEGERS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "logps_chunk_size", "max_length", "save_total_limit", "dataset_num_proc",
                     "ref_model_sync_steps")
# optimizer and loss values: key -> (low, high, what the message says); low <= value < high
RANGES = {"adam_beta1": (0, 1, "in [0, 1)"), "adam_beta2": (0, 1, "in [0, 1)"),
          "adam_epsilon": (0, math.inf, ">= 0"), "weight_decay": (0, math.inf, ">= 0"),
          "max_grad_norm": (0, math.inf, ">= 0 (0 or null: no clipping)"),
          "label_smoothing": (0, 0.5, "in [0, 0.5)"), "lora_dropout": (0, 1, "in [0, 1)"),
          "pair_min_gap": (0, math.inf, ">= 0"), "loss_spike_factor": (0, math.inf, ">= 0 (0: off)")}
BOOLEANS = ("reference_free", "use_weighting", "disable_dropout", "sync_ref_model", "activation_offloading")


def _bad(key: str, message: str) -> ConfigError:
    return ConfigError(f"config key `{key}`: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _loss_names(loss_type: str | list[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


@dataclass
class TrainConfig:
    # model and data
    model_name_or_path: str = ""
    tokenizer_name_or_path: str | None = None
    trust_remote_code: bool = False
    stage: str = "preference"
    dataset: str | list[Any] = ""  # one dataset, or a mixture: a list of paths / {path: ..., weight: ...}
    dataset_split: str = "train"
    dataset_format: str | None = None
    eval_dataset: str | list[Any] | None = None
    eval_split: str | None = None
    max_samples: int | None = None
    data: dict[str, Any] = field(default_factory=dict)  # further DataConfig keys (column maps, ...)
    max_length: int = 1024
    max_prompt_length: int | None = None
    on_bad_row: str = "error"
    dataset_num_proc: int = 1
    # optimisation
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0  # 0 or null: no clipping (as in transformers and TRL)
    loss_spike_factor: float = 10.0  # stop when a step's loss exceeds this times its level so far (0: never)
    seed: int = 42
    bf16: bool = False
    # with bf16 on one GPU or DDP: trainable weights and optimizer state in fp32, compute under autocast
    # (FSDP2 always does this); false holds them in bf16
    fp32_master_weights: bool = False
    gradient_checkpointing: bool = False
    # auto: every decoder layer compiled (before step 1, every packed row length run), on CUDA with packing
    torch_compile: bool | str = "auto"
    torch_compile_dynamic: bool = True  # one graph with a symbolic row length; false: a graph per row length
    # torch.compile's mode for the layers (transformers' key): default, reduce-overhead (CUDA graphs),
    # max-autotune, max-autotune-no-cudagraphs
    torch_compile_mode: str = "default"
    # the compiled layers round bf16 as the uncompiled model does after each operation (inductor's
    # emulate_precision_casts), so policy and reference graphs agree at step 1; false keeps fused
    # intermediates in fp32, which rounds differently in the training and no-gradient graphs
    torch_compile_eager_numerics: bool = True
    activation_offloading: bool = False  # as TRL: activations saved for the backward kept in CPU memory
    # preference loss
    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    loss_params: dict[str, Any] = field(default_factory=dict)
    pair_strategy: str = "all"
    pair_min_gap: float = 0.0
    reference_mode: str = "auto"
    ref_model_name_or_path: str | None = None
    reference_free: bool = False  # reference log-probs taken as 0; no reference model
    f_divergence_type: str = "reverse_kl"  # f-DPO: reverse_kl, forward_kl, js_divergence, alpha_divergence
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None  # LD-DPO weight of the tokens beyond the shorter response's length
    use_weighting: bool = False  # WPO pair weights
    sync_ref_model: bool = False  # TR-DPO: mix the policy into the reference every ref_model_sync_steps steps
    ref_model_mixup_alpha: float = 0.6  # TR-DPO: reference <- alpha * policy + (1 - alpha) * reference
    ref_model_sync_steps: int = 512
    disable_dropout: bool = True  # as TRL: every nn.Dropout of the policy (LoRA's too) gets p = 0
    # LoRA
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 base weights (needs bitsandbytes, CUDA and use_peft)
    # prefixpo
    prefix_sharing: bool = True
    # auto: pack where the attention is FlexAttention (CUDA), whose mask skips the blocks between
    # packed groups; a dense mask (CPU, attention_backend sdpa) costs a packed row its length squared
    packing: bool | str = "auto"
    packing_capacity: int | str = "auto"  # auto: micro-batch size x the longest group, in multiples of 128
    packing_num_buckets: int = 0  # packed row lengths, from the data; 0: any multiple of 128
    attention_backend: str = "auto"
    logps_chunk_size: int = 1024
    # output, logging, evaluation
    output_dir: str = "runs/prefixpo"
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int = 2
    report_to: str | list[str] = "none"
    resume_from_checkpoint: str | None = None  # latest, auto (latest if there is one, else start) or a path
    overwrite_output_dir: bool = False  # replace the run an output_dir already holds
    generate_during_eval: bool = False
    num_generations: int = 4
    max_new_tokens: int = 64
    disable_progress_bar: bool = False
    torch_num_threads: int | None = None  # CPU threads for torch (None: torch's default)

    def validate(self) -> TrainConfig:
        """Check every key, the cheap checks first, so a bad value stops the run before anything loads;
        the first problem raises ``ConfigError`` naming the key. Normalises ``resume_from_checkpoint``
        (true/false) and ``max_grad_norm`` (null is 0). Returns ``self``."""
        self._check_required()
        self._check_choices()
        self._check_counts()
        self._check_resume()
        self._check_optimisation()
        self._check_packing()
        self._check_installed()
        self._check_data()
        self._check_loss_options()
        self._check_loss()
        self._check_sync()
        return self

    def _check_required(self) -> None:
        if not self.model_name_or_path:
            raise _bad("model_name_or_path", "is required (a hub name, a local directory with weights, or a model "
                       "config file (config.json) for random weights)")
        if self.dataset in ("", None, []):
            raise _bad("dataset", "is required (a local json/jsonl/parquet/csv file, a saved dataset "
                       "directory, or a hub dataset name; or a list of them)")

    def _check_choices(self) -> None:
        choices = {"stage": STAGES, "lr_scheduler_type": SCHEDULERS, "reference_mode": REFERENCE_MODES,
                   "attention_backend": ("auto", "sdpa", "flex"), "on_bad_row": ("error", "skip")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise _bad(key, f"got {getattr(self, key)!r}; choose one of {', '.join(allowed)}")

    def _check_counts(self) -> None:
        """Batch sizes, lengths, step intervals: positive integers (eval and save steps may be null)."""
        for key in POSITIVE_INTEGERS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(key, f"must be a positive integer, got {value!r}")
        for key in ("eval_steps", "save_steps"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise _bad(key, f"must be a positive integer or null, got {value!r}")

    def _check_resume(self) -> None:
        if isinstance(self.resume_from_checkpoint, bool):  # transformers' meaning: true is the newest checkpoint
            self.resume_from_checkpoint = "latest" if self.resume_from_checkpoint else None
        if self.resume_from_checkpoint is not None and not isinstance(self.resume_from_checkpoint, str):
            raise _bad("resume_from_checkpoint", f"got {self.resume_from_checkpoint!r}; give latest, auto or the "
                       "path of a checkpoint directory")

    def _check_optimisation(self) -> None:
        """Learning rate, optimizer and loss values (``RANGES``), seed, schedule length and warmup."""
        if not (_is_number(self.learning_rate) and 0 < self.learning_rate < math.inf):
            raise _bad("learning_rate", f"must be a number > 0, got {self.learning_rate!r}")
        if self.max_grad_norm is None:
            self.max_grad_norm = 0.0
        for key, (low, high, text) in RANGES.items():
            value = getattr(self, key)
            if not (_is_number(value) and low <= value < high):
                raise _bad(key, f"must be a number {text}, got {value!r}")
        for key in ("warmup_steps", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or (key == "warmup_steps" and value < 0):
                raise _bad(key, f"must be {'a non-negative ' if key == 'warmup_steps' else 'an '}integer, got "
                           f"{value!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int):
            raise _bad("max_steps", f"must be an integer (-1: from num_train_epochs), got {self.max_steps!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise _bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise _bad("num_train_epochs", "must be > 0 unless max_steps is set")

    def _check_packing(self) -> None:
        """Packed rows and their compilation: buckets, capacity, torch_compile."""
        if isinstance(self.packing_num_buckets, bool) or not isinstance(self.packing_num_buckets, int) \
                or self.packing_num_buckets < 0:
            raise _bad("packing_num_buckets", "must be a number of row lengths, or 0 for rows padded to any multiple "
                       f"of 128, got {self.packing_num_buckets!r}")
        if self.packing_capacity != "auto" and (isinstance(self.packing_capacity, bool)
                                                or not isinstance(self.packing_capacity, int)
                                                or self.packing_capacity < 128 or self.packing_capacity % 128):
            raise _bad("packing_capacity", f"must be auto or a positive multiple of 128, got {self.packing_capacity!r}")
        if self.packing not in (True, False, "auto"):
            raise _bad("packing", f"must be true, false or auto, got {self.packing!r}")
        if self.torch_compile not in (True, False, "auto"):
            raise _bad("torch_compile", f"must be true, false or auto, got {self.torch_compile!r}")
        if not isinstance(self.torch_compile_dynamic, bool):
            raise _bad("torch_compile_dynamic", f"must be true or false, got {self.torch_compile_dynamic!r}")
        if not isinstance(self.torch_compile_eager_numerics, bool):
            raise _bad("torch_compile_eager_numerics", f"must be true or false, got {self.torch_compile_eager_numerics!r}")
        if self.torch_compile_mode not in COMPILE_MODES:
            raise _bad("torch_compile_mode", f"must be one of {', '.join(COMPILE_MODES)}, got {self.torch_compile_mode!r}")
        if not self.torch_compile_dynamic and self.packing_num_buckets == 0:
            raise _bad("torch_compile_dynamic", "false compiles a graph per row length, and packing_num_buckets: 0 "
                       "(the default) makes rows of any length; set packing_num_buckets to a number of lengths "
                       "(e.g. 4)")
        if self.packing is not False and self.packing_capacity != "auto" and self.packing_capacity < self.max_length:
            raise _bad("packing_capacity", f"({self.packing_capacity}) must be at least max_length "
                       f"({self.max_length}), so every group fits in a row")

    def _check_installed(self) -> None:
        """Keys that need an optional package: the trackers of report_to, bitsandbytes for load_in_4bit."""
        for r in [self.report_to] if isinstance(self.report_to, str) else list(self.report_to):
            if r not in REPORT_TO:
                raise _bad("report_to", f"got {r!r}; choose from {', '.join(REPORT_TO)}")
            if r != "none" and importlib.util.find_spec(r) is None:
                raise _bad("report_to", f"{r} is not installed (pip install {r})")
        if self.load_in_4bit:
            if not self.use_peft:
                raise _bad("load_in_4bit", "4-bit base weights train only adapters: set use_peft: true")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise _bad("load_in_4bit", "needs the bitsandbytes package (pip install bitsandbytes) and a CUDA GPU")

    def _check_data(self) -> None:
        """The ``data`` keys and every train and eval dataset entry, as ``DataConfig`` takes them."""
        # in the function: prefixpo.data imports datasets (about a second), which the checks above skip
        from prefixpo.data.config import DataConfig
        from prefixpo.data.errors import DataError, UnknownDataKey

        try:
            DataConfig.from_dict({**self.data_defaults(), "dataset": "-"})
        except UnknownDataKey as err:
            raise ConfigError(f"data config `data`: {err}") from None
        except DataError as err:
            raise ConfigError(f"data config keys: {err}") from None
        try:
            self.data_sources()
            if self.eval_dataset is not None:
                self.data_sources(evaluation=True)
        except DataError as err:  # a MixtureError, naming the key path
            raise ConfigError(str(err)) from None

    def _check_loss_options(self) -> None:
        """The switches and the LD-DPO and f-DPO values of the preference loss."""
        for key in BOOLEANS:
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, f"must be true or false, got {getattr(self, key)!r}")
        if self.ld_alpha is not None and not (_is_number(self.ld_alpha) and 0 <= self.ld_alpha <= 1):
            raise _bad("ld_alpha", f"must be a number in [0, 1] or null, got {self.ld_alpha!r}")
        if self.ld_alpha is not None and self.reference_mode == "precomputed":
            raise _bad("ld_alpha", "needs the reference's per-token log-probs, which a precomputed reference does "
                       "not keep: use reference_mode: model (or auto)")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise _bad("f_divergence_type", f"got {self.f_divergence_type!r}; choose one of {', '.join(F_DIVERGENCES)}")
        if not (_is_number(self.f_alpha_divergence_coef) and math.isfinite(self.f_alpha_divergence_coef)):
            raise _bad("f_alpha_divergence_coef", f"must be a finite number, got {self.f_alpha_divergence_coef!r}")
        if self.f_divergence_type != "reverse_kl" and self.stage == "preference":
            without = [n for n in _loss_names(self.loss_type)
                       if n in LOSSES and n != "sft" and "f_divergence_type" not in LOSSES[n].defaults]
            if without:
                raise _bad("f_divergence_type", f"{self.f_divergence_type} is defined for losses built on the "
                           f"chosen - rejected score difference, not for {without} (TRL refuses them too)")

    def _check_loss(self) -> None:
        """The loss and pair strategy, as ``get_loss`` and ``PairConfig`` take them."""
        if ("listwise" in _loss_names(self.loss_type)) != (self.pair_strategy == "ranking"):
            raise _bad("pair_strategy", "loss_type listwise and pair_strategy ranking go together (the listwise "
                       f"loss takes each group's ranking); got loss_type {self.loss_type!r} with pair_strategy "
                       f"{self.pair_strategy!r}")
        if self.stage != "preference":
            return
        if not (_is_number(self.beta) and math.isfinite(self.beta)):
            raise _bad("beta", f"must be a number, got {self.beta!r}")
        try:
            get_loss(self.loss_type, **self.loss_kwargs())
        except ValueError as err:  # named by the key that holds the parameter, where it is a key of its own
            key = next((k for k in ("beta", "label_smoothing") if f"parameter {k}=" in str(err)), "loss_type")
            raise _bad(key, str(err)) from None
        try:
            PairConfig(self.pair_strategy, self.pair_min_gap)
        except ValueError as err:
            raise _bad("pair_strategy", str(err)) from None

    def _check_sync(self) -> None:
        """TR-DPO's keys: a number in [0, 1] and a reference model that can change (the step count is
        checked with the other positive integers)."""
        alpha = self.ref_model_mixup_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise _bad("ref_model_mixup_alpha", f"must be a number in [0, 1], got {alpha!r}")
        if not self.sync_ref_model or self.stage != "preference":
            return
        why = None
        if self.use_peft:
            why = "with use_peft the reference is the policy with its adapters off (or the base model), not a " \
                  "separate copy of the trained weights to mix into (TRL refuses it too)"
        elif self.reference_mode in ("precomputed", "none"):
            why = f"reference_mode: {self.reference_mode} keeps no reference model to update; use model (or auto)"
        elif not loss_requires_reference(self.loss_type, self.reference_free):
            why = "the loss uses no reference model (reference_free, or a reference-free loss)"
        if why:
            raise _bad("sync_ref_model", why)

    def data_defaults(self, evaluation: bool = False) -> dict[str, Any]:
        """The DataConfig keys every train (or eval) dataset starts from: the run's data keys and ``data``."""
        split = (self.eval_split or self.dataset_split) if evaluation else self.dataset_split
        return {"split": split, "format": self.dataset_format or "auto", "max_samples": self.max_samples,
                "max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "on_bad_row": self.on_bad_row, "num_proc": self.dataset_num_proc, "seed": self.seed,
                # SFT trains each group's first response: rows merged by prompt would lose the others'
                **({"merge_prompts": False, "pairs": False} if self.stage == "sft" else {}), **self.data}

    def data_sources(self, evaluation: bool = False) -> list[Any]:
        """The ``DataConfig`` of each train (or eval) dataset: the defaults, then its own keys."""
        # in the function: prefixpo.data imports datasets (about a second), which a config error need not wait for
        from prefixpo.data.mixture import resolve_sources

        key = "eval_dataset" if evaluation else "dataset"
        return resolve_sources(getattr(self, key), self.data_defaults(evaluation), key)

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``get_loss``: beta, label_smoothing and the f-divergence where the loss
        has them (an f-divergence other than reverse_kl is given to every loss, so a loss without one
        is refused, as TRL does), and the options reference_free, ld_alpha, use_weighting."""
        names = _loss_names(self.loss_type)
        kwargs: dict[str, Any] = {}
        if len(names) > 1:
            kwargs["loss_weights"] = self.loss_weights
        elif self.loss_weights is not None:
            kwargs["loss_weights"] = self.loss_weights
        shared = {}
        if any("beta" in LOSSES[n].defaults for n in names if n in LOSSES):
            shared["beta"] = self.beta
        if self.label_smoothing and any("label_smoothing" in LOSSES[n].defaults for n in names if n in LOSSES):
            shared["label_smoothing"] = self.label_smoothing
        if self.f_divergence_type != "reverse_kl":
            shared["f_divergence_type"] = self.f_divergence_type
            shared["f_alpha_divergence_coef"] = self.f_alpha_divergence_coef
        kwargs.update(reference_free=self.reference_free, ld_alpha=self.ld_alpha, use_weighting=self.use_weighting)
        if len(names) == 1:
            kwargs.update(shared, **self.loss_params)
        else:
            kwargs.update(shared)
            kwargs["params"] = self.loss_params
        return kwargs

    @property
    def reports(self) -> list[str]:
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [r for r in reports if r != "none"]


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
FLOAT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)}
