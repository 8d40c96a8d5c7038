"""Where the update's compiled functions are built: the train state, the update, the old log-probs.

Every function here is traced inside `sharding.use_rules(mesh, rules)` (the context is entered in
the traced body, so whenever jax traces it, the models' activation constraints are active) and
compiled with the train state's shardings as in- and outputs:

    state shardings   params / frozen / reference / master: each Variable's logical axes -> rules;
                      AdamW moments: their parameter's; step and optimizer counters: replicated
    update            (state, batch [M, n, ...]) -> (state, metrics)   donated state, metrics replicated
    old log-probs     (state, batch) -> [M, n, T]                       (num_iterations > 1)
    length-aware      (state, micro-batches [n, T_m] each) -> (state, metrics): per step a statistics
    update            program, per micro-batch a reference and an accumulate program (one compiled
                      shape per bucket length T_m, the accumulator donated), then an apply program
                      (state donated); `LengthAwareUpdate`
    rollout, generate runtime/programs.py (RolloutPrograms, which Programs extends)

The trainer, the evaluator, the benchmarks and the tests build their programs here, so a test of
the sharded update tests the program training runs. Batches are placed by
`placement.put_batch` (rows on the mesh axes of the logical `activation_batch` axis) before the call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from anatomy_r1_jax.models import lora
from anatomy_r1_jax.data.batch import TrainBatch
from anatomy_r1_jax.runtime.placement import place_state, split_model
from anatomy_r1_jax.runtime.precision import Precision, init_optimizer
from anatomy_r1_jax.runtime.programs import RolloutPrograms, traced_under_rules
from anatomy_r1_jax.train import step as step_lib
from anatomy_r1_jax.train.step import StepConfig, TrainState, policy_logps, train_step


@dataclasses.dataclass(frozen=True)
class Programs(RolloutPrograms):
    """The compiled functions of one model (graphdef) on one mesh under one set of logical rules:
    the rollout's (runtime/programs.py) and the train state's and update's."""

    # ---- the train state ----------------------------------------------------------------------
    def init_state(self, tx: optax.GradientTransformation, precision: Precision, params, frozen, *,
                   reference: bool) -> TrainState:
        """The initial TrainState, every leaf placed: params / frozen on their rules' shardings, a
        reference copy (when `reference`), the master copy and AdamW moments on their parameter's
        sharding, step and counters replicated int32. The update's outputs have exactly these
        shardings and types, so it compiles once."""
        params, frozen = place_state(params, self.mesh, self.rules), place_state(frozen, self.mesh, self.rules)
        master, opt_state = self.init_optimizer(tx, precision, params)
        ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=_shardings(params))(params) if reference \
            else None
        step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        return TrainState(step=step, params=params, frozen=frozen, ref_params=ref, opt_state=opt_state, master=master)

    def init_optimizer(self, tx: optax.GradientTransformation, precision: Precision, params):
        """(master, opt_state) of placed `params` (precision.init_optimizer), placed: moments and the
        master copy like their parameter, everything else replicated."""
        init = functools.partial(init_optimizer, tx, precision)
        abstract_master, abstract_opt = jax.eval_shape(init, params)
        param_sh = _shardings(params)
        master_sh = None if abstract_master is None else param_sh
        opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                       transform_non_params=lambda _: self.replicated)
        return jax.jit(init, out_shardings=(master_sh, opt_sh))(params)

    def reset_optimizer(self, tx: optax.GradientTransformation, precision: Precision, state: TrainState) -> TrainState:
        """`state` with a fresh optimizer (moments 0, schedule count 0) for the next phase; the
        master copy restarts from the current weights."""
        master, opt_state = self.init_optimizer(tx, precision, state.params)
        return state.replace(master=master, opt_state=opt_state)

    def copy_params(self, state: TrainState, *, reference: bool) -> TrainState:
        """`state` whose reference policy is its current policy: with `reference`, a copy of its
        current params (rl.beta != 0), or in a LoRA run (reference = adapters off) the adapters folded
        into the frozen base weights and restarted from zero (models/lora.py fold_adapters); else
        unchanged."""
        if reference:
            ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=_shardings(state.params))(state.params)
            return state.replace(ref_params=ref)
        if not lora.has_adapters(nnx.merge(self.graphdef, state.params, state.frozen)):
            return state

        trainable = {path for path, _ in nnx.to_flat_state(state.params)}

        def fold(params, frozen):  # split again as before: the same paths trainable
            model = lora.fold_adapters(nnx.merge(self.graphdef, params, frozen))
            _, params, frozen = nnx.split(model, lambda path, _: tuple(path) in trainable, ...)
            return params, frozen

        out = (_shardings(state.params), _shardings(state.frozen))
        params, frozen = jax.jit(fold, out_shardings=out, donate_argnums=(0, 1))(state.params, state.frozen)
        return state.replace(params=params, frozen=frozen)

    def switch_trainable(self, state: TrainState, trains: str, freeze_vision: bool) -> TrainState:
        """`state` whose trainable part is `trains` (placement.split_model): the same arrays split
        anew into params / frozen; the graphdef, and so every program but the update, is unchanged.
        A LoRA run's full warm-up -> GRPO ("base" -> "adapters"): the warm-up's weights become the
        frozen base, and so the KL reference (adapters off), and the adapters, still at B = 0 (the
        policy is the warm-up model), the trainable part. Reset the optimizer (`reset_optimizer`) and
        build the update (`update`) for the new state."""
        _, params, frozen = split_model(nnx.merge(self.graphdef, state.params, state.frozen), freeze_vision, trains)
        return state.replace(params=params, frozen=frozen)

    # ---- the update ---------------------------------------------------------------------------
    def update(self, tx: optax.GradientTransformation, cfg: StepConfig, state: TrainState):
        """Jitted `(state, batch) -> (state, metrics)` (train/step.py train_step), the state donated
        and kept on `state`'s shardings, metrics replicated: built for `state`'s trainable part (one
        update per phase when the phases train different parts, `switch_trainable`)."""
        state_sh = _shardings(state)
        step = traced_under_rules(functools.partial(train_step, self.graphdef, tx, cfg), self.mesh, self.rules)
        return jax.jit(step, in_shardings=(state_sh, None), out_shardings=(state_sh, self.replicated),
                       donate_argnums=0)

    def old_logps(self, cfg: StepConfig):
        """Jitted `(state, batch) -> [M, n, T]`: the batch's completion log-probs under the current
        policy at cfg.temperature (step.policy_logps), rows sharded like the batch."""
        fn = lambda state, batch: policy_logps(self.graphdef, state, batch, cfg.temperature,  # noqa: E731
                                               cfg.logp_chunk, cfg.group_size)
        return jax.jit(traced_under_rules(fn, self.mesh, self.rules))

    def length_aware_update(self, tx: optax.GradientTransformation, cfg: StepConfig, state: TrainState,
                            lengths: tuple[int, ...]) -> "LengthAwareUpdate":
        """The GRPO update over micro-batches each trimmed to its own bucket length (one of `lengths`,
        train/micro_batches.py): `LengthAwareUpdate`, built for `state`'s trainable part."""
        return LengthAwareUpdate.build(self, tx, cfg, state, lengths)

