"""Hub-layout safetensors checkpoints <-> `QwenVL`, driven by the declarative Rule tables.

Loading never holds two copies of the model: the module is built abstractly (`nnx.eval_shape`,
no arrays), then each checkpoint tensor is read alone (memory-mapped), mapped by LANGUAGE_RULES +
VISION_RULES, cast, and placed directly on its NamedSharding (from the parameters' logical `axes`
and the sharding rules) before the next is read. With scanned layers a layer's tensor is written
into its row of the stacked parameter, on the devices (`_set_row`); saving slices the rows out
again, so the files have the same keys either way.

Saving writes what transformers' `Qwen2VLForConditionalGeneration.from_pretrained` /
`Qwen2_5_VLForConditionalGeneration.from_pretrained` read: config.json, generation_config.json,
and `model.safetensors` or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from anatomy_r1_jax.models.config import QwenVLConfig
from anatomy_r1_jax.models.conversion import TRANSFORMS, Rule, hf_name, layer_path, match, stacked_path
from anatomy_r1_jax.models.language import LANGUAGE_RULES
from anatomy_r1_jax.models.qwen_vl import QwenVL
from anatomy_r1_jax.models.vision import VISION_RULES
from anatomy_r1_jax.sharding import Rules, state_shardings

WEIGHT_RULES: list[Rule] = [*LANGUAGE_RULES, *VISION_RULES]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint directory (from the index when sharded)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return [os.path.join(path, n) for n in names]


def _params(model: nnx.Module) -> Iterator[tuple[str, nnx.Param]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield ".".join(str(p) for p in path), node


def abstract_model(cfg: QwenVLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, **options) -> QwenVL:
    """A QwenVL whose Variables hold ShapeDtypeStructs (no memory): a frame to load into or to study.
    options: QwenVL's (remat, attention, scan_layers)."""
    return nnx.eval_shape(lambda: QwenVL(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **options))


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(stack: jax.Array, row: jax.Array, index) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, row, index, 0)


