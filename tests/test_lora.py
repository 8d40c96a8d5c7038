"""LoRA (models/lora.py): adapters at zero are the base model exactly; the update's gradient with
respect to the adapters is the chain rule of the merged model's gradient (KL to the base model);
only adapters change and have optimizer state, placed by the sharding rules; the warm-up fold keeps
the function; a full warm-up trains the base, which GRPO then keeps frozen under fresh adapters; the
merged export gives the adapted model's logits in transformers, and after a full warm-up it is the
warm-up checkpoint plus the PEFT adapters."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import QwenVL, lora
from anatomy_r1_jax.rl.losses import GRPOLoss
from anatomy_r1_jax.train.compiled import Programs
from anatomy_r1_jax.train.logprobs import completion_logps
from anatomy_r1_jax.runtime.placement import put_batch, split_model
from anatomy_r1_jax.train.step import StepConfig, TrainState, make_optimizer
from test_rollout_step import RULES, _stack, _train_batch, one_device_mesh, tiny_model_cfg

LORA = lora.LoraConfig(rank=4, alpha=8.0, vision=True)  # scale 2
STEP = StepConfig(group_size=4, loss=GRPOLoss(beta=0.04), temperature=0.9, logp_chunk=6)


def base_model(scan_layers=False, seed=0, scale=5.0) -> QwenVL:
    """Tiny random model, weights widened (the 0.02 init makes every layer ~identity)."""
    model = QwenVL(tiny_model_cfg(), scan_layers=scan_layers, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, state))


def adapted_model(scan_layers=False, b_std=0.0, cfg=LORA) -> QwenVL:
    """base_model with adapters; B ~ N(0, b_std^2) instead of its zero init when b_std > 0."""
    model = lora.add_adapters(base_model(scan_layers), cfg, seed=1)
    for i, (_, dense) in enumerate(lora.adapted_layers(model)):
        b = dense.lora.lora_b
        if b_std:
            b.set_value(b_std * jax.random.normal(jax.random.key(100 + i), b.shape))
    return model


@functools.partial(jax.jit, static_argnums=0)
def _logps(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    return completion_logps(model, batch.prompt, batch.completions.ids, batch.completions.mask, 1.0, 6, 4)[0]


def logps(model, batch) -> np.ndarray:
    """[n, T] completion log-probs of a _train_batch (jitted per model structure)."""
    return np.asarray(_logps(*nnx.split(model), batch))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adapters_at_zero_are_the_base_model_exactly(scan_layers):
    batch = jax.tree.map(jnp.asarray, _train_batch(seed=0))
    model = adapted_model(scan_layers)
    paths = [".".join(map(str, p)) for p, _ in lora.adapted_layers(model)]
    assert any(p.startswith("vision.blocks") for p in paths) and any(p.endswith("mlp.down") for p in paths)
    # Op by op (one compiled program per op, the same for both) the outputs are bitwise equal; a
    # program compiled per model may fuse the base matmuls differently (1 ulp), so eager here.
    small = jax.tree.map(jnp.asarray, _train_batch(seed=0, queries=1, group=2, t=3))
    eager = lambda m: np.asarray(completion_logps(m, small.prompt, small.completions.ids,  # noqa: E731
                                                  small.completions.mask, 1.0, 3, 2)[0])
    np.testing.assert_array_equal(eager(model), eager(base_model(scan_layers)))
    base = logps(base_model(scan_layers), batch)
    np.testing.assert_allclose(logps(model, batch), base, atol=1e-5)
    # The adapters are in the forward: a non-zero B of one vision and one decoder layer changes it.
    for prefix in ("vision.blocks", "language.layers"):
        model = adapted_model(scan_layers)
        dense = next(d for p, d in lora.adapted_layers(model) if ".".join(map(str, p)).startswith(prefix))
        dense.lora.lora_b.set_value(0.5 * jax.random.normal(jax.random.key(0), dense.lora.lora_b.shape))
        assert np.abs(logps(model, batch) - base).max() > 1e-3, prefix
    # Switched off (the KL reference), even non-zero adapters give the base model.
    np.testing.assert_array_equal(logps(lora.without_adapters(model), batch), base)


def capture_gradients() -> optax.GradientTransformation:
    """An optimizer that leaves the weights and keeps the last gradient as its state."""
    inner = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                         lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    return optax.apply_if_finite(inner, 10)


def gradients(graphdef, params, frozen, ref_params, batch):
    programs = Programs.create(graphdef, one_device_mesh(), RULES)
    tx = capture_gradients()
    state = programs.init_state(tx, STEP.precision, params, frozen, reference=False).replace(ref_params=ref_params)
    state, _ = programs.update(tx, STEP, state)(state, put_batch(batch, programs.mesh, RULES, micro_axis=True))
    return state.opt_state.inner_state


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adapter_gradient_is_the_merged_models_gradient_through_the_chain_rule(scan_layers):
    """L(A, B) = loss(W + s A B) with KL to W (adapters off): dL/dA = s G B^T, dL/dB = s A^T G with
    G = dloss/dW of the merged model whose reference copy is the base W (a full fine-tune's update)."""
    batch = _stack([_train_batch(seed=0)])
    model = adapted_model(scan_layers, b_std=0.05)
    graphdef, params, frozen = split_model(model, freeze_vision=False)
    layers = {tuple(p): (np.asarray(d.lora.lora_a[...]), np.asarray(d.lora.lora_b[...]), d.lora_scale)
              for p, d in lora.adapted_layers(model)}
    base_g, base_params, _ = split_model(base_model(scan_layers), freeze_vision=False)
    merged = lora.merge_adapters(nnx.merge(graphdef, jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, frozen)))
    full_g, full_params, full_frozen = split_model(merged, freeze_vision=False)
    grads = nnx.to_flat_state(gradients(graphdef, params, frozen, None, batch))  # donates params, frozen
    assert not jax.tree.leaves(full_frozen) and base_g == full_g
    reference = dict(nnx.to_flat_state(gradients(full_g, full_params, full_frozen, base_params, batch)))
    assert len(grads) == 2 * len(layers)
    for path, grad in grads:
        a, b, s = layers[tuple(path[:-2])]
        g_w = np.asarray(reference[tuple(path[:-2]) + ("kernel",)])
        expected = s * (g_w @ np.swapaxes(b, -1, -2) if path[-1] == "lora_a" else np.swapaxes(a, -1, -2) @ g_w)
        assert np.abs(expected).max() > 1e-6, path
        np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                                   err_msg=".".join(map(str, path)))


