"""Declarative HF <-> Flax weight-name tables and the transforms they name.

A table is a list of `Rule(hf, ours, transform)`: `hf` is a regex over a Hugging Face hub key
(named groups such as `(?P<i>\\d+)`), `ours` a dotted path template into the nnx module
(`"language.layers.{i}.attn.q.kernel"`; integers index `nnx.List`s), `transform` the name of an
entry of TRANSFORMS that maps the HF array to ours (`to_ours`) and back (`to_hf`).
The generic loader / exporter (weights.py) knows nothing about any particular model.

Scanned layers (`layers.stack_modules`) hold one parameter per layer *kind*, stacked [n, ...]: the
path "language.layers.3.attn.q.kernel" then names row 3 of "language.layers.attn.q.kernel"
(`stacked_path`), and `layer_path` goes back.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: str
    transform: str = "identity"


@dataclasses.dataclass(frozen=True)
class Transform:
    to_ours: Callable[[np.ndarray, tuple], np.ndarray]  # (hf_array, our_shape) -> our_array
    to_hf: Callable[[np.ndarray, tuple], np.ndarray]  # (our_array, hf_shape or None) -> hf_array


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda a, s: a, lambda a, s: a),
    # torch Linear weight [out, in] <-> our kernel [in, out]
    "transpose": Transform(lambda a, s: a.T, lambda a, s: a.T),
    # Conv3d patch embedding [out, C, T, P, P] <-> dense kernel [C*T*P*P, out]
    # (the processor flattens each patch in C, T, P, P order, so the conv is a matmul)
    "conv_to_dense": Transform(
        lambda a, s: a.reshape(a.shape[0], -1).T,
        lambda a, s: a.T.reshape((a.shape[1],) + tuple(s[1:])) if s is not None else a.T,
    ),
}


def match(name: str, rules: Sequence[Rule]) -> tuple[str, str] | None:
    """Returns (our_path, transform) for an HF key, or None if no rule matches."""
    for rule in rules:
        m = re.fullmatch(rule.hf, name)
        if m:
            return rule.ours.format(**m.groupdict()), rule.transform
    return None


def hf_name(path: str, rules: Sequence[Rule]) -> tuple[str, str] | None:
    """Inverse of `match`: (hf_key, transform) for one of our paths, or None."""
    for rule in rules:
        pattern = re.escape(rule.ours)
        groups = re.findall(r"\\\{(\w+)\\\}", pattern)
        for g in groups:
            pattern = pattern.replace(r"\{" + g + r"\}", rf"(?P<{g}>\d+)")
        m = re.fullmatch(pattern, path)
        if m:
            key = rule.hf
            for g, v in m.groupdict().items():
                key = re.sub(rf"\(\?P<{g}>[^)]*\)", v, key)
            return key.replace("\\.", "."), rule.transform
    return None


def stacked_path(path: str) -> tuple[str, int] | None:
    """("language.layers.attn.q.kernel", 3) for "language.layers.3.attn.q.kernel"; None without an index."""
    m = re.fullmatch(r"(.*?)\.(\d+)(\..*)", path)
    return None if m is None else (m[1] + m[3], int(m[2]))


def layer_path(path: str, index: int, rules: Sequence[Rule]) -> str | None:
    """Inverse of `stacked_path` under the rules' templates: layer `index` of a stacked parameter."""
    for rule in rules:
        if ".{i}." in rule.ours and rule.ours.replace(".{i}", "", 1) == path:
            return rule.ours.format(i=index)
    return None


def get_by_path(module, path: str):
    obj = module
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def resolve(module, path: str) -> tuple[object, int | None]:
    """(the Variable at `path`, None), or for a layer of scanned layers (the stacked Variable, layer)."""
    try:
        return get_by_path(module, path), None
    except (AttributeError, TypeError, IndexError, KeyError):
        stacked = stacked_path(path)
        if stacked is None:
            raise
        return get_by_path(module, stacked[0]), stacked[1]


def set_by_path(module, path: str, value) -> None:
    """Writes `value` into the nnx Variable at `path` in place (a layer's row of a stacked one).

    The shape must match exactly; the value is cast to the Variable's dtype and placed with the
    Variable's current sharding (so a model built sharded stays sharded).
    """
    var, layer = resolve(module, path)
    if not hasattr(var, "set_value"):
        raise TypeError(f"{path} is a {type(var).__name__}, not an nnx Variable")
    old = var.get_value()
    shape = tuple(old.shape) if layer is None else tuple(old.shape[1:])
    if tuple(np.shape(value)) != shape:
        raise ValueError(f"{path}: got shape {tuple(np.shape(value))}, expected {shape}")
    value = np.asarray(value).astype(old.dtype)
    var.set_value(jax.device_put(value if layer is None else old.at[layer].set(value), getattr(old, "sharding", None)))


def assign_by_rules(module, tensors: Mapping[str, np.ndarray], rules: Sequence[Rule]) -> tuple[list[str], list[str]]:
    """Writes every HF tensor a rule matches into `module` (transform from TRANSFORMS applied).

    tensors: HF key -> array (e.g. a safetensors file read with `safetensors.numpy.load_file`).
    Returns (our paths written, HF keys no rule matched); callers decide whether leftovers are an error.
    """
    written, unmatched = [], []
    for key, array in tensors.items():
        hit = match(key, rules)
        if hit is None:
            unmatched.append(key)
            continue
        path, transform = hit
        var, layer = resolve(module, path)
        shape = tuple(var.get_value().shape)[0 if layer is None else 1:]
        set_by_path(module, path, TRANSFORMS[transform].to_ours(np.asarray(array), shape))
        written.append(path)
    return written, unmatched
