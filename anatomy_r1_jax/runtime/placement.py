"""Placement: the train state and batches on a mesh (from the config's logical rules), and a GRPO step's host
decisions (which queries each rollout call and micro-batch holds, each data shard's prompt rows).

The state's shardings come from each parameter's logical `axes` (see `anatomy_r1_jax.sharding`);
optimizer moments follow their parameters. Batch rows (dimension N of [N, ...], or of
[3, N, ...] for position ids, after an optional leading micro-batch axis) go to the mesh axes of
the logical `activation_batch` axis; patches of the vision tower likewise, whole queries per device.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import lora
from anatomy_r1_jax.data.batch import PromptBatch, TrainBatch
from anatomy_r1_jax.runtime.distributed import DataShard


def split_model(model: nnx.Module, freeze_vision: bool, trains: str | None = None):
    """(graphdef, trainable params, frozen rest). With freeze_vision the vision tower is frozen.
    trains (lora.LoraConfig.trains of the phase): "adapters" the low-rank adapters (models/lora.py)
    alone, every base weight frozen in its stored dtype; "base" every weight but the adapters (all
    of a model without any); None: "adapters" when the model has any, else "base". The graphdef is
    the same for every split, so one model's programs take the states of either."""
    trains = trains or ("adapters" if lora.has_adapters(model) else "base")
    if trains not in ("adapters", "base"):
        raise ValueError(f"split_model: trains={trains!r}, expected 'adapters' or 'base'")
    kind = nnx.LoRAParam if trains == "adapters" else nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    trainable = nnx.All(kind, nnx.Not(nnx.PathContains("vision"))) if freeze_vision else kind
    return nnx.split(model, trainable, ...)


def rollout_layout(config, mesh: Mesh) -> tuple[Mesh, list]:
    """(mesh, rules) of the rollout: config.rollout_mesh ([] = the training `mesh`) and
    config.rollout_sharding_rules (checked). Decoding reads every weight once per token, so it has a
    layout of its own (weights replicated or tensor-parallel, rows over the rest; configs/default.py)."""
    rules = [tuple(r) for r in config.rollout_sharding_rules]
    sharding.check_rules(rules, "rollout_sharding_rules")
    return (sharding.make_mesh([tuple(a) for a in config.rollout_mesh]) if config.rollout_mesh else mesh), rules


def place_state(tree, mesh: Mesh, rules):
    """device_put an nnx State onto the shardings its `axes` metadata and the rules give."""
    return jax.device_put(tree, sharding.state_shardings(tree, mesh, rules))


def _row_axes(mesh: Mesh, rules) -> tuple | None:
    spec = sharding.logical_to_spec((sharding.BATCH,), rules, mesh)
    return spec[0] if len(spec) else None


def _rows_spec(ndim: int, row_dim: int, rows_axis, size: int, mesh: Mesh) -> P:
    names = () if rows_axis is None else (rows_axis,) if isinstance(rows_axis, str) else tuple(rows_axis)
    n_dev = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    spec = [None] * ndim
    if names and size % n_dev == 0:
        spec[row_dim] = rows_axis
    return P(*spec)


def _map_roles(batch, rows, replicated, micro_axis: bool):
    """Applies rows(x, row_dim) to the per-row and per-patch leaves of a PromptBatch / TrainBatch
    and replicated(x) to the gather indices (`image_rows`, the window permutation)."""
    lead = 1 if micro_axis else 0
    row = lambda x, row_dim=0: None if x is None else rows(x, row_dim + lead)  # noqa: E731
    rep = lambda x: None if x is None else replicated(x)  # noqa: E731

    def prompt(pb: PromptBatch):
        vision = None
        if pb.vision is not None:
            vision = jax.tree.map(rep, pb.vision)
            vision = vision.replace(position_ids=row(pb.vision.position_ids), segment_ids=row(pb.vision.segment_ids),
                                    window_segment_ids=row(pb.vision.window_segment_ids))
        return PromptBatch(input_ids=row(pb.input_ids), attention_mask=row(pb.attention_mask),
                           position_ids=row(pb.position_ids, 1), rope_deltas=row(pb.rope_deltas),
                           pixel_values=row(pb.pixel_values), vision=vision, image_rows=rep(pb.image_rows))

    if isinstance(batch, PromptBatch):
        return prompt(batch)
    return TrainBatch(prompt=prompt(batch.prompt), completions=jax.tree.map(row, batch.completions),
                      rewards=row(batch.rewards), categories=row(batch.categories))


def _global_shape(x, row_dim: int, shard_count: int) -> tuple[int, ...]:
    shape = list(np.shape(x))
    shape[row_dim] *= shard_count
    return tuple(shape)


def _rows_sharding(x, row_dim: int, mesh: Mesh, rules, shard_count: int) -> NamedSharding:
    size = _global_shape(x, row_dim, shard_count)[row_dim]
    return NamedSharding(mesh, _rows_spec(x.ndim, row_dim, _row_axes(mesh, rules), size, mesh))


def batch_shardings(batch, mesh: Mesh, rules, micro_axis: bool = False, shard_count: int = 1):
    """NamedShardings for a PromptBatch / TrainBatch (optionally with a leading micro-batch axis).

    Rows go to the `activation_batch` mesh axes; pixel values and per-patch vision inputs are split along
    patches (each device encodes whole queries when queries divide evenly); gather indices
    (`image_rows`, the window permutation) stay replicated. With shard_count > 1 the batch holds
    one data shard's rows and patches: the global arrays have shard_count times as many.
    """
    return _map_roles(batch, lambda x, row_dim: _rows_sharding(x, row_dim, mesh, rules, shard_count),
                      lambda x: NamedSharding(mesh, P()), micro_axis)


