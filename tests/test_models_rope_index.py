"""get_rope_index (NumPy) is exactly transformers' Qwen2-VL / Qwen2.5-VL get_rope_index."""

from __future__ import annotations

import numpy as np
import pytest

import torch
from hf_tiny import HF_CLASSES, multimodal_batch

from anatomy_r1_jax.models import decode_position_ids, get_rope_index
from anatomy_r1_jax.models.presets import tiny_hf_config
from anatomy_r1_jax.models.rope_index import mm_token_types

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def hf(request):
    config_cls, model_cls = HF_CLASSES[request.param]
    config = tiny_hf_config(request.param)
    return request.param, config, model_cls(config_cls(**config)).eval().model


def _ids(config: dict) -> dict:
    return dict(image_token_id=config["image_token_id"], video_token_id=config["video_token_id"],
                vision_start_token_id=config["vision_start_token_id"])


def _reference(model, input_ids, types, image_grid=None, video_grid=None, mask=None, **kw):
    t = lambda x: None if x is None else torch.as_tensor(np.asarray(x))  # noqa: E731
    pos, deltas = model.get_rope_index(t(input_ids), t(types), t(image_grid), t(video_grid),
                                       attention_mask=t(mask), **kw)
    return pos.numpy(), deltas.numpy()


@pytest.mark.parametrize("with_mask", [True, False])
def test_images_left_padding_text_only(hf, with_mask):
    _, config, model = hf
    b = multimodal_batch(config, grids=((1, 6, 8), (1, 4, 6)), text_lengths=(7, 5, 9), text_only_length=12)
    mask = b["attention_mask"] if with_mask else None
    ref = _reference(model, b["input_ids"], b["mm_token_type_ids"], b["image_grid_thw"], mask=mask)
    ours = get_rope_index(b["input_ids"], None, b["image_grid_thw"], None, mask, **_ids(config))
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])
    np.testing.assert_array_equal(mm_token_types(b["input_ids"], image_token_id=config["image_token_id"],
                                                 video_token_id=config["video_token_id"]), b["mm_token_type_ids"])


def test_video_and_image(hf):
    family, config, model = hf
    vs, ve = config["vision_start_token_id"], config["vision_end_token_id"]
    video = [vs] + [config["video_token_id"]] * (3 * 2 * 3) + [ve]  # grid (3, 4, 6) -> 3 frames of 2x3
    image = [vs] + [config["image_token_id"]] * 4 + [ve]  # grid (1, 4, 4)
    row = [5, 6] + video + [7] + image + [8, 9, 10]
    input_ids = np.array([[0, 0] + row, [1] * 4 + row[:-2]])
    mask = np.array([[0, 0] + [1] * len(row), [1] * (len(row) + 2)])
    types = mm_token_types(input_ids, image_token_id=config["image_token_id"], video_token_id=config["video_token_id"])
    images, videos = np.array([[1, 4, 4]] * 2), np.array([[3, 4, 6]] * 2)
    extra, ours_extra = {}, {}
    if family == "qwen2_5_vl":  # 0.7 s per grid step at 2 tokens/s: temporal ids 0, 1, 2 (floor of 1.4 k)
        extra = {"second_per_grid_ts": torch.tensor([0.7, 1.5])}
        ours_extra = {"second_per_grid_ts": [0.7, 1.5], "tokens_per_second": config["vision_config"]["tokens_per_second"]}
    ref = _reference(model, input_ids, types, images, videos, mask, **extra)
    ours = get_rope_index(input_ids, types, images, videos, mask, spatial_merge_size=2, **ours_extra)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_malformed_prompts_raise():
    config = tiny_hf_config("qwen2_vl")
    image = config["image_token_id"]
    with pytest.raises(ValueError, match="vision_start"):
        get_rope_index(np.array([[3, image, image, image, image]]), None, np.array([[1, 4, 4]]), **_ids(config))
    with pytest.raises(ValueError, match="does not match grid"):
        get_rope_index(np.array([[config["vision_start_token_id"], image, image]]), None, np.array([[1, 4, 4]]),
                       **_ids(config))


def test_decode_positions_continue_after_the_prompt():
    # Prompt of 3 slots, row 0 with one pad, row 1 with none; deltas as get_rope_index returns them.
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    deltas = np.array([[-4], [0]])
    ids = np.asarray(decode_position_ids(5, deltas, mask, length=2))
    # Row 0: slot 5 follows 2 real prompt tokens + 2 decoded ones -> text position 4, plus delta -4.
    np.testing.assert_array_equal(ids, np.broadcast_to([[0, 1], [5, 6]], (3, 2, 2)))
