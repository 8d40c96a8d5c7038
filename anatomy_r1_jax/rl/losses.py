"""Policy losses as (numerator, denominator) pairs, so micro-batch accumulation is exact.

Shapes: logps, old_logps, ref_logps, mask [B, T] (completion tokens; mask 1 on real tokens);
advantages [B] (one per sequence); valid_fraction [] (see GPG). Log-probs are those of the sampled
tokens, computed from logits / temperature (METHOD.md section 2).

Every registered policy loss ("grpo", "gpg", "sft") is one entry of `POLICY_LOSSES`: its function
and its own frozen config dataclass (its hyper-parameters), with one signature for all,

    fn(cfg, logps, old_logps, ref_logps, advantages, mask, valid_fraction) -> LossParts

(cfg: that loss's config, e.g. `GRPOLoss`; each ignores the arrays it has no use for), so the
update (train/step.py) calls any of them alike. A run builds the config by field name: each field
`f` of the dataclass is read from `config.rl.f` (`loss_config`; train/step.py `step_configs`), so
`rl.eps_low`, `rl.beta`, `rl.aggregation`, `rl.max_completion_length` are GRPOLoss's fields. A field
named `beta` is the KL weight: the update computes reference log-probs iff it is != 0 (`kl_weight`).

Adding a loss with a new hyper-parameter touches three files:
  1. rl/losses.py: a frozen dataclass (the new knob a field of it), the function, and
     `@register_policy_loss("name", NameLoss)` on the function;
  2. configs/default.py: `c.rl.<knob>` with its default and a comment (select it with rl.loss="name");
  3. a test (tests/test_step_configs.py shows one: the knob read from the config changes the loss).

Over micro-batches m of one batch,

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

import dataclasses
from typing import Any, Callable, NamedTuple

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


class PolicyLoss(NamedTuple):
    """One registry entry: `config`, the loss's frozen dataclass of hyper-parameters (hashable: it
    is part of the update's static config), and `fn(cfg, logps, old_logps, ref_logps, advantages,
    mask, valid_fraction) -> LossParts`."""

    config: type
    fn: PolicyLossFn


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def register_policy_loss(name: str, config: type) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """`@register_policy_loss("grpo", GRPOLoss)` on a loss function: registers it with its config
    class as one entry of POLICY_LOSSES (config.rl.loss names it) and returns the function."""
    if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
        raise TypeError(f"policy loss {name!r}: its config {config!r} must be a frozen dataclass")

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES.register(name)(PolicyLoss(config, fn))
        return fn

    return decorator


def loss_config(name: str, rl) -> Any:
    """The config of policy loss `name`, each of its dataclass fields `f` read from `rl.f` (`rl`:
    config.rl, an ml_collections.ConfigDict or any mapping). An unknown name or a field the config
    lacks raises one line naming them."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"config.rl.loss={name!r} is not a registered policy loss; "
                         f"registered: {POLICY_LOSSES.names()}")
    cls = POLICY_LOSSES.get(name).config
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if f not in rl]
    if missing:
        raise ValueError(f"policy loss {name!r} ({cls.__name__}) reads " + ", ".join(f"config.rl.{f}" for f in missing)
                         + ", which the config lacks: give it a default in configs/default.py")
    return cls(**{f: rl[f] for f in fields})


def kl_weight(cfg) -> float:
    """beta of a loss config (0 for a loss without a `beta` field): the KL penalty's weight; the
    update computes the reference policy's log-probs iff it is != 0."""
    return float(getattr(cfg, "beta", 0.0))


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


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
    """Hyper-parameters of "grpo" (each read from config.rl.<field>): the clip range
    [1 - eps_low, 1 + eps_high], the KL weight beta, the aggregation (AGGREGATIONS) and drgrpo's
    L = max_completion_length (None: the batch's width T)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.04
    aggregation: str = "token-mean"
    max_completion_length: int | None = None


@dataclasses.dataclass(frozen=True)
class GPGLoss:
    """Hyper-parameters of "gpg" (each read from config.rl.<field>): the KL weight beta, the
    aggregation and drgrpo's L = max_completion_length (None: T)."""

    beta: float = 0.0
    aggregation: str = "token-mean"
    max_completion_length: int | None = None


@dataclasses.dataclass(frozen=True)
class SFTLoss:
    """"sft" has no hyper-parameters: a token-mean negative log-likelihood, no reference policy."""


@register_policy_loss("grpo", GRPOLoss)
def grpo_loss_parts(cfg: GRPOLoss, logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array | None,
                    advantages: jax.Array, mask: jax.Array, valid_fraction: jax.Array | float = 1.0) -> LossParts:
    """Clipped GRPO surrogate with a k3 KL penalty.

    ratio = exp(logp - old_logp)                                       [B, T]
    l     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3(logp, ref)
    loss  = aggregation(l, mask)

    With num_iterations = 1 pass old_logps = stop_gradient(logps): ratio == 1, the clip is
    inactive and grad = aggregation of (-A + beta * (1 - exp(ref - logp))) * grad(logp).
    ref_logps may be None when cfg.beta == 0. valid_fraction is unused (one signature for every
    policy loss).
    """
    del valid_fraction
    logps, old_logps, ref_logps, adv, mask = _prepare(logps, old_logps, ref_logps, advantages, mask)
    kl = _kl_term(logps, ref_logps, cfg.beta)
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    if cfg.beta != 0:
        per_token = per_token + cfg.beta * kl
    num, den = AGGREGATIONS.get(cfg.aggregation)(per_token, mask, max_completion_length=cfg.max_completion_length)
    ratio_sg, adv_b = jax.lax.stop_gradient(ratio), jnp.broadcast_to(adv, ratio.shape)
    sums = {
        "tokens": jnp.sum(mask),
        "kl": jnp.sum(jax.lax.stop_gradient(kl) * mask),
        "ratio": jnp.sum(ratio_sg * mask),
        "clip_low": jnp.sum(((ratio_sg < 1.0 - cfg.eps_low) & (adv_b < 0)) * mask),
        "clip_high": jnp.sum(((ratio_sg > 1.0 + cfg.eps_high) & (adv_b > 0)) * mask),
    }
    return LossParts(num, den, sums)


@register_policy_loss("gpg", GPGLoss)
def gpg_loss_parts(cfg: GPGLoss, logps: jax.Array, old_logps: jax.Array | None, ref_logps: jax.Array | None,
                   advantages: jax.Array, mask: jax.Array, valid_fraction: jax.Array | float) -> LossParts:
    """GPG baseline: plain policy gradient rescaled by the fraction of informative groups.

    l     = -logp * A + beta * k3(logp, ref)                           [B, T]
    alpha = 1 / valid_fraction  (1 when valid_fraction == 0: then every A is 0 anyway)
    loss  = alpha * aggregation(l, mask)

    valid_fraction is the fraction of groups of the *whole batch* whose rewards are not all equal
    (`advantages.valid_group_fraction(rewards, G)`); compute it once per batch and pass the same
    value to every micro-batch so accumulation stays exact. old_logps only feeds the ratio metric.
    """
    logps, old_logps, ref_logps, adv, mask = _prepare(logps, old_logps, ref_logps, advantages, mask)
    kl = _kl_term(logps, ref_logps, cfg.beta)
    per_token = -logps * adv
    if cfg.beta != 0:
        per_token = per_token + cfg.beta * kl
    frac = jnp.asarray(valid_fraction, jnp.float32)
    alpha = jnp.where(frac > 0, 1.0 / jnp.where(frac > 0, frac, 1.0), 1.0)
    num, den = AGGREGATIONS.get(cfg.aggregation)(per_token, mask, max_completion_length=cfg.max_completion_length)
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


@register_policy_loss("sft", SFTLoss)
def sft_loss_parts(cfg: SFTLoss, logps: jax.Array, old_logps: jax.Array | None, ref_logps: jax.Array | None,
                   advantages: jax.Array, mask: jax.Array, valid_fraction: jax.Array | float = 1.0) -> LossParts:
    """Supervised warm-up: negative log-likelihood of the target tokens.

    l    = -logp                                                       [B, T]
    loss = sum_bt -logp*m / sum_bt m                                   (token-mean)

    Advantages, old log-probs and valid_fraction are unused (the same signature as every policy
    loss); ref_logps must be None (no reference policy in the warm-up).
    """
    del cfg, old_logps, advantages, valid_fraction
    if ref_logps is not None:
        raise ValueError("the sft objective has no reference policy: pass ref_logps=None")
    logps, _, _, _, mask = _prepare(logps, None, None, jnp.zeros(mask.shape[:1]), mask)
    num, den = token_mean(-logps, mask)
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


def grpo_loss(cfg: GRPOLoss, *arrays) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of `grpo_loss_parts` (same arguments) for a whole batch."""
    parts = grpo_loss_parts(cfg, *arrays)
    return loss_value(parts), finalize_metrics(parts.metric_sums)


def gpg_loss(cfg: GPGLoss, *arrays) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of `gpg_loss_parts` (same arguments) for a whole batch."""
    parts = gpg_loss_parts(cfg, *arrays)
    return loss_value(parts), finalize_metrics(parts.metric_sums)