def _stack_frame(shape, dtype, sharding) -> jax.Array:
    """Zeros [layers, ...] made on the devices, each holding only its shard."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _place(array: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jax.device_put(array)
    # Each device (on every host) copies only its own slice of the host array.
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    rules: Rules | None = None, *, param_dtype=None, **options) -> QwenVL:
    """Loads a hub-layout checkpoint directory into a QwenVL.

    dtype: compute dtype (also the storage dtype unless param_dtype is given). mesh / rules: place
    every parameter on `NamedSharding(mesh, spec from its logical axes under rules)` (rules None:
    replicated); no mesh: the default device. options: QwenVL's (remat, attention, scan_layers).
    Raises on a checkpoint key no rule maps, on a shape mismatch, and on parameters the checkpoint
    lacks (naming the key and the file).
    """
    cfg = QwenVLConfig.from_dir(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, **options)
    params = dict(_params(model))
    loaded: dict[str, str] = {}  # our per-layer path -> file
    stacks: dict[str, jax.Array] = {}  # stacked parameter -> its array, filled row by row
    for file in checkpoint_files(path):
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():
                hit = match(key, WEIGHT_RULES)
                if hit is None:
                    raise KeyError(f"checkpoint key {key!r} in {file} matches no weight rule")
                ours, transform = hit
                target, row = ours, None
                if ours not in params and stacked_path(ours) and stacked_path(ours)[0] in params:
                    target, row = stacked_path(ours)
                if target not in params:
                    if ours == "lm_head.kernel" and cfg.tie_word_embeddings:
                        continue  # a tied checkpoint may still store the (identical) head
                    raise KeyError(f"checkpoint key {key!r} in {file} maps to {ours!r}, which the model lacks")
                if ours in loaded:
                    raise KeyError(f"{ours!r} given twice: {key!r} in {file} and in {loaded[ours]}")
                var = params[target]
                full_shape, var_dtype = tuple(var.get_value().shape), var.get_value().dtype
                shape = full_shape if row is None else full_shape[1:]
                array = TRANSFORMS[transform].to_ours(f.get_tensor(key), shape)
                if tuple(array.shape) != shape:
                    raise ValueError(f"checkpoint key {key!r} in {file}: shape {tuple(array.shape)} after "
                                     f"{transform!r}, model {ours!r} expects {shape}")
                sharding = None if mesh is None else state_shardings(var, mesh, rules or ())
                array = np.ascontiguousarray(array.astype(var_dtype))
                if row is None:
                    var.set_value(_place(array, sharding))
                else:
                    if target not in stacks:
                        stacks[target] = _stack_frame(full_shape, var_dtype, sharding)
                    row_sharding = None if sharding is None else NamedSharding(mesh, P(*sharding.spec[1:]))
                    stacks[target] = _set_row(stacks[target], _place(array, row_sharding), row)
                loaded[ours] = file
    expected = [p for p, var in params.items() for p in layer_paths(p, var)]
    missing = [p for p in expected if p not in loaded]
    if missing:
        keys = [(hf_name(p, WEIGHT_RULES) or (p,))[0] for p in missing]
        raise KeyError(f"checkpoint {path} lacks {len(missing)} parameters, e.g. {keys[:5]}")
    for target, array in stacks.items():
        params[target].set_value(array)
    return model


def layer_paths(path: str, var) -> list[str]:
    """The per-layer paths the checkpoint names for one parameter: itself, or one per stacked row."""
    if "layers" not in tuple(var.get_metadata().get("axes") or ())[:1]:
        return [path]
    return [layer_path(path, i, WEIGHT_RULES) or f"{path}[{i}]" for i in range(var.get_value().shape[0])]


def _hf_shape(cfg: QwenVLConfig, transform: str, shape: tuple) -> tuple | None:
    """The torch shape a transform's inverse must produce, where it is not implied by ours."""
    if transform == "conv_to_dense":  # Conv3d weight [out, C, T, p, p]
        v = cfg.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return None


def to_host(value: jax.Array) -> np.ndarray:
    if not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def _dtype_name(dtype) -> str:
    return {np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}.get(np.dtype(dtype), "float32")


def save_pretrained(model: QwenVL, path: str | os.PathLike, *, max_shard_bytes: int = 4 * 2**30) -> None:
    """Writes `model` as a hub-layout checkpoint directory (parameters in their stored dtype).

    Files above max_shard_bytes are split into numbered shards with an index. Every process must
    call this (sharded arrays are gathered); only process 0 writes.
    """
    cfg = model.config
    entries = []
    for param, var in _params(model):
        value = var.get_value()
        for i, ours in enumerate(layer_paths(param, var)):
            named = hf_name(ours, WEIGHT_RULES)
            if named is None:
                raise KeyError(f"parameter {ours!r} has no weight rule (cannot name it in the checkpoint)")
            row = value if ours == param else value[i]
            entries.append((named[0], named[1], ours, row, row.size * row.dtype.itemsize))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[4]
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    weight_map = {}
    for name, shard in zip(names, shards):
        tensors = {}
        for key, transform, _, value, _ in shard:
            host = to_host(value)
            tensors[key] = np.ascontiguousarray(TRANSFORMS[transform].to_hf(host, _hf_shape(cfg, transform, host.shape)))
            weight_map[key] = name
        if writer:
            save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    if not writer:
        return
    if len(shards) == 1 and os.path.exists(os.path.join(path, INDEX_FILE)):
        os.remove(os.path.join(path, INDEX_FILE))  # a stale index would point the loader at old shards
    if len(shards) > 1:
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": int(sum(e[4] for e in entries))}, "weight_map": weight_map}, f,
                      indent=2, sort_keys=True)
    dtype = _dtype_name(entries[0][3].dtype) if entries else "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(dtype=dtype), f, indent=2)
    eos = list(cfg.eos_token_ids)
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
                  "pad_token_id": cfg.pad_token_id}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
