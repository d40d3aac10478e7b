"""``prefixpo bench``: preference-training steps of the same pairs timed in four layouts, and an
attention microbenchmark (docs/benchmarks.md). One module per concern:

    profiles    synthetic groups with the benchmark length profiles (``profiles.json``, package data)
    layouts     a step's pairs as micro-batches of the prefixpo modes; allowed attention pairs
    baseline    TRL's separate-sequence recipe: its padded batch, its log-probs, its step
    models      the benchmark's models: a profile's model shape, policy and reference, attention and
                compilation per mode
    flops       model dimensions, model FLOPs of a step, GPU peaks for MFU
    harness     one step of any mode; warm-up, timed loop and measurements of one mode
    attention   the attention microbenchmark (``prefixpo bench --attention``)
    cli         the ``prefixpo bench`` command (``add_arguments``, ``run``)
"""
