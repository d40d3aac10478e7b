"""A ``trl dpo --config`` YAML read as a prefixpo config: TRL's keys mapped, the rest warned or refused.

A YAML file is a TRL config when it holds a key that only TRL has (``dataset_name``, ``datasets``,
``eval_strategy``, ``dtype``, ...; ``TRL_MARKERS``) and no ``stages``. Its keys are those of TRL
1.16's ``ScriptArguments``, ``DPOConfig`` (with ``TrainingArguments``), ``ModelConfig`` and
``DatasetMixtureConfig``; each is one of:

- mapped (``MAPPED``): a prefixpo key of the same name, or a converter that gives prefixpo keys;
- honoured only at one value (``HONOURED``): a key that would change the training in a way
  prefixpo cannot follow; any other value is an error naming the key;
- ignored (``IGNORED``): logistics that do not change the optimisation (Hub uploads, data loader
  workers, log levels); listed, names only, in one warning line.

TRL's defaults are filled in first (``TRL_DEFAULTS``), so a key the file leaves out means what it
means to ``trl dpo``: 3 epochs, 8 pairs per device, gradient checkpointing, bf16 mixed precision
with fp32 weights, dropout off, a checkpoint every 500 steps (all kept) in ``trainer_output``.
Keys that only prefixpo has (``tokenizer_name_or_path``, ``max_samples``, ...) pass through.

>>> cfg, ignored = from_trl({"model_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
...                          "dataset_name": "trl-lib/ultrafeedback_binarized", "learning_rate": 5.0e-7,
...                          "eval_strategy": "steps", "eval_steps": 50, "bf16": True,
...                          "use_peft": True, "lora_r": 32, "push_to_hub": True})
>>> cfg["dataset"], cfg["eval_dataset"], cfg["eval_split"], cfg["eval_steps"]
('trl-lib/ultrafeedback_binarized', 'trl-lib/ultrafeedback_binarized', 'test', 50)
>>> cfg["learning_rate"], cfg["num_train_epochs"], cfg["per_device_train_batch_size"], cfg["lora_r"]
(5e-07, 3.0, 8, 32)
>>> cfg["bf16"], cfg["fp32_master_weights"], cfg["lora_target_modules"], cfg["lora_dropout"]
(True, True, None, 0.0)
>>> ignored
['push_to_hub']
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from prefixpo.errors import ConfigError
from prefixpo.losses import LOSSES
from prefixpo.train_config import FIELDS

Converter = Callable[[Any, Mapping[str, Any]], dict[str, Any]]
KEEP_ALL = 1_000_000  # save_total_limit for TRL's null (keep every checkpoint)


def refuse(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"TRL config key `{key}`: {value!r} is not supported by prefixpo ({why})")


def to(name: str) -> Converter:
    """The value under prefixpo's ``name``."""
    return lambda value, _: {name: value}


