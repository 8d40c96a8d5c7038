"""Multimodal (M-RoPE) position ids, on the host in NumPy, as transformers' `get_rope_index`.

Per sample, over its real tokens only (attention_mask == 1), tokens are grouped into runs of one
modality (mm_token_type: 0 text, 1 image, 2 video). With `p` the running position:
  * a text run of n tokens gets ids p .. p+n-1 on all three axes; p += n;
  * an image / video run consumes the next grid (t, h, w) of its modality; with m the spatial merge
    size its t * (h/m) * (w/m) tokens (t-major, then row-major) get
        temporal = p + floor(k * interval), height = p + row, width = p + col   (k the frame index)
    where interval is 1 except for Qwen2.5-VL video (tokens_per_second * second_per_grid_t);
    then p += max(h, w) / m  (the temporal extent is not counted, exactly as transformers does).
Padding keeps id 0. rope_delta = max id + 1 - number of real tokens, so that a token generated
after the prompt at text position n (n real tokens before it) has id n + rope_delta on every axis.

Note: runs are found by modality change, so two images with no token between them form one run
(transformers behaves the same; real prompts always put <|vision_end|><|vision_start|> between).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_types(input_ids: np.ndarray, *, image_token_id: int, video_token_id: int) -> np.ndarray:
    """[B, L] token ids -> [B, L] int32 modality types (0 text, 1 image, 2 video), as the processor's
    `mm_token_type_ids`."""
    ids = np.asarray(input_ids)
    return np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT)).astype(np.int32)


def _check_vision_starts(input_ids: np.ndarray, types: np.ndarray, vision_start_token_id: int) -> None:
    """Each image / video run must follow a <|vision_start|> token (the processor's prompt layout)."""
    for b in range(types.shape[0]):
        starts = np.flatnonzero((types[b] != TEXT) & (np.r_[TEXT, types[b, :-1]] != types[b]))
        bad = [int(s) for s in starts if s == 0 or input_ids[b, s - 1] != vision_start_token_id]
        if bad:
            raise ValueError(f"sample {b}: vision tokens at {bad} are not preceded by vision_start_token_id "
                             f"{vision_start_token_id}")


def _vision_positions(start: int, grid, merge: int, interval: float) -> np.ndarray:
    """[3, t * h/m * w/m] ids of one image / video starting at text position `start`."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    # torch: (arange(t) * interval).long() truncates toward zero; ids are non-negative so floor.
    temporal = (np.arange(t) * interval).astype(np.int64)
    tt, hh, ww = np.meshgrid(temporal, np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1) + start


def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                   attention_mask=None, *, spatial_merge_size: int = 2, image_token_id: int | None = None,
                   video_token_id: int | None = None, vision_start_token_id: int | None = None,
                   second_per_grid_ts=None, tokens_per_second: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """3-D rotary position ids of a (left- or right-padded) prompt batch.

    input_ids [B, L]; mm_token_type_ids [B, L] (0 text, 1 image, 2 video), derived from
    image_token_id / video_token_id when None; image_grid_thw [n_images, 3] and video_grid_thw
    [n_videos, 3] in patches, consumed in row-major order over the batch; attention_mask [B, L].
    Qwen2.5-VL video: pass tokens_per_second (vision config) and second_per_grid_ts [n_videos];
    tokens_per_second=None is Qwen2-VL (frame k at temporal offset k).
    vision_start_token_id, when given, checks that every vision run follows <|vision_start|>.

    Returns position_ids [3, B, L] int64 (0 on padding) and rope_deltas [B, 1] int64.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    if mm_token_type_ids is None:
        if image_token_id is None or video_token_id is None:
            raise ValueError("pass mm_token_type_ids, or image_token_id and video_token_id to derive them")
        types = mm_token_types(input_ids, image_token_id=image_token_id, video_token_id=video_token_id)
    else:
        types = np.asarray(mm_token_type_ids)
    if vision_start_token_id is not None:
        _check_vision_starts(input_ids, types, vision_start_token_id)
    mask = np.ones((batch, length), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = {IMAGE: iter(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else iter(()),
             VIDEO: iter(np.asarray(video_grid_thw).reshape(-1, 3)) if video_grid_thw is not None else iter(())}
    seconds = iter(np.asarray(second_per_grid_ts).reshape(-1)) if second_per_grid_ts is not None else itertools.repeat(1)

    position_ids = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    for b in range(batch):
        sample_types = types[b][mask[b]]
        pos, pieces = 0, []
        for modality, run in itertools.groupby(sample_types.tolist()):
            n = len(list(run))
            if modality == TEXT:
                pieces.append(np.broadcast_to(np.arange(n) + pos, (3, n)))
                pos += n
                continue
            grid = next(grids[modality], None)
            if grid is None:
                kind = "image_grid_thw" if modality == IMAGE else "video_grid_thw"
                raise ValueError(f"sample {b}: more {kind.split('_')[0]} runs than rows in {kind}")
            interval = 1.0
            if modality == VIDEO and tokens_per_second is not None:
                interval = tokens_per_second * float(next(seconds))
            ids = _vision_positions(pos, grid, spatial_merge_size, interval)
            if ids.shape[1] != n:
                raise ValueError(f"sample {b}: a run of {n} vision tokens does not match grid {grid.tolist()} "
                                 f"({ids.shape[1]} tokens after {spatial_merge_size}x{spatial_merge_size} merge)")
            pieces.append(ids)
            pos += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        if pieces:
            ids = np.concatenate(pieces, axis=1)
            position_ids[:, b, mask[b]] = ids
            deltas[b, 0] = ids.max() + 1 - len(sample_types)
    return position_ids, deltas


def decode_position_ids(cache_index, rope_deltas, prompt_mask, length: int = 1):
    """Position ids [3, B, length] of `length` new tokens written at cache slots index .. index+length-1
    after a prompt occupying slots 0 .. P-1 (jit-friendly; cache_index may be traced).

    transformers' generate continues every axis from the prompt's last id + 1, i.e. a token with n
    real tokens before it gets n + rope_delta. With the prompt left-padded to P slots, a slot s >= P
    has n = s - (number of padding slots), so id = s + rope_delta - pad_count.

    cache_index: int scalar; rope_deltas [B, 1]; prompt_mask [B, P] (1 = real prompt token).
    """
    pad = prompt_mask.shape[1] - jnp.sum(jnp.asarray(prompt_mask).astype(jnp.int32), axis=1, keepdims=True)
    slots = cache_index + jnp.arange(length, dtype=jnp.int32)[None, :]  # [1, length]
    ids = slots + (jnp.asarray(rope_deltas, jnp.int32) - pad)  # [B, length]
    return jnp.broadcast_to(ids[None], (3,) + ids.shape)
