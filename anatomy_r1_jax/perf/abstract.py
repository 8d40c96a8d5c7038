"""Abstract (weightless) train states and batches: shapes with shardings, for compiling and sizing
real-size models (Qwen2.5-VL 3B / 7B) without allocating them.

Leaves are `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))`, so
`jax.jit(train_step).lower(state, batch).compile()` partitions the update exactly as it would for
real arrays and `memory_analysis()` reports per-device buffers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models.config import QwenVLConfig
from anatomy_r1_jax.models.lora import LoraConfig, add_adapters
from anatomy_r1_jax.models.qwen_vl import QwenVL
from anatomy_r1_jax.models.weights import abstract_model
from anatomy_r1_jax.perf.memory import leaf_bytes_per_device
from anatomy_r1_jax.runtime.placement import batch_shardings, split_model
from anatomy_r1_jax.train.step import TrainState


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def with_shardings(tree, mesh: Mesh, rules):
    """ShapeDtypeStructs given the shardings `state_shardings` derives (Variables by their logical
    axes, anything else replicated): an nnx State, or an optax state whose moments are States."""
    shardings = sharding.state_shardings(tree, mesh, rules)

    def leaf(x, s):
        if _is_var(x):
            return x.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(leaf, tree, shardings, is_leaf=_is_var)


def abstract_params(cfg: QwenVLConfig, mesh: Mesh, rules, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                    remat: bool | str = True, freeze_vision: bool = False, lora: LoraConfig | None = None,
                    **options):
    """(graphdef, trainable params, frozen rest) as sharded ShapeDtypeStructs; options: QwenVL's
    (attention, scan_layers). With `lora` (rank > 0) the trainable params are its adapters and
    every base weight is frozen."""
    if lora is not None and lora.enabled:
        model = nnx.eval_shape(lambda: add_adapters(
            QwenVL(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0), **options), lora,
            seed=0, dtype=dtype, param_dtype=param_dtype))
    else:
        model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, **options)
    graphdef, params, frozen = split_model(model, freeze_vision)
    return graphdef, with_shardings(params, mesh, rules), with_shardings(frozen, mesh, rules)


def abstract_opt_state(tx, params, mesh: Mesh, rules, moment_dtype=None):
    """tx.init(params) abstractly. optax keeps the moments as nnx States of the parameters'
    Variables, so they carry the same logical axes and get the same shardings; counters are
    replicated. Floating moments are cast to moment_dtype when given (fp32 moments for bf16 params)."""
    shapes = jax.eval_shape(tx.init, params)
    if moment_dtype is not None:
        def cast(x):
            floating = jnp.issubdtype(x.dtype, jnp.floating) and x.ndim > 0
            return jax.ShapeDtypeStruct(x.shape, moment_dtype if floating else x.dtype)
        shapes = jax.tree.map(cast, shapes)
    return with_shardings(shapes, mesh, rules)


def abstract_train_state(cfg: QwenVLConfig, mesh: Mesh, rules, tx, *, reference: bool = True, moment_dtype=None,
                         **model_kw) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, TrainState of sharded ShapeDtypeStructs); a reference copy when `reference` (a
    LoRA state, model_kw `lora`, has none: its reference is the base model)."""
    graphdef, params, frozen = abstract_params(cfg, mesh, rules, **model_kw)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    state = TrainState(step=step, params=params, frozen=frozen, ref_params=params if reference else None,
                       opt_state=abstract_opt_state(tx, params, mesh, rules, moment_dtype))
    return graphdef, state


def abstract_batch(batch, mesh: Mesh, rules, micro_axis: bool = True):
    """A NumPy PromptBatch / TrainBatch as ShapeDtypeStructs placed as `put_batch` would place it."""
    shardings = batch_shardings(batch, mesh, rules, micro_axis)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
                        batch, shardings)


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Per-device bytes of the training state (the maximum over devices of its shards)."""

    params: int
    grads: int
    moments: int
    reference: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.moments + self.reference


def state_footprint(params, *, param_bytes: int = 2, grad_bytes: int = 2, moment_bytes: int = 8,
                    reference: bool = True) -> Footprint:
    """Analytic per-device bytes from the parameters' shardings: params and grads at param_bytes /
    grad_bytes per element, AdamW's two moments at moment_bytes per element together (fp32: 8),
    a reference copy of the params (GRPO with beta > 0) at param_bytes. Activations excluded."""
    elements = sum(leaf_bytes_per_device(x) // np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    return Footprint(params=elements * param_bytes, grads=elements * grad_bytes, moments=elements * moment_bytes,
                     reference=elements * param_bytes if reference else 0)
