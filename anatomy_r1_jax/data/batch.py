"""Device-side batch pytrees shared by the rollout engine, the train step and evaluation.

Rows are samples: N = prompts * G with the G rows of a group contiguous. Each image is encoded once
per prompt; `image_rows` maps every image-placeholder token of the row-major [N, Lp] prompt batch
to its row of the encoded image embeddings, so a group's G rows reuse one encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import numpy as np


@flax.struct.dataclass
class PromptBatch:
    """input_ids [N, Lp] (left padded), attention_mask [N, Lp], position_ids [3, N, Lp] (M-RoPE),
    rope_deltas [N, 1], pixel_values [P, C*T*p*p] or None, vision (VisionInputs) or None,
    image_rows [E] int32 (E = static budget of image tokens in the batch)."""

    input_ids: jax.Array
    attention_mask: jax.Array
    position_ids: jax.Array
    rope_deltas: jax.Array
    pixel_values: jax.Array | None = None
    vision: Any = None
    image_rows: jax.Array | None = None


@flax.struct.dataclass
class Completions:
    """ids [N, T] (pad after EOS), mask [N, T] (1 up to and including EOS), logps [N, T] of the
    sampling distribution (temperature-scaled, full vocabulary), lengths [N]."""

    ids: jax.Array
    mask: jax.Array
    logps: jax.Array
    lengths: jax.Array


@flax.struct.dataclass
class TrainBatch:
    """A GRPO update's input: prompts, their completions and rewards [N] (groups contiguous),
    plus per-row integer categories [N] (anatomy class index; -1 unknown) for metrics. (S(q) is
    host-side only, in the trainer's metrics: the update never reads it.)"""

    prompt: PromptBatch
    completions: Completions
    rewards: jax.Array
    categories: jax.Array


def prompt_width(attention_mask: np.ndarray, widths: Sequence[int]) -> int:
    """The smallest of `widths` (ascending) that holds the longest prompt of a left-padded
    attention_mask [N, Lp] (host array)."""
    longest = int(np.asarray(attention_mask).sum(axis=1).max(initial=0))
    return next((w for w in widths if w >= longest), widths[-1])


def trim_prompts(batch: PromptBatch, width: int) -> PromptBatch:
    """The last `width` columns of a left-padded prompt batch (host arrays): the same prompts
    without their leading padding. Nothing else changes: `image_rows` follows the placeholders in
    row-major order and the decode positions count the padding they skip (rope_index.decode_position_ids)."""
    lp = batch.input_ids.shape[1]
    if width >= lp:
        return batch
    if np.asarray(batch.attention_mask)[:, : lp - width].any():
        raise ValueError(f"a prompt is longer than the width {width} it would be cut to (of {lp})")
    return batch.replace(input_ids=batch.input_ids[:, lp - width:], attention_mask=batch.attention_mask[:, lp - width:],
                         position_ids=batch.position_ids[:, :, lp - width:])
