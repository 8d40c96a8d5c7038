"""Policy losses as (numerator, denominator) pairs, so micro-batch accumulation is exact.

Shapes: logps, old_logps, ref_logps, mask [B, T] (completion tokens; mask 1 on real tokens);
advantages [B] (one per sequence). Log-probs are those of the sampled tokens, computed from
logits / temperature (METHOD.md section 2).

Every registered policy loss ("grpo", "gpg", "sft") has one signature,

    fn(logps, old_logps, ref_logps, advantages, mask, *, eps_low, eps_high, beta, aggregation,
       max_completion_length, valid_fraction) -> LossParts(numerator, denominator, metric_sums)

(each ignores the hyper-parameters it has no use for), so the update calls any of them alike. Over
micro-batches m of one batch,

    loss = sum_m numerator_m / sum_m denominator_m,   grad = sum_m grad(numerator_m) / sum_m den_m

which equals the full-batch loss and gradient exactly, because every denominator is a count that
does not depend on the parameters. `metric_sums` are token sums, combined the same way by
`finalize_metrics`.

Aggregations (how per-token losses l [B, T] become (numerator, denominator)), registered by name:
- "token-mean" (authors' default):   sum_bt l*m / sum_bt m
- "sequence-mean-token-mean":        sum_b (sum_t l*m / sum_t m) / #sequences
- "drgrpo":                          sum_bt l*m / (#sequences * max_completion_length)
#sequences counts rows with at least one completion token, so all-padding rows added to fill a
micro-batch change nothing (TRL counts every row; identical when no row is empty).

Clip metrics follow TRL: a token is low-clipped when ratio < 1 - eps_low and A < 0, high-clipped
when ratio > 1 + eps_high and A > 0 (only there does the clip remove the gradient); the clip
fraction is their sum over masked tokens.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from anatomy_r1_jax.rl.registry import Registry


class LossParts(NamedTuple):
    """numerator / denominator is the loss; metric_sums are token sums (see finalize_metrics)."""

    numerator: jax.Array
    denominator: jax.Array
    metric_sums: dict[str, jax.Array]


AggregationFn = Callable[..., tuple[jax.Array, jax.Array]]
AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation")
register_aggregation = AGGREGATIONS.register

PolicyLossFn = Callable[..., LossParts]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register


def _nonempty_rows(mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sum(mask, axis=1) > 0).astype(jnp.float32)


@register_aggregation("token-mean")
def token_mean(per_token: jax.Array, mask: jax.Array, *, max_completion_length: int | None = None):
    """(sum_bt l*m, sum_bt m): token mean over the whole batch."""
    del max_completion_length
    return jnp.sum(per_token * mask), jnp.sum(mask)


@register_aggregation("sequence-mean-token-mean")
def sequence_mean_token_mean(per_token: jax.Array, mask: jax.Array, *, max_completion_length: int | None = None):
    """(sum_b mean_t(l_b), #non-empty sequences): mean over sequences of per-sequence token means."""
    del max_completion_length
    per_seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return jnp.sum(per_seq), _nonempty_rows(mask)


@register_aggregation("drgrpo")
def drgrpo_aggregation(per_token: jax.Array, mask: jax.Array, *, max_completion_length: int | None = None):
    """(sum_bt l*m, #non-empty sequences * L): L = max_completion_length (default: T)."""
    length = per_token.shape[1] if max_completion_length is None else max_completion_length
    return jnp.sum(per_token * mask), _nonempty_rows(mask) * float(length)


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


def _prepare(logps, old_logps, ref_logps, advantages, mask):
    """fp32 inputs zeroed off-mask, so padding can never leak NaN into values or grads."""
    mask = jnp.asarray(mask).astype(jnp.float32)
    on = mask > 0
    clean = lambda x: None if x is None else jnp.where(on, jnp.asarray(x, jnp.float32), 0.0)  # noqa: E731
    adv = jnp.asarray(advantages, jnp.float32)[:, None]
    return clean(logps), clean(old_logps), clean(ref_logps), adv, mask


def _kl_term(logps, ref_logps, beta: float):
    if ref_logps is None:
        if beta != 0:
            raise ValueError("beta > 0 needs ref_logps")
        return jnp.zeros_like(logps)
    return k3_kl(logps, ref_logps)


@register_policy_loss("grpo")
def grpo_loss_parts(
    logps: jax.Array,
    old_logps: jax.Array,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.04,
    aggregation: str = "token-mean",
    max_completion_length: int | None = None,
    valid_fraction: jax.Array | float = 1.0,
) -> LossParts:
    """Clipped GRPO surrogate with a k3 KL penalty.

    ratio = exp(logp - old_logp)                                       [B, T]
    l     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3(logp, ref)
    loss  = aggregation(l, mask)

    With num_iterations = 1 pass old_logps = stop_gradient(logps): ratio == 1, the clip is
    inactive and grad = aggregation of (-A + beta * (1 - exp(ref - logp))) * grad(logp).
    `beta` is a Python float; ref_logps may be None when beta == 0. valid_fraction is unused (one
    signature for every policy loss).
    """
    del valid_fraction
    logps, old_logps, ref_logps, adv, mask = _prepare(logps, old_logps, ref_logps, advantages, mask)
    kl = _kl_term(logps, ref_logps, beta)
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    if beta != 0:
        per_token = per_token + beta * kl
    num, den = AGGREGATIONS.get(aggregation)(per_token, mask, max_completion_length=max_completion_length)
    ratio_sg, adv_b = jax.lax.stop_gradient(ratio), jnp.broadcast_to(adv, ratio.shape)
    sums = {
        "tokens": jnp.sum(mask),
        "kl": jnp.sum(jax.lax.stop_gradient(kl) * mask),
        "ratio": jnp.sum(ratio_sg * mask),
        "clip_low": jnp.sum(((ratio_sg < 1.0 - eps_low) & (adv_b < 0)) * mask),
        "clip_high": jnp.sum(((ratio_sg > 1.0 + eps_high) & (adv_b > 0)) * mask),
    }
    return LossParts(num, den, sums)


@register_policy_loss("gpg")
def gpg_loss_parts(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    valid_fraction: jax.Array | float,
    beta: float = 0.0,
    aggregation: str = "token-mean",
    max_completion_length: int | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> LossParts:
    """GPG baseline: plain policy gradient rescaled by the fraction of informative groups.

    l     = -logp * A + beta * k3(logp, ref)                           [B, T]
    alpha = 1 / valid_fraction  (1 when valid_fraction == 0: then every A is 0 anyway)
    loss  = alpha * aggregation(l, mask)

    valid_fraction is the fraction of groups of the *whole batch* whose rewards are not all equal
    (`advantages.valid_group_fraction(rewards, G)`); compute it once per batch and pass the same
    value to every micro-batch so accumulation stays exact. old_logps only feeds the ratio metric;
    eps_low / eps_high are unused (one signature for every policy loss).
    """
    del eps_low, eps_high
    logps, old_logps, ref_logps, adv, mask = _prepare(logps, old_logps, ref_logps, advantages, mask)
    kl = _kl_term(logps, ref_logps, beta)
    per_token = -logps * adv
    if beta != 0:
        per_token = per_token + beta * kl
    frac = jnp.asarray(valid_fraction, jnp.float32)
    alpha = jnp.where(frac > 0, 1.0 / jnp.where(frac > 0, frac, 1.0), 1.0)
    num, den = AGGREGATIONS.get(aggregation)(per_token, mask, max_completion_length=max_completion_length)
    ratio = jnp.ones_like(logps) if old_logps is None else jnp.exp(jax.lax.stop_gradient(logps) - old_logps)
    zero = jnp.zeros((), jnp.float32)
    sums = {
        "tokens": jnp.sum(mask),
        "kl": jnp.sum(jax.lax.stop_gradient(kl) * mask),
        "ratio": jnp.sum(ratio * mask),
        "clip_low": zero,
        "clip_high": zero,
    }
    return LossParts(alpha * num, den, sums)


@register_policy_loss("sft")
def sft_loss_parts(logps: jax.Array, old_logps: jax.Array | None, ref_logps: jax.Array | None,
                   advantages: jax.Array, mask: jax.Array, *, beta: float = 0.0, aggregation: str = "token-mean",
                   **unused) -> LossParts:
    """Supervised warm-up: negative log-likelihood of the target tokens.

    l    = -logp                                                       [B, T]
    loss = aggregation(l, mask)          (token-mean: sum_bt -logp*m / sum_bt m)

    Advantages, old and reference log-probs are unused (the same signature as every policy loss);
    beta must be 0 (no reference policy in the warm-up).
    """
    del old_logps, advantages, unused  # valid_fraction, max_completion_length, eps_low, eps_high
    if beta != 0 or ref_logps is not None:
        raise ValueError("the sft objective has no reference policy: use beta=0")
    logps, _, _, _, mask = _prepare(logps, None, None, jnp.zeros(mask.shape[:1]), mask)
    num, den = AGGREGATIONS.get(aggregation)(-logps, mask)
    zero = jnp.zeros((), jnp.float32)
    sums = {"tokens": jnp.sum(mask), "kl": zero, "ratio": jnp.sum(mask), "clip_low": zero, "clip_high": zero}
    return LossParts(num, den, sums)


def sum_loss_parts(parts: list[LossParts]) -> LossParts:
    """Combine micro-batch parts: numerators, denominators and metric sums all add."""
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *parts)


def loss_value(parts: LossParts) -> jax.Array:
    """numerator / denominator (0 when the denominator is 0: nothing to learn from)."""
    den = parts.denominator
    return jnp.where(den > 0, parts.numerator / jnp.where(den > 0, den, 1.0), 0.0)


def finalize_metrics(metric_sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Token means: kl, ratio (mean importance ratio), clip_low, clip_high, clip_fraction."""
    tokens = jnp.maximum(metric_sums["tokens"], 1.0)
    out = {k: metric_sums[k] / tokens for k in ("kl", "ratio", "clip_low", "clip_high")}
    out["clip_fraction"] = out["clip_low"] + out["clip_high"]
    return out


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, **hparams) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of `grpo_loss_parts` (same arguments) for a whole batch."""
    parts = grpo_loss_parts(logps, old_logps, ref_logps, advantages, mask, **hparams)
    return loss_value(parts), finalize_metrics(parts.metric_sums)


def gpg_loss(logps, old_logps, ref_logps, advantages, mask, **hparams) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of `gpg_loss_parts` (same arguments) for a whole batch."""
    parts = gpg_loss_parts(logps, old_logps, ref_logps, advantages, mask, **hparams)
    return loss_value(parts), finalize_metrics(parts.metric_sums)
