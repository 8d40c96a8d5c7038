"""Host-side collation into fixed-shape batches (so the jitted step never recompiles).

A batch is a list of groups; a group is the G rows of one query (copies of the record, or its
GDQA variants) sharing the query's images. Static sizes come from `BatchShape`: the prompt
length Lp, the completion length T and the patch budget per query; anything larger raises a
`DataError` naming the record rather than being truncated silently.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from anatomy_r1_jax.data import prompts
from anatomy_r1_jax.data.images import load_image
from anatomy_r1_jax.data.readers import DataError
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.models.rope_index import get_rope_index
from anatomy_r1_jax.models.vision_inputs import concat_vision_inputs, pad_pixel_values, vision_inputs
from anatomy_r1_jax.data.batch import PromptBatch

IMAGE_PAD = "<|image_pad|>"


@dataclasses.dataclass(frozen=True)
class BatchShape:
    prompt_length: int = 256
    completion_length: int = 64
    patches_per_query: int = 64


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
    """A query's preprocessed images: pixel_values [p, C*T*ps*ps] float32, grid_thw [k, 3] int."""

    pixel_values: np.ndarray
    grid_thw: np.ndarray


def preprocess_images(record: Record, image_processor) -> ImageFeatures:
    """Loads and preprocesses a record's images with the checkpoint's (PIL) image processor."""
    if not record.images:
        d = image_processor.temporal_patch_size * image_processor.patch_size ** 2 * 3
        return ImageFeatures(np.zeros((0, d), np.float32), np.zeros((0, 3), np.int64))
    out = image_processor(images=[load_image(p) for p in record.images], return_tensors="np")
    return ImageFeatures(np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64))


