"""Parity of the vision towers with transformers (fp32), host-side inputs, weight table, recompiles."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from transformers import vision_utils

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import conversion
from anatomy_r1_jax.models.presets import tiny_hf_config
from anatomy_r1_jax.models.vision import (VISION_RULES, VisionConfig, VisionTower, pad_pixel_values,
                                          vision_inputs)

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
HF_CLASSES = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
              "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}
# (t, h, w) in patches. Window side is 2 merged units (56 px): 6x10 and 10x14 leave partial windows,
# 8x4 tiles exactly (transformers then pads an empty window), all non-square; the video has 2 frames.
GRIDS = {
    "images": [[1, 6, 10], [1, 8, 4], [1, 10, 14]],
    "video_and_image": [[2, 4, 6], [1, 6, 6]],
}
TOL = 1e-4


def _widen(model: torch.nn.Module, seed: int) -> None:
    """Re-draws the vision weights wide enough that a wrong index or transpose shows (default init ~0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("model.visual."):
                continue
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_q" in name:
                p.copy_(noise * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(noise * (0.05 if "patch_embed" in name else 0.15))


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    """(family, HF vision tower, our loaded tower, hub tensors) for a tiny random model."""
    family = request.param
    hf_dict = tiny_hf_config(family, vision_depth=3, fullatt_block_indexes=(1,))
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
    torch.manual_seed(0)
    model = model_cls(config_cls.from_dict(hf_dict)).eval()
    _widen(model, seed=1)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    hub = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith("visual.")}

    cfg = VisionConfig.from_hf(family, hf_dict["vision_config"])

    class Top(nnx.Module):  # stands in for the top model, which holds the tower as `vision`
        def __init__(self):
            self.vision = VisionTower(cfg, rngs=nnx.Rngs(0))

    top = Top()
    written, unmatched = conversion.assign_by_rules(top, hub, VISION_RULES)
    assert unmatched == []
    ours = {".".join(map(str, ("vision",) + k)) for k, _ in nnx.to_flat_state(nnx.state(top.vision, nnx.Param))}
    assert set(written) == ours and len(written) == len(hub)
    return family, model.model.visual, top.vision, hub


def _hf_tokens(visual, pixel_values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid))
    return out.pooler_output.numpy()  # transformers 5: a BaseModelOutputWithPooling; merged tokens


def _pixels(cfg: VisionConfig, grid: np.ndarray, seed: int) -> np.ndarray:
    n = int(np.prod(grid, axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, cfg.patch_dim)).astype(np.float32)