def consumed(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """Read by another key's converter."""
    return {}


# --- converters -------------------------------------------------------------------------------

LOSS_NAMES: dict[str, str] = {}  # TRL 1.16's name -> prefixpo's where they differ; every name is the same
TRL_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def loss_names(values: Mapping[str, Any]) -> list[str]:
    names = values["loss_type"]
    return [names] if isinstance(names, str) else list(names)


def loss_type(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    names = [LOSS_NAMES.get(n, n) for n in loss_names(values)]
    for name in names:
        if name not in LOSSES:
            raise refuse("loss_type", name, f"prefixpo's losses: {', '.join(LOSSES)}")
    out: dict[str, Any] = {"loss_type": names[0] if len(names) == 1 else names}
    if len(names) > 1 and values.get("loss_weights") is None:
        out["loss_weights"] = [1.0] * len(names)  # TRL: equal weights
    return out


def discopop_tau(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    names = loss_names(values)
    if "discopop" not in names:
        return {}
    params = {"tau": float(value)}
    return {"loss_params": params if len(names) == 1 else {"discopop": params}}


def weights_dtype(values: Mapping[str, Any]) -> Any:
    """The dtype TRL loads the weights in: ``model_init_kwargs`` over ``dtype`` (``torch_dtype``: older)."""
    init = values.get("model_init_kwargs") or {}
    top = values["torch_dtype"] if "torch_dtype" in values and values["dtype"] == "float32" else values["dtype"]
    return init.get("dtype", init.get("torch_dtype", top))


def precision(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """``bf16`` with the weights' ``dtype``: fp32 weights under bf16 autocast, or bf16 weights."""
    dtype = weights_dtype(values)
    if values.get("fp16"):
        raise refuse("fp16", True, "fp16 mixed precision; use bf16")
    bf16 = (not values.get("fp16")) if values["bf16"] is None else bool(values["bf16"])
    if dtype in ("bfloat16", "bf16"):
        return {"bf16": True, "fp32_master_weights": False}
    if dtype in ("float32", "fp32", None):
        return {"bf16": bf16, "fp32_master_weights": bf16}
    raise refuse("dtype", dtype, "give float32 (fp32 weights, bf16 autocast with bf16: true) or bfloat16")


def model_init_kwargs(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in (value or {}).items():
        if key == "trust_remote_code":
            out["trust_remote_code"] = item
        elif key == "revision" and item not in (None, "main"):
            raise refuse("model_init_kwargs.revision", item, "prefixpo loads the default revision")
        elif key not in ("dtype", "torch_dtype", "revision", "attn_implementation", "use_cache"):
            raise refuse(f"model_init_kwargs.{key}", item, "prefixpo passes no further from_pretrained arguments")
    return out


def dataset_name(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    if values.get("datasets"):
        return {}  # TRL: `datasets` wins, `dataset_name` is ignored
    if value is None:
        raise ConfigError("TRL config: give `dataset_name` or `datasets`")
    out: dict[str, Any] = {"dataset": value, "dataset_split": values["dataset_train_split"]}
    if values.get("dataset_config") is not None:
        out["data"] = {**(values.get("data") or {}), "subset": values["dataset_config"]}
    return out


def mixture_entry(i: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    where = f"datasets[{i}]"
    for key in ("data_dir", "data_files", "columns", "fraction"):
        if entry.get(key) is not None:
            why = ("TRL's fraction caps the mixture by every dataset's size; use prefixpo's `weight` or "
                   "`max_samples` per dataset" if key == "fraction" else "give the files as `path`")
            raise refuse(f"{where}.{key}", entry[key], why)
    unknown = set(entry) - {"path", "name", "split", "data_dir", "data_files", "columns", "fraction"}
    if unknown or "path" not in entry:
        raise ConfigError(f"TRL config key `{where}`: needs `path`, takes name, split (got {sorted(entry)})")
    out = {"path": entry["path"], "split": entry.get("split", "train")}
    if entry.get("name") is not None:
        out["subset"] = entry["name"]
    return out


def datasets(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    if not value:
        return {}
    if values["dataset_train_split"] != "train":
        raise refuse("dataset_train_split", values["dataset_train_split"], "a TRL mixture is its `train` split")
    if values.get("test_split_size") is not None:
        raise refuse("test_split_size", values["test_split_size"], "give an eval dataset as `eval_dataset`")
    return {"dataset": [mixture_entry(i, entry) for i, entry in enumerate(value)]}


def steps(key: str, value: Any) -> int:
    if isinstance(value, float) and 0 < value < 1:
        raise refuse(key, value, "a ratio of the total steps; give a number of steps")
    return int(value)


def eval_strategy(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    if value == "no":
        return {}
    if value != "steps":
        raise refuse("eval_strategy", value, "prefixpo evaluates every eval_steps steps: use steps")
    if values.get("datasets"):
        raise refuse("eval_strategy", value, "a TRL mixture has no test split here; give `eval_dataset`")
    every = values.get("eval_steps") or values["logging_steps"]  # TRL: eval_steps defaults to logging_steps
    return {"eval_dataset": values["dataset_name"], "eval_split": values["dataset_test_split"],
            "eval_steps": steps("eval_steps", every)}


def save_strategy(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    if value == "no":
        return {"save_steps": None}
    if value != "steps":
        raise refuse("save_strategy", value, "prefixpo saves every save_steps steps: use steps or no")
    limit = values["save_total_limit"]
    return {"save_steps": steps("save_steps", values["save_steps"]),
            "save_total_limit": KEEP_ALL if limit is None else limit}


def warmup_steps(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(value, float) and 0 < value < 1:  # transformers 5: a ratio of the steps
        return {"warmup_ratio": value}
    return {"warmup_steps": int(value)}


def disable_dropout(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"disable_dropout": bool(value)}
    if value and values.get("use_peft"):
        out["lora_dropout"] = 0.0  # TRL zeroes every nn.Dropout after adding adapters, LoRA's too
    return out


def load_in_4bit(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """prefixpo's QLoRA: NF4 with its constants quantized too, bf16 compute (TRL computes in ``dtype``)."""
    if value and not values.get("use_bnb_nested_quant"):
        raise refuse("use_bnb_nested_quant", False, "prefixpo's QLoRA quantizes its constants too: set it true")
    if value and weights_dtype(values) not in ("bfloat16", "bf16"):
        raise refuse("dtype", weights_dtype(values), "prefixpo's QLoRA computes in bf16: set dtype: bfloat16")
    return {"load_in_4bit": bool(value)}


def truncation_mode(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    if value != "keep_start":
        raise refuse("truncation_mode", value, "prefixpo cuts a long row's responses at their end: keep_start")
    return {"data": {**(values.get("data") or {}), "truncation": "keep_start"}}


def positive_or_refuse(key: str, why: str) -> Converter:
    def convert(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
        if value is None:
            raise refuse(key, value, why)
        return {key: steps(key, value)}
    return convert


def optim(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    if value not in ("adamw_torch", "adamw_torch_fused"):
        raise refuse("optim", value, "prefixpo trains with torch's AdamW: adamw_torch or adamw_torch_fused")
    return {}


def packing(value: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    if value:
        raise refuse("packing", value, "in a TRL config it is TRL's; prefixpo's packing counts "
                     "per_device_train_batch_size in packed rows: set it with --packing true on the command line")
    return {}


# --- the tables ---------------------------------------------------------------------------------

# TRL key -> prefixpo key (the same name) or a converter
MAPPED: dict[str, str | Converter] = {
    # ModelConfig, ScriptArguments, DatasetMixtureConfig
    "model_name_or_path": "model_name_or_path", "dataset_name": dataset_name, "datasets": datasets,
    "dataset_config": consumed, "dataset_train_split": consumed, "dataset_test_split": consumed,
    "test_split_size": consumed, "dtype": precision, "torch_dtype": consumed,
    "use_peft": "use_peft", "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "lora_target_modules": "lora_target_modules", "load_in_4bit": load_in_4bit,
    "use_bnb_nested_quant": consumed,
    # DPOConfig
    "model_init_kwargs": model_init_kwargs, "trust_remote_code": "trust_remote_code",
    "disable_dropout": disable_dropout, "dataset_num_proc": lambda v, _: {"dataset_num_proc": v or 1},
    "max_length": positive_or_refuse("max_length", "prefixpo needs a length limit"),
    "max_prompt_length": "max_prompt_length", "truncation_mode": truncation_mode,
    "precompute_ref_log_probs": lambda v, _: {"reference_mode": "precomputed"} if v else {},
    "loss_type": loss_type, "loss_weights": "loss_weights", "label_smoothing": "label_smoothing",
    "beta": "beta", "discopop_tau": discopop_tau,
    "ld_alpha": "ld_alpha", "f_divergence_type": "f_divergence_type",
    "f_alpha_divergence_coef": "f_alpha_divergence_coef", "use_weighting": "use_weighting",
    "sync_ref_model": "sync_ref_model", "ref_model_mixup_alpha": "ref_model_mixup_alpha",
    "ref_model_sync_steps": "ref_model_sync_steps", "reference_free": "reference_free",
    # TrainingArguments
    "output_dir": lambda v, _: {"output_dir": v or "trainer_output"},
    "per_device_train_batch_size": "per_device_train_batch_size",
    "per_device_eval_batch_size": "per_device_eval_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "num_train_epochs": "num_train_epochs",
    "max_steps": "max_steps", "learning_rate": "learning_rate", "lr_scheduler_type": "lr_scheduler_type",
    "warmup_ratio": "warmup_ratio", "warmup_steps": warmup_steps, "weight_decay": "weight_decay",
    "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2", "adam_epsilon": "adam_epsilon",
    "max_grad_norm": "max_grad_norm", "optim": optim, "seed": "seed", "bf16": consumed, "fp16": consumed,
    "gradient_checkpointing": "gradient_checkpointing", "torch_compile": "torch_compile",
    # as in transformers, a mode turns compilation on
    "torch_compile_mode": lambda v, _: {"torch_compile_mode": v or "default", **({"torch_compile": True} if v else {})},
    "activation_offloading": "activation_offloading",
    "logging_steps": lambda v, _: {"logging_steps": steps("logging_steps", v)},
    "eval_strategy": eval_strategy, "eval_steps": consumed, "save_strategy": save_strategy,
    "save_steps": consumed, "save_total_limit": consumed, "report_to": "report_to",
    "resume_from_checkpoint": "resume_from_checkpoint", "overwrite_output_dir": "overwrite_output_dir",
    "disable_tqdm": lambda v, _: {"disable_progress_bar": bool(v)}, "packing": packing,
}

# keys that change the training: only these values are honoured (value list, why)
HONOURED: dict[str, tuple[tuple[Any, ...], str]] = {
    "model_revision": (("main", None), "prefixpo loads the default revision"),
    "lora_target_parameters": ((None,), "adapters on parameters"),
    "lora_modules_to_save": ((None,), "fully trained extra modules"),
    "lora_task_type": (("CAUSAL_LM",), "causal LMs only"),
    "use_rslora": ((False,), "rank-stabilised LoRA"), "use_dora": ((False,), "DoRA"),
    "load_in_8bit": ((False,), "8-bit base weights; QLoRA is load_in_4bit"),
    "bnb_4bit_quant_type": (("nf4",), "prefixpo's QLoRA is NF4"),
    "router_aux_loss_coef": ((None,), "a Mixture-of-Experts auxiliary loss"),
    "max_completion_length": ((None,), "prefixpo bounds prompt + response by max_length"),
    "lr_scheduler_kwargs": ((None, {}), "scheduler arguments"),
    "optim_args": ((None, ""), "optimizer arguments"), "optim_target_modules": ((None,), "per-module optimizers"),
    "auto_find_batch_size": ((False,), "it changes the batch size"),
    "neftune_noise_alpha": ((None,), "NEFTune noise"),
    "train_sampling_strategy": (("random",), "prefixpo shuffles groups by seed"),
    "data_seed": ((None,), "prefixpo's data order follows seed"),
    "dataloader_drop_last": ((False,), "prefixpo's epoch plan decides the batches"),
    "load_best_model_at_end": ((False,), "prefixpo's final model is the last step's"),
    "fsdp": ((None, "", []), "give FSDP in the accelerate launch config (docs/training.md, Several GPUs)"),
    "fsdp_config": ((None, {}), "give FSDP in the accelerate launch config"),
    "deepspeed": ((None,), "give DeepSpeed in the accelerate launch config"),
    "parallelism_config": ((None,), "give parallelism in the accelerate launch config"),
    "label_smoothing_factor": ((0, 0.0), "DPO's loss uses label_smoothing"),
    "logging_strategy": (("steps",), "prefixpo logs every logging_steps steps"),
}

# logistics: no effect on the optimisation; warned
IGNORED = frozenset({
    "padding_free",  # TRL 1.16 ignores it (falls back to padding); prefixpo's `packing` changes the batch size
    "dataset_streaming", "ignore_bias_buffers", "streaming", "attn_implementation", "bnb_4bit_quant_storage",
    "pad_to_multiple_of", "pad_token", "precompute_ref_batch_size",
    "average_tokens_across_devices", "bf16_full_eval", "fp16_full_eval", "tf32", "activation_checkpointing",
    "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs", "torch_compile_backend",
    "use_liger_kernel", "liger_kernel_config", "use_cache", "torch_empty_cache_steps",
    "logging_first_step", "log_on_each_node", "logging_nan_inf_filter", "include_num_input_tokens_seen",
    "log_level", "log_level_replica", "logging_dir", "run_name", "project", "trackio_space_id",
    "trackio_bucket_id", "trackio_static_space_id", "eval_delay", "prediction_loss_only", "eval_on_start",
    "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics",
    "batch_eval_metrics", "save_only_model", "save_on_each_node", "enable_jit_checkpoint", "push_to_hub",
    "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    "metric_for_best_model", "greater_is_better", "ignore_data_skip", "restore_callback_states_from_checkpoint",
    "full_determinism", "use_cpu", "accelerator_config", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "dataloader_in_order", "remove_unused_columns", "label_names", "length_column_name",
    "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend",
    "ddp_timeout", "debug", "skip_memory_metrics", "do_train", "do_eval", "do_predict", "local_rank",
})

# TRL's default of each key whose meaning depends on it, filled in when the file leaves the key out
TRL_DEFAULTS: dict[str, Any] = {
    "dataset_name": None, "dataset_train_split": "train", "dataset_test_split": "test", "dtype": "float32",
    "lora_target_modules": None, "disable_dropout": True, "dataset_num_proc": None, "max_length": 1024,
    "truncation_mode": "keep_start", "loss_type": ["sigmoid"], "beta": 0.1, "learning_rate": 1e-6,
    "output_dir": None, "per_device_train_batch_size": 8, "num_train_epochs": 3.0, "bf16": None,
    "gradient_checkpointing": True, "logging_steps": 10, "eval_strategy": "no", "save_strategy": "steps",
    "save_steps": 500, "save_total_limit": None, "report_to": "none",
}

TRL_KEYS = set(MAPPED) | set(HONOURED) | IGNORED
TRL_MARKERS = frozenset(TRL_KEYS - FIELDS - {"packing"})


def is_trl_config(raw: Mapping[str, Any]) -> bool:
    """A TRL config: a key only TRL has, and no prefixpo ``stages``."""
    return "stages" not in raw and bool(TRL_MARKERS & raw.keys())


def check_honoured(values: Mapping[str, Any]) -> None:
    for key, (allowed, why) in HONOURED.items():
        if key in values and values[key] not in allowed:
            raise refuse(key, values[key], why)


def from_trl(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(prefixpo keys, ignored TRL keys)`` of a TRL config (see the module docstring)."""
    if "dataset" in raw and ("dataset_name" in raw or "datasets" in raw):
        raise ConfigError("TRL config: give the data as `dataset_name` (or `datasets`) or as `dataset`, not both")
    values = {**TRL_DEFAULTS, **raw}
    if "dataset" in raw:
        values["dataset_name"] = raw["dataset"]
    check_honoured(values)
    # prefixpo's own keys and same-name keys first, then the converters (which win: lora_dropout under
    # disable_dropout, a mixture's dataset)
    out = {key: values[key] for key in values
           if isinstance(MAPPED.get(key), str) or (key in FIELDS and key not in MAPPED and key != "dataset")}
    out.update({key: values[key] for key in values if key not in TRL_KEYS | FIELDS})  # unknown: load_stages says
    for key, value in values.items():
        target = MAPPED.get(key)
        if target is None or isinstance(target, str):
            continue
        converted = target(value, values)
        data = converted.pop("data", None)
        out.update(converted)
        if data is not None:
            out["data"] = {**out.get("data", {}), **data}
    return out, ignored_keys(raw, values)


def ignored_keys(raw: Mapping[str, Any], values: Mapping[str, Any]) -> list[str]:
    """The keys of ``raw`` that have no effect here: logistics, and keys TRL itself would not use."""
    unused = {"discopop_tau": "discopop" not in loss_names(values),
              "eval_steps": values["eval_strategy"] == "no", "dataset_test_split": values["eval_strategy"] == "no",
              "dataset_name": bool(values.get("datasets"))}
    return [key for key in raw if key in IGNORED or unused.get(key, False)]


def read_trl(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The prefixpo keys of a TRL config; one line on stderr (main process) names the ignored keys."""
    out, ignored = from_trl(raw)
    if os.environ.get("RANK", "0") == "0":
        read = f"{where} read as a TRL config (TRL's defaults)"
        print(f"prefixpo train: warning: {read}; ignored keys (no effect on training): {', '.join(ignored)}"
              if ignored else f"prefixpo train: {read}; no key ignored", file=sys.stderr)
    return out
