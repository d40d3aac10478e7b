"""`prefixpo train` under accelerate's DeepSpeed state on CPU ranks, for tests: the script that
`accelerate launch --config_file examples/accelerate/zero3.yaml` runs, with DS_ACCELERATOR=cpu and
the `prefixpo` command-line arguments.

accelerate picks a process group backend only for accelerator devices (or for `--cpu`, which turns
DeepSpeed off): on a machine without GPUs every DeepSpeed rank would believe it is alone. This
makes that pick gloo on CPU, the backend DeepSpeed's CPU accelerator uses without oneCCL; from there
on it is accelerate's own DeepSpeed state, config and preparation, and deepspeed's own engine.
DeepSpeed's shared-memory all-reduce (a C++ op it compiles on first use, ~45 s; only its inference
all-reduce uses it) is left out, so gloo does every collective.
"""

import os
import sys


def deepspeed_on_cpu() -> None:
    import deepspeed.comm.torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    chosen = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if not cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and "LOCAL_RANK" in os.environ:
            return "gloo", DistributedType.MULTI_CPU
        return chosen(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = prepare_backend
    deepspeed.comm.torch.build_shm_op = lambda: None


def main() -> int:
    deepspeed_on_cpu()
    from prefixpo.cli import main as prefixpo

    return prefixpo(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
