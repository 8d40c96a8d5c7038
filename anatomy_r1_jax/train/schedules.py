"""Learning-rate schedules and the optimizer of each training phase.

A run has two phases on one step counter: the supervised warm-up (config.sft, steps 0..S-1) and
GRPO (config.optim / config.train, steps S..S+N-1). Each phase has its own schedule, counted from
the phase's first step, and its own optimizer state (the trainer starts GRPO with fresh AdamW
moments: the warm-up's do not carry over).

A schedule of peak lr, W warm-up steps and n phase steps, at phase step i:

    warm-up  (i < W)   lr * i / W                         (W = 0: no warm-up, step 0 at full lr)
    constant           lr
    linear             lr * (1 - (i - W) / (n - W))       (to 0 at the phase's end)
    cosine             0.1 lr + 0.9 lr * (1 + cos(pi (i - W) / (n - W))) / 2   (to 0.1 lr)
"""

from __future__ import annotations

from typing import Callable

import optax

from anatomy_r1_jax.models import lora
from anatomy_r1_jax.rl.registry import Registry
from anatomy_r1_jax.train.step import make_optimizer

DecayFn = Callable[[float, int], optax.Schedule]
DECAYS: Registry[DecayFn] = Registry("learning-rate schedule")


@DECAYS.register("constant")
def constant(lr: float, steps: int) -> optax.Schedule:
    del steps
    return optax.constant_schedule(lr)


@DECAYS.register("linear")
def linear(lr: float, steps: int) -> optax.Schedule:
    return optax.linear_schedule(lr, 0.0, max(steps, 1))


@DECAYS.register("cosine")
def cosine(lr: float, steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.1)


def learning_rate_schedule(name: str, *, lr: float, warmup_steps: int, steps: int,
                           field: str = "optim.schedule") -> optax.Schedule:
    """Linear warm-up over `warmup_steps` (none when 0), then the registered decay `name` over the
    rest of the phase's `steps` (see the module docstring)."""
    if name not in DECAYS:
        raise ValueError(f"config {field}={name!r}: use one of {DECAYS.names()}")
    decay = DECAYS.get(name)(lr, max(steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def phase_schedules(config) -> dict[str, optax.Schedule]:
    """{"sft": the warm-up's schedule, "grpo": GRPO's}, each counted from its phase's first step; a
    phase that trains LoRA adapters (lora.LoraConfig.trains) at its lr times model.lora.lr_scale."""
    s, o = config.sft, config.optim
    adapters = lora.LoraConfig.from_config(config.model)
    scale = {phase: adapters.lr_scale if adapters.trains(phase) == "adapters" else 1.0 for phase in ("sft", "grpo")}
    return {"sft": learning_rate_schedule(s.schedule, lr=s.lr * scale["sft"], warmup_steps=s.warmup_steps,
                                          steps=s.steps, field="sft.schedule"),
            "grpo": learning_rate_schedule(o.schedule, lr=o.lr * scale["grpo"], warmup_steps=o.warmup_steps,
                                           steps=config.train.steps)}


def phase_optimizers(config) -> dict[str, optax.GradientTransformation]:
    """{"sft": ..., "grpo": ...}: make_optimizer with the phase's schedule and config.optim's AdamW
    settings. Both have the same state structure (a checkpoint of either phase restores alike)."""
    o = config.optim
    return {phase: make_optimizer(schedule, weight_decay=o.weight_decay, grad_clip=o.grad_clip, b1=o.b1, b2=o.b2)
            for phase, schedule in phase_schedules(config).items()}
