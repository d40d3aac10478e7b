"""`prefixpo train` with diagnostics before its first step: each model's weights against the saved
ones, and the first micro-batch's per-response log-probs through the policy (eval and train mode,
with and without grad), the trainer's reference and a plain model loaded from disk.

Launch it where `-m prefixpo.cli` would go, with the same arguments, e.g.

    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 1 \
        scripts/fsdp_trainer_probe.py train --model_name_or_path /tmp/llama-1b ...

On CPU (torchrun, ACCELERATE_USE_CPU=true) set PROBE_FORCE_FSDP2=1 to turn accelerate's FSDP2 state
on as tests/fsdp_cpu.py does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def weight_gaps(model: torch.nn.Module, path: str) -> list[tuple[str, float]]:
    """Largest absolute difference of each parameter and buffer from the saved weights."""
    from safetensors.torch import load_file

    saved = {}
    for f in Path(path).glob("*.safetensors"):
        saved.update(load_file(f))
    gaps = []
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        key = next((k for k in saved if name.endswith(k)), None)
        if key is None:
            gaps.append((name + " (not saved)", float(full.float().abs().max())))
            continue
        gaps.append((name, float((full.detach().float().cpu() - saved[key].float()).abs().max())))
    return sorted(gaps, key=lambda g: -g[1])


def main() -> int:
    if os.environ.get("PROBE_FORCE_FSDP2"):
        sys.path.insert(0, str(ROOT / "tests"))
        from fsdp_cpu import force_fsdp2

        force_fsdp2()
    import prefixpo.step
    import prefixpo.train as train
    from prefixpo.logprobs import compute_logps
    from prefixpo.modeling import build_attention_masks, unwrap

    real_step = prefixpo.step.preference_step
    model_path = sys.argv[sys.argv.index("--model_name_or_path") + 1]
    done = []

    def report(name, logps):
        sums = logps.sums.detach().float().cpu()
        counts = logps.counts.float().cpu()
        print(f"PROBE {name:28s} per-token {float(sums.sum() / counts.sum()):9.4f} sums {sums[:4].tolist()}",
              flush=True)

    def step(policy, micro_batches, loss_fn, reference, *args, **kwargs):
        if not done:
            done.append(True)
            inner = unwrap(policy)
            print("PROBE policy", type(policy).__name__, "attn", inner.config._attn_implementation,
                  "training", policy.training, "dtypes", sorted({str(p.dtype) for p in policy.parameters()}),
                  flush=True)
            print("PROBE policy weight gaps", weight_gaps(policy, model_path)[:6], flush=True)
            mb = micro_batches[0]
            masks = build_attention_masks(policy, mb)
            report("reference (trainer)", reference(mb, masks))
            for mode in ("eval", "train"):
                policy.train(mode == "train")
                with torch.no_grad():
                    report(f"policy {mode} no-grad", compute_logps(policy, mb, masks))
                report(f"policy {mode} grad", compute_logps(policy, mb, masks))
            plain = train.load_model(model_path, train_config[0], 0).to(mb.input_ids.device)
            from prefixpo.modeling import apply_prefix_attention, backend_of

            apply_prefix_attention(plain, backend_of(policy))
            print("PROBE plain weight gaps", weight_gaps(plain, model_path)[:3], flush=True)
            with torch.no_grad():
                report("plain from disk", compute_logps(plain, mb, build_attention_masks(plain, mb)))
            del plain
        return real_step(policy, micro_batches, loss_fn, reference, *args, **kwargs)

    train_config = []
    real_stage = train.train_stage

    def stage(cfg):
        train_config.append(cfg)
        return real_stage(cfg)

    prefixpo.step.preference_step = step
    train.train_stage = stage
    from prefixpo.cli import main as prefixpo

    return prefixpo(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