@pytest.mark.slow  # whole updates on 8 devices
def test_only_adapters_train_have_optimizer_state_and_follow_the_sharding_rules():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    graphdef, params, frozen = split_model(adapted_model(), freeze_vision=False)
    programs = Programs.create(graphdef, mesh, RULES)
    tx = make_optimizer(1e-2)
    state = programs.init_state(tx, STEP.precision, params, frozen, reference=False)
    assert state.ref_params is None
    q = state.params["language"]["layers"][0]["attn"]["q"]["lora"]
    assert q["lora_a"].sharding.spec == P("fsdp", None) and q["lora_b"].sharding.spec == P(None, "tensor")
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert len(moments) == 2 * len(jax.tree.leaves(state.params))  # AdamW mu, nu of the adapters alone
    assert sum(x.size for x in jax.tree.leaves(state.params)) * 10 < sum(x.size for x in jax.tree.leaves(frozen))
    before = jax.tree.map(np.asarray, (state.params, state.frozen))
    update = programs.update(tx, STEP, state)
    for seed in range(2):
        state, metrics = update(state, put_batch(_stack([_train_batch(seed=seed)]), mesh, RULES, micro_axis=True))
    assert update._cache_size() == 1 and float(metrics["kl"]) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), before[1])
    changed = [not np.array_equal(np.asarray(x), y) for x, y in zip(jax.tree.leaves(state.params),
                                                                     jax.tree.leaves(before[0]))]
    assert all(changed)


