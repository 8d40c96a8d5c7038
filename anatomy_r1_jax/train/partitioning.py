"""Placement of the train state and batches on a mesh, from the config's logical rules.

The state's shardings come from each parameter's logical `axes` (see `anatomy_r1_jax.sharding`);
optimizer moments follow their parameters. Batch rows (dimension N of [N, ...], or of
[3, N, ...] for position ids, after an optional leading micro-batch axis) go to the mesh axes of
the logical `batch` axis; patches of the vision tower likewise, whole queries per device.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from anatomy_r1_jax import sharding
from anatomy_r1_jax.rl.batch import PromptBatch, TrainBatch


def split_model(model: nnx.Module, freeze_vision: bool):
    """(graphdef, trainable params, frozen rest). With freeze_vision the vision tower is frozen."""
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision"))) if freeze_vision else nnx.Param
    return nnx.split(model, trainable, ...)


def place_state(tree, mesh: Mesh, rules):
    """device_put an nnx State onto the shardings its `axes` metadata and the rules give."""
    return jax.device_put(tree, sharding.state_shardings(tree, mesh, rules))


def _row_axes(mesh: Mesh, rules) -> tuple | None:
    spec = sharding.logical_to_spec(("batch",), rules, mesh)
    return spec[0] if len(spec) else None


def _rows_spec(ndim: int, row_dim: int, rows_axis, size: int, mesh: Mesh) -> P:
    names = () if rows_axis is None else (rows_axis,) if isinstance(rows_axis, str) else tuple(rows_axis)
    n_dev = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    spec = [None] * ndim
    if names and size % n_dev == 0:
        spec[row_dim] = rows_axis
    return P(*spec)


def batch_shardings(batch, mesh: Mesh, rules, micro_axis: bool = False):
    """NamedShardings for a PromptBatch / TrainBatch (optionally with a leading micro-batch axis).

    Rows go to the `batch` mesh axes; pixel values and per-patch vision inputs are split along
    patches (each device encodes whole queries when queries divide evenly); gather indices
    (`image_rows`, the window permutation) stay replicated.
    """
    rows_axis = _row_axes(mesh, rules)
    lead = 1 if micro_axis else 0

    def rows(x, row_dim=0):
        if x is None:
            return None
        return NamedSharding(mesh, _rows_spec(x.ndim, row_dim + lead, rows_axis, x.shape[row_dim + lead], mesh))

    def replicated(x):
        return None if x is None else NamedSharding(mesh, P())

    def prompt(pb: PromptBatch):
        vision = None
        if pb.vision is not None:
            vision = jax.tree.map(replicated, pb.vision)
            vision = vision.replace(position_ids=rows(pb.vision.position_ids), segment_ids=rows(pb.vision.segment_ids),
                                    window_segment_ids=rows(pb.vision.window_segment_ids))
        return PromptBatch(input_ids=rows(pb.input_ids), attention_mask=rows(pb.attention_mask),
                           position_ids=rows(pb.position_ids, 1), rope_deltas=rows(pb.rope_deltas),
                           pixel_values=rows(pb.pixel_values), vision=vision, image_rows=replicated(pb.image_rows))

    if isinstance(batch, PromptBatch):
        return prompt(batch)
    return TrainBatch(prompt=prompt(batch.prompt), completions=jax.tree.map(rows, batch.completions),
                      rewards=rows(batch.rewards), categories=rows(batch.categories),
                      similarity=rows(batch.similarity))


def put_batch(batch, mesh: Mesh, rules, micro_axis: bool = False):
    return jax.device_put(batch, batch_shardings(batch, mesh, rules, micro_axis))