def put_batch(batch, mesh: Mesh, rules, micro_axis: bool = False, shard_count: int = 1):
    """Host batch -> global arrays. shard_count 1: every process passes the whole batch (device_put).
    Several data shards: every process passes its shard's rows and patches (runtime/distributed.py) and
    the same gather indices; jax.make_array_from_process_local_data assembles the global arrays."""
    if shard_count == 1:
        return jax.device_put(batch, batch_shardings(batch, mesh, rules, micro_axis))

    def rows(x, row_dim):
        sharding, shape = _rows_sharding(x, row_dim, mesh, rules, shard_count), _global_shape(x, row_dim, shard_count)
        if shard_count > 1 and sharding.spec[row_dim] is None:
            raise ValueError(f"a batch of {shape[row_dim]} rows (or patches) does not split over the mesh axes of the "
                             f"logical 'activation_batch' axis ({_row_axes(mesh, rules)}): with {shard_count} data "
                             f"shards (hosts), train.batch_size (queries) and the rows it makes must divide by them")
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), shape)

    replicated = lambda x: jax.make_array_from_process_local_data(NamedSharding(mesh, P()), np.asarray(x))  # noqa: E731
    return _map_roles(batch, rows, replicated, micro_axis)


def shard_rows(batch, index: int, count: int, micro_axis: bool = False):
    """The rows and patches of data shard `index` (of `count`) of a host batch; gather indices whole."""

    def rows(x, row_dim):
        n = x.shape[row_dim] // count
        return np.take(x, np.arange(index * n, (index + 1) * n), axis=row_dim)

    return _map_roles(batch, rows, lambda x: x, micro_axis)


# ---- a GRPO step's host decisions: which queries each rollout call and micro-batch holds -----------------
def rollout_calls(batch_size: int, rollout_batch_size: int, shards: int) -> int:
    """R, a GRPO step's rollout calls: train.batch_size / rl.rollout_batch_size queries each (0: one
    call). Raises one line when the sizes do not divide (each call holds every data shard's part)."""
    size = rollout_batch_size or batch_size
    if size < 1 or batch_size % size or size % shards:
        raise ValueError(f"config rl.rollout_batch_size={rollout_batch_size} must divide train.batch_size="
                         f"{batch_size} and be a multiple of the {shards} data shards (hosts) of the mesh (0: one "
                         f"rollout call per step)")
    return batch_size // size


def step_order(shards: int, local: int, parts_from: int, parts_to: int) -> np.ndarray:
    """A step's shards x local queries (each shard's in its pipeline order) in the order of
    `parts_to` parts, as indices into their order in `parts_from` parts. In P parts, part by part
    and in each the shards' local parts in turn (`step_records`), query i of shard h sits at
    (i // (local / P)) * shards * local / P + h * local / P + i % (local / P). Returns idx [B]:
    the k-th query of the `parts_to` order is the idx[k]-th of the `parts_from` order."""
    h, i = np.divmod(np.arange(shards * local), local)

    def position(parts):
        per = local // parts
        return (i // per) * shards * per + h * per + i % per

    order = np.empty(shards * local, np.int64)
    order[position(parts_to)] = position(parts_from)
    return order


def step_records(shard: DataShard, queries, parts: int, records):
    """The records of a step's queries (this shard's, data/pipeline.py Query) on all data shards, in
    the order of `parts` parts (rollout calls, micro-batches): part by part, each the shards' local
    parts in turn (`step_order`); `records`: the training records the queries index."""
    if shard.count == 1:
        return [q.record for q in queries]
    local = shard.gather(np.array([q.index for q in queries], np.int64))
    per = len(queries) // parts
    return [records[i] for m in range(parts) for part in local for i in part[m * per:(m + 1) * per]]


def shard_prompts(shard: DataShard, collator, batch: PromptBatch) -> PromptBatch:
    """This data shard's collated PromptBatch -> what `put_batch` takes: its rows and patches of the
    batch all shards' prompts make together (frame and window ids shifted past earlier shards'),
    and that batch's gather indices. Only the bookkeeping travels between hosts, not pixels."""
    if shard.count == 1:
        return batch
    joined = collator.concat(shard.gather(batch.replace(pixel_values=batch.pixel_values[:, :1])))
    return shard_rows(joined, shard.index, shard.count).replace(pixel_values=batch.pixel_values)


class RolloutWeights:
    """(params, frozen) resharded onto the rollout's layout (`rollout_layout`), once per state: a
    step's rollout calls, its re-rolls and an evaluation of the same weights share one copy, which
    `drop` releases before the update. The decode loop then reads weights local to each device."""

    def __init__(self, mesh: Mesh, rules):
        self.mesh, self.rules, self._cache = mesh, rules, None

    def __call__(self, params, frozen):
        if self._cache is None or self._cache[0] is not params:
            self._cache = (params, (place_state(params, self.mesh, self.rules),
                                    place_state(frozen, self.mesh, self.rules)))
        return self._cache[1]

    def drop(self) -> None:
        self._cache = None