def test_warm_up_fold_keeps_the_policy_and_restarts_the_adapters():
    batch = jax.tree.map(jnp.asarray, _train_batch(seed=0))
    graphdef, params, frozen = split_model(adapted_model(b_std=0.05), freeze_vision=False)
    programs = Programs.create(graphdef, one_device_mesh(), RULES)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, ref_params=None, opt_state=None)
    before = logps(nnx.merge(graphdef, params, frozen), batch)
    base = logps(lora.without_adapters(nnx.merge(graphdef, params, frozen)), batch)
    folded = programs.copy_params(state, reference=False)
    model = nnx.merge(graphdef, folded.params, folded.frozen)
    assert all(not np.asarray(d.lora.lora_b[...]).any() for _, d in lora.adapted_layers(model))
    np.testing.assert_allclose(logps(model, batch), before, atol=1e-4)
    # The new reference (adapters off) is the warmed-up policy, no longer the base.
    np.testing.assert_allclose(logps(lora.without_adapters(model), batch), before, atol=1e-4)
    assert np.abs(base - before).max() > 1e-2


def test_full_warm_up_trains_the_base_then_grpo_trains_fresh_adapters_on_it():
    """model.lora.warmup="full": the warm-up's update trains every base weight (the adapters stay at
    B = 0); at the switch to GRPO its weights become the frozen base, so the policy at GRPO step 0 and
    its reference (adapters off) are the warm-up model, and GRPO's update (built for the adapters,
    with their own AdamW state) changes the adapters alone."""
    cfg = lora.LoraConfig(rank=4, alpha=8.0, warmup="full")
    assert (cfg.trains("sft"), cfg.trains("grpo")) == ("base", "adapters")
    assert lora.LoraConfig(rank=4, warmup="adapters").trains("sft") == "adapters"
    assert lora.LoraConfig(rank=0).trains("grpo") == "base"
    batch = jax.tree.map(jnp.asarray, _train_batch(seed=0))
    placed = [put_batch(_stack([_train_batch(seed=s)]), one_device_mesh(), RULES, micro_axis=True) for s in (0, 1)]
    model = adapted_model(cfg=cfg)
    start = logps(model, batch)
    graphdef, params, frozen = split_model(model, freeze_vision=False, trains=cfg.trains("sft"))
    assert all("lora" not in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
    programs = Programs.create(graphdef, one_device_mesh(), RULES)
    tx = make_optimizer(1e-2)
    state = programs.init_state(tx, STEP.precision, params, frozen, reference=False)
    moments = lambda s: [x for x in jax.tree.leaves(s.opt_state) if x.ndim]  # noqa: E731
    assert len(moments(state)) == 2 * len(jax.tree.leaves(state.params))  # the warm-up's AdamW: the base's
    base_before = jax.tree.map(np.asarray, state.params)
    warm_up = programs.update(tx, STEP, state)
    for b in placed:
        state, _ = warm_up(state, b)
    changed = [not np.array_equal(np.asarray(x), y) for x, y in zip(jax.tree.leaves(state.params),
                                                                     jax.tree.leaves(base_before))]
    assert sum(changed) > len(changed) // 2  # the warm-up trains the base (norm weights and biases too)
    warmed = logps(nnx.merge(graphdef, state.params, state.frozen), batch)
    assert np.abs(warmed - start).max() > 1e-2

    state = programs.switch_trainable(state, cfg.trains("grpo"), freeze_vision=False)
    state = programs.reset_optimizer(tx, STEP.precision, state)
    policy = nnx.merge(graphdef, state.params, state.frozen)
    assert all(not np.asarray(d.lora.lora_b[...]).any() for _, d in lora.adapted_layers(policy))
    np.testing.assert_array_equal(logps(policy, batch), warmed)  # policy at GRPO step 0 = the warm-up model
    np.testing.assert_array_equal(logps(lora.without_adapters(nnx.merge(graphdef, state.params, state.frozen)),
                                        batch), warmed)  # and so is its reference
    assert all("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params))
    assert len(moments(state)) == 2 * len(jax.tree.leaves(state.params))  # GRPO's AdamW: the adapters'
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    grpo = programs.update(tx, STEP, state)
    for b in placed:
        state, metrics = grpo(state, b)
    assert grpo._cache_size() == 1 and float(metrics["kl"]) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), frozen_before)
    b_after = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state.params)
               if "lora_b" in jax.tree_util.keystr(p)]
    assert b_after and all(b.any() for b in b_after)


