import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anatomy_r1_jax.rl import losses

B, T = 6, 7
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    logps = rng.normal(-1.5, 0.5, (B, T)).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios well outside the clip range
    ref = (logps + rng.normal(0, 0.2, (B, T))).astype(np.float32)
    adv = np.array([1.0, -0.5, 0.0, 2.0, -1.5, 0.7], np.float32)
    lengths = [7, 3, 5, 1, 6, 4]  # ragged
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    logps[mask == 0] = -np.inf  # padding garbage must not leak
    return logps, old, ref, adv, mask


def _reference_loss(logps, old, ref, adv, mask, aggregation, beta=BETA, max_len=None):
    """Independent plain-loop implementation of METHOD.md section 2."""
    per_seq_sum, per_seq_cnt = [], []
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = math.exp(logps[b, t] - old[b, t])
            clipped = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
            pg = -min(ratio * adv[b], clipped * adv[b])
            d = ref[b, t] - logps[b, t]
            s += pg + beta * (math.exp(d) - d - 1)
            n += 1
        per_seq_sum.append(s)
        per_seq_cnt.append(n)
    if aggregation == "token-mean":
        return sum(per_seq_sum) / sum(per_seq_cnt)
    if aggregation == "sequence-mean-token-mean":
        return sum(s / n for s, n in zip(per_seq_sum, per_seq_cnt)) / B
    if aggregation == "drgrpo":
        return sum(per_seq_sum) / (B * (max_len or T))
    raise ValueError(aggregation)


def _hp(aggregation, **kw):
    return losses.GRPOLoss(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA, aggregation=aggregation, **kw)


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean-token-mean", "drgrpo"])
def test_grpo_loss_matches_reference(aggregation):
    logps, old, ref, adv, mask = _batch()
    extra = {"max_completion_length": 16} if aggregation == "drgrpo" else {}
    loss, metrics = jax.jit(lambda *a: losses.grpo_loss(_hp(aggregation, **extra), *a))(logps, old, ref, adv, mask)
    expected = _reference_loss(logps, old, ref, adv, mask, aggregation, max_len=extra.get("max_completion_length"))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert np.isfinite(metrics["kl"])


def test_metrics_match_reference():
    logps, old, ref, adv, mask = _batch(1)
    _, m = losses.grpo_loss(_hp("token-mean"), logps, old, ref, adv, mask)
    n = low = high = 0
    kl = ratio_sum = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                r = math.exp(logps[b, t] - old[b, t])
                d = ref[b, t] - logps[b, t]
                n += 1
                ratio_sum += r
                kl += math.exp(d) - d - 1
                low += r < 1 - EPS_LOW and adv[b] < 0
                high += r > 1 + EPS_HIGH and adv[b] > 0
    assert low > 0 and high > 0
    np.testing.assert_allclose(m["kl"], kl / n, rtol=1e-5)
    np.testing.assert_allclose(m["ratio"], ratio_sum / n, rtol=1e-5)
    np.testing.assert_allclose(m["clip_low"], low / n, rtol=1e-6)
    np.testing.assert_allclose(m["clip_high"], high / n, rtol=1e-6)
    np.testing.assert_allclose(m["clip_fraction"], (low + high) / n, rtol=1e-6)


def test_beta_zero_allows_no_reference():
    logps, old, ref, adv, mask = _batch()
    loss, m = losses.grpo_loss(losses.GRPOLoss(eps_low=0.2, eps_high=0.2, beta=0.0), logps, old, None, adv, mask)
    np.testing.assert_allclose(loss, _reference_loss(logps, old, ref, adv, mask, "token-mean", beta=0.0), rtol=1e-5)
    assert float(m["kl"]) == 0.0
    with pytest.raises(ValueError, match="ref_logps"):
        losses.grpo_loss(losses.GRPOLoss(beta=0.04), logps, old, None, adv, mask)


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean-token-mean"])
def test_on_policy_gradient_is_unclipped_policy_gradient(aggregation):
    """num_iterations = 1: old = stop_gradient(logp) -> dL/dlogp = agg((-A + beta(1 - e^{ref-logp})) m)."""
    logps, _, ref, adv, mask = _batch(2)
    logps = np.where(mask > 0, logps, 0.0).astype(np.float32)

    def loss_fn(lp):
        return losses.grpo_loss(_hp(aggregation), lp, jax.lax.stop_gradient(lp), ref, adv, mask)[0]

    grad = jax.grad(loss_fn)(jnp.asarray(logps))
    per_token = (-adv[:, None] + BETA * (1 - np.exp(ref - logps))) * mask
    if aggregation == "token-mean":
        expected = per_token / mask.sum()
    else:
        expected = per_token / mask.sum(1, keepdims=True) / B
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    # central finite difference of the loss with old_logps frozen at the current logps
    def frozen(lp):
        return losses.grpo_loss(_hp(aggregation), lp, logps, ref, adv, mask)[0]

    for b, t in [(0, 2), (1, 1), (4, 5)]:
        e = np.zeros_like(logps)
        e[b, t] = 1e-2
        fd = (frozen(logps + e) - frozen(logps - e)) / 2e-2
        np.testing.assert_allclose(fd, expected[b, t], rtol=2e-2)


