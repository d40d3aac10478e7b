"""The DeepSpeed wiring without deepspeed: the step through an engine's backward keeps the gradient
of the mean over the step's pairs, the engine learns where the step ends, and the DeepSpeed config
gets prefixpo's values. (tests/test_deepspeed.py trains with the real engine where it is installed.)"""

import pytest
import torch
from conftest import tiny_model
from test_step import BETA, make_groups, oracle_step, unpacked

from prefixpo.config import ConfigError
from prefixpo.engine.deepspeed import accumulation_boundary, configure, engine_backward, gathered
from prefixpo.losses import get_loss
from prefixpo.modeling import apply_prefix_attention
from prefixpo.reference import reference_from_model
from prefixpo.step import preference_step


class FakeEngine:
    """What prefixpo uses of ``deepspeed.DeepSpeedEngine``, with its documented loss scaling:
    ``backward`` divides the loss by the configured accumulation steps unless ``scale_wrt_gas=False``."""

    def __init__(self, accumulation_steps: int) -> None:
        self.accumulation_steps = accumulation_steps
        self.boundaries: list[bool] = []
        self.backwards = 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.boundaries.append(is_boundary)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        self.backwards += 1
        loss = loss / self.accumulation_steps if scale_wrt_gas else loss
        loss.backward(retain_graph=retain_graph)
        return loss


def test_the_step_through_an_engine_backward_keeps_the_gradient_of_the_pair_mean():
    """Three micro-batches through the engine's backward with accumulation 3 in its config: the
    gradient is the oracle's (not a third of it), the engine runs every backward, and only the
    last micro-batch is marked as the step's boundary."""
    policy, reference = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    groups = make_groups()
    _, want = oracle_step(policy, reference, groups)  # separate sequences, the mean over all pairs
    for model in (policy, reference):
        apply_prefix_attention(model, "sdpa")
    engine = FakeEngine(accumulation_steps=3)
    micro_batches = unpacked(groups, 3)
    assert len(micro_batches) == 3
    policy.zero_grad(set_to_none=True)
    preference_step(policy, micro_batches, get_loss("sigmoid", beta=BETA), reference=reference_from_model(reference),
                    chunk_size=32, no_sync=accumulation_boundary(engine), backward=engine_backward(engine))
    assert engine.backwards == 3 and engine.boundaries == [False, False, True]
    for name, w in want.items():
        rel = (policy.get_parameter(name).grad - w).abs().max() / w.abs().max()
        assert rel <= 1e-5, f"{name}: {rel:.2e}"


def prefixpo_config(**overrides):
    from types import SimpleNamespace

    return SimpleNamespace(**{"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                              "max_grad_norm": 1.0, **overrides})


def test_configure_fills_auto_keys_and_keeps_matching_ones():
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2, "gradient_clipping": "auto",
              "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}
    configure(config, prefixpo_config())
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # needed to save
    stage2 = {"zero_optimization": {"stage": 2}}
    configure(stage2, prefixpo_config())
    assert "stage3_gather_16bit_weights_on_model_save" not in stage2["zero_optimization"]


@pytest.mark.parametrize("config, message", [
    ({"gradient_accumulation_steps": 8}, "`gradient_accumulation_steps` to 8, but prefixpo's `gradient_accumulation"),
    ({"gradient_clipping": 0.5}, "prefixpo's `max_grad_norm` is 1.0"),
    ({"optimizer": {"type": "AdamW"}}, "has its own `optimizer`; remove it"),
])
def test_configure_refuses_deepspeed_values_that_contradict_prefixpo(config, message):
    with pytest.raises(ConfigError, match=message):
        configure({**config, "zero_optimization": {"stage": 3}}, prefixpo_config())


def test_gathered_passes_plain_parameters_through():
    weight = torch.nn.Parameter(torch.ones(2))
    with gathered([weight, None]):
        assert torch.equal(weight, torch.ones(2))
