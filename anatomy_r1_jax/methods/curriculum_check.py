"""What a curriculum order does, measured without a model (issue 23): per window of steps, the
answer-class shares and the score of two image-free shortcuts; over the steps, whether batch S(q)
rises; and how much of S(q) the answer class explains.

`check_order(records, sim, curriculum, ...)` measures one epoch's order against the bounds a
curriculum must keep so that no stretch of training can be passed by a shortcut (the "staged"
failure: a stage of one or two classes, whose questions the odd-one-out rule answers):

- every window of `window_steps` steps: largest class share <= 1.5 / C, smallest >= 0.5 / C;
- the odd-one-out rule (`similarity.odd_one_out`) and the best single-class rule ("answer class c
  whenever it is offered, else guess": 1 if c is the answer, 0 if c is a distractor, 1/k if absent)
  score at most their whole-epoch value + 0.15 in every window;
- Spearman correlation of the batch mean S(q) with the step >= 0.6 (the curriculum climbs).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.methods import similarity as sim_lib
from anatomy_r1_jax.methods.curriculum import Curriculum, curriculum_order



def window_class_shares(order: np.ndarray, classes: np.ndarray, *, queries: int, num_classes: int) -> np.ndarray:
    """[W, C] share of each class among the records of each window of `queries` consecutive
    positions of `order` (the last, shorter window included)."""
    labels = np.asarray(classes)[np.asarray(order)]
    windows = [labels[i: i + queries] for i in range(0, len(labels), queries)]
    return np.stack([np.bincount(w, minlength=num_classes) / len(w) for w in windows]) if windows else \
        np.zeros((0, num_classes))


def window_means(order: np.ndarray, values: np.ndarray, *, queries: int) -> np.ndarray:
    """[W] mean of per-record `values` over each window of `queries` consecutive positions."""
    v = np.asarray(values, np.float64)[np.asarray(order)]
    return np.array([v[i: i + queries].mean() for i in range(0, len(v), queries)])


def class_r2(scores: np.ndarray, classes: np.ndarray) -> float:
    """R^2 of S(q) on the answer class: between-class variance / total variance, in [0, 1]
    (1: S(q) is a function of the class; NaN when S(q) is constant)."""
    scores, classes = np.asarray(scores, np.float64), np.asarray(classes)
    total = np.sum((scores - scores.mean()) ** 2)
    fitted = np.zeros_like(scores)
    for c in np.unique(classes):
        fitted[classes == c] = scores[classes == c].mean()
    return float(np.sum((fitted - scores.mean()) ** 2) / total) if total > 0 else float("nan")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of the ranks (average ranks on ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


@dataclasses.dataclass(frozen=True)
class OrderCheck:
    """One order's measurements; shares [W, C] per window (classes in `classes` order)."""

    classes: list[str]
    shares: np.ndarray
    odd_one_out: np.ndarray        # [W] the odd-one-out rule's score per window
    odd_one_out_all: float         # ... over the whole epoch
    best_class: np.ndarray         # [W] the best single-class rule's score per window
    best_class_all: float          # ... the best class over the whole epoch
    window_sq: np.ndarray          # [W] mean S(q) per window
    spearman: float                # batch mean S(q) against the step
    r2: float                      # S(q) on the answer class

    def violations(self) -> dict[str, float]:
        """{bound: measured value} for every bound of the module docstring the order breaks."""
        k = len(self.classes)
        measured = {"max class share": (self.shares.max(), self.shares.max() <= 1.5 / k),
                    "min class share": (self.shares.min(), self.shares.min() >= 0.5 / k),
                    "odd-one-out": (self.odd_one_out.max(), self.odd_one_out.max() <= self.odd_one_out_all + 0.15),
                    "best class": (self.best_class.max(), self.best_class.max() <= self.best_class_all + 0.15),
                    "spearman S(q) ~ step": (self.spearman, self.spearman >= 0.6)}
        return {name: round(float(v), 3) for name, (v, ok) in measured.items() if not ok}


def check_order(records: Sequence[Record], sim: sim_lib.Similarity, curriculum: Curriculum, *,
                score: str = "distractors", window_steps: int = 25, seed: int = 0, epoch: int = 0) -> OrderCheck:
    """Measures the order `curriculum` gives `records` (S(q) by `score` under `sim`) at (seed, epoch)."""
    sq = sim_lib.scores_array(records, sim_lib.score_records(records, sim, score=score))
    classes, names = sim_lib.answer_classes(records)
    order = curriculum_order(sq, classes, curriculum, seed=seed, epoch=epoch)
    b = max(1, curriculum.batch_size)
    queries, k = window_steps * b, len(names)
    odd = np.array([sim_lib.odd_one_out(r, sim) for r in records])
    offered = np.array([[c in {sim_lib.class_key(o) for o in r.options} for c in names] for r in records])
    guess = np.array([1.0 / len(r.options) for r in records])[:, None]
    class_rule = np.where(classes[:, None] == np.arange(k), 1.0, np.where(offered, 0.0, guess))  # [n, C]
    per_class = np.stack([window_means(order, class_rule[:, c], queries=queries) for c in range(k)])
    steps = len(order) // b
    batch_sq = sq[order[:steps * b]].reshape(steps, b).mean(axis=1)
    return OrderCheck(classes=names, shares=window_class_shares(order, classes, queries=queries, num_classes=k),
                      odd_one_out=window_means(order, odd, queries=queries), odd_one_out_all=float(odd.mean()),
                      best_class=per_class.max(axis=0), best_class_all=float(class_rule.mean(axis=0).max()),
                      window_sq=window_means(order, sq, queries=queries),
                      spearman=_spearman(np.arange(steps), batch_sq) if steps > 1 else float("nan"),
                      r2=class_r2(sq, classes))
