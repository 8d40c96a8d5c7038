"""Device-side batch pytrees shared by the rollout engine, the train step and evaluation.

Rows are samples: N = prompts * G with the G rows of a group contiguous. Each image is encoded once
per prompt; `image_rows` maps every image-placeholder token of the row-major [N, Lp] prompt batch
to its row of the encoded image embeddings, so a group's G rows reuse one encoding.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


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