def test_clip_removes_gradient_only_where_it_should():
    lp = jnp.zeros((1, 4))
    old = jnp.log(jnp.array([[1.0, 2.0, 0.5, 1.1]]))  # ratios 1, 0.5, 2, 1/1.1
    mask = jnp.ones((1, 4))
    cfg = losses.GRPOLoss(eps_low=0.2, eps_high=0.2, beta=0.0)
    for a in (1.0, -1.0):
        g = jax.grad(lambda x: losses.grpo_loss(cfg, x, old, None, jnp.array([a]), mask)[0])(lp)
        ratio = np.exp(-np.asarray(old))
        active = (ratio > 1.2) & (a > 0) | (ratio < 0.8) & (a < 0)
        np.testing.assert_allclose(g, np.where(active, 0.0, -a * ratio / 4), rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean-token-mean", "drgrpo"])
@pytest.mark.parametrize("name", ["grpo", "gpg"])
def test_micro_batch_accumulation_is_exact(aggregation, name):
    logps, old, ref, adv, mask = _batch(3)
    logps = np.where(mask > 0, logps, 0.0).astype(np.float32)
    entry = losses.POLICY_LOSSES.get(name)
    kw = dict(beta=BETA, aggregation=aggregation, max_completion_length=12)
    kw.update(dict(eps_low=EPS_LOW, eps_high=EPS_HIGH) if name == "grpo" else {})
    cfg, fn, valid = entry.config(**kw), entry.fn, 0.75  # (grpo ignores the valid fraction)

    def full(lp):
        return losses.loss_value(fn(cfg, lp, old, ref, adv, mask, valid))

    def numerator(lp, sl):
        return fn(cfg, lp, old[sl], ref[sl], adv[sl], mask[sl], valid).numerator

    splits = [slice(0, 1), slice(1, 4), slice(4, 6)]
    parts = [fn(cfg, logps[s], old[s], ref[s], adv[s], mask[s], valid) for s in splits]
    combined = losses.sum_loss_parts(parts)
    np.testing.assert_allclose(losses.loss_value(combined), full(logps), rtol=1e-5)
    full_parts = fn(cfg, logps, old, ref, adv, mask, valid)
    for k, v in full_parts.metric_sums.items():
        np.testing.assert_allclose(combined.metric_sums[k], v, rtol=1e-5, atol=1e-7)

    grad_full = jax.grad(full)(jnp.asarray(logps))
    grad_acc = np.concatenate([jax.grad(numerator)(jnp.asarray(logps[s]), s) for s in splits]) / combined.denominator
    np.testing.assert_allclose(grad_acc, grad_full, rtol=1e-5, atol=1e-8)


def test_gpg_loss():
    logps, old, ref, adv, mask = _batch(4)
    loss, m = losses.gpg_loss(losses.GPGLoss(beta=BETA), logps, old, ref, adv, mask, 0.5)
    lp = np.where(mask > 0, logps, 0.0)
    d = ref - lp
    per_token = (-lp * adv[:, None] + BETA * (np.exp(d) - d - 1)) * mask
    np.testing.assert_allclose(loss, 2.0 * per_token.sum() / mask.sum(), rtol=1e-5)
    assert float(m["clip_fraction"]) == 0.0
    # no informative group: alpha falls back to 1 and nothing blows up
    loss0, _ = losses.gpg_loss(losses.GPGLoss(), logps, None, None, np.zeros(B, np.float32), mask, 0.0)
    assert float(loss0) == 0.0
