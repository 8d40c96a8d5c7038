"""Group-relative advantages and invalid-group statistics (pure jnp, jit-friendly).

Layout everywhere: rewards [num_prompts * G] with the G rollouts of one prompt contiguous
(rollout j of prompt p at index p * G + j). `group_size` is a Python int (static under jit).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from anatomy_r1_jax.rl.registry import Registry

AdvantageFn = Callable[..., jax.Array]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage = ADVANTAGES.register


def _grouped(rewards: jax.Array, group_size: int, xp=jnp) -> jax.Array:
    rewards = xp.asarray(rewards, xp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards shape {rewards.shape} is not [num_prompts * {group_size}]")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards: jax.Array, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> jax.Array:
    """A_i = (r_i - mean_g(r)) / (std_g(r) + eps), std unbiased (divides by G - 1).

    scale=False gives A_i = r_i - mean_g(r) (Dr.GRPO: no std division).

    Args:
      rewards: [P * G] float, groups contiguous.
    Returns:
      [P * G] float32 advantages; 0 for every member of a group whose rewards are all equal.
    """
    g = _grouped(rewards, group_size)
    centred = g - g.mean(axis=1, keepdims=True)
    if scale:
        if group_size < 2:
            raise ValueError("the unbiased group std needs group_size >= 2")
        std = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / (group_size - 1))
        centred = centred / (std + eps)
    return centred.reshape(-1)


@register_advantage("grpo")
def grpo_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-4) -> jax.Array:
    """GRPO (ms-swift / TRL default): (r - mean_g) / (std_g + eps), unbiased std."""
    return group_advantages(rewards, group_size, scale=True, eps=eps)


@register_advantage("drgrpo")
def drgrpo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """Dr.GRPO: r - mean_g, no std normalisation."""
    return group_advantages(rewards, group_size, scale=False)


@register_advantage("none")
def no_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """All zeros: objectives that learn from targets, not rewards (the supervised warm-up)."""
    del group_size
    return jnp.zeros_like(rewards, jnp.float32)


def all_equal_groups(rewards, group_size: int):
    """[P] bool: True where every reward of the group (rewards [P * G], groups contiguous) is equal
    (all advantages 0: no gradient). A jax array in (the update), a jax array out; NumPy or a list in
    (the host's GDQA and re-roll bookkeeping), NumPy out."""
    xp = jnp if isinstance(rewards, jax.Array) else np
    g = _grouped(rewards, group_size, xp)
    return xp.all(g == g[:, :1], axis=1)


def valid_group_fraction(rewards: jax.Array, group_size: int) -> jax.Array:
    """Scalar: fraction of groups whose rewards are not all equal (GPG's 1 / alpha)."""
    return 1.0 - jnp.mean(all_equal_groups(rewards, group_size).astype(jnp.float32))


def invalid_counts_by_category(
    invalid: jax.Array, categories: jax.Array, num_categories: int
) -> tuple[jax.Array, jax.Array]:
    """Per-category (invalid groups, groups) counts, summable across steps and devices.

    Args:
      invalid: [P] bool from `all_equal_groups`.
      categories: [P] int in [0, num_categories), one per group (e.g. the anatomy class).
    Returns:
      (invalid_count [C] float32, group_count [C] float32).
    """
    categories = jnp.asarray(categories, jnp.int32)
    invalid = jnp.asarray(invalid, jnp.float32)
    inv = jax.ops.segment_sum(invalid, categories, num_segments=num_categories)
    cnt = jax.ops.segment_sum(jnp.ones_like(invalid), categories, num_segments=num_categories)
    return inv, cnt


def invalid_ratio_by_category(
    rewards: jax.Array, group_size: int, categories: jax.Array, num_categories: int
) -> jax.Array:
    """[C] float32: fraction of a category's groups with all-equal rewards; NaN where it has none."""
    inv, cnt = invalid_counts_by_category(all_equal_groups(rewards, group_size), categories, num_categories)
    return jnp.where(cnt > 0, inv / jnp.maximum(cnt, 1.0), jnp.nan)
