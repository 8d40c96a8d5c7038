"""The mixed-precision policy: a GRPO update on bf16 weights keeps every dtype the policy names
(weights, gradients, moments, master copy), and its loss and update are those of float32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anatomy_r1_jax.models import QwenVL, QwenVLConfig
from anatomy_r1_jax.models.presets import tiny_hf_config
from anatomy_r1_jax.rl.losses import GRPOLoss
from anatomy_r1_jax.runtime.placement import split_model
from anatomy_r1_jax.runtime.precision import Precision, init_optimizer
from anatomy_r1_jax.train.step import StepConfig, TrainState, make_optimizer, train_step
from test_rollout_step import _stack, _train_batch

# One layer each (compile time); token ids as in test_rollout_step's batches. The vision tower is
# frozen, as the real-model configs freeze it.
CFG = QwenVLConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256, num_hidden_layers=1, vision_depth=1,
                                          fullatt_block_indexes=(0,)))

MASTER = Precision(weights="bfloat16", compute="bfloat16", grads="float32", moments="float32", master_weights=True)
BF16_GRADS = Precision(weights="bfloat16", compute="bfloat16", grads="bfloat16", moments="float32")


def _state(policy: Precision, lr=1e-2):
    dtype = jnp.dtype(policy.weights)
    model = QwenVL(CFG, dtype=jnp.dtype(policy.compute), param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params, frozen = split_model(model, freeze_vision=True)
    tx = make_optimizer(lr, weight_decay=0.1, grad_clip=1.0)
    master, opt_state = init_optimizer(tx, policy, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                       ref_params=jax.tree.map(jnp.copy, params), opt_state=opt_state, master=master)
    return graphdef, tx, state


def _floating(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _accumulated_grad_dtypes(step, state, batch):
    """Dtypes of the gradient accumulator: the leading carry outputs of the update's micro-batch scan."""
    jaxpr = jax.make_jaxpr(step)(state, batch).jaxpr
    scan = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    n = len(jax.tree.leaves(state.params))
    return {str(v.aval.dtype) for v in scan.outvars[:n]}


def test_bf16_update_keeps_the_policys_dtypes():
    """bf16 weights and compute, fp32 gradients, moments and master copy (the real-model policy)."""
    policy = MASTER
    graphdef, tx, state = _state(policy)
    batch = _stack([_train_batch(seed=0)])  # random rewards 0..2: non-zero advantages
    cfg = StepConfig(group_size=4, loss=GRPOLoss(beta=0.04), temperature=0.9, logp_chunk=6, precision=policy)
    step = functools.partial(train_step, graphdef, tx, cfg)
    assert _accumulated_grad_dtypes(step, state, batch) == {"float32"}
    before = jax.tree.map(np.asarray, state.params)
    step = jax.jit(step)
    new, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["update_skipped"]) == 0
    assert float(metrics["advantage_abs_mean"]) > 0
    assert {str(x.dtype) for x in jax.tree.leaves(new.params)} == {"bfloat16"}
    assert {str(x.dtype) for x in jax.tree.leaves(new.frozen)} == {"bfloat16"}
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new.params))]
    assert sum(changed) > 0.9 * len(changed)
    assert {str(x.dtype) for x in _floating(new.opt_state)} == {"float32"}  # AdamW's mu and nu
    assert {str(x.dtype) for x in jax.tree.leaves(new.master)} == {"float32"}
    # The weights are the master copy rounded to bf16.
    jax.tree.map(lambda m, p: np.testing.assert_array_equal(np.asarray(m.astype(jnp.bfloat16)), np.asarray(p)),
                 new.master, new.params)
    # A second step (the optimizer state's types are stable: no recompilation, no cond mismatch).
    new, metrics = step(new, batch)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["update_skipped"]) == 0
    assert step._cache_size() == 1


def test_master_copy_keeps_updates_smaller_than_bf16_resolution():
    """lr 1e-5 moves a weight of size ~0.02 by ~1e-5, below bf16's resolution there (~1e-4): the
    bf16 weights updated directly (bf16 gradients, fp32 moments) barely move; the master copy
    moves everywhere."""
    batch = _stack([_train_batch(seed=0)])
    moved = {}
    for policy in (MASTER, BF16_GRADS):
        graphdef, tx, state = _state(policy, lr=1e-5)
        cfg = StepConfig(group_size=4, loss=GRPOLoss(beta=0.0), temperature=0.9, logp_chunk=6, precision=policy)
        step = functools.partial(train_step, graphdef, tx, cfg)
        if policy is BF16_GRADS:
            assert _accumulated_grad_dtypes(step, state, batch) == {"bfloat16"}
        before = jax.tree.map(np.asarray, state.params)
        state, metrics = jax.jit(step)(state, batch)
        assert int(metrics["update_skipped"]) == 0
        assert {str(x.dtype) for x in _floating(state.opt_state)} == {"float32"}
        trained = state.params if state.master is None else state.master
        moved[policy.master_weights] = np.mean([np.mean(np.asarray(a, np.float32) != np.asarray(b, np.float32))
                                                for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trained))])
    assert moved[True] > 0.95 and moved[False] < 0.5, moved


def test_policy_errors_name_the_config_field():
    with pytest.raises(ValueError, match="optim.master_weights"):
        Precision(master_weights=True)
    with pytest.raises(ValueError, match="optim.moment_dtype='fp16'"):
        Precision(moments="fp16")
    graphdef, tx, state = _state(MASTER)
    cfg = StepConfig(group_size=4, loss=GRPOLoss(beta=0.0), precision=Precision())  # float32 policy, bf16 weights
    with pytest.raises(ValueError, match="model.param_dtype"):
        jax.eval_shape(functools.partial(train_step, graphdef, tx, cfg), state, _stack([_train_batch(seed=0)]))
