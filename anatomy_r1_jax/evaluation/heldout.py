"""The trainer's held-out evaluation: the evaluator scripts/evaluate.py uses, and the paired gain.

    evaluate(params, frozen) -> eval/* metrics (accuracy with its Wilson 95% interval, strict
                                accuracy, format rate, n) and per-question correctness {id: 0/1}
    gain(correct)            -> eval/gain, eval/gain_ci95 (paired over the questions both answered,
                                metrics.paired_difference), eval/accuracy_start, eval/gain_n

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


class HeldOut:
    """Greedy answers to the held-out `records` by `evaluator`, scored as scripts/evaluate.py scores them."""

    def __init__(self, evaluator: Evaluator, records: Sequence[Record]):
        self.evaluator, self.records = evaluator, list(records)
        self.start: dict | None = None

    def evaluate(self, params, frozen) -> tuple[dict, dict[str, float]]:
        result = self.evaluator.evaluate(params, frozen, self.records)
        accuracy = result["accuracy"]
        out = {"eval/accuracy": accuracy["value"], "eval/accuracy_lo": accuracy["ci95"][0],
               "eval/accuracy_hi": accuracy["ci95"][1], "eval/accuracy_strict": result["accuracy_strict"]["value"],
               "eval/format": 1.0 - result["format_failure_rate"]["value"], "eval/n": float(len(result["records"]))}
        return out, {o["id"]: o["correct"] for o in result["records"]}

    def gain(self, correct: dict[str, float]) -> dict:
        """The paired gain of `correct` against the start, and the start's accuracy on the same questions."""
        start = self.start["correct"]
        ids = [i for i in correct if i in start]
        if not ids:
            log.warning("no held-out question of this evaluation was answered at the start of GRPO: no gain")
            return {}
        paired = paired_difference([start[i] for i in ids], [correct[i] for i in ids])
        return {"eval/gain": paired["gain"], "eval/gain_ci95": paired["ci95"], "eval/accuracy_start": paired["before"],
                "eval/gain_n": float(paired["n"])}
