"""Benchmark and sharding-study helpers (used by scripts/bench_*.py and scripts/sharding_study.py).

    timing     interleaved wall-clock timing with warm-up and block_until_ready; medians
    hlo        collective ops (count, bytes) in compiled HLO text
    memory     compiled memory_analysis summaries; bytes per device of sharded pytrees
    buffers    the values making up compiled temporaries at their peak (XLA's buffer-assignment dump)
    abstract   abstract (weightless) train states and their sharded footprint
    workloads  one set of weights and prompts for our model and the transformers reference
    report     markdown tables and the machine line printed with every result
"""
