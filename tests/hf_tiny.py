"""Test helper: tiny random transformers Qwen2-VL / Qwen2.5-VL models saved in the hub layout, and
hand-built multimodal prompt batches (no tokenizer or processor needed).

Weights are re-drawn wide (std ~0.15, norm scales 1 +- 0.15) because transformers' 0.02 init makes
every layer nearly the identity and hides wiring bugs.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from anatomy_r1_jax.models.presets import tiny_hf_config

HF_CLASSES = {
    "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
}
PATCH_DIM = 3 * 2 * 14 * 14  # processor row: C * temporal_patch * patch * patch


def widen_(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> None:
    """Re-draws every parameter in place: norm weights ~ 1 + N(0, std^2), everything else N(0, std^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            is_norm = "norm" in name or "ln_q" in name
            p.copy_((1.0 + noise if is_norm and name.endswith("weight") else noise).to(p.dtype))


def build_hf_model(family: str, path, *, seed: int = 0, std: float = 0.15, **config_overrides):
    """Builds, widens and saves (`save_pretrained`) a tiny model; returns (torch model in eval mode, config dict)."""
    config_dict = tiny_hf_config(family, **config_overrides)
    config_cls, model_cls = HF_CLASSES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config_dict)).eval()
    widen_(model, std=std, seed=seed)
    model.save_pretrained(path)
    return model, config_dict


def _image_run(config: dict, grid) -> list[int]:
    n = int(np.prod(grid)) // 4  # 2x2 spatial merge
    return [config["vision_start_token_id"]] + [config["image_token_id"]] * n + [config["vision_end_token_id"]]


def multimodal_batch(config: dict, *, grids=((1, 6, 8), (1, 4, 6)), text_lengths=(120, 90, 100),
                     text_only_length: int = 250, seed: int = 0) -> dict[str, np.ndarray]:
    """A left-padded batch of 2: sample 0 = text, image, text, image, text (two images of different
    sizes); sample 1 = text only, shorter, so it carries left padding.

    Returns NumPy input_ids, attention_mask, mm_token_type_ids [2, L]; pixel_values [P, 1176] (random);
    image_grid_thw [2, 3].
    """
    rng = np.random.default_rng(seed)
    n_text = config["text_config"]["vocab_size"] - 16  # special tokens live in the top 16 ids

    def text(n):
        return rng.integers(0, n_text, n).tolist()

    first = text(text_lengths[0]) + _image_run(config, grids[0]) + text(text_lengths[1]) \
        + _image_run(config, grids[1]) + text(text_lengths[2])
    second = text(text_only_length)
    length = max(len(first), len(second))
    input_ids = np.zeros((2, length), np.int64)
    attention_mask = np.zeros((2, length), np.int64)
    for row, ids in enumerate((first, second)):
        input_ids[row, length - len(ids):] = ids
        attention_mask[row, length - len(ids):] = 1
    mm_token_type_ids = (input_ids == config["image_token_id"]).astype(np.int64)
    grid = np.asarray(grids, np.int64)
    pixel_values = rng.standard_normal((int(grid.prod(-1).sum()), PATCH_DIM)).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": pixel_values, "image_grid_thw": grid}


def torch_inputs(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


def hf_image_logits(hf, ids: np.ndarray, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
    """transformers' logits [B, L, V] for unpadded image prompts `ids [B, L]` (mm_token_type_ids
    marks the image placeholders)."""
    ids_t = torch.from_numpy(ids)
    mm = torch.from_numpy((ids == hf.config.image_token_id).astype(np.int64))
    with torch.no_grad():
        return hf(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), pixel_values=torch.from_numpy(pixel_values),
                  image_grid_thw=torch.from_numpy(grid_thw), mm_token_type_ids=mm).logits.numpy()
