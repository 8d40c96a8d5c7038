"""Memory figures: XLA's compiled `memory_analysis()` and bytes per device of sharded pytrees."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Per-device bytes XLA reserves for one compiled executable.

    peak = arguments + outputs + temporaries - aliased (donated arguments reused as outputs); the
    generated code is excluded. This is XLA's static buffer assignment, not a measured high-water mark.
    """

    argument: int
    output: int
    temp: int
    alias: int
    code: int

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias


def compiled_memory(compiled) -> CompiledMemory | None:
    """From `jax.jit(f).lower(...).compile()`; None when the backend gives no analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return CompiledMemory(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                          temp=int(m.temp_size_in_bytes), alias=int(m.alias_size_in_bytes),
                          code=int(m.generated_code_size_in_bytes))


def leaf_bytes_per_device(x) -> int:
    """Bytes one device holds of an array / ShapeDtypeStruct (its shard when it carries a sharding)."""
    shape = tuple(x.shape)
    sharding = getattr(x, "sharding", None)
    if sharding is not None:
        shape = tuple(sharding.shard_shape(shape))
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def bytes_per_device(tree) -> int:
    """Sum of `leaf_bytes_per_device` over the array leaves of a pytree (nnx States included)."""
    return sum(leaf_bytes_per_device(x) for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype"))


def gib(n: float) -> float:
    return n / 2**30
