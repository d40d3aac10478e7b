"""activation_offloading: the tensors saved for the backward go through CPU memory, and a run's
losses and weights are those of a run without it, bit for bit."""

import json

import torch
from safetensors.torch import load_file
from test_train import write_config

from prefixpo.cli import main


def run(tmp_path, name: str, **overrides) -> tuple[list[float], dict[str, torch.Tensor]]:
    (tmp_path / name).mkdir()
    assert main(["train", "--config", str(write_config(tmp_path / name, max_steps=3, save_steps=None,
                                                       **overrides))]) == 0
    lines = [json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines], load_file(tmp_path / name / "run" / "final" / "model.safetensors")


def test_offloading_changes_nothing_but_runs_the_offload_hooks(tmp_path, monkeypatch):
    packed = []
    original = torch.autograd.graph.save_on_cpu

    class Counting(original):
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counted(tensor):
                packed.append(tensor.shape)
                return pack(tensor)

            self.pack_hook = counted

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    off_losses, off_weights = run(tmp_path, "off")
    assert not packed
    for stage in ({}, {"stage": "sft"}):
        on_losses, on_weights = run(tmp_path, f"on{len(stage)}", activation_offloading=True, **stage)
        assert packed  # the step's forward saved its tensors through the offload hooks
        if not stage:
            assert on_losses == off_losses
            assert all(torch.equal(on_weights[k], off_weights[k]) for k in off_weights)
