"""The trainer's evaluations (config.evals): the evaluator scripts/evaluate.py uses, and the paired gain.

    evaluate(params, frozen) -> <prefix>/* metrics (prefix "eval" for evals.heldout, else eval_<name>: (accuracy with its Wilson 95% interval, strict
                                accuracy, format rate, n) and per-question correctness {id: 0/1}
    gain(correct)            -> <prefix>/gain, <prefix>/gain_ci95 (paired over the questions both answered,
                                metrics.paired_difference), <prefix>/accuracy_start, <prefix>/gain_n

The start (`start`: {"step", "correct"}) is the evaluation where GRPO begins (the warm-up's last);
a checkpoint's meta keeps it, so a resumed run reports its gain against the same start.
"""

from __future__ import annotations

import logging
from typing import Sequence

from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.evaluation.evaluator import Evaluator
from anatomy_r1_jax.evaluation.metrics import paired_difference

log = logging.getLogger(__name__)


def itstime(step: int, every: int, *, last: bool = False, first: int = 0) -> bool:
    """Whether a cadence of `every` steps counted from step `first` falls on `step` (or it is the
    `last`): every cadence of the trainer (logging, evaluation, checkpoints) asks this."""
    return last or (every > 0 and step > first and (step - first) % every == 0)


HELDOUT = "heldout"  # the run's held-out evaluation (config.evals.heldout): eval/*, the run's last line


class HeldOut:
    """Greedy answers to the held-out `records` by `evaluator`, scored as scripts/evaluate.py scores
    them, every `every` GRPO steps (config.evals.<name>)."""

    def __init__(self, evaluator: Evaluator, records: Sequence[Record], *, name: str = HELDOUT, every: int = 0):
        self.evaluator, self.records, self.name, self.every = evaluator, list(records), name, every
        self.prefix = "eval" if name == HELDOUT else f"eval_{name}"
        self.start: dict | None = None

    def due(self, step: int, *, warm_up: int, last: bool) -> bool:
        """Whether it evaluates after `step`: every `every` GRPO steps, the last step, and the
        warm-up's last (where GRPO starts)."""
        return itstime(step, self.every, last=last, first=warm_up) or (0 < step == warm_up)

    def evaluate(self, params, frozen) -> tuple[dict, dict[str, float]]:
        result = self.evaluator.evaluate(params, frozen, self.records)
        accuracy = result["accuracy"]
        out = {"accuracy": accuracy["value"], "accuracy_lo": accuracy["ci95"][0], "accuracy_hi": accuracy["ci95"][1],
               "accuracy_strict": result["accuracy_strict"]["value"],
               "format": 1.0 - result["format_failure_rate"]["value"], "n": float(len(result["records"]))}
        return {f"{self.prefix}/{k}": v for k, v in out.items()}, {o["id"]: o["correct"] for o in result["records"]}

    def gain(self, correct: dict[str, float]) -> dict:
        """The paired gain of `correct` against the start, and the start's accuracy on the same questions."""
        start = self.start["correct"]
        ids = [i for i in correct if i in start]
        if not ids:
            log.warning("%s: no question of this evaluation was answered at the start of GRPO: no gain", self.name)
            return {}
        paired = paired_difference([start[i] for i in ids], [correct[i] for i in ids])
        out = {"gain": paired["gain"], "gain_ci95": paired["ci95"], "accuracy_start": paired["before"],
               "gain_n": float(paired["n"])}
        return {f"{self.prefix}/{k}": v for k, v in out.items()}
