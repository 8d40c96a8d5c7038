"""The pure GRPO / SFT update: `(state, batch) -> (state, metrics)`, and its parts.

Micro-batches hold whole groups. Gradients of the loss numerators are summed over micro-batches
and divided by the summed denominators once, which equals the full-batch gradient exactly (losses
are (numerator, denominator) pairs).

    A      = advantage_fn(rewards [M*n], G)               (per group, over the whole step)
    mask   = completion mask [* valid group, when cfg.drop_invalid_groups]
    grad   = sum_m grad(num_m(params)) / sum_m den_m      (accumulated in the policy's grads dtype)
    params = optax update (clip by global norm, AdamW, schedule), skipped when non-finite

Two ways to run it, one arithmetic: `train_step` takes the padded batch [M, n, T] and scans over
its micro-batches in one program; the length-aware update (train/compiled.py LengthAwareUpdate)
calls the same parts, `step_statistics` -> `reference_logps` / `accumulate_micro_batch` per
micro-batch, each trimmed to its own length -> `apply_accumulated`, as programs of their own.

Every dtype follows the run's precision policy (runtime/precision.py): weights, compute, gradients,
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
from anatomy_r1_jax.data.batch import TrainBatch
from anatomy_r1_jax.runtime import precision as precision_lib
from anatomy_r1_jax.train.logprobs import completion_logps
from anatomy_r1_jax.runtime.precision import Precision


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the update (hashable). `loss` is the objective's own config (rl/losses.py,
    e.g. GRPOLoss(eps_low, eps_high, beta, aggregation, max_completion_length)); None: its defaults.
    A run builds its StepConfigs from the run config with `step_configs`."""

    objective: str = "grpo"  # a registered policy loss (rl/losses.py POLICY_LOSSES: "grpo", "gpg", "sft")
    loss: Any = None
    group_size: int = 8
    advantage: str = "grpo"
    temperature: float = 0.9
    logp_chunk: int = 128
    num_categories: int = 1
    precision: Precision = Precision()
    old_logps: str = "current"  # "current": stop_gradient(logps) (ratio 1); "batch": batch.completions.logps
    # DAPO-style dynamic sampling "drop": groups with all-equal rewards get zero weight (their tokens
    # leave the loss, its KL term and its denominator, so the loss is normalised by the valid groups).
    drop_invalid_groups: bool = False

    def __post_init__(self):
        config = losses.POLICY_LOSSES.get(self.objective).config
        if self.loss is None:
            object.__setattr__(self, "loss", config())
        elif not isinstance(self.loss, config):
            raise TypeError(f"StepConfig(objective={self.objective!r}) takes loss={config.__name__}(...), "
                            f"not {type(self.loss).__name__}")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss has a KL term (its config's beta != 0): the reference policy's log-probs."""
        return losses.kl_weight(self.loss) != 0


def step_configs(config, *, num_categories: int = 1, precision: Precision | None = None) -> dict[str, StepConfig]:
    """A run's updates from its config: {"grpo": the RL update, "sft": the supervised warm-up}.

    Both: temperature rl.temperature (the warm-up's 1.0), logp_chunk train.logp_chunk,
    max(1, num_categories) reward categories, `precision` (None: Precision.from_config).
    grpo: objective rl.loss with its config read from config.rl by field name (rl/losses.py
    loss_config), group_size rl.group_size, advantage rl.advantage, old log-probs from the batch
    when rl.num_iterations > 1, all-equal groups dropped when rl.dynamic_sampling == "drop".
    sft: objective "sft", no advantage, groups of 1."""
    c = config
    common = dict(temperature=c.rl.temperature, logp_chunk=c.train.logp_chunk, num_categories=max(1, num_categories),
                  precision=Precision.from_config(c) if precision is None else precision)
    grpo = StepConfig(objective=c.rl.loss, loss=losses.loss_config(c.rl.loss, c.rl), group_size=c.rl.group_size,
                      advantage=c.rl.advantage, old_logps="batch" if c.rl.num_iterations > 1 else "current",
                      drop_invalid_groups=c.rl.dynamic_sampling == "drop", **common)
    sft = StepConfig(objective="sft", loss=losses.loss_config("sft", c.rl), advantage="none", group_size=1,
                     **{**common, "temperature": 1.0})
    return {"grpo": grpo, "sft": sft}


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
    """The configured objective with its own config (rl/losses.py POLICY_LOSSES: one signature for all)."""
    return losses.POLICY_LOSSES.get(cfg.objective).fn(cfg.loss, logps, old_logps, ref_logps, advantages, mask,
                                                      valid_fraction)


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


@flax.struct.dataclass
class StepStatistics:
    """What the update needs of the whole step before any micro-batch: advantages [M, n] (each
    group's from its own rewards), keep [M, n] bool (False on rows of all-equal groups when
    cfg.drop_invalid_groups), valid_fraction [] (fraction of the step's groups whose rewards
    differ: GPG's 1 / alpha) and the step's group metrics (invalid ratio, per-category counts,
    mean |A|)."""

    advantages: jax.Array
    keep: jax.Array
    valid_fraction: jax.Array
    metrics: dict


def step_statistics(cfg: StepConfig, rewards: jax.Array, categories: jax.Array) -> StepStatistics:
    """StepStatistics of a step's rewards and categories [M, n] (groups contiguous, whole groups per
    micro-batch; any order of the groups):

        A       = advantage_fn(rewards [M*n], G)
        invalid = all rewards of the group equal                  [M*n / G]
        valid   = 1 - mean(invalid)"""
    m, n = rewards.shape
    g = cfg.group_size
    flat = rewards.reshape(-1)
    advantages = adv_lib.ADVANTAGES.get(cfg.advantage)(flat, g).reshape(m, n)
    invalid = adv_lib.all_equal_groups(flat, g)
    valid_fraction = 1.0 - jnp.mean(invalid.astype(jnp.float32))
    keep = jnp.repeat(~invalid, g).reshape(m, n) if cfg.drop_invalid_groups else jnp.ones((m, n), bool)
    cats = categories.reshape(-1)[::g]
    bad, total = adv_lib.invalid_counts_by_category(invalid, jnp.maximum(cats, 0), cfg.num_categories)
    metrics = {"invalid_gradient_ratio": 1.0 - valid_fraction, "invalid_groups_by_category": bad,
               "groups_by_category": total, "advantage_abs_mean": jnp.mean(jnp.abs(advantages))}
    return StepStatistics(advantages, keep, valid_fraction, metrics)


@flax.struct.dataclass
class Accumulator:
    """Sums over the micro-batches of one step: grads (the loss numerators' gradients, like params
    in the policy's grads dtype), parts (LossParts of scalars: numerators, denominators, metric
    sums), entropy (sum over sampled tokens) and tokens (their count)."""

    grads: Any
    parts: losses.LossParts
    entropy: jax.Array
    tokens: jax.Array


def zero_accumulator(policy: Precision, params) -> Accumulator:
    zero = jnp.zeros((), jnp.float32)
    parts = losses.LossParts(zero, zero, {k: zero for k in ("tokens", "kl", "ratio", "clip_low", "clip_high")})
    return Accumulator(grads=jax.tree.map(lambda p: jnp.zeros(p.shape, policy.grad_dtype), params), parts=parts,
                       entropy=zero, tokens=zero)


def accumulate_micro_batch(graphdef: nnx.GraphDef, cfg: StepConfig, state: TrainState, acc: Accumulator,
                           mb: TrainBatch, advantages: jax.Array, keep: jax.Array, ref_logps: jax.Array | None,
                           valid_fraction: jax.Array) -> Accumulator:
    """acc + one micro-batch's terms. mb arrays are [n, ...] with completions [n, T_m] for any T_m
    (the length-aware update trims each micro-batch; padding beyond a row's end is masked, so T_m
    changes nothing but the work); advantages, keep [n]; ref_logps [n, T_m] or None (not cfg.needs_reference).

        grads  += grad_params num_m(params)       (in the policy's grads dtype)
        parts  += (num_m, den_m, metric sums_m)   (rl/losses.py)
        entropy += sum_t H_t * mask_t,  tokens += sum_t mask_t
    """
    precision_lib.check_weights(cfg.precision, state.params)
    ids, mask = mb.completions.ids, mb.completions.mask
    loss_mask = mask * keep[:, None].astype(mask.dtype)

    def numerator(params):
        model = nnx.merge(graphdef, params, state.frozen)
        logps, entropy = completion_logps(model, mb.prompt, ids, mask, cfg.temperature, cfg.logp_chunk,
                                          cfg.group_size)
        old = mb.completions.logps if cfg.old_logps == "batch" else jax.lax.stop_gradient(logps)
        parts = _loss_parts(cfg, logps, old, ref_logps, advantages, loss_mask, valid_fraction)
        ent = jnp.sum(jax.lax.stop_gradient(entropy) * mask)  # every sampled token, dropped groups too
        return parts.numerator, (parts, ent)

    grads, (parts, ent) = jax.grad(numerator, has_aux=True)(state.params)
    return Accumulator(grads=jax.tree.map(lambda a, gr: a + gr.astype(a.dtype), acc.grads, grads),
                       parts=jax.tree.map(jnp.add, acc.parts, parts), entropy=acc.entropy + ent,
                       tokens=acc.tokens + jnp.sum(mask))


def apply_accumulated(tx: optax.GradientTransformation, cfg: StepConfig, state: TrainState, acc: Accumulator,
                      group_metrics: dict) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer step from a whole step's sums: grad = acc.grads / max(sum_m den_m, 1e-8), then
    precision.apply_gradients (clip, AdamW, skipped when non-finite); the metrics of the step."""
    den = jnp.maximum(acc.parts.denominator, 1e-8)
    grads = jax.tree.map(lambda x: (x / den).astype(x.dtype), acc.grads)
    params, master, opt_state = precision_lib.apply_gradients(tx, cfg.precision, state.params, state.master,
                                                              state.opt_state, grads)
    new_state = state.replace(step=state.step + 1, params=params, master=master, opt_state=opt_state)
    metrics = {"loss": losses.loss_value(acc.parts), "grad_norm": optax.tree.norm(precision_lib.cast(grads, jnp.float32)),
               "entropy": acc.entropy / jnp.maximum(acc.tokens, 1.0),  # the policy's, per sampled token
               "update_skipped": 1 - opt_state.last_finite.astype(jnp.int32),
               # since the phase's optimizer began (its state is checkpointed, so a resumed run counts on)
               "updates_skipped_total": opt_state.total_notfinite,
               "updates_skipped_consecutive": opt_state.notfinite_count,
               **losses.finalize_metrics(acc.parts.metric_sums), **group_metrics}
    return new_state, metrics


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: StepConfig, state: TrainState,
               batch: TrainBatch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update over the padded batch: arrays [M, n, ...] (pixel values [M, P, D]), every
    micro-batch at the full completion length T, accumulated in one `lax.scan` (the SFT update,
    and the GRPO update with train.length_buckets = 0; the length-aware update is
    train/compiled.py LengthAwareUpdate, the same functions called per micro-batch).

    Old log-probs (the ratio's denominator): cfg.old_logps == "batch" reads them from
    batch.completions.logps (num_iterations > 1: computed once before the iterations, so iterations
    2..N have ratio != 1 and the clip acts); "current" uses stop_gradient(logps) (one iteration:
    ratio 1, the on-policy gradient)."""
    stats = step_statistics(cfg, batch.rewards, batch.categories)
    # The reference's log-probs of every micro-batch first, outside jax.grad (no gradient flows to
    # it, and nnx.remat inside the grad trace cannot update Variables merged from outer-trace state)
    # and in a pass of their own: the reference's weights (and any backend copies of them, e.g.
    # XLA:CPU's float32 upcasts of bf16 weights) are then dead before the gradient pass's policy
    # weights, gradient accumulator and saved activations exist, instead of live beside them.
    ref_logps = (jax.lax.map(lambda mb: reference_logps(graphdef, cfg, state, mb), batch) if cfg.needs_reference
                 else None)

    def micro(acc, xs):
        mb, adv_m, keep_m, ref = xs
        return accumulate_micro_batch(graphdef, cfg, state, acc, mb, adv_m, keep_m, ref, stats.valid_fraction), None

    acc, _ = jax.lax.scan(micro, zero_accumulator(cfg.precision, state.params),
                          (batch, stats.advantages, stats.keep, ref_logps))
    return apply_accumulated(tx, cfg, state, acc, stats.metrics)


def reference_logps(graphdef: nnx.GraphDef, cfg: StepConfig, state: TrainState, mb: TrainBatch) -> jax.Array:
    """[n, T_m] log-probs of one micro-batch's completions under the KL reference policy."""
    return completion_logps(reference_model(graphdef, state), mb.prompt, mb.completions.ids, mb.completions.mask,
                            cfg.temperature, cfg.logp_chunk, cfg.group_size)[0]


def current_logps(graphdef: nnx.GraphDef, cfg: StepConfig, state: TrainState, mb: TrainBatch) -> jax.Array:
    """[n, T_m] log-probs of one micro-batch's completions under the current policy (masked tokens
    0): the old log-probs of num_iterations > 1 in the length-aware update."""
    logps = completion_logps(nnx.merge(graphdef, state.params, state.frozen), mb.prompt, mb.completions.ids,
                             mb.completions.mask, cfg.temperature, cfg.logp_chunk, cfg.group_size)[0]
    return logps * mb.completions.mask


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