@pytest.mark.parametrize("layout", sorted(GRIDS))
@pytest.mark.parametrize("extra_patches,rows", [(0, "dense"), (24, "dense"), (24, "per frame")])
def test_tower_matches_transformers(setup, layout, extra_patches, rows):
    """Dense: one attention row of all patches; per frame: rows as long as the largest frame."""
    family, visual, tower, _ = setup
    grid = np.array(GRIDS[layout], np.int64)
    pixels = _pixels(tower.cfg, grid, seed=2)
    expected = _hf_tokens(visual, pixels, grid)
    budget = len(pixels) + extra_patches if extra_patches else None
    frame_budget = int(np.prod(grid[:, 1:], axis=1).max()) if rows == "per frame" else None
    inputs = vision_inputs(grid, tower.cfg, patch_budget=budget, frame_budget=frame_budget)
    assert inputs.frame_rows.index.shape[0] == (1 if frame_budget is None else -(-inputs.num_patches // frame_budget))
    got = np.asarray(nnx.jit(lambda t, x, i: t(x, i))(tower, pad_pixel_values(pixels, inputs.num_patches), inputs))
    unit = tower.cfg.spatial_merge_size ** 2
    assert got.shape == (inputs.num_patches // unit, tower.cfg.out_hidden_size)
    assert inputs.token_valid.sum() == len(expected) and inputs.token_valid[:len(expected)].all()
    diff = float(np.abs(got[:len(expected)] - expected).max())
    print(f"{family} {layout} extra={extra_patches}: max |diff| = {diff:.2e} (scale {np.abs(expected).max():.1f})")
    assert diff <= TOL


def test_host_inputs_match_transformers_indices(setup):
    """Window permutation, window / frame boundaries and positions against transformers' own helpers."""
    _, _, tower, _ = setup
    cfg = tower.cfg
    for layout in GRIDS.values():
        grid = torch.tensor(layout)
        inputs = vision_inputs(np.array(layout), cfg)
        unit = cfg.spatial_merge_size ** 2
        if cfg.uses_windows:
            index, cu_windows = vision_utils.get_vision_window_index(
                grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
            np.testing.assert_array_equal(inputs.window_index, index.numpy())
            starts = np.flatnonzero(np.diff(inputs.window_segment_ids, prepend=-1))
            np.testing.assert_array_equal(np.append(starts, inputs.num_patches), cu_windows.numpy())
        else:
            np.testing.assert_array_equal(inputs.window_index, np.arange(inputs.num_patches // unit))
        np.testing.assert_array_equal(inputs.reverse_index[inputs.window_index], np.arange(len(inputs.window_index)))
        cu = vision_utils.get_vision_cu_seqlens(grid).numpy()
        np.testing.assert_array_equal(np.flatnonzero(np.diff(inputs.segment_ids, prepend=-1)), cu[:-1])
        positions = vision_utils.get_vision_position_ids(grid, cfg.spatial_merge_size).numpy()
        order = (inputs.window_index[:, None] * unit + np.arange(unit)).ravel()  # compute order, per patch
        np.testing.assert_array_equal(inputs.position_ids, positions[order])


def test_padding_is_isolated_and_errors_are_clear(setup):
    _, _, tower, _ = setup
    cfg = tower.cfg
    grid = np.array([[1, 6, 10]])
    inputs = vision_inputs(grid, cfg, patch_budget=64)
    pad = slice(60, None)
    assert not set(inputs.segment_ids[pad]) & set(inputs.segment_ids[:60])
    assert not set(inputs.window_segment_ids[pad]) & set(inputs.window_segment_ids[:60])
    empty = vision_inputs(np.zeros((0, 3), np.int64), cfg, patch_budget=16)  # text-only batch, same shapes
    assert empty.num_patches == 16 and not empty.token_valid.any()
    with pytest.raises(ValueError, match="patch_budget"):
        vision_inputs(grid, cfg, patch_budget=56)
    with pytest.raises(ValueError, match="multiple"):
        vision_inputs(grid, cfg, patch_budget=62)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        vision_inputs(np.array([[1, 5, 4]]), cfg)
    with pytest.raises(ValueError, match="frame_budget=40"):  # three frames of 24 need 3 rows of 40, 2 allowed
        vision_inputs(np.array([[1, 4, 6]] * 3), cfg, patch_budget=80, frame_budget=40)
    rows = vision_inputs(np.array([[1, 6, 6], [1, 6, 6]]), cfg, patch_budget=80, frame_budget=40).frame_rows
    assert (rows.segments[:, :36] == [[0], [1]]).all() and (rows.segments[:, 36:] == -1).all()
    np.testing.assert_array_equal(rows.index.ravel()[rows.slots[:72]], np.arange(72))  # slots invert index
    assert (rows.slots[72:] == rows.index.size).all()  # padding patches read the zero row


def _tower_flops(tower, n_images: int) -> float:
    grid = np.array([[1, 8, 8]] * n_images, np.int64)
    inputs = vision_inputs(grid, tower.cfg, frame_budget=64)
    pixels = jax.ShapeDtypeStruct((inputs.num_patches, tower.cfg.patch_dim), jnp.float32)
    graphdef, state = nnx.split(tower)
    run = jax.jit(lambda state, x, i: nnx.merge(graphdef, state)(x, i))
    return run.lower(state, pixels, inputs).compile().cost_analysis()["flops"]


def test_attention_cost_is_linear_in_images(setup):
    """8 images cost 4x the FLOPs of 2 (dense attention over all patches: ~10x with this tiny width)."""
    _, _, tower, _ = setup
    ratio = _tower_flops(tower, 8) / _tower_flops(tower, 2)
    assert 3.8 <= ratio <= 4.2, ratio


def test_transformers_style_forward_is_linear_in_images():
    """`QwenVL.__call__`'s tower inputs (`vision_batch`): attention in rows of the largest frame, so
    8 images of mixed sizes cost about 4x the FLOPs of 2. The former inputs (vision_inputs with no
    frame budget, one dense row of all patches) cost 5.9x here; the frame packing is exact (the
    tower's output rows of real images are unchanged)."""
    from anatomy_r1_jax.models import QwenVL, QwenVLConfig

    model = QwenVL(QwenVLConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256)), rngs=nnx.Rngs(0))
    cfg = model.config.vision
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, x, i: nnx.merge(graphdef, state).encode_images(x, i))

    def flops(pixels, inputs):
        return encode.lower(state, jnp.asarray(pixels), inputs).compile().cost_analysis()["flops"]

    def images(n):
        grid = np.array([[1, 8, 8], [1, 4, 8]] * (n // 2), np.int64)
        return _pixels(cfg, grid, seed=n), grid

    ours = {n: flops(*model.vision_batch(*images(n))) for n in (2, 8)}
    dense = {n: flops(images(n)[0], vision_inputs(images(n)[1], cfg)) for n in (2, 8)}
    assert ours[8] / ours[2] <= 4.3, ours
    assert dense[8] / dense[2] >= 5.5, dense  # what the former inputs cost (5.9x at this tiny width)
    pixels, grid = images(8)
    real = int(vision_inputs(grid, cfg).token_valid.sum())
    np.testing.assert_allclose(np.asarray(encode(state, *model.vision_batch(pixels, grid)))[:real],
                               np.asarray(encode(state, jnp.asarray(pixels), vision_inputs(grid, cfg))), atol=1e-5)


@pytest.mark.parametrize("frame_budget", [None, 160])
def test_one_compile_for_different_layouts(setup, frame_budget):
    """Two batches of different image sizes with one patch budget share one trace; both stay exact."""
    _, visual, tower, _ = setup
    graphdef, state = nnx.split(tower)
    traces = []

    @jax.jit
    def run(state, pixels, inputs):
        traces.append(1)  # runs only when jax (re)traces
        return nnx.merge(graphdef, state)(pixels, inputs)

    budget = 256
    for seed, layout in enumerate(([[1, 6, 10], [1, 8, 4]], [[1, 4, 4], [1, 10, 14], [1, 2, 2], [1, 6, 2]])):
        grid = np.array(layout, np.int64)
        pixels = _pixels(tower.cfg, grid, seed)
        inputs = vision_inputs(grid, tower.cfg, budget, frame_budget=frame_budget)
        got = np.asarray(run(state, pad_pixel_values(pixels, budget), inputs))
        expected = _hf_tokens(visual, pixels, grid)
        assert np.abs(got[:len(expected)] - expected).max() <= TOL
    assert len(traces) == 1


def test_rules_round_trip_and_config(setup):
    family, _, tower, hub = setup
    for key, array in hub.items():
        path, transform = conversion.match(key, VISION_RULES)
        assert conversion.hf_name(path, VISION_RULES) == (key, transform)
        ours = np.asarray(conversion.get_by_path(tower, path.removeprefix("vision.")).get_value())
        back = conversion.TRANSFORMS[transform].to_hf(ours, array.shape)
        np.testing.assert_array_equal(back, array)
    cfg = tower.cfg
    config_cls = getattr(transformers, HF_CLASSES[family][0]).sub_configs["vision_config"]
    assert VisionConfig.from_hf(family, config_cls(**cfg.to_hf()).to_dict()) == cfg
    specs = sharding.state_specs(nnx.state(tower, nnx.Param), [("vision_heads", "tensor"), ("embed", "fsdp")])
    assert specs["blocks"][0]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(None, "tensor")
    assert specs["merger"]["fc2"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp")


def test_scanned_tower_matches_transformers(setup):
    """Blocks as stacked parameters run by a scan (Qwen2.5-VL: a cond picks window or full attention),
    loaded through the same rule table, each layer's tensor written into its row."""
    family, visual, _, hub = setup
    hf_vision = tiny_hf_config(family, vision_depth=3, fullatt_block_indexes=(1,))["vision_config"]
    cfg = VisionConfig.from_hf(family, hf_vision)

    class Top(nnx.Module):
        def __init__(self):
            self.vision = VisionTower(cfg, scan_layers=True, rngs=nnx.Rngs(0))

    top = Top()
    written, unmatched = conversion.assign_by_rules(top, hub, VISION_RULES)
    assert unmatched == [] and len(written) == len(hub)
    assert top.vision.blocks.attn.qkv.kernel[...].shape[0] == 3
    grid = np.array(GRIDS["images"], np.int64)
    pixels = _pixels(cfg, grid, seed=4)
    inputs = vision_inputs(grid, cfg, frame_budget=140)
    got = np.asarray(nnx.jit(lambda t, x, i: t(x, i))(top.vision, pixels, inputs))
    expected = _hf_tokens(visual, pixels, grid)
    assert np.abs(got[:len(expected)] - expected).max() <= TOL


def test_bf16_and_remat(setup):
    """bf16 compute stays close to fp32; remat changes nothing in the forward and gives finite grads."""
    family, _, tower, _ = setup
    if family != "qwen2_5_vl":
        pytest.skip("the code paths are shared; one family keeps the suite fast")
    grid = np.array(GRIDS["images"], np.int64)
    pixels = _pixels(tower.cfg, grid, seed=3)
    inputs = vision_inputs(grid, tower.cfg)
    reference = np.asarray(tower(pixels, inputs))
    state = nnx.state(tower)

    def variant(**kw):
        other = VisionTower(tower.cfg, rngs=nnx.Rngs(0), **kw)
        nnx.update(other, state)
        return other

    bf16 = np.asarray(variant(dtype=jnp.bfloat16)(pixels, inputs).astype(jnp.float32))
    assert np.abs(bf16 - reference).max() <= 0.05 * np.abs(reference).max()

    remat = variant(remat=True)
    loss = lambda m: jnp.mean(jnp.square(m(pixels, inputs)))  # noqa: E731
    value, grads = nnx.jit(nnx.value_and_grad(loss))(remat)
    assert np.isclose(float(value), float(np.mean(reference ** 2)), rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
