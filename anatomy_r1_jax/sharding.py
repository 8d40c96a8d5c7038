"""Sharding policy as data: logical axis names -> mesh axes.

Every parameter carries its logical axes as Variable metadata (`nnx.Param(x, axes=("embed", "mlp"))`)
and main activations are constrained with `constrain(x, ("activation_batch", "activation_length",
"activation_embed"))`. Weights and activations have names of their own (MaxText style), so a config
can shard a weight dimension and leave the same activation dimension whole, or the reverse. A config
holds the mesh shape and the rules (MaxText / big_vision style), e.g.

    mesh = [("data", 2), ("fsdp", 2), ("tensor", 2)]
    rules = [("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
             ("vocab", "tensor"),                                               # weights
             ("activation_batch", ("data", "fsdp")), ("activation_mlp", "tensor"),
             ("activation_heads", "tensor"), ("activation_vocab", "tensor")]  # activations

Weight names: embed, mlp, heads, kv_heads, vocab, vision_embed, vision_mlp, vision_heads,
layers. Activation names (ACTIVATION_NAMES): activation_batch (the rows of every batch: also where
inputs are placed and how hosts split the data), activation_length, activation_embed,
activation_mlp, activation_heads, activation_kv_heads, activation_head_dim, activation_vocab,
activation_patches, activation_vision_embed. A name without a rule is replicated; a rule naming
neither is refused (`check_rules`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

WEIGHT_NAMES = frozenset({"embed", "mlp", "heads", "kv_heads", "vocab", "vision_embed", "vision_mlp",
                          "vision_heads", "layers"})
BATCH = "activation_batch"
ACTIVATION_NAMES = frozenset({BATCH, "activation_length", "activation_embed", "activation_mlp", "activation_heads",
                              "activation_kv_heads", "activation_head_dim", "activation_vocab", "activation_patches",
                              "activation_vision_embed"})

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("sharding", default=None)


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
    """Builds a mesh from `[(name, size), ...]`; one size may be -1 (all remaining devices).

    Axis types are Auto (classic GSPMD propagation): jax 0.10 defaults to Explicit otherwise.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(a for a, _ in axes)
    sizes = [int(s) for _, s in axes]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {axes}: at most one axis may be -1")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {axes}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {axes} needs {int(np.prod(sizes))} devices, {len(devices)} available")
    return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                         devices=devices)


def check_rules(rules: Rules, field: str = "sharding_rules") -> None:
    """Raises one line naming a rule whose logical name no weight or activation has (a typo, or a
    rule list from before activations had names of their own: "batch" is now "activation_batch")."""
    for name, _ in rules:
        if name not in WEIGHT_NAMES | ACTIVATION_NAMES:
            hint = f"; activations are named 'activation_{name}'" if f"activation_{name}" in ACTIVATION_NAMES else ""
            raise ValueError(f"config {field}: no weight or activation has the logical name {name!r}{hint} "
                             f"(weights: {sorted(WEIGHT_NAMES)}; activations: {sorted(ACTIVATION_NAMES)})")


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules, mesh: Mesh | None = None) -> P:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t not in used and (mesh is None or mesh.shape.get(t, 1) > 1))
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state, rules: Rules, mesh: Mesh | None = None):
    """PartitionSpecs for an nnx State (or any pytree of Variables) from each Variable's `axes`."""

    def spec(v):
        if _is_var(v):
            return logical_to_spec(v.get_metadata().get("axes"), rules, mesh)
        return P()

    return jax.tree.map(spec, state, is_leaf=_is_var)


def state_shardings(state, mesh: Mesh, rules: Rules):
    """NamedShardings matching `state_specs`, with dimensions that do not divide left replicated."""

    def sharding(v):
        value = v.get_value() if _is_var(v) else v
        axes = v.get_metadata().get("axes") if _is_var(v) else None
        spec = logical_to_spec(axes, rules, mesh)
        return NamedSharding(mesh, _fit(spec, np.shape(value), mesh))

    return jax.tree.map(sharding, state, is_leaf=_is_var)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (e.g. 2 kv heads on a 4-way tensor axis)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([mesh.shape[n] for n in names]))
        out.append(entry if dim % size == 0 else None)
    return P(*out)


@contextlib.contextmanager
def use_rules(mesh: Mesh | None, rules: Rules):
    """Activates `constrain` inside traced model code (no-op when mesh is None)."""
    token = _ACTIVE.set(None if mesh is None else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under `use_rules`; identity otherwise."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = _fit(logical_to_spec(axes, rules, mesh), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def map_rows(fn, *args):
    """fn(*args) run on each device's own rows: under `use_rules`, every argument's leading axis
    split over the mesh axes of `activation_batch` and fn applied per block (`jax.shard_map`), the
    outputs' leading axes joined again; fn(*args) outside the rules or when the rows do not split.
    For row-wise functions that XLA's partitioner would otherwise run on gathered rows (its TopK,
    the sampler's top-k, is not split along the batch axis). None arguments pass through."""
    active = _ACTIVE.get()
    if active is None:
        return fn(*args)
    mesh, rules = active
    rows = next(a.shape[0] for a in args if a is not None)
    spec = _fit(logical_to_spec((BATCH,), rules, mesh), (rows,), mesh)
    if not len(spec) or spec[0] is None:
        return fn(*args)
    return jax.shard_map(fn, mesh=mesh, in_specs=P(spec[0]), out_specs=P(spec[0]), check_vma=False)(*args)
