"""QwenVL against transformers (fp32, highest matmul precision): logits, greedy decoding with the KV
cache, export back to transformers, bf16, tied embeddings.

Batch: 2 samples left-padded to 332 tokens; sample 0 holds two images of different sizes between
text, sample 1 is text only.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import torch
from flax import nnx
from hf_tiny import HF_CLASSES, build_hf_model, multimodal_batch, torch_inputs

from anatomy_r1_jax.models import decode_position_ids, layers, load_pretrained, save_pretrained
from anatomy_r1_jax.models.vision import pad_pixel_values, vision_inputs

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
TOL = 1e-4
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf, config = build_hf_model(request.param, path)
    batch = multimodal_batch(config)
    with torch.no_grad():
        ref = hf(**torch_inputs(batch)).logits.numpy()
    return {"family": request.param, "hf": hf, "config": config, "path": path, "batch": batch, "ref": ref,
            "model": load_pretrained(path)}


def _logits(model, batch) -> np.ndarray:
    return np.asarray(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                            batch["image_grid_thw"]))


def _max_diff(a, b, mask) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


def test_position_ids_match_transformers(tiny):
    b = tiny["batch"]
    ref, ref_deltas = tiny["hf"].model.get_rope_index(
        torch.from_numpy(b["input_ids"]), torch.from_numpy(b["mm_token_type_ids"]),
        torch.from_numpy(b["image_grid_thw"]), None, attention_mask=torch.from_numpy(b["attention_mask"]))
    ours, deltas = tiny["model"].position_ids(b["input_ids"], b["attention_mask"], b["image_grid_thw"])
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy())


def test_logits_match_transformers(tiny):
    b = tiny["batch"]
    assert b["input_ids"].shape[1] >= 300 and (b["attention_mask"] == 0).any()
    logits = _logits(tiny["model"], b)
    assert np.isfinite(logits).all()  # padding rows attend to nothing and must not produce NaN
    diff = _max_diff(logits, tiny["ref"], b["attention_mask"])
    assert diff <= TOL, f"{tiny['family']}: max |logits diff| {diff:.3g}"


@pytest.mark.parametrize("attention,scan_layers", [("reference", False), ("reference", True), ("xla", True),
                                                   ("chunked", True)])  # xla unscanned: test_logits_match
def test_each_attention_and_layout_matches_transformers(tiny, attention, scan_layers, monkeypatch):
    monkeypatch.setattr(layers, "QUERY_BLOCK", 128)  # 332 tokens: 3 query blocks, the last padded
    b = tiny["batch"]
    model = load_pretrained(tiny["path"], attention=attention, scan_layers=scan_layers)
    diff = _max_diff(_logits(model, b), tiny["ref"], b["attention_mask"])
    assert diff <= TOL, f"{tiny['family']} {attention} scan={scan_layers}: max |logits diff| {diff:.3g}"


@nnx.jit
def _prefill(model, input_ids, position_ids, attention_mask, pixel_values, inputs, cache):
    image_embeds = model.encode_images(pixel_values, inputs)
    hidden, cache = model.forward(input_ids, position_ids, attention_mask, image_embeds, cache)
    return model.logits(hidden[:, -1]), cache


TRACES = {"decode": 0}


@nnx.jit
def _decode(model, token, position_ids, cache):
    TRACES["decode"] += 1  # runs at trace time only
    hidden, cache = model.forward(token[:, None], position_ids, jnp.ones_like(token)[:, None], None, cache)
    return model.logits(hidden[:, 0]), cache


def greedy(model, batch, new_tokens: int) -> np.ndarray:
    """Prefill the left-padded prompt into a KV cache, then decode one token at a time."""
    mask = batch["attention_mask"]
    position_ids, deltas = model.position_ids(batch["input_ids"], mask, batch["image_grid_thw"])
    cache = model.init_cache(mask.shape[0], mask.shape[1] + new_tokens)
    inputs = vision_inputs(batch["image_grid_thw"], model.config.vision)
    logits, cache = _prefill(model, jnp.asarray(batch["input_ids"]), jnp.asarray(position_ids), jnp.asarray(mask),
                             jnp.asarray(batch["pixel_values"]), inputs, cache)
    tokens = [jnp.argmax(logits, -1).astype(jnp.int32)]
    for _ in range(new_tokens - 1):
        logits, cache = _decode(model, tokens[-1], decode_position_ids(cache.index, deltas, mask), cache)
        tokens.append(jnp.argmax(logits, -1).astype(jnp.int32))
    assert int(cache.index) == mask.shape[1] + new_tokens - 1
    return np.stack(tokens, axis=1)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_decoding_matches_generate(tiny, scan_layers):
    if scan_layers and tiny["family"] != "qwen2_5_vl":
        pytest.skip("the decoder and its cache are shared; one family keeps the suite fast")
    b = tiny["batch"]
    with torch.no_grad():  # eos_token_id=None: no early stop, so all 32 tokens are compared
        out = tiny["hf"].generate(**torch_inputs(b), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    ref = out[:, b["input_ids"].shape[1]:].numpy()
    traces = TRACES["decode"]
    model = load_pretrained(tiny["path"], scan_layers=True) if scan_layers else tiny["model"]
    ours = greedy(model, b, NEW_TOKENS)
    np.testing.assert_array_equal(ours, ref)
    assert TRACES["decode"] - traces <= 1, "decode step recompiled as the cache index moved"


@pytest.mark.parametrize("scan_layers", [False, True])
def test_export_loads_in_transformers(tiny, tmp_path, scan_layers):
    """Scanned or not, the files carry the same hub keys and values (stacked rows sliced out)."""
    save_pretrained(load_pretrained(tiny["path"], scan_layers=True) if scan_layers else tiny["model"], tmp_path)
    _, model_cls = HF_CLASSES[tiny["family"]]
    reloaded = model_cls.from_pretrained(tmp_path).eval()
    original = tiny["hf"].state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
    with torch.no_grad():
        logits = reloaded(**torch_inputs(tiny["batch"])).logits.numpy()
    assert _max_diff(logits, _logits(tiny["model"], tiny["batch"]), tiny["batch"]["attention_mask"]) <= TOL


def test_bf16_forward_close_to_fp32_and_exports(tiny, tmp_path):
    if tiny["family"] != "qwen2_5_vl":
        pytest.skip("one family is enough for the dtype check")
    b = tiny["batch"]
    model = load_pretrained(tiny["path"], dtype=jnp.bfloat16)
    assert model.language.layers[0].mlp.up.kernel[...].dtype == jnp.bfloat16
    logits = _logits(model, b)
    assert logits.dtype == np.float32
    mask = b["attention_mask"].astype(bool)
    scale = np.abs(tiny["ref"][mask]).max()
    assert _max_diff(logits, tiny["ref"], mask) <= 0.05 * scale
    assert (logits.argmax(-1) == tiny["ref"].argmax(-1))[mask].mean() >= 0.9
    save_pretrained(model, tmp_path)
    reloaded = HF_CLASSES["qwen2_5_vl"][1].from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16
    original = tiny["hf"].state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, original[key].to(torch.bfloat16), rtol=0, atol=0, msg=key)


def test_tied_embeddings(tmp_path):
    hf, config = build_hf_model("qwen2_vl", tmp_path / "hf", tie_word_embeddings=True, seed=1)
    b = multimodal_batch(config, text_lengths=(40, 30, 30), text_only_length=60, seed=1)
    model = load_pretrained(tmp_path / "hf")
    assert getattr(model, "lm_head", None) is None
    with torch.no_grad():
        ref = hf(**torch_inputs(b)).logits.numpy()
    assert _max_diff(_logits(model, b), ref, b["attention_mask"]) <= TOL
    save_pretrained(model, tmp_path / "ours")
    reloaded = HF_CLASSES["qwen2_vl"][1].from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert _max_diff(reloaded(**torch_inputs(b)).logits.numpy(), ref, b["attention_mask"]) <= TOL


TRACES["layout"] = 0


@nnx.jit
def _padded_logits(model, input_ids, position_ids, attention_mask, pixel_values, inputs):
    TRACES["layout"] += 1
    hidden, _ = model.forward(input_ids, position_ids, attention_mask, model.encode_images(pixel_values, inputs))
    return model.logits(hidden)


def test_image_layouts_share_one_compile(tiny):
    """Two batches with different image sizes, padded to one patch budget and one length: one trace."""
    model, config = tiny["model"], tiny["config"]
    layouts = [(((1, 6, 8), (1, 4, 6)), (40, 30, 30)),  # 12 + 6 image tokens
               (((1, 4, 4), (1, 8, 8)), (38, 30, 30))]  # 4 + 16 image tokens: same length
    traces = TRACES["layout"]
    for grids, text_lengths in layouts:
        b = multimodal_batch(config, grids=grids, text_lengths=text_lengths, text_only_length=80, seed=3)
        assert b["input_ids"].shape == (2, 122)
        inputs = vision_inputs(b["image_grid_thw"], model.config.vision, patch_budget=96)
        pixels = pad_pixel_values(b["pixel_values"], 96)
        position_ids, _ = model.position_ids(b["input_ids"], b["attention_mask"], b["image_grid_thw"])
        logits = _padded_logits(model, jnp.asarray(b["input_ids"]), jnp.asarray(position_ids),
                                jnp.asarray(b["attention_mask"]), jnp.asarray(pixels), inputs)
        with torch.no_grad():
            ref = tiny["hf"](**torch_inputs(b)).logits.numpy()
        assert _max_diff(logits, ref, b["attention_mask"]) <= TOL
    assert TRACES["layout"] - traces == 1
