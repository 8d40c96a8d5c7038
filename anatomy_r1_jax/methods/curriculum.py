"""Anatomical Similarity Curriculum (ASC): the order in which one epoch visits the records.

`curriculum_order(scores, schedule=..., num_stages=K, seed=s, epoch=e) -> [n] int` is a pure
function of (scores, schedule, K, seed, epoch), usable as a Grain index order. Schedules,
registered by name (our reconstruction, METHOD.md section 6):

- "staged": sort by S(q) ascending (ties broken at random), split into K stages of near-equal size
  (sizes differ by at most one), shuffle inside each stage, concatenate. Easy (dissimilar options)
  first; over one epoch the batch mean S(q) rises stage by stage. Every epoch repeats the
  curriculum with its own shuffle.
- "none": a seeded shuffle per epoch (the plain-GRPO baseline).

`span` (the curriculum's horizon): with span = m > 0, the epoch first visits the m records that the
"none" shuffle of the same (seed, epoch) puts first, ordered by the schedule, then the rest in that
shuffle. A run that sees only m queries (train.steps x batch_size) then goes through every stage, and
the "staged" and "none" arms train on the same queries in a different order.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from anatomy_r1_jax.rl.registry import Registry

ScheduleFn = Callable[..., np.ndarray]
SCHEDULES: Registry[ScheduleFn] = Registry("curriculum schedule")
register_schedule = SCHEDULES.register


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def stage_slices(n: int, num_stages: int) -> list[slice]:
    """K contiguous slices of range(n), sizes differing by at most one (larger ones first)."""
    if num_stages < 1:
        raise ValueError("num_stages must be >= 1")
    sizes = np.full(num_stages, n // num_stages)
    sizes[: n % num_stages] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


@register_schedule("staged")
def staged_order(scores: np.ndarray, *, num_stages: int, seed: int, epoch: int) -> np.ndarray:
    """Indices by ascending S(q) in K stages, shuffled within each stage."""
    scores = np.asarray(scores, np.float64)
    rng = _rng(seed, epoch)
    tie_break = rng.permutation(len(scores))
    by_score = np.lexsort((tie_break, scores))  # primary key: scores
    stages = [rng.permutation(by_score[s]) for s in stage_slices(len(scores), num_stages)]
    return np.concatenate(stages).astype(np.int64)


@register_schedule("none")
def shuffled_order(scores: np.ndarray, *, num_stages: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded shuffle of all indices (the scores are ignored)."""
    del num_stages
    return _rng(seed, epoch).permutation(len(scores)).astype(np.int64)


def curriculum_order(scores: np.ndarray, *, schedule: str, num_stages: int, seed: int, epoch: int,
                     span: int = 0) -> np.ndarray:
    """One epoch's record order: [n] int64, a permutation of range(n).

    Args:
      scores: [n] S(q) per record, in dataset order (similarity.scores_array).
      schedule: a SCHEDULES name ("staged", "none").
      span: 0 for the whole epoch, else the number of leading records the schedule orders (see above).
    """
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be [n], got shape {scores.shape}")
    order_fn = SCHEDULES.get(schedule)
    if span <= 0 or span >= len(scores) or order_fn is shuffled_order:  # "none" is the same with any span
        return order_fn(scores, num_stages=num_stages, seed=seed, epoch=epoch)
    shuffled = shuffled_order(scores, num_stages=num_stages, seed=seed, epoch=epoch)
    head = shuffled[:span]
    head = head[order_fn(scores[head], num_stages=num_stages, seed=seed, epoch=epoch)]
    return np.concatenate([head, shuffled[span:]]).astype(np.int64)
