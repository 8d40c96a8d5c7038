"""The rollout's layout of its own (config.rollout_mesh / rollout_sharding_rules): the trainer's
rollout program, compiled on 8 CPU devices under a real-model mesh (fsdp over all 8), holds no
all-gather inside its token loop, where the training layout gathers weight shards and the
[rows, vocab] logits on every generated token; the sampler draws the same tokens whatever the
split of its rows; and a step's queries regroup exactly from rollout calls into micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import QwenVL, QwenVLConfig
from anatomy_r1_jax.models.presets import tiny_hf_config
from anatomy_r1_jax.perf import hlo, workloads
from anatomy_r1_jax.rl.sampling import SamplingConfig, sample_token
from anatomy_r1_jax.runtime.programs import rollout_programs
from anatomy_r1_jax.train.compiled import Programs
from anatomy_r1_jax.runtime.placement import place_state, put_batch, split_model
from anatomy_r1_jax.runtime.placement import rollout_calls, step_order
from configs import default
from configs.methods import REAL_MODEL, REAL_MODELS


def _token_loop_collectives(programs: Programs, cfg: QwenVLConfig) -> dict:
    """Collectives inside the token loop of `programs`' rollout of a bf16, scanned tiny Qwen2.5-VL
    (8 queries x G 8, top-k / top-p sampling as REAL_MODEL), placed on `programs`' layout."""
    mesh, rules = programs.mesh, programs.rules
    with sharding.use_rules(mesh, rules):
        model = QwenVL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True, rngs=nnx.Rngs(0))
    graphdef, params, frozen = split_model(model, freeze_vision=True)
    programs = Programs.create(graphdef, mesh, rules)
    prompts, _ = workloads.image_prompts(cfg, queries=8, group=1, prompt_length=32, grid=(1, 4, 4))
    sampling = SamplingConfig(max_new_tokens=8, eos_ids=(cfg.vocab_size - 1,), temperature=REAL_MODEL["rl.temperature"],
                              top_k=REAL_MODEL["rl.top_k"], top_p=REAL_MODEL["rl.top_p"])
    lowered = programs.rollout(cache_dtype=jnp.bfloat16).lower(
        place_state(params, mesh, rules), place_state(frozen, mesh, rules), put_batch(prompts, mesh, rules),
        jax.random.key(0), sampling, 8, 1)
    return hlo.collective_stats(hlo.loop_body_text(lowered.compile().as_text(), dynamic_only=True))


def test_the_trainers_rollout_gathers_nothing_inside_its_token_loop():
    c = default.get_config()
    mesh = sharding.make_mesh(REAL_MODELS["qwen2_5_vl_3b"]["mesh"])
    assert dict(mesh.shape)["fsdp"] == 8
    cfg = QwenVLConfig.from_hf(tiny_hf_config("qwen2_5_vl", vocab_size=512, hidden_size=64, intermediate_size=128))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0))))
    ours = _token_loop_collectives(rollout_programs(c, graphdef, mesh), cfg)
    assert ours["all-gather"]["count"] == 0, ours
    assert hlo.total(ours)[0] == 0, ours  # nothing crosses devices per token on this mesh (tensor = 1)
    # The training layout, which the rollout ran under before: the check sees its per-token gathers.
    training = _token_loop_collectives(Programs.create(graphdef, mesh, c.sharding_rules), cfg)
    assert training["all-gather"]["count"] > 0, training


def test_sampling_draws_categoricals_token_whatever_the_row_split():
    """The draw is jax.random.categorical's over the top-k / top-p candidates (the same tokens as
    before the sampler ran per row block), and rows split over 8 devices draw what one device does."""
    logits = jax.random.normal(jax.random.key(1), (16, 64), jnp.float32) * 3
    cfg = SamplingConfig(temperature=0.9, top_k=10, top_p=0.8)
    rng = jax.random.key(2)
    cand, ids = jax.lax.top_k(logits / cfg.temperature, cfg.top_k)
    probs = jax.nn.softmax(cand, -1)
    cand = jnp.where(jnp.cumsum(probs, -1) - probs < cfg.top_p, cand, -jnp.inf)
    want = jnp.take_along_axis(ids, jax.random.categorical(rng, cand, axis=-1)[:, None], -1)[:, 0]
    alone, _ = sample_token(rng, logits, cfg)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(want))
    mesh = sharding.make_mesh([("data", 8)])
    rules = [("activation_batch", "data")]
    rows = jax.device_put(logits, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    with sharding.use_rules(mesh, rules):
        sampler = jax.jit(lambda r, x: sample_token(r, x, cfg))
        text = sampler.lower(rng, rows).compile().as_text()
        tokens, _ = sampler(rng, rows)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))
    assert hlo.collective_stats(text)["all-gather"]["count"] == 0  # each device filters its own rows


