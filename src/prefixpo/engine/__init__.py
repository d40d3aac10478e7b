"""How the policy is spread over processes, chosen once per run (``prefixpo.trainer.choose_engine``).

An engine is a small record of the functions whose behaviour depends on the parallelism: loading
and placing a model, ``prepare``, ``backward``, ``no_sync``, ``clip_and_step``, saving and loading
its optimizer state, and sharding the frozen reference. The training loop (``prefixpo.train``)
calls them and never asks which engine it runs. Three engines:

- ``Engine`` (``prefixpo.engine.plain``): one process, or DDP through accelerate;
- ``FSDPEngine`` (``prefixpo.engine.fsdp``): FSDP2, the policy and the reference sharded;
- ``DeepSpeedEngine`` (``prefixpo.engine.deepspeed``): DeepSpeed ZeRO-1/2/3.
"""
