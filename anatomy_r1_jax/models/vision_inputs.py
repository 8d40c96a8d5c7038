"""Host-side (NumPy) inputs of the vision tower: everything that depends on the image grids.

The Qwen2-VL processor emits `pixel_values [P, C*T*p*p]` (all images concatenated) and
`image_grid_thw [n, 3]` (t, h, w in patches per image). Patches of one frame come in
*merge-block-major* order: the image is cut into m x m blocks of patches (m = spatial_merge_size),
blocks run row-major over the `(h/m, w/m)` grid, and the m*m patches of a block are consecutive, so
that the merger can fuse each run of m*m rows into one token ("merged unit", U = P / m^2 of them).

Everything grid-dependent (positions, segments, window permutation) is computed here once per batch,
so the jitted tower sees only fixed-shape integer arrays: with `patch_budget`, images of any sizes
reuse one compiled function.

Orders. *Input order* is the processor's. *Compute order* is the order the transformer blocks see:
for Qwen2.5-VL the merged units are permuted window by window (`window_index`); for Qwen2-VL it is
the input order. The tower un-permutes after the merger, so its output rows are in input order
(the order the language model's image placeholder tokens consume them).

Attention rows. Attention never spans segments (frames for full attention, windows for Qwen2.5-VL's
window attention), so the tower does not attend over all P patches at once: the segments are packed,
whole and in compute order, into a static number of fixed-length rows (next-fit), and attention runs
per row, [rows, R, R] scores instead of [P, P]. The cost is linear in the number of images:
    windows: R = the largest window ((window_size / patch_size)^2 patches), at most 2 * ceil(P / R) - 1
             rows (next-fit: two consecutive rows hold more than R patches), so this never fails;
    frames:  R = `frame_budget` (the most patches a query's images may have), ceil(P / R) rows. When
             every query's frames together fit in R patches and P = queries * R, next-fit opens at most one
             row per query, so the frames fit; otherwise `vision_inputs` says so. frame_budget None: one
             row of all P patches (dense; any layout fits).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
from flax import struct

if TYPE_CHECKING:
    from anatomy_r1_jax.models.config import VisionConfig


@struct.dataclass
class AttentionRows:
    """Segments packed into rows for attention (see the module docstring); n rows of R slots.

    index:    [n, R] compute-order patch in each slot; P (one past the last patch) for an empty slot.
    segments: [n, R] segment id of each slot, -1 when empty: a slot attends to slots of its own segment.
    slots:    [P] flat slot (row * R + column) of each compute-order patch; n * R for padding patches.
    """

    index: np.ndarray
    segments: np.ndarray
    slots: np.ndarray


@struct.dataclass
class VisionInputs:
    """Per-batch tower inputs (int32 / bool NumPy arrays; P patches, U = P / merge^2 units).

    position_ids:       [P, 2] (row, column) of each patch inside its frame, compute order; the 2-D rotary.
    segment_ids:        [P] frame id (images count as one frame), compute order; full attention is
                        block-diagonal over these, as transformers' `cu_seqlens` (one segment per frame).
    window_segment_ids: [P] window id, compute order (Qwen2.5-VL window attention; Qwen2-VL: = segment_ids).
    window_index:       [U] compute-order unit j holds input-order unit window_index[j] (identity for Qwen2-VL).
    reverse_index:      [U] the inverse permutation: input-order unit i sits at compute position reverse_index[i].
    token_valid:        [U] True for output rows that belong to a real image (padding rows come last).
    frame_rows:         frames packed into rows of `frame_budget` patches (full attention).
    window_rows:        windows packed into rows of one window (Qwen2.5-VL window attention; None for Qwen2-VL).

    Padding patches get a segment and a window id of their own, so they never attend to or
    from real patches; their outputs are garbage the caller ignores.
    """

    position_ids: np.ndarray
    segment_ids: np.ndarray
    window_segment_ids: np.ndarray
    window_index: np.ndarray
    reverse_index: np.ndarray
    token_valid: np.ndarray
    frame_rows: AttentionRows
    window_rows: AttentionRows | None = None

    @property
    def num_patches(self) -> int:
        return int(self.position_ids.shape[0])


def _check_grids(grid: np.ndarray, merge: int) -> np.ndarray:
    grid = np.asarray(grid, dtype=np.int64).reshape(-1, 3)
    if (grid <= 0).any():
        raise ValueError(f"image_grid_thw must be positive, got {grid.tolist()}")
    if (grid[:, 1:] % merge).any():
        raise ValueError(f"grid heights and widths must be multiples of spatial_merge_size={merge}: {grid.tolist()}")
    return grid


def _unit_coordinates(grid: np.ndarray, merge: int) -> dict[str, np.ndarray]:
    """Per merged unit in input order: global frame id, row and column in the frame's unit grid,
    and that grid's height and width. Units run image by image, frame-major, then row-major."""
    t, lh, lw = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge
    units = t * lh * lw
    image = np.repeat(np.arange(len(grid)), units)
    offset = np.arange(units.sum()) - np.repeat(np.cumsum(units) - units, units)
    per_frame = (lh * lw)[image]
    return {
        "frame": (np.cumsum(t) - t)[image] + offset // per_frame,
        "row": (offset % per_frame) // lw[image],
        "col": offset % lw[image],
        "height": lh[image],
        "width": lw[image],
    }


