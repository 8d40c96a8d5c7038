"""A run's updates from its config (train/step.py step_configs), and a newcomer's path to a policy
loss with a hyper-parameter of its own: a frozen config dataclass, its function and one registry
entry (rl/losses.py), and `c.rl.<knob>` in configs/default.py; nothing else changes."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from anatomy_r1_jax.rl import losses
from anatomy_r1_jax.runtime.precision import Precision
from anatomy_r1_jax.train.step import StepConfig, step_configs
from configs.default import get_config
from test_rollout_step import _run_steps, _train_batch


@dataclasses.dataclass(frozen=True)
class ScaledPGLoss:
    """A made-up loss: pg_scale is its new knob (config.rl.pg_scale), aggregation an existing one."""

    pg_scale: float
    aggregation: str = "token-mean"


def scaled_pg_loss_parts(cfg: ScaledPGLoss, logps, old_logps, ref_logps, advantages, mask, valid_fraction):
    """l = -pg_scale * logp * A [B, T]; loss = aggregation(l, mask)."""
    del old_logps, ref_logps, valid_fraction
    mask = jnp.asarray(mask, jnp.float32)
    per_token = -cfg.pg_scale * jnp.where(mask > 0, logps, 0.0) * advantages[:, None]
    num, den = losses.AGGREGATIONS.get(cfg.aggregation)(per_token, mask)
    zero = jnp.zeros((), jnp.float32)
    sums = {"tokens": jnp.sum(mask), "kl": zero, "ratio": jnp.sum(mask), "clip_low": zero, "clip_high": zero}
    return losses.LossParts(num, den, sums)


@pytest.fixture
def scaled_pg():
    """"test-scaled-pg" registered for the test alone (the registry is left as it was)."""
    losses.register_policy_loss("test-scaled-pg", ScaledPGLoss)(scaled_pg_loss_parts)
    yield "test-scaled-pg"
    losses.POLICY_LOSSES.unregister("test-scaled-pg")
    assert "test-scaled-pg" not in losses.POLICY_LOSSES


def test_step_configs_build_the_trainers_updates():
    c = get_config()
    cfgs = step_configs(c, num_categories=0)
    grpo, sft = cfgs["grpo"], cfgs["sft"]
    assert grpo == StepConfig(
        objective=c.rl.loss, group_size=c.rl.group_size, advantage=c.rl.advantage, temperature=c.rl.temperature,
        logp_chunk=c.train.logp_chunk, num_categories=1, precision=Precision.from_config(c), old_logps="current",
        drop_invalid_groups=False, loss=losses.GRPOLoss(eps_low=c.rl.eps_low, eps_high=c.rl.eps_high, beta=c.rl.beta,
                                                        aggregation=c.rl.aggregation,
                                                        max_completion_length=c.rl.max_completion_length))
    assert sft == StepConfig(objective="sft", loss=losses.SFTLoss(), advantage="none", group_size=1, temperature=1.0,
                             logp_chunk=c.train.logp_chunk, num_categories=1, precision=Precision.from_config(c))
    assert grpo.needs_reference and not sft.needs_reference
    assert len({grpo, sft}) == 2  # hashable (static for jit)
    c.rl.update(num_iterations=2, dynamic_sampling="drop", beta=0.0, loss="gpg", eps_low=0.1)
    grpo = step_configs(c, num_categories=3, precision=Precision(grads="bfloat16"))["grpo"]
    assert (grpo.old_logps, grpo.drop_invalid_groups, grpo.num_categories, grpo.precision.grads) == (
        "batch", True, 3, "bfloat16")
    assert grpo.loss == losses.GPGLoss(beta=0.0, aggregation=c.rl.aggregation,
                                       max_completion_length=c.rl.max_completion_length)
    assert not grpo.needs_reference


def test_a_new_loss_reads_its_new_knob_from_the_config(scaled_pg):
    """config.rl.loss names the new loss, config.rl.pg_scale sets its knob: step_configs builds its
    config from the run config, and the update's loss scales with the value read."""
    c = get_config()
    c.rl.update(loss=scaled_pg, group_size=4)
    c.train.logp_chunk = 3
    batch = _train_batch(seed=0)
    losses_by_scale = {}
    for scale in (0.5, 2.0):
        c.rl.pg_scale = scale
        cfg = step_configs(c)["grpo"]
        assert cfg.loss == ScaledPGLoss(pg_scale=scale, aggregation=c.rl.aggregation) and not cfg.needs_reference
        losses_by_scale[scale] = float(_run_steps(None, [batch], 1, cfg)[0][0])
    assert abs(losses_by_scale[0.5]) > 1e-6
    np.testing.assert_allclose(losses_by_scale[2.0], 4 * losses_by_scale[0.5], rtol=1e-5)


def test_a_missing_field_or_an_unknown_loss_is_one_line(scaled_pg):
    c = get_config()
    c.rl.loss = scaled_pg  # config.rl.pg_scale never given
    named = r"policy loss 'test-scaled-pg' \(ScaledPGLoss\) reads config\.rl\.pg_scale, which the config lacks"
    with pytest.raises(ValueError, match=named) as missing:
        step_configs(c)
    c.rl.loss = "no-such-loss"
    with pytest.raises(ValueError, match=r"config\.rl\.loss='no-such-loss' is not a registered policy loss") as unknown:
        step_configs(c)
    assert "\n" not in str(missing.value) and "\n" not in str(unknown.value)
    with pytest.raises(TypeError, match=r"objective='sft'\) takes loss=SFTLoss"):
        StepConfig(objective="sft", loss=losses.GRPOLoss())