def prompt_text(tokenizer, record: Record, variant: str | None = None, think: bool = True) -> str:
    """The chat prompt's text (chat template, generation prompt added), one IMAGE_PAD per image."""
    messages = prompts.chat_messages(record, variant, think=think)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, record: Record, image_tokens: Sequence[int], *, variant: str | None = None,
               think: bool = True) -> list[int]:
    """Token ids of the chat prompt, the k-th image placeholder expanded to image_tokens[k] tokens
    (an image of grid (t, h, w) has t*h*w / merge**2 of them)."""
    parts = prompt_text(tokenizer, record, variant, think).split(IMAGE_PAD)
    if len(parts) - 1 != len(image_tokens):
        raise DataError(f"record {record.id!r}: prompt has {len(parts) - 1} image placeholders for "
                        f"{len(image_tokens)} images")
    text = parts[0] + "".join(IMAGE_PAD * c + p for c, p in zip(image_tokens, parts[1:]))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Collator:
    """Tokenizes prompts through the chat template and packs groups into a `PromptBatch`."""

    def __init__(self, tokenizer, model_cfg, shape: BatchShape, *, variant: str | None = None, think: bool = True):
        self.tokenizer = tokenizer
        self.cfg = model_cfg
        self.shape = shape
        self.variant = variant
        self.think = think
        self.merge = model_cfg.vision.spatial_merge_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if shape.patches_per_query % (self.merge ** 2):
            raise ValueError(f"patches_per_query={shape.patches_per_query} must be a multiple of {self.merge ** 2}")

    def prompt_ids(self, record: Record, grid_thw: np.ndarray) -> list[int]:
        """Token ids of the chat prompt with each image placeholder expanded to its merged tokens."""
        counts = [int(np.prod(g)) // self.merge ** 2 for g in grid_thw]
        return prompt_ids(self.tokenizer, record, counts, variant=self.variant, think=self.think)

    def prompts(self, groups: Sequence[Sequence[Record]], images: Sequence[ImageFeatures]) -> PromptBatch:
        """groups: B lists of G records (rows); images: B ImageFeatures. Returns NumPy arrays:
        input_ids [B*G, Lp] left padded, pixel_values [B * patches_per_query, D]."""
        lp = self.shape.prompt_length
        rows, grids, image_rows = [], [], []
        embed_offset = 0
        for group, feats in zip(groups, images):
            n_patches = int(np.prod(feats.grid_thw, axis=1).sum()) if len(feats.grid_thw) else 0
            if n_patches > self.shape.patches_per_query:
                raise DataError(f"record {group[0].id!r}: its images have {n_patches} patches, more than the "
                                f"patch budget patches_per_query={self.shape.patches_per_query}; raise "
                                f"--config.data.patches_per_query to {n_patches} or lower data.max_pixels "
                                f"(0: images are resized to fit the budget)")
            n_tokens = n_patches // self.merge ** 2
            for record in group:
                ids = self.prompt_ids(record, feats.grid_thw)
                if len(ids) > lp:
                    raise DataError(f"record {record.id!r}: prompt of {len(ids)} tokens exceeds "
                                    f"prompt_length={lp}; raise data.prompt_length")
                rows.append(ids)
                grids.extend(feats.grid_thw)
                image_rows.extend(range(embed_offset, embed_offset + n_tokens))
            embed_offset += n_tokens  # the tower's outputs: every query's real tokens in turn, padding last
        n = len(rows)
        input_ids = np.full((n, lp), self.pad_id, np.int32)
        mask = np.zeros((n, lp), np.int32)
        for i, ids in enumerate(rows):
            input_ids[i, lp - len(ids):] = ids
            mask[i, lp - len(ids):] = 1
        grid_arr = np.asarray(grids, np.int64).reshape(-1, 3)
        position_ids, deltas = get_rope_index(
            input_ids, image_grid_thw=grid_arr if len(grid_arr) else None, attention_mask=mask,
            spatial_merge_size=self.merge, image_token_id=self.cfg.image_token_id,
            video_token_id=self.cfg.video_token_id, vision_start_token_id=self.cfg.vision_start_token_id)
        budget = len(groups) * self.shape.patches_per_query
        pixel_values = pad_pixel_values(np.concatenate([f.pixel_values for f in images]), budget)
        query_grids = np.concatenate([f.grid_thw for f in images]).reshape(-1, 3)
        token_budget = n * (self.shape.patches_per_query // self.merge ** 2)
        rows_arr = np.zeros((token_budget,), np.int32)
        rows_arr[: len(image_rows)] = image_rows
        return PromptBatch(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids.astype(np.int32),
            rope_deltas=deltas.astype(np.int32), pixel_values=pixel_values.astype(np.float32),
            vision=vision_inputs(query_grids, self.cfg.vision, patch_budget=budget,
                                 frame_budget=self.shape.patches_per_query),  # attention per frame
            image_rows=rows_arr)

    def concat(self, parts: Sequence[PromptBatch]) -> PromptBatch:
        """Prompt batches of `prompts` laid end to end: rows and patches of part k after those of
        parts < k, as one call with all their groups packs them, except that each part keeps its
        padding patches (and padding image_rows) at its end. Multi-host training joins the data
        shards' batches with it (runtime/distributed.py)."""
        real, units = [], 0
        for p in parts:  # image_rows: each part's real entries, shifted past earlier parts' tower outputs
            real.append(p.image_rows[: int((p.input_ids == self.cfg.image_token_id).sum())] + units)
            units += p.pixel_values.shape[0] // self.merge ** 2
        real = np.concatenate(real)
        image_rows = np.zeros((sum(len(p.image_rows) for p in parts),), np.int32)
        image_rows[: len(real)] = real
        cat = lambda field, axis=0: np.concatenate([getattr(p, field) for p in parts], axis)  # noqa: E731
        return PromptBatch(input_ids=cat("input_ids"), attention_mask=cat("attention_mask"),
                           position_ids=cat("position_ids", 1), rope_deltas=cat("rope_deltas"),
                           pixel_values=cat("pixel_values"), vision=concat_vision_inputs([p.vision for p in parts]),
                           image_rows=image_rows)

    def targets(self, texts: Sequence[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Supervised completions: ids [N, T] right padded (text + EOS), mask [N, T]."""
        t = self.shape.completion_length
        ids = np.full((len(texts), t), self.pad_id, np.int32)
        mask = np.zeros((len(texts), t), np.int32)
        for i, text in enumerate(texts):
            tok = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id]
            if len(tok) > t:
                raise DataError(f"target {text[:40]!r}... has {len(tok)} tokens > completion_length={t}")
            ids[i, : len(tok)] = tok
            mask[i, : len(tok)] = 1
        return ids, mask