def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


@dataclasses.dataclass(frozen=True)
class LengthAwareUpdate:
    """`(state, micro) -> (state, metrics)`: the GRPO update of one step whose micro-batches
    `micro` (a tuple of M placed TrainBatches [n, ...], completions [n, T_m], T_m in `lengths`)
    are trimmed to their own lengths (train/micro_batches.py plans them). The same arithmetic as
    `Programs.update` (train/step.py: the same functions), run as programs of their own:

        stats       = statistics(rewards_m, categories_m for all m)   advantages, keep, valid fraction
        acc         = zeros()                                         grads like params, sums 0
        for m:      ref_m = reference[T_m](state, micro_m)            (beta != 0; a pass of its own)
                    acc   = accumulate[T_m](state, acc, micro_m, A_m, keep_m, ref_m, valid)  acc donated
        state, met  = apply(state, acc, stats metrics)                 state donated

    Each jitted function compiles once per bucket length (a handful), under the trainer's shardings
    (state and accumulator on the params' shardings, scalars replicated). Nothing returns to the
    host between micro-batches: the loop only dispatches."""

    lengths: tuple[int, ...]
    statistics: Callable
    zeros: Callable
    reference: Callable | None
    accumulate: Callable
    apply: Callable
    current_logps: Callable

    @classmethod
    def build(cls, programs: "Programs", tx, cfg: StepConfig, state: TrainState, lengths) -> "LengthAwareUpdate":
        loss = cfg.loss  # (a loss config with an aggregation: GRPOLoss, GPGLoss)
        if getattr(loss, "aggregation", None) == "drgrpo" and getattr(loss, "max_completion_length", 0) is None:
            raise ValueError("the length-aware update trims completions: drgrpo's denominator needs "
                             f"{type(loss).__name__}.max_completion_length (the padded T), not the trimmed width")
        g, rules = programs.graphdef, (programs.mesh, programs.rules)
        state_sh, rep = _shardings(state), programs.replicated
        acc_sh = step_lib.Accumulator(grads=state_sh.params, parts=jax.tree.map(
            lambda _: rep, step_lib.zero_accumulator(cfg.precision, {}).parts), entropy=rep, tokens=rep)

        def statistics(rewards, categories):
            stats = step_lib.step_statistics(cfg, jnp.stack(rewards), jnp.stack(categories))
            return (tuple(stats.advantages), tuple(stats.keep), stats.valid_fraction, stats.metrics)

        jit = lambda fn, **kw: jax.jit(traced_under_rules(fn, *rules), **kw)  # noqa: E731
        reference = functools.partial(step_lib.reference_logps, g, cfg)
        accumulate = functools.partial(step_lib.accumulate_micro_batch, g, cfg)
        apply = functools.partial(step_lib.apply_accumulated, tx, cfg)
        return cls(
            lengths=tuple(sorted(lengths)),
            statistics=jit(statistics, out_shardings=(None, None, rep, rep)),
            zeros=jax.jit(lambda params: step_lib.zero_accumulator(cfg.precision, params), out_shardings=acc_sh),
            reference=jit(reference, in_shardings=(state_sh, None)) if cfg.needs_reference else None,
            accumulate=jit(accumulate, in_shardings=(state_sh, acc_sh, None, None, None, None, rep),
                           out_shardings=acc_sh, donate_argnums=1),
            # (the accumulator is not donated to apply: every output aliases a state buffer already)
            apply=jit(apply, in_shardings=(state_sh, acc_sh, rep), out_shardings=(state_sh, rep), donate_argnums=0),
            current_logps=jit(functools.partial(step_lib.current_logps, g, cfg), in_shardings=(state_sh, None)))

    def _check(self, micro) -> None:
        widths = [mb.completions.ids.shape[-1] for mb in micro]
        if any(w not in self.lengths for w in widths):
            raise ValueError(f"micro-batch widths {widths} are not all bucket lengths {self.lengths} "
                             "(train/micro_batches.py plan_micro_batches): each new width would compile anew")

    def __call__(self, state: TrainState, micro) -> tuple[TrainState, dict]:
        self._check(micro)
        advantages, keep, valid, group_metrics = self.statistics(tuple(mb.rewards for mb in micro),
                                                                 tuple(mb.categories for mb in micro))
        acc = self.zeros(state.params)
        for mb, adv, kp in zip(micro, advantages, keep):
            ref = self.reference(state, mb) if self.reference is not None else None
            acc = self.accumulate(state, acc, mb, adv, kp, ref, valid)
        return self.apply(state, acc, group_metrics)

    def old_logps(self, state: TrainState, micro) -> tuple:
        """Per micro-batch [n, T_m]: the completions' log-probs under the current policy
        (num_iterations > 1, StepConfig(old_logps="batch"))."""
        self._check(micro)
        return tuple(self.current_logps(state, mb) for mb in micro)

    def cache_sizes(self) -> dict[str, int]:
        """Compiled programs per jitted function (tests: at most one per bucket length)."""
        fns = {"statistics": self.statistics, "zeros": self.zeros, "accumulate": self.accumulate,
               "apply": self.apply, "current_logps": self.current_logps}
        if self.reference is not None:
            fns["reference"] = self.reference
        return {name: fn._cache_size() for name, fn in fns.items()}


def _with_logps(batch, logps):
    """batch (a TrainBatch, or a tuple of micro-batches) whose completions carry `logps`."""
    if isinstance(batch, TrainBatch):
        return batch.replace(completions=batch.completions.replace(logps=logps))
    return tuple(_with_logps(mb, lp) for mb, lp in zip(batch, logps))


def run_iterations(update, old_logps, state: TrainState, batch, num_iterations: int):
    """`num_iterations` PPO-style epochs of `update` over one rollout's batch (a stacked TrainBatch
    for `Programs.update`, or the tuple of trimmed micro-batches of a `LengthAwareUpdate`, whose
    `old_logps` method goes with it). With more than one, the old log-probs are computed once,
    before the first (`old_logps(state, batch)`), and carried in batch.completions.logps, so the
    importance ratio of iterations 2..N is pi_now / pi_rollout and the clip acts (the update must
    be built with StepConfig(old_logps="batch")). Returns the state and the last iteration's
    metrics."""
    if num_iterations > 1:
        batch = _with_logps(batch, old_logps(state, batch))
    metrics = None
    for _ in range(num_iterations):
        state, metrics = update(state, batch)
    return state, metrics