@pytest.mark.parametrize("shards,local,calls,micro", [(1, 8, 1, 4), (2, 4, 1, 2), (2, 4, 2, 1), (4, 4, 2, 4)])
def test_step_order_maps_rollout_calls_onto_micro_batches(shards, local, calls, micro):
    """Query i of shard h, labelled (h, i), laid out as `placement.step_records` orders P parts:
    step_order(..., calls, micro) must take the calls' order to the micro-batches' order."""
    def layout(parts):
        per = local // parts
        return [(h, i) for m in range(parts) for h in range(shards) for i in range(m * per, (m + 1) * per)]

    order = step_order(shards, local, calls, micro)
    src = layout(calls)
    assert [src[k] for k in order] == layout(micro)


def test_rollout_batch_size_must_divide_the_step():
    assert rollout_calls(16, 0, 1) == 1 and rollout_calls(16, 4, 2) == 4
    with pytest.raises(ValueError, match="rl.rollout_batch_size=6 must divide train.batch_size=16"):
        rollout_calls(16, 6, 1)


def test_a_tensor_parallel_rollout_mesh_decodes_what_the_training_layout_does():
    """config.rollout_mesh of the same 8 devices as [data 4, tensor 2]: the weights resharded onto it
    (heads, KV heads and MLP split 2 ways, rows over data), greedy decoding gives the training
    layout's tokens and log-probs; the token loop all-reduces activations and gathers nothing. (A
    tensor degree that does not divide the KV heads leaves the cache replicated and gathers its
    parts every token: choose one that divides them.)"""
    c = default.get_config()
    c.rollout_mesh = [("data", 4), ("tensor", 2)]
    mesh = sharding.make_mesh([("data", 1), ("fsdp", 8)])
    cfg = QwenVLConfig.from_hf(tiny_hf_config("qwen2_5_vl", vocab_size=512, hidden_size=64, intermediate_size=128))
    train_rules = [tuple(r) for r in c.sharding_rules]
    with sharding.use_rules(mesh, train_rules):
        model = QwenVL(cfg, scan_layers=True, rngs=nnx.Rngs(0))
    graphdef, params, frozen = split_model(model, freeze_vision=True)
    params, frozen = place_state(params, mesh, train_rules), place_state(frozen, mesh, train_rules)
    prompts, _ = workloads.image_prompts(cfg, queries=4, group=1, prompt_length=32, grid=(1, 4, 4))
    sampling = SamplingConfig(max_new_tokens=6, greedy=True)
    out, texts = {}, {}
    for name, programs in (("training", Programs.create(graphdef, mesh, train_rules)),
                           ("tensor", rollout_programs(c, graphdef, mesh))):
        args = (place_state(params, programs.mesh, programs.rules), place_state(frozen, programs.mesh, programs.rules),
                put_batch(prompts, programs.mesh, programs.rules), jax.random.key(0), sampling, 2, 1)
        rollout = programs.rollout()
        texts[name] = rollout.lower(*args).compile().as_text()
        out[name] = jax.device_get(rollout(*args))
    assert dict(rollout_programs(c, graphdef, mesh).mesh.shape) == {"data": 4, "tensor": 2}
    np.testing.assert_array_equal(out["tensor"].ids, out["training"].ids)
    np.testing.assert_allclose(out["tensor"].logps, out["training"].logps, atol=1e-4)
    loop = hlo.collective_stats(hlo.loop_body_text(texts["tensor"], dynamic_only=True))
    assert loop["all-reduce"]["count"] > 0 and loop["all-gather"]["count"] == 0, loop
