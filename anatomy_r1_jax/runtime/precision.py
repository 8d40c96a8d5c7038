"""The mixed-precision policy: the dtype of every part of the train state and of the update.

    part      config field            what it holds
    weights   model.param_dtype       the parameters the model holds: forward, rollout, the frozen
                                      reference copy, checkpoints, evaluation and export
    compute   model.dtype             activations and matmul inputs (softmax / logits stay float32)
    grads     optim.grad_dtype        the gradient accumulated over micro-batches and clipped
    moments   optim.moment_dtype      AdamW's first and second moments and the arithmetic of the update
    master    optim.master_weights    a float32 copy of the trainable weights that AdamW updates; the
                                      weights are its rounding to `weights` after every step

Why a master copy: bf16 keeps 8 significant bits, so a weight w moves only when its update exceeds
about |w| / 256; with lr 1e-5 the AdamW step (about lr per weight) is below that for most weights of
a 7B model (|w| ~ 0.01-0.05) and is rounded away. The master copy accumulates those steps exactly
(what DeepSpeed / ms-swift do for bf16 training). Without it (master_weights=False) the optimizer's
float32 update is added to the bf16 weights and rounded once per step.

Bytes per trainable parameter (the accumulated gradient is transient, during the update):

    policy (weights/grads/moments/master)   weights  master  moments  grads   total  (+ reference)
    float32 / float32 / float32 / off        4        -       8        4       16     (+4 when beta != 0)
    bfloat16 / float32 / float32 / on        2        4       8        4       18     (+2)
    bfloat16 / bfloat16 / float32 / off      2        -       8        2       12     (+2)

The real-model configs (configs/methods.py REAL_MODEL) use bf16 weights and compute with fp32
gradients, moments and master copy; the tiny default keeps everything float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(field: str, name: str):
    if name not in DTYPES:
        raise ValueError(f"config {field}={name!r} is not a dtype of the precision policy; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Precision:
    """One run's precision policy (hashable: part of the update's static configuration)."""

    weights: str = "float32"
    compute: str = "float32"
    grads: str = "float32"
    moments: str = "float32"
    master_weights: bool = False

    def __post_init__(self):
        for field, name in (("model.param_dtype", self.weights), ("model.dtype", self.compute),
                            ("optim.grad_dtype", self.grads), ("optim.moment_dtype", self.moments)):
            _dtype(field, name)
        if self.master_weights and self.weights == "float32":
            raise ValueError("config optim.master_weights=True keeps a float32 copy of weights that are already "
                             "float32: set optim.master_weights=False or model.param_dtype='bfloat16'")

    @classmethod
    def from_config(cls, config) -> "Precision":
        return cls(weights=config.model.param_dtype, compute=config.model.dtype, grads=config.optim.grad_dtype,
                   moments=config.optim.moment_dtype, master_weights=bool(config.optim.master_weights))

    @property
    def weight_dtype(self):
        return DTYPES[self.weights]

    @property
    def compute_dtype(self):
        return DTYPES[self.compute]

    @property
    def grad_dtype(self):
        return DTYPES[self.grads]

    @property
    def moment_dtype(self):
        return DTYPES[self.moments]


# bf16 weights and compute with fp32 gradients and AdamW moments, no master copy (the perf tools' states).
BF16 = Precision(weights="bfloat16", compute="bfloat16")


def cast(tree, dtype):
    """Floating leaves of `tree` as `dtype` (integer leaves unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_optimizer(tx: optax.GradientTransformation, policy: Precision, params) -> tuple[Any, Any]:
    """(master, opt_state) for trainable `params` (weights dtype): the float32 master copy (None
    without one) and the optimizer state, its moments in the policy's moments dtype."""
    master = cast(params, jnp.float32) if policy.master_weights else None
    return master, tx.init(cast(params if master is None else master, policy.moment_dtype))


def check_weights(policy: Precision, params) -> None:
    """Raises when a trainable parameter's dtype is not the policy's weights dtype (at trace time)."""
    wrong = {str(x.dtype) for x in jax.tree.leaves(params) if x.dtype != policy.weight_dtype}
    if wrong:
        raise ValueError(f"trainable parameters are {sorted(wrong)} but the precision policy's weights are "
                         f"{policy.weights} (model.param_dtype): build the model with the policy's dtypes")


def apply_gradients(tx: optax.GradientTransformation, policy: Precision, params, master, opt_state, grads):
    """One optimizer step under the policy; returns (params, master, opt_state).

    grads (any float dtype) enter the optimizer as the moments dtype (so the state keeps its dtype
    through `optax.apply_if_finite`'s cond); the update is added to the master copy when there is
    one (params = its rounding to the weights dtype), else to params directly, in float32 and then
    rounded to the weights dtype.
    """
    target = params if master is None else master
    updates, opt_state = tx.update(cast(grads, policy.moment_dtype), opt_state, target)
    target = optax.apply_updates(target, updates)  # (p + u) computed in the wider dtype, cast to p's
    if master is None:
        return target, None, opt_state
    return cast(target, policy.weight_dtype), target, opt_state