def _window_ids(units: dict[str, np.ndarray], side: int) -> np.ndarray:
    """Global window id per unit: windows tile each frame in side x side units, row-major, the last
    row / column of windows partial; ids increase frame by frame. A stable sort by these ids is
    transformers' `get_vision_window_index` order (its empty padding windows hold no units)."""
    frame = units["frame"]
    windows_w = -(-units["width"] // side)
    windows_per_frame = -(-units["height"] // side) * windows_w
    n_frames = int(frame.max()) + 1 if len(frame) else 0
    count = np.zeros(n_frames, np.int64)
    count[frame] = windows_per_frame  # the same value for every unit of a frame
    first = np.cumsum(count) - count
    return first[frame] + (units["row"] // side) * windows_w + units["col"] // side


def attention_rows(segments: np.ndarray, total: int, length: int, capacity: int) -> AttentionRows | None:
    """Packs the runs of equal ids in `segments [n_real]` (real patches, compute order) whole into
    `capacity` rows of `length` slots, next-fit in order; None when they do not fit. `total` is P."""
    starts = np.flatnonzero(np.diff(segments, prepend=-1)) if len(segments) else np.zeros(0, np.int64)
    sizes = np.diff(np.append(starts, len(segments)))
    first_slot = np.zeros(len(sizes), np.int64)
    row, fill = 0, 0
    for i, size in enumerate(sizes.tolist()):
        if fill + size > length:
            row, fill = row + 1, 0
        first_slot[i] = row * length + fill
        fill += size
    if row >= capacity or (sizes > length).any():
        return None
    run = np.repeat(np.arange(len(sizes)), sizes)
    slot_of_patch = first_slot[run] + np.arange(len(segments)) - starts[run]
    index = np.full(capacity * length, total, np.int64)
    index[slot_of_patch] = np.arange(len(segments))
    seg = np.full(capacity * length, -1, np.int64)
    seg[slot_of_patch] = segments
    slots = np.full(total, capacity * length, np.int64)
    slots[:len(segments)] = slot_of_patch
    return AttentionRows(index=index.reshape(capacity, length).astype(np.int32),
                         segments=seg.reshape(capacity, length).astype(np.int32), slots=slots.astype(np.int32))


def vision_inputs(image_grid_thw: np.ndarray, cfg: "VisionConfig", patch_budget: int | None = None,
                  frame_budget: int | None = None) -> VisionInputs:
    """Builds the tower inputs for images with grids `image_grid_thw [n, 3]` (t, h, w in patches).

    patch_budget: total patch rows the tower will see (the caller pads `pixel_values` to it with
    `pad_pixel_values`); a multiple of merge^2 and >= the real patch count. None = no padding.
    frame_budget: the row length of full attention, at least the largest frame (module docstring);
    the trainer passes its patches per query. None = the whole patch budget (one dense row).
    Qwen2.5-VL windows are `window_size / (patch_size * merge)` merged units on a side.
    """
    merge = cfg.spatial_merge_size
    unit = merge * merge
    grid = _check_grids(image_grid_thw, merge)
    real = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    total = real if patch_budget is None else int(patch_budget)
    if total < real or total % unit:
        raise ValueError(f"patch_budget={patch_budget} must be a multiple of merge^2={unit} and at least the "
                         f"{real} patches of image_grid_thw={grid.tolist()}")
    n_real, n_units = real // unit, total // unit

    units = _unit_coordinates(grid, merge)
    if cfg.uses_windows:
        side = cfg.window_size // (cfg.patch_size * merge)
        if side < 1:
            raise ValueError(f"window_size={cfg.window_size} is smaller than one merged patch")
        window = _window_ids(units, side)
        window_patches = (side * merge) ** 2
    else:
        window = units["frame"]
    # Padding units form one extra segment and one extra window of their own, at position (0, 0)
    # (their rotary is irrelevant); they stay at the end of the compute order.
    pad = n_units - n_real
    frame = np.concatenate([units["frame"], np.full(pad, int(grid[:, 0].sum()))])
    window = np.concatenate([window, np.full(pad, int(window.max(initial=-1)) + 1)])
    row = np.concatenate([units["row"], np.zeros(pad, np.int64)])
    col = np.concatenate([units["col"], np.zeros(pad, np.int64)])
    window_index = np.argsort(window, kind="stable")
    reverse_index = np.argsort(window_index)

    def per_patch(x):  # unit-level value in compute order, repeated for the unit's m*m patches
        return np.repeat(x[window_index], unit).astype(np.int32)

    # Patch (row, col) inside its frame: unit corner + offset inside the m x m block.
    within = np.tile(np.arange(unit), n_units)
    position_ids = np.stack([per_patch(row) * merge + within // merge, per_patch(col) * merge + within % merge], -1)
    segment_ids, window_segment_ids = per_patch(frame), per_patch(window)
    length = (total or unit) if frame_budget is None else int(frame_budget)
    frame_rows = attention_rows(segment_ids[:real], total, length, max(1, -(-total // length)))
    if frame_rows is None:
        raise ValueError(f"the frames of image_grid_thw={grid.tolist()} do not fit {max(1, -(-total // length))} "
                         f"rows of frame_budget={frame_budget} patches: give each query at most frame_budget "
                         f"patches and patch_budget = queries * frame_budget (now {total})")
    window_rows = None
    if cfg.uses_windows:
        window_rows = attention_rows(window_segment_ids[:real], total, window_patches,
                                     max(1, 2 * -(-total // window_patches) - 1))
        assert window_rows is not None, "next-fit always fits windows in 2 * ceil(P / R) - 1 rows"
    return VisionInputs(
        position_ids=position_ids.astype(np.int32),
        segment_ids=segment_ids,
        window_segment_ids=window_segment_ids,
        window_index=window_index.astype(np.int32),
        reverse_index=reverse_index.astype(np.int32),
        token_valid=np.arange(n_units) < n_real,
        frame_rows=frame_rows,
        window_rows=window_rows,
    )


def frame_budgets(image_grid_thw: np.ndarray, merge: int) -> tuple[int, int]:
    """(patch_budget, frame_budget) that keep full attention per frame for images of any sizes:
    frame_budget R = the largest frame (h * w patches), patch_budget = n * R for the n rows that
    next-fit packing of the frames in order needs (n <= 2 ceil(P / R) - 1, so at most ~2P + R
    patches). The tower's cost is then linear in the images, where frame_budget None (one dense row
    of all P patches) costs P^2 in attention. A host-side helper for callers without a data
    pipeline's fixed budgets (`QwenVL.__call__`)."""
    grid = _check_grids(image_grid_thw, merge)
    sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    length = int(sizes.max())
    rows, fill = 1, 0
    for size in sizes.tolist():
        if fill + size > length:
            rows, fill = rows + 1, 0
        fill += size
    return rows * length, length


def pad_pixel_values(pixel_values: np.ndarray, num_patches: int) -> np.ndarray:
    """Appends zero rows to `pixel_values [P, C*T*p*p]` up to `num_patches` rows (a patch budget)."""
    pixel_values = np.asarray(pixel_values)
    if pixel_values.shape[0] > num_patches:
        raise ValueError(f"{pixel_values.shape[0]} patches exceed the budget of {num_patches}")
    return np.pad(pixel_values, ((0, num_patches - pixel_values.shape[0]), (0, 0)))


def concat_vision_inputs(parts: "list[VisionInputs]") -> VisionInputs:
    """The tower inputs of several batches' patches laid end to end (each part's padding stays at
    its end): what a batch made of the parts' images in turn computes, up to where padding sits.
    Frame and window ids of part k are shifted past those of parts < k, its unit indices by their
    unit counts, its attention rows follow those of parts < k (`concat_attention_rows`). Multi-host
    training joins the data shards' batches with it (runtime/distributed.py).
    """
    shifted, frames, windows, units = [], [], [], 0
    frame_shift = window_shift = 0
    for p in parts:
        frames.append(frame_shift)
        windows.append(window_shift)
        shifted.append(p.replace(segment_ids=p.segment_ids + frame_shift,
                                 window_segment_ids=p.window_segment_ids + window_shift,
                                 window_index=p.window_index + units, reverse_index=p.reverse_index + units))
        frame_shift += int(p.segment_ids.max(initial=-1)) + 1
        window_shift += int(p.window_segment_ids.max(initial=-1)) + 1
        units += len(p.window_index)
    arrays = {f.name: np.concatenate([getattr(s, f.name) for s in shifted]) for f in dataclasses.fields(VisionInputs)
              if f.name not in ("frame_rows", "window_rows")}
    sizes = [p.num_patches for p in parts]
    windowed = parts[0].window_rows is not None
    return VisionInputs(**arrays, frame_rows=concat_attention_rows([p.frame_rows for p in parts], sizes, frames),
                        window_rows=concat_attention_rows([p.window_rows for p in parts], sizes, windows)
                        if windowed else None)


def concat_attention_rows(parts: list[AttentionRows], patches: list[int], shifts: list[int]) -> AttentionRows:
    """Rows of parts laid end to end: part k's patch indices move past the `patches` of parts < k,
    its segment ids by `shifts[k]`, its slots past the rows of parts < k; every part's sentinels (P
    for an empty slot, n * R for a padding patch) become the joined batch's."""
    length = parts[0].index.shape[1]
    total, rows = sum(patches), sum(r.index.shape[0] for r in parts)
    index, segments, slots = [], [], []
    patch_offset = row_offset = 0
    for r, p, shift in zip(parts, patches, shifts):
        n = r.index.shape[0]
        index.append(np.where(r.index == p, total, r.index + patch_offset))
        segments.append(np.where(r.segments < 0, -1, r.segments + shift))
        slots.append(np.where(r.slots == n * length, rows * length, r.slots + row_offset * length))
        patch_offset, row_offset = patch_offset + p, row_offset + n
    return AttentionRows(index=np.concatenate(index).astype(np.int32),
                         segments=np.concatenate(segments).astype(np.int32),
                         slots=np.concatenate(slots).astype(np.int32))
