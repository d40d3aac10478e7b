"""`prefixpo train` with accelerate's FSDP2 state forced on, for tests on CPU; run under torchrun
with ACCELERATE_USE_CPU=true, with the `prefixpo` command-line arguments.

accelerate turns FSDP on only for GPU distributed types (its launcher and AcceleratorState), but
FSDP2 itself (``fully_shard``) runs on CPU with gloo. This sets accelerate's state to FSDP with the
plugin of examples/accelerate/fsdp2.yaml right after an Accelerator is made; from there on it is
accelerate's own FSDP2 preparation and state dict code, and prefixpo's FSDP path.
"""

import sys
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp2.yaml"
NAMES = {"fsdp_version": "fsdp_version", "fsdp_offload_params": "cpu_offload"}  # the rest: drop "fsdp_"


def force_fsdp2() -> None:
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    options = {NAMES.get(k, k.removeprefix("fsdp_")): v for k, v in yaml.safe_load(CONFIG.read_text())["fsdp_config"].items()}
    made = accelerate.Accelerator.__init__

    def init(self, *args, **kwargs):
        made(self, *args, **kwargs)
        plugin = FullyShardedDataParallelPlugin(**options)
        if self.state.mixed_precision != "no":  # as accelerate's state does for a launched FSDP run
            plugin.set_mixed_precision(self.state.mixed_precision)
        self.state.fsdp_plugin = plugin
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.Accelerator.__init__ = init


def main() -> int:
    force_fsdp2()
    from prefixpo.cli import main as prefixpo

    return prefixpo(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
