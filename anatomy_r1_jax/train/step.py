"""The pure GRPO / SFT update: `(state, batch) -> (state, metrics)`, compiled once.

Batches carry a leading micro-batch axis M (micro-batches hold whole groups). Gradients of the
loss numerators are summed over a `lax.scan` and divided by the summed denominators once, which
equals the full-batch gradient exactly (losses are (numerator, denominator) pairs).

    A      = advantage_fn(rewards [M*n], G)               (groups contiguous)
    mask   = completion mask [* valid group, when cfg.drop_invalid_groups]
    grad   = sum_m grad(num_m(params)) / sum_m den_m      (accumulated in the policy's grads dtype)
    params = optax update (clip by global norm, AdamW, schedule), skipped when non-finite

Every dtype follows the run's precision policy (train/precision.py): weights, compute, gradients,
optimizer moments and an optional float32 master copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from anatomy_r1_jax.models import lora
from anatomy_r1_jax.rl import advantages as adv_lib
from anatomy_r1_jax.rl import losses
from anatomy_r1_jax.rl.batch import TrainBatch
from anatomy_r1_jax.train import precision as precision_lib
from anatomy_r1_jax.train.logprobs import completion_logps
from anatomy_r1_jax.train.precision import Precision


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the update (hashable)."""

    objective: str = "grpo"  # a registered policy loss (rl/losses.py: "grpo", "gpg", "sft")
    group_size: int = 8
    advantage: str = "grpo"
    temperature: float = 0.9
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.04
    aggregation: str = "token-mean"
    max_completion_length: int | None = None
    logp_chunk: int = 128
    num_categories: int = 1
    precision: Precision = Precision()
    old_logps: str = "current"  # "current": stop_gradient(logps) (ratio 1); "batch": batch.completions.logps
    # DAPO-style dynamic sampling "drop": groups with all-equal rewards get zero weight (their tokens
    # leave the loss, its KL term and its denominator, so the loss is normalised by the valid groups).
    drop_invalid_groups: bool = False


@flax.struct.dataclass
class TrainState:
    """step []; params: trainable nnx.State; frozen: the rest of the model (e.g. a frozen vision
    tower; with LoRA every base weight); ref_params: the reference policy's trainable part (None
    when beta == 0, and in a LoRA run, whose reference is the base model: `reference_model`);
    opt_state: optax state (of `master` when there is one, else of `params`); master: the float32
    master copy of params (None unless the precision policy keeps one)."""

    step: jax.Array
    params: Any
    frozen: Any
    ref_params: Any
    opt_state: Any
    master: Any = None


