"""The compiled functions as the trainer builds them (train/compiled.py): traced under the sharding
rules, compiled once, and num_iterations > 1 as PPO epochs over one rollout with a working clip."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anatomy_r1_jax import sharding
from anatomy_r1_jax.models import QwenVL, QwenVLConfig
from anatomy_r1_jax.models.presets import tiny_hf_config
from anatomy_r1_jax.rl.advantages import grpo_advantages
from anatomy_r1_jax.rl.losses import GRPOLoss
from anatomy_r1_jax.train.compiled import Programs, run_iterations
from anatomy_r1_jax.runtime.placement import put_batch, split_model
from anatomy_r1_jax.train.step import StepConfig, make_optimizer
from test_rollout_step import RULES, _stack, _train_batch, one_device_mesh

CFG = QwenVLConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256, num_hidden_layers=1, vision_depth=1,
                                          fullatt_block_indexes=(0,)))


def _programs(mesh, lr=1e-2):
    graphdef, params, frozen = split_model(QwenVL(CFG, rngs=nnx.Rngs(0)), freeze_vision=False)
    programs = Programs.create(graphdef, mesh, RULES)
    tx = make_optimizer(lr, grad_clip=1.0)
    return programs, tx, params, frozen


@pytest.mark.slow  # whole updates on 8 devices
def test_update_is_traced_under_the_rules_and_compiles_once():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    programs, tx, params, frozen = _programs(mesh)
    cfg = StepConfig(group_size=4, loss=GRPOLoss(beta=0.04), temperature=0.9, logp_chunk=6)
    state = programs.init_state(tx, cfg.precision, params, frozen, reference=True)
    update = programs.update(tx, cfg, state)
    batch = put_batch(_stack([_train_batch(seed=0)]), mesh, RULES, micro_axis=True)
    # The models' activation constraints (sharding.constrain) are in the program: without use_rules
    # at trace time there are none.
    text = update.lower(state, batch).as_text()
    assert text.count("sharding_constraint") > 0  # 22 for this model; 0 when traced outside the rules
    for seed in range(3):
        state, _ = update(state, put_batch(_stack([_train_batch(seed=seed)]), mesh, RULES, micro_axis=True))
    assert update._cache_size() == 1
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    assert opt_leaves and all(x.sharding.is_fully_replicated for x in opt_leaves)
    # The phase switch (warm-up -> GRPO): fresh AdamW state, same shardings, no recompilation.
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(state.opt_state) if x.ndim)
    fresh = programs.reset_optimizer(tx, cfg.precision, state)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(fresh.opt_state) if x.dtype != bool)
    assert jax.tree.map(lambda x: x.sharding, fresh) == jax.tree.map(lambda x: x.sharding, state)
    update(fresh, batch)
    assert update._cache_size() == 1


def test_weights_and_activations_have_logical_names_of_their_own():
    """A weight rule shards weights only, an activation rule activations only: the logits are
    constrained by activation_vocab, never by the lm_head's vocab rule; unknown names are refused."""
    model = QwenVL(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    axes = {a for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
            for a in (v.get_metadata().get("axes") or ()) if a}
    assert axes and axes <= sharding.WEIGHT_NAMES and not axes & sharding.ACTIVATION_NAMES
    mesh = sharding.make_mesh([("tensor", 8)])
    hidden = jnp.ones((2, 4, CFG.hidden_size), jnp.float32)

    def logits_spec(rules):
        with sharding.use_rules(mesh, rules):
            out = jax.jit(lambda s, h: nnx.merge(graphdef, s).logits(h))(state, hidden)
        return tuple(out.sharding.spec) + (None,) * (3 - len(out.sharding.spec))

    assert logits_spec([("vocab", "tensor")])[2] is None
    assert logits_spec([("activation_vocab", "tensor")])[2] == "tensor"
    with pytest.raises(ValueError, match="'batch'; activations are named 'activation_batch'"):
        Programs.create(graphdef, mesh, [("batch", "tensor")])


def _masked(x, mask):
    return np.where(mask > 0, x, 0.0)


def test_num_iterations_two_is_a_clipped_second_epoch():
    """Iteration 2 of one rollout: ratio = pi_1 / pi_0 != 1 and the clip acts, loss by hand."""
    mesh = one_device_mesh()
    cfg = StepConfig(group_size=4, loss=GRPOLoss(eps_low=0.2, eps_high=0.2, beta=0.0), temperature=0.9, logp_chunk=6,
                     old_logps="batch")
    batch = _stack([_train_batch(seed=0)])
    mask = batch.completions.mask[0].astype(np.float32)

    # By hand: pi_0 before the first iteration, pi_1 after it.
    programs, tx, params, frozen = _programs(mesh, lr=0.05)
    state = programs.init_state(tx, cfg.precision, params, frozen, reference=False)
    update, old_logps = programs.update(tx, cfg, state), programs.old_logps(cfg)
    logp0 = np.asarray(old_logps(state, batch))
    state, first = update(state, batch.replace(completions=batch.completions.replace(logps=logp0)))
    logp1 = np.asarray(old_logps(state, batch))[0]
    np.testing.assert_allclose(float(first["ratio"]), 1.0, atol=1e-5)
    adv = np.asarray(grpo_advantages(jnp.asarray(batch.rewards[0]), 4))[:, None]
    ratio = np.exp(_masked(logp1 - logp0[0], mask))
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    loss = (per_token * mask).sum() / mask.sum()
    clipped = (((ratio < 0.8) & (adv < 0)) | ((ratio > 1.2) & (adv > 0))) * mask
    assert clipped.sum() > 0

    # The trainer's path: run_iterations over a fresh, identical state.
    programs, tx, params, frozen = _programs(mesh, lr=0.05)
    state = programs.init_state(tx, cfg.precision, params, frozen, reference=False)
    _, second = run_iterations(programs.update(tx, cfg, state), programs.old_logps(cfg), state, batch, 2)
    np.testing.assert_allclose(float(second["loss"]), loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(second["ratio"]), (ratio * mask).sum() / mask.sum(), rtol=1e-4)
    np.testing.assert_allclose(float(second["clip_fraction"]), clipped.sum() / mask.sum(), rtol=1e-4)


_CACHE_USER = """
import sys, jax, jax.numpy as jnp, ml_collections, numpy as np
from anatomy_r1_jax.runtime.programs import use_compilation_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
use_compilation_cache(ml_collections.ConfigDict(dict(compilation_cache=sys.argv[1],
                                                     compilation_cache_max_gb=float(sys.argv[2]))))
for n in sys.argv[3:]:  # one program per n (n is a constant of its HLO)
    jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x @ x.T) * int(n))(np.ones((8, 8), np.float32)))
"""


def test_the_compilation_cache_replaces_a_program_cut_short_and_stays_under_its_bound(tmp_path):
    cache = tmp_path / "xla"

    def run(max_gb, *programs):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", _CACHE_USER, str(cache), str(max_gb), *programs], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return {p.name: p.stat().st_size for p in cache.glob("*-cache")}, sorted(p.name for p in cache.glob("*-atime"))

    entries, times = run(8.0, "1")
    assert len(entries) == 1 and len(times) == 1
    (name, size), = entries.items()
    # A kill -9 inside jax's write: half the program on disk, its access time not yet written.
    (cache / name).write_bytes((cache / name).read_bytes()[:size // 2])
    (cache / times[0]).unlink()
    entries, times = run(8.0, "1")
    assert entries == {name: size} and len(times) == 1  # compiled again and written whole (jax alone keeps the half)

    cap = 1.5 * size / 2**30  # room for one program of this size, not two
    entries, _ = run(cap, "2", "3")
    assert len(entries) == 1 and sum(entries.values()) <= cap * 2**30  # least recently used evicted