def test_merged_export_gives_the_adapted_models_logits_in_transformers_and_peft_adapters(tmp_path):
    from safetensors.numpy import load_file
    from transformers import Qwen2VLForConditionalGeneration

    from anatomy_r1_jax.models import save_pretrained

    from anatomy_r1_jax.data.collate import BatchShape, Collator, preprocess_images
    from anatomy_r1_jax.evaluation.checkpoints import restore_model_state
    from anatomy_r1_jax.evaluation.export import export_checkpoint
    from hf_tiny import hf_image_logits
    from test_export_hf import TOL, default_config, make_run, synthetic_record

    config = default_config()
    config.model.lora.update(rank=4, alpha=4.0, vision=True, warmup="adapters")  # step 3: an adapter warm-up
    setup, params, frozen = make_run(tmp_path / "run", config, step=3, seed=1)
    assert all("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
    out = tmp_path / "hf"
    export_checkpoint(config, str(tmp_path / "run"), str(out))
    hf = Qwen2VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    record = synthetic_record(tmp_path)
    feats = preprocess_images(record, setup.image_processor)
    ids = np.asarray([Collator(setup.tokenizer, setup.model_cfg, BatchShape(256, 16, 16)).prompt_ids(
        record, feats.grid_thw)])
    model = nnx.merge(setup.graphdef, *restore_model_state(setup, str(tmp_path / "run" / "checkpoints" / "3")))
    assert lora.has_adapters(model)
    ours = np.asarray(model(ids, np.ones_like(ids), feats.pixel_values, feats.grid_thw))
    base = np.asarray(lora.without_adapters(model)(ids, np.ones_like(ids), feats.pixel_values, feats.grid_thw))
    ref = hf_image_logits(hf, ids, feats.pixel_values, feats.grid_thw)
    assert np.abs(ours - base).max() > 1e-2, "adapters too small to show in the logits"
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, f"max |logits diff| {diff:.3g}"

    # PEFT adapters: applied by hand (W += lora_alpha / r * B A, PEFT's merge) to the base model in
    # transformers, by the module names they carry, they give the merged export's weights.
    peft = json.loads((out / "peft_adapters" / "adapter_config.json").read_text())
    assert peft["r"] == 4 and peft["lora_alpha"] == 4.0 and peft["peft_type"] == "LORA"
    save_pretrained(lora.without_adapters(model), str(tmp_path / "base"))
    hf_base = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "base"), dtype=torch.float32).eval()
    tensors = load_file(str(out / "peft_adapters" / "adapter_model.safetensors"))
    layers = config.model.tiny.num_hidden_layers * 7 + config.model.tiny.vision_depth * 4
    assert len(peft["target_modules"]) == layers and len(tensors) == 2 * layers
    with torch.no_grad():
        for module in peft["target_modules"]:
            key = f"base_model.model.{module}"
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            hf_base.get_submodule(module).weight += torch.from_numpy(b @ a) * (peft["lora_alpha"] / peft["r"])
    merged = hf.state_dict()
    for name, value in hf_base.state_dict().items():
        np.testing.assert_allclose(value.numpy(), merged[name].numpy(), atol=1e-6, err_msg=name)


