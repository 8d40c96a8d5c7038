"""Per-question outcomes from decoded answers, and the summary of a (model, dataset) evaluation.

Correctness is a registered reward (rl/rewards.py): "accuracy" (the authors' exact letter match,
default) or "accuracy_lenient"; a format failure is a completion the "format" reward gives 0
(not exactly <think>..</think><answer>..</answer>). Both accuracies are always reported.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.evaluation import metrics
from anatomy_r1_jax.rl.rewards import compute_rewards, extract_answer

REWARD_NAMES = ("format", "accuracy", "accuracy_lenient")
ACCURACY_RULES = ("accuracy", "accuracy_lenient")


def run_accuracy(rewards) -> str:
    """The accuracy rule a run is reported with: the first of its accuracy rewards with a non-zero
    weight in config.rl.rewards ("accuracy", the authors' exact letter, when none is on). Training
    metrics, the trainer's held-out evaluation and scripts/evaluate.py all use it."""
    return next((name for name, weight in dict(rewards).items() if name in ACCURACY_RULES and weight), "accuracy")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One question: its labels, the greedy answer and how it scored, and for pass@k how many of the
    n sampled answers were correct / well formatted."""

    id: str
    category: str
    question_type: str
    source: str
    answer: str  # the correct letter
    text: str  # the greedy completion (decoded, without the closing EOS)
    predicted: str | None  # inside <answer>..</answer>, None without the tag
    correct: float  # by the configured accuracy reward
    correct_strict: float
    correct_lenient: float
    formatted: float
    samples_correct: int = 0
    samples_formatted: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _rewards(texts: Sequence[str], records: Sequence[Record]) -> dict[str, np.ndarray]:
    _, per = compute_rewards(texts, records, [(name, 1.0) for name in REWARD_NAMES])
    return per


def score(records: Sequence[Record], greedy_texts: Sequence[str],
          sample_texts: Sequence[Sequence[str]] | None = None, accuracy: str = "accuracy") -> list[Outcome]:
    """Outcomes of N questions: greedy_texts [N]; sample_texts [N][n] (None: no sampling)."""
    if accuracy not in ACCURACY_RULES:
        raise ValueError(f"accuracy must be 'accuracy' or 'accuracy_lenient', got {accuracy!r}")
    if len(greedy_texts) != len(records):
        raise ValueError(f"{len(greedy_texts)} answers for {len(records)} questions")
    per = _rewards(greedy_texts, records)
    s_correct = np.zeros(len(records), int)
    s_format = np.zeros(len(records), int)
    if sample_texts is not None:
        n = len(sample_texts[0]) if len(sample_texts) else 0
        if len(sample_texts) != len(records) or any(len(s) != n for s in sample_texts):
            raise ValueError("sample_texts must hold the same number of samples for every question")
        flat = [t for s in sample_texts for t in s]
        rows = [r for r in records for _ in range(n)]
        sp = _rewards(flat, rows)
        s_correct = sp[accuracy].reshape(len(records), n).sum(1).astype(int)
        s_format = sp["format"].reshape(len(records), n).sum(1).astype(int)
    return [Outcome(id=r.id, category=r.category, question_type=r.question_type, source=r.source, answer=r.answer,
                    text=t, predicted=extract_answer(t), correct=float(per[accuracy][i]),
                    correct_strict=float(per["accuracy"][i]), correct_lenient=float(per["accuracy_lenient"][i]),
                    formatted=float(per["format"][i]), samples_correct=int(s_correct[i]),
                    samples_formatted=int(s_format[i]))
            for i, (r, t) in enumerate(zip(records, greedy_texts))]


def summarize(outcomes: Sequence[Outcome], samples: int = 0, ks: Sequence[int] = ()) -> dict:
    """Accuracy (configured, strict, lenient) and format-failure rate with Wilson 95% intervals,
    accuracy per category / question type / source, and pass@k (mean over questions) for k <= samples."""
    n = len(outcomes)
    out = {
        "n": n,
        "accuracy": metrics.proportion(sum(o.correct for o in outcomes), n),
        "accuracy_strict": metrics.proportion(sum(o.correct_strict for o in outcomes), n),
        "accuracy_lenient": metrics.proportion(sum(o.correct_lenient for o in outcomes), n),
        "format_failure_rate": metrics.proportion(sum(1.0 - o.formatted for o in outcomes), n),
        "by_category": metrics.group_accuracy(outcomes, lambda o: o.category, lambda o: o.correct),
        "by_question_type": metrics.group_accuracy(outcomes, lambda o: o.question_type, lambda o: o.correct),
        "by_source": metrics.group_accuracy(outcomes, lambda o: o.source, lambda o: o.correct),
        "samples": samples,
    }
    if samples:
        total = n * samples
        out["pass_at_k"] = metrics.mean_pass_at_k((o.samples_correct for o in outcomes), samples, ks)
        out["sample_accuracy"] = metrics.proportion(sum(o.samples_correct for o in outcomes), total)
        out["sample_format_failure_rate"] = metrics.proportion(
            sum(samples - o.samples_formatted for o in outcomes), total)
    return out
