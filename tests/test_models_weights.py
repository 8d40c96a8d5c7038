"""Config round trips, the safetensors loader / exporter (shards, errors, mesh placement), remat."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from hf_tiny import build_hf_model, multimodal_batch
from safetensors.numpy import load_file, save_file

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import QwenVLConfig, load_pretrained, save_pretrained
from anatomy_r1_jax.models.presets import PRESETS, preset_hf_config, tiny_hf_config
from anatomy_r1_jax.models.vision import vision_inputs
from anatomy_r1_jax.models.weights import layer_paths, abstract_model

RULES = [("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"),
         ("vision_embed", "fsdp"), ("vision_mlp", "tensor"), ("vision_heads", "tensor"),
         ("activation_batch", ("data", "fsdp")), ("activation_embed", "fsdp"), ("activation_mlp", "tensor"),
         ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"), ("activation_vocab", "tensor"),
         ("activation_vision_embed", "fsdp")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    _, config = build_hf_model("qwen2_5_vl", path, seed=2)
    batch = multimodal_batch(config, text_lengths=(20, 10, 10), text_only_length=40, seed=2)
    return path, batch


def _flat(model) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _logits(model, batch):
    position_ids, _ = model.position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    inputs = vision_inputs(batch["image_grid_thw"], model.config.vision)

    @nnx.jit
    def run(model, input_ids, position_ids, mask, pixel_values):
        hidden, _ = model.forward(input_ids, position_ids, mask, model.encode_images(pixel_values, inputs))
        return model.logits(hidden)

    return run(model, jnp.asarray(batch["input_ids"]), jnp.asarray(position_ids), jnp.asarray(batch["attention_mask"]),
               jnp.asarray(batch["pixel_values"]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_config_round_trip_and_flat_layout(family):
    cfg = QwenVLConfig.from_hf(tiny_hf_config(family))
    assert QwenVLConfig.from_hf(cfg.to_hf()) == cfg
    nested = tiny_hf_config(family)
    flat = {k: v for k, v in nested.items() if k != "text_config"}  # pre-v5 hub layout
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    flat.update(text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    flat["model_type"] = family
    assert QwenVLConfig.from_hf(flat) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_real_size_presets_parse(name):
    cfg = QwenVLConfig.from_hf(preset_hf_config(name))
    assert cfg.head_dim == 128 and cfg.mrope_section == (16, 24, 24) and cfg.image_token_id == 151655
    assert QwenVLConfig.from_hf(cfg.to_hf()) == cfg


def test_7b_builds_abstractly_with_shardings():
    cfg = QwenVLConfig.from_hf(preset_hf_config("qwen2_5_vl_7b"))
    model = abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = nnx.state(model, nnx.Param)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    shardings = sharding.state_shardings(params, mesh, RULES)
    assert shardings["language"]["layers"][0]["attn"]["q"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for key, var in nnx.to_flat_state(params):  # every parameter names its logical axes
        assert len(var.get_metadata().get("axes") or ()) == len(var.get_value().shape), key
    count = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(params))
    assert abs(count - 8.29e9) / 8.29e9 < 0.01, count  # the published 8.29B


def test_sharded_export_round_trip(checkpoint, tmp_path):
    path, _ = checkpoint
    model = load_pretrained(path)
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and "model.embed_tokens.weight" in index["weight_map"]
    assert all(k.startswith(("model.layers.", "model.embed_tokens", "model.norm", "visual.", "lm_head"))
               for k in index["weight_map"])
    again = load_pretrained(tmp_path)
    a, b = _flat(model), _flat(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    save_pretrained(again, tmp_path)  # back to one file: the stale index must go
    assert not (tmp_path / "model.safetensors.index.json").exists()


def _tampered(path, tmp_path, edit):
    tmp_path.mkdir()
    shutil.copy(path / "config.json", tmp_path / "config.json")
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


def test_unknown_and_missing_keys_are_named(checkpoint, tmp_path):
    path, _ = checkpoint
    extra = _tampered(path, tmp_path / "extra", lambda t: t.update(extra=np.zeros(2, np.float32)))
    with pytest.raises(KeyError, match=r"'extra'.*model\.safetensors.*matches no weight rule"):
        load_pretrained(extra)
    missing = _tampered(path, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(missing)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_mesh_placement_matches_single_device(checkpoint, scan_layers):
    path, batch = checkpoint
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    model = load_pretrained(path, mesh=mesh, rules=RULES, scan_layers=scan_layers)
    if scan_layers:  # stacked [layers, ...]; the layer axis is replicated
        kernel = model.language.layers.mlp.gate.kernel[...]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (2, 32, 64)
        np.testing.assert_array_equal(kernel[1], load_pretrained(path).language.layers[1].mlp.gate.kernel[...])
    else:
        kernel = model.language.layers[0].mlp.gate.kernel[...]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (32, 64)
    with jax.set_mesh(mesh), sharding.use_rules(mesh, RULES):
        sharded = np.asarray(_logits(model, batch))
    single = np.asarray(_logits(load_pretrained(path), batch))
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(sharded - single)[mask].max() <= 1e-5


def _per_layer(grads) -> dict:
    """Gradients keyed by their checkpoint paths (stacked rows of scanned layers split out)."""
    out = {}
    for key, var in nnx.to_flat_state(grads):
        path = ".".join(map(str, key))
        value = np.asarray(var.get_value())
        for i, name in enumerate(layer_paths(path, var)):
            out[name] = value if name == path else value[i]
    return out


@pytest.fixture(scope="module")
def gradients(checkpoint):
    """grads(**options): per-layer gradients of a text-only log-prob loss for the model loaded with options."""
    path, batch = checkpoint
    ids = jnp.asarray(batch["input_ids"][1:, -32:])  # text-only row: the language path
    positions = jnp.broadcast_to(jnp.arange(32), (3, 1, 32))

    def loss(model):
        hidden, _ = model.forward(ids, positions, jnp.ones_like(ids))
        return jnp.mean(jax.nn.log_softmax(model.logits(hidden))[..., 3])

    return lambda **options: _per_layer(nnx.jit(nnx.grad(loss))(load_pretrained(path, **options)))


@pytest.fixture(scope="module")
def plain_gradients(gradients):
    return gradients()


@pytest.mark.parametrize("remat,scan_layers", [(True, False), ("full", True), ("save_dots", True), ("none", True)])
def test_remat_gives_the_same_gradients(gradients, plain_gradients, remat, scan_layers):
    plain, other = plain_gradients, gradients(remat=remat, scan_layers=scan_layers)
    assert plain.keys() == other.keys()
    for key, a in plain.items():
        np.testing.assert_allclose(a, other[key], atol=1e-6, err_msg=key)