def test_export_after_a_full_warm_up_merges_the_adapters_into_the_warm_up_checkpoint(tmp_path):
    """A GRPO checkpoint of a run with a full warm-up (sft.steps = 2) holds the adapters alone; its
    base is the warm-up's checkpoint 2 (the whole model). Restoring it reads the base from there;
    its merged export is checkpoint 2's export plus alpha/r B^T A^T in every adapted module, and its
    PEFT adapters name checkpoint 2 and give exactly that difference."""
    from safetensors.numpy import load_file

    from anatomy_r1_jax.evaluation.checkpoints import base_state, build_setup, restore_model_state
    from anatomy_r1_jax.evaluation.export import PEFT_DIR, export_checkpoint
    from anatomy_r1_jax.runtime import builders
    from anatomy_r1_jax.train.checkpoint import Checkpointer
    from test_export_hf import default_config, random_state

    config = default_config()
    config.model.lora.update(rank=4, alpha=8.0)
    config.sft.steps = 2
    config.model.tiny.num_hidden_layers = 1
    assert config.model.lora.warmup == "full"  # the default
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config.to_json_best_effort(indent=1))
    builders.build_tokenizer(config, str(run))
    setup = build_setup(config, str(run))
    adapters, base = random_state(setup.params, 1), random_state(setup.frozen, 2)
    warm_adapters = jax.tree_util.tree_map_with_path(  # the warm-up leaves B = 0
        lambda p, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(p) else x, adapters)
    _, warm_params, warm_frozen = split_model(nnx.merge(setup.graphdef, warm_adapters, base), False, "base")
    ckpt = Checkpointer(str(run / "checkpoints"), keep=1, preserve=(2,))
    for step, params, frozen in ((2, warm_params, warm_frozen), (5, adapters, None)):
        tx = make_optimizer(1e-3)
        ckpt.save(step, TrainState(step=jnp.asarray(step, jnp.int32), params=params, frozen=frozen, ref_params=None,
                                   opt_state=tx.init(params)), {"lora": builders.adapter_base(config, step, "")})
    ckpt.close()

    restored, frozen = restore_model_state(setup, str(run / "checkpoints" / "5"))
    for ours, expected in ((restored, adapters), (frozen, base)):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ours), jax.tree.map(np.asarray, expected))
    assert np.abs(np.asarray(jax.tree.leaves(base_state(setup)[1])[0]) - np.asarray(jax.tree.leaves(base)[0])).max()

    export_checkpoint(config, str(run / "checkpoints" / "2"), str(tmp_path / "warm"))
    export_checkpoint(config, str(run / "checkpoints" / "5"), str(tmp_path / "grpo"))
    assert not (tmp_path / "warm" / PEFT_DIR).exists()  # the warm-up's base weights are its own
    peft = json.loads((tmp_path / "grpo" / PEFT_DIR / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str(run / "checkpoints" / "2")
    tensors = load_file(str(tmp_path / "grpo" / PEFT_DIR / "adapter_model.safetensors"))
    warm, grpo = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("warm", "grpo"))
    assert warm.keys() == grpo.keys()
    hub = {("model." + m.removeprefix("model.language_model.") if m.startswith("model.language_model.")
            else m.removeprefix("model.")) + ".weight": m for m in peft["target_modules"]}
    assert len(hub) == 7 and hub.keys() <= warm.keys()
    for key, value in warm.items():
        expected = value
        if key in hub:
            a, b = (tensors[f"base_model.model.{hub[key]}.lora_{x}.weight"] for x in "AB")
            expected = value + peft["lora_alpha"] / peft["r"] * (b @ a)
            assert np.abs(b @ a).max() > 1e-3, key
        np.testing.assert_allclose(grpo[key], expected, atol=1e-5, err_msg=key)


def test_adapter_only_checkpoint_restores_onto_the_base_model(tmp_path):
    from anatomy_r1_jax.evaluation.checkpoints import base_state, restore_model_state
    from test_export_hf import default_config, make_run

    config = default_config()
    config.model.lora.rank = 4
    config.model.tiny.num_hidden_layers = 1
    setup, params, _ = make_run(tmp_path / "run", config, step=2, seed=1, base_saved=False)
    restored, frozen = restore_model_state(setup, str(tmp_path / "run" / "checkpoints" / "2"))
    for ours, expected in ((restored, params), (frozen, base_state(setup)[1])):
        assert jax.tree.structure(ours) == jax.tree.structure(expected)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ours), jax.tree.map(np.asarray, expected))
    assert jax.tree.leaves(frozen)


def test_config_errors_name_the_field():
    from anatomy_r1_jax.runtime import builders
    from test_export_hf import default_config

    config = default_config()
    config.model.lora.update(rank=8, vision=True)
    config.model.freeze_vision = True
    with pytest.raises(ValueError, match="model.lora.vision=True .* model.freeze_vision=False"):
        builders.with_adapters(config, None)
    with pytest.raises(ValueError, match="model.lora.targets"):
        lora.LoraConfig(rank=8, targets=("q", "qkv"))
    with pytest.raises(ValueError, match="model.lora.dropout"):
        lora.LoraConfig(rank=8, dropout=0.1)
    assert not lora.LoraConfig.from_config(default_config().model).enabled  # the default: off
