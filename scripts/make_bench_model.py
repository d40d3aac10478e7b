"""A model directory of a benchmark profiles model shape (default llama-1b): its config.json, and
with ``--weights`` random bf16 weights (seed 0, drawn by ``prefixpo.modeling.load_model``) saved
beside it, so that every process and both models of a run load the same tensors. The GPU training
runs start from it: scripts/gpu_train_run.sh (docs/training.md "A short run on the GPU") and
scripts/gpu_multi_run.sh (docs/benchmarks.md "Several GPUs"). From the repository root:

    PYTHONPATH=src python scripts/make_bench_model.py --out /tmp/llama-1b --weights
"""

from __future__ import annotations

import argparse
import os

import torch

from prefixpo.bench.models import model_config
from prefixpo.bench.profiles import load_profiles
from prefixpo.modeling import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", default=None)
    parser.add_argument("--model", default="llama-1b",
                        help="a model of the profiles file, or a directory holding a config.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", action="store_true", help="also save random bf16 weights (seed 0)")
    parser.add_argument("--device", default="cpu",
                        help="where the weights are drawn (default cpu; a seed draws other weights on cuda, "
                             "an 8B model's in seconds instead of minutes)")
    args = parser.parse_args()
    if os.path.isdir(args.model):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
    else:
        profiles = load_profiles(args.profiles)
        config = model_config(args.model, profiles)
        config.architectures = [profiles["models"][args.model]["architecture"]]
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    if not args.weights:
        config.save_pretrained(args.out)
        return
    load_model(config, dtype=torch.bfloat16, seed=0, device=args.device).save_pretrained(args.out)


if __name__ == "__main__":
    main()
