"""``prefixpo train``: SFT and preference training, one stage after another.

The command reads the config, plans every stage (start, resume, skip or continue a finished run;
never overwrite one, ``prefixpo.rundir``) and checks every model, tokenizer, dataset and checkpoint
it names (``prefixpo.sources``) before anything heavy loads, so a mistake costs a second and one
line. Each stage then trains under a lock on its output directory (``prefixpo.trainer``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prefixpo.cli import name_mapping
from prefixpo.config import ConfigError, load_stages
from prefixpo.rundir import RunLock, clear_run, plan_stages
from prefixpo.sources import check_stages

# --- command line -------------------------------------------------------------------------------

ACCEPTS_OVERRIDES = True  # every other --key value is a config override


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see docs/training.md)")
    parser.add_argument("--column-map", type=name_mapping, action="append", default=[], metavar="NAME=COLUMN",
                        help="map a canonical column to a dataset column (repeatable), e.g. chosen=good: the column "
                             "map of every dataset that has none of its own (data: {column_map: ...})")
    parser.epilog = ("Any other --key value overrides a config key in every stage; --STAGE.key value (e.g. "
                     "--sft.learning_rate 1e-5) overrides it in one stage. --resume_from_checkpoint latest "
                     "resumes from the newest checkpoint.")


def run(args: argparse.Namespace) -> int:
    try:
        stages = load_stages(args.config, args.overrides)
        if args.column_map:  # over every stage's default column map
            for cfg in stages:
                cfg.data = {**cfg.data, "column_map": {**cfg.data.get("column_map", {}), **dict(args.column_map)}}
        plans = plan_stages(stages)  # never overwrite a run, nothing to resume: before anything loads
        for cfg, plan in zip(stages, plans):
            cfg.resume_from_checkpoint = plan.checkpoint
        check_stages([cfg for cfg, plan in zip(stages, plans) if plan.action != "skip"])
    except ConfigError as err:
        print(f"prefixpo train: {err}", file=sys.stderr)
        return 2
    # after the checks: the trainer imports torch, accelerate, transformers and datasets (seconds)
    import torch

    from prefixpo.checkpoint import CheckpointError
    from prefixpo.data.errors import DataError
    from prefixpo.guards import TrainingError
    from prefixpo.plot import plot_quietly
    from prefixpo.trainer import STAGES_ENDED, train_stage

    STAGES_ENDED.clear()  # the stages of this command only (a notebook may run several)
    try:
        for cfg, plan in zip(stages, plans):
            if plan.note:
                print(plan.note, file=sys.stderr)
            if plan.action == "skip":
                continue
            # the main process (of a launched run: RANK 0) holds the directory while the stage trains
            with RunLock(cfg.output_dir, main=os.environ.get("RANK", "0") == "0") as lock:
                if plan.clear and lock.main:  # the old run's files, removed once
                    clear_run(cfg.output_dir)
                done = train_stage(cfg)
            print(f"stage {cfg.stage} done: {describe_done(done, Path(cfg.output_dir))}")
        if len(stages) > 1:
            plot_quietly(Path(stages[0].output_dir).parent)  # every stage in one figure
        end_process_group()
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"prefixpo train: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"prefixpo train: {err}", file=sys.stderr)
        return err.exit_code
    except torch.cuda.OutOfMemoryError as err:
        print(f"prefixpo train: CUDA out of memory ({str(err).splitlines()[0]}). Lower packing_capacity or "
              "per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), turn on "
              "gradient_checkpointing, or lower logps_chunk_size.", file=sys.stderr)
        return 1
    return 0


def end_process_group() -> None:
    """A launched run's ranks leave together: every rank waits for the others, then closes the
    process group itself (left to interpreter teardown, gloo's threads at times abort a rank that
    has finished its work: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def describe_done(record: dict[str, Any], out: Path) -> str:
    """``40 steps, model in runs/x/final; eval loss 0.3123, rewards/accuracies 0.9750``."""
    text = f"{record['steps']} steps, model in {out / 'final'}"
    evals = {k: record["eval"][k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in record["eval"]}
    if evals:
        text += "; eval " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items())
    return text