def make_optimizer(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0, grad_clip: float = 1.0,
                   b1: float = 0.9, b2: float = 0.999,
                   max_consecutive_errors: int = 1_000_000) -> optax.GradientTransformation:
    """Clip by global norm -> AdamW; an update whose gradients are not finite is skipped
    (`optax.apply_if_finite`), so a NaN never reaches the parameters or a checkpoint. The updates
    leave in the gradients' dtype (the cond's branches must agree; a float32 learning rate or
    weight decay would otherwise promote bf16 updates). Initialise and apply it with
    precision.init_optimizer / precision.apply_gradients."""
    tx = optax.chain(optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
                     optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.apply_if_finite(_keep_update_dtype(tx), max_consecutive_errors)


def _keep_update_dtype(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    def update(grads, state, params=None):
        updates, state = inner.update(grads, state, params)
        return jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads), state

    return optax.GradientTransformation(inner.init, update)


def _loss_parts(cfg: StepConfig, logps, old_logps, ref_logps, advantages, mask, valid_fraction):
    """The configured objective (rl/losses.py POLICY_LOSSES: one signature for all)."""
    return losses.POLICY_LOSSES.get(cfg.objective)(
        logps, old_logps, ref_logps, advantages, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
        aggregation=cfg.aggregation, max_completion_length=cfg.max_completion_length, valid_fraction=valid_fraction)


def reference_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The KL reference policy: the reference copy merged with the frozen rest or, in a LoRA run
    (no copy: ref_params None), the policy with its adapters switched off, i.e. the frozen base
    weights alone (models/lora.py)."""
    if state.ref_params is not None:
        return nnx.merge(graphdef, state.ref_params, state.frozen)
    model = nnx.merge(graphdef, state.params, state.frozen)
    if not lora.has_adapters(model):
        raise ValueError("rl.beta != 0 needs a reference policy: build the train state with reference=True "
                         "(or give the model LoRA adapters, whose reference is the base model)")
    return lora.without_adapters(model)


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: StepConfig, state: TrainState,
               batch: TrainBatch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update. batch arrays are [M, n, ...] (pixel values [M, P, D]).

    Old log-probs (the ratio's denominator): cfg.old_logps == "batch" reads them from
    batch.completions.logps (num_iterations > 1: computed once before the iterations, so iterations
    2..N have ratio != 1 and the clip acts); "current" uses stop_gradient(logps) (one iteration:
    ratio 1, the on-policy gradient)."""
    m, n = batch.rewards.shape
    g = cfg.group_size
    rewards = batch.rewards.reshape(-1)
    advantages = adv_lib.ADVANTAGES.get(cfg.advantage)(rewards, g)
    invalid = adv_lib.invalid_group_mask(rewards, g)
    valid_fraction = 1.0 - jnp.mean(invalid.astype(jnp.float32))
    advantages = advantages.reshape(m, n)
    keep = jnp.repeat(~invalid, g).reshape(m, n) if cfg.drop_invalid_groups else jnp.ones((m, n), bool)

    # The reference's log-probs of every micro-batch first, outside jax.grad (no gradient flows to
    # it, and nnx.remat inside the grad trace cannot update Variables merged from outer-trace state)
    # and in a pass of their own: the reference's weights (and any backend copies of them, e.g.
    # XLA:CPU's float32 upcasts of bf16 weights) are then dead before the gradient pass's policy
    # weights, gradient accumulator and saved activations exist, instead of live beside them.
    ref_logps = (_batch_logps(lambda: reference_model(graphdef, state), batch, cfg.temperature, cfg.logp_chunk, g)
                 if cfg.beta != 0 else None)

    def micro(carry, xs):
        grad_acc, parts_acc, entropy_acc = carry  # entropy_acc: (sum over completion tokens, their count)
        mb, adv_m, keep_m, ref = xs

        ids, mask = mb.completions.ids, mb.completions.mask
        loss_mask = mask * keep_m[:, None].astype(mask.dtype)

        def numerator(params):
            model = nnx.merge(graphdef, params, state.frozen)
            logps, entropy = completion_logps(model, mb.prompt, ids, mask, cfg.temperature, cfg.logp_chunk, g)
            old = mb.completions.logps if cfg.old_logps == "batch" else jax.lax.stop_gradient(logps)
            parts = _loss_parts(cfg, logps, old, ref, adv_m, loss_mask, valid_fraction)
            ent = jnp.sum(jax.lax.stop_gradient(entropy) * mask)  # every sampled token, dropped groups too
            return parts.numerator, (parts, ent)

        grads, (parts, ent) = jax.grad(numerator, has_aux=True)(state.params)
        grad_acc = jax.tree.map(lambda acc, gr: acc + gr.astype(acc.dtype), grad_acc, grads)
        parts_acc = jax.tree.map(jnp.add, parts_acc, parts)
        return (grad_acc, parts_acc, (entropy_acc[0] + ent, entropy_acc[1] + jnp.sum(mask))), None

    policy = cfg.precision
    precision_lib.check_weights(policy, state.params)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, policy.grad_dtype), state.params)
    zero = jnp.zeros((), jnp.float32)
    parts0 = losses.LossParts(zero, zero, {k: zero for k in ("tokens", "kl", "ratio", "clip_low", "clip_high")})
    xs = (batch, advantages, keep, ref_logps)
    (grads, parts, (entropy, tokens)), _ = jax.lax.scan(micro, (zeros, parts0, (zero, zero)), xs)
    den = jnp.maximum(parts.denominator, 1e-8)
    grads = jax.tree.map(lambda x: (x / den).astype(x.dtype), grads)
    params, master, opt_state = precision_lib.apply_gradients(tx, policy, state.params, state.master,
                                                              state.opt_state, grads)
    new_state = state.replace(step=state.step + 1, params=params, master=master, opt_state=opt_state)

    grad_norm = optax.tree.norm(precision_lib.cast(grads, jnp.float32))
    metrics = {"loss": losses.loss_value(parts), "grad_norm": grad_norm,
               "entropy": entropy / jnp.maximum(tokens, 1.0),  # the policy's, per sampled token
               "update_skipped": 1 - opt_state.last_finite.astype(jnp.int32),
               # since the phase's optimizer began (its state is checkpointed, so a resumed run counts on)
               "updates_skipped_total": opt_state.total_notfinite, "updates_skipped_consecutive": opt_state.notfinite_count,
               **losses.finalize_metrics(parts.metric_sums)}
    cats = batch.categories.reshape(-1)[::g]
    bad, total = adv_lib.invalid_counts_by_category(invalid, jnp.maximum(cats, 0), cfg.num_categories)
    metrics.update({"invalid_gradient_ratio": 1.0 - valid_fraction, "invalid_groups_by_category": bad,
                    "groups_by_category": total, "advantage_abs_mean": jnp.mean(jnp.abs(advantages))})
    return new_state, metrics


def _batch_logps(make_model, batch: TrainBatch, temperature: float, chunk: int, group_size: int) -> jax.Array:
    """[M, n, T] log-probs of every micro-batch's completions under `make_model()` (an nnx module
    merged inside the traced map), one micro-batch at a time (`lax.map`)."""

    def one(mb):
        return completion_logps(make_model(), mb.prompt, mb.completions.ids, mb.completions.mask, temperature, chunk,
                                group_size)[0]

    return jax.lax.map(one, batch)


def policy_logps(graphdef: nnx.GraphDef, state: TrainState, batch: TrainBatch, temperature: float,
                 chunk: int = 128, group_size: int = 1) -> jax.Array:
    """[M, n, T] log-probs of the batch's completions under the current policy (the old log-probs of
    num_iterations > 1, computed once before the iterations; masked tokens 0)."""
    logps = _batch_logps(lambda: nnx.merge(graphdef, state.params, state.frozen), batch, temperature, chunk,
                         group_size)
    return logps * batch.completions.mask
