"""Anatomical Similarity Curriculum (ASC): the order in which one epoch visits the records.

`curriculum_order(scores, classes, curriculum, seed=s, epoch=e) -> [n] int` is a pure function of
(scores, answer classes, the Curriculum settings, seed, epoch), usable as a Grain index order (so a
resumed run sees exactly the order it would have seen). Schedules, registered by name (ours,
METHOD.md section 6):

- "competence" (the curriculum arms' default): a class-stratified competence curriculum
  (Platanios et al. 2019). Difficulty is the percentile of S(q) among the questions of the same
  answer class,
      d(q) = (rank of S(q) within its class + 1) / |class|   in (0, 1]   (ties ranked at random),
  and the competence after t steps is
      c(t) = min(1, sqrt(c0^2 + (1 - c0^2) t / T)),
  T = Curriculum.competence_steps (0: the span's last step, so that it draws from all). Step t's batch of B queries is
  drawn uniformly from the not-yet-visited questions with d(q) <= c(t); if fewer than B are eligible
  (T longer than the span), the easiest not-yet-eligible ones are taken. Every class enters at its
  own easiest questions, so at every step the eligible set holds each class in its dataset share and
  no stage can be one class (the "staged" failure: S(q) is largely a function of the class).
- "staged": sort by S(q) ascending (ties broken at random), split into K stages of near-equal size
  (sizes differ by at most one), shuffle inside each stage, concatenate. Easy (dissimilar options)
  first; over one epoch the batch mean S(q) rises stage by stage. Kept as an arm: on data where S(q)
  follows the class, its stages are nearly single classes.
- "none": a seeded shuffle per epoch (the plain-GRPO baseline).

`span` (the curriculum's horizon): with span = m > 0, the epoch first visits the m records that the
"none" shuffle of the same (seed, epoch) puts first, ordered by the schedule, then the rest in that
shuffle. A run that sees only m queries (train.steps x batch_size) then goes through the whole
curriculum, and the curriculum and "none" arms train on the same queries in a different order.

Diagnostics of an order, without a model: methods/curriculum_check.py.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from anatomy_r1_jax.rl.registry import Registry

ScheduleFn = Callable[..., np.ndarray]
SCHEDULES: Registry[ScheduleFn] = Registry("curriculum schedule")
register_schedule = SCHEDULES.register


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """How an epoch is ordered (config.curriculum, plus the run's batch size).

    schedule: a SCHEDULES name. num_stages: K ("staged"). c0: c(0) and competence_steps: T
    ("competence"; T = 0: the span's last step). batch_size: queries per step (global). span: records
    ordered at the head of the epoch (0: all).
    """

    schedule: str = "none"
    num_stages: int = 4
    c0: float = 0.5
    competence_steps: int = 0
    batch_size: int = 1
    span: int = 0

    @classmethod
    def from_config(cls, c) -> "Curriculum":
        """From a run config: span "run" = train.steps x train.batch_size."""
        span = c.train.steps * c.train.batch_size if c.curriculum.span == "run" else int(c.curriculum.span)
        return cls(schedule=c.curriculum.schedule, num_stages=c.curriculum.num_stages, c0=c.curriculum.c0,
                   competence_steps=c.curriculum.competence_steps, batch_size=c.train.batch_size, span=span)


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


def competence(t: np.ndarray, *, c0: float, steps: int) -> np.ndarray:
    """c(t) = min(1, sqrt(c0^2 + (1 - c0^2) t / T)), the fraction of each class's questions (easiest
    first) a batch at step t may draw from; T = steps."""
    if not 0.0 < c0 <= 1.0 or steps < 1:
        raise ValueError(f"competence needs 0 < c0 <= 1 and T >= 1, got c0={c0}, T={steps}")
    t = np.asarray(t, np.float64)
    return np.minimum(1.0, np.sqrt(c0 ** 2 + (1.0 - c0 ** 2) * t / steps))


def class_percentiles(scores: np.ndarray, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """d(q) = (rank of S(q) among its class, ties at random, + 1) / class size: [n] in (0, 1]."""
    d = np.zeros(len(scores), np.float64)
    tie_break = rng.permutation(len(scores))
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        ranked = members[np.lexsort((tie_break[members], scores[members]))]
        d[ranked] = np.arange(1, len(members) + 1) / len(members)
    return d


@register_schedule("competence")
def competence_order(scores: np.ndarray, classes: np.ndarray, *, curriculum: Curriculum, seed: int,
                     epoch: int) -> np.ndarray:
    """Batches of B drawn at random from the unvisited questions with d(q) <= c(t), step by step."""
    n, b = len(scores), max(1, curriculum.batch_size)
    rng = _rng(seed, epoch)
    d = class_percentiles(scores, classes, rng)
    steps = -(-n // b)
    comp = competence(np.arange(steps), c0=curriculum.c0, steps=curriculum.competence_steps or max(1, steps - 1))
    by_difficulty = np.lexsort((rng.permutation(n), d))
    # the first step whose competence reaches d(q) (steps: never within the span)
    release = np.searchsorted(comp, d[by_difficulty] - 1e-12, side="left")
    out, pool, next_in = [], np.zeros(0, np.int64), 0
    for t in range(steps):
        newly = int(np.searchsorted(release, t, side="right"))
        need = min(b, n - len(out))
        newly = max(newly, next_in + max(0, need - len(pool)))  # too few eligible: the easiest next
        pool = np.concatenate([pool, by_difficulty[next_in:newly]])
        next_in = newly
        pick = rng.choice(len(pool), need, replace=False)
        out.append(pool[pick])
        pool = np.delete(pool, pick)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


@register_schedule("staged")
def staged_order(scores: np.ndarray, classes: np.ndarray, *, curriculum: Curriculum, seed: int,
                 epoch: int) -> np.ndarray:
    """Indices by ascending S(q) in K stages, shuffled within each stage (classes unused)."""
    del classes
    rng = _rng(seed, epoch)
    tie_break = rng.permutation(len(scores))
    by_score = np.lexsort((tie_break, scores))  # primary key: scores
    stages = [rng.permutation(by_score[s]) for s in stage_slices(len(scores), curriculum.num_stages)]
    return np.concatenate(stages).astype(np.int64)


@register_schedule("none")
def shuffled_order(scores: np.ndarray, classes: np.ndarray, *, curriculum: Curriculum, seed: int,
                   epoch: int) -> np.ndarray:
    """A seeded shuffle of all indices (scores and classes are ignored)."""
    del classes, curriculum
    return _rng(seed, epoch).permutation(len(scores)).astype(np.int64)


def curriculum_order(scores: np.ndarray, classes: np.ndarray | None, curriculum: Curriculum, *, seed: int,
                     epoch: int) -> np.ndarray:
    """One epoch's record order: [n] int64, a permutation of range(n).

    Args:
      scores: [n] S(q) per record, in dataset order (similarity.scores_array).
      classes: [n] int answer class per record (similarity.answer_classes); None: one class.
      curriculum: the schedule and its settings (Curriculum.from_config).
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be [n], got shape {scores.shape}")
    classes = np.zeros(len(scores), np.int64) if classes is None else np.asarray(classes)
    if classes.shape != scores.shape:
        raise ValueError(f"classes {classes.shape} and scores {scores.shape} differ in shape")
    order_fn = SCHEDULES.get(curriculum.schedule)
    kw = dict(curriculum=curriculum, seed=seed, epoch=epoch)
    span = curriculum.span
    if span <= 0 or span >= len(scores) or order_fn is shuffled_order:  # "none" is the same with any span
        return order_fn(scores, classes, **kw)
    shuffled = shuffled_order(scores, classes, **kw)
    head = shuffled[:span]
    head = head[order_fn(scores[head], classes[head], **kw)]
    return np.concatenate([head, shuffled[span:]]).astype(np.int64)
