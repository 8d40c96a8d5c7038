"""Rule-based rewards on decoded completions (host side, plain Python / NumPy).

A reward function takes the N decoded completions and their N targets and returns N floats:

    fn(completions: Sequence[str], targets: Sequence[Record | str]) -> Sequence[float]

A target is the `Record` the completion answers (needed by rewards that look at option texts) or
just the solution letter ("A"). Functions are registered by name with `@register_reward("name")`
and combined by `compute_rewards`:

    r_i = sum_k w_k * r_k(completion_i, target_i)

The two rewards of the authors' trainer (METHOD.md section 3) are reproduced exactly:

- "format":   1 if re.match(FORMAT_PATTERN, text, DOTALL | MULTILINE) else 0. The negative
  lookahead `(?![\\s\\S])` means nothing, not even a newline, may follow `</answer>`.
- "accuracy": 1 if the stripped text inside the first <answer>...</answer> equals the solution
  letter exactly, else 0 ("A. Gallbladder" and "(A)" score 0; no <answer> tag scores 0).
- "accuracy_lenient" (ours, opt in by naming it): also accepts a letter with brackets or
  punctuation ("(A)", "A.", "A)", "A: ..."), a letter followed by its option text
  ("A. Gallbladder"; the text, when given and the options are known, must be that letter's
  option), or the correct option text alone (case and whitespace insensitive).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.rl.registry import Registry

Target = Union[Record, str]
RewardFn = Callable[[Sequence[str], Sequence[Target]], Sequence[float]]

FORMAT_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])"
_FORMAT_RE = re.compile(FORMAT_PATTERN, re.DOTALL | re.MULTILINE)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# "(A)", "[A]", "A.", "A)", "A:", optionally followed by whitespace and text ("A. Gallbladder").
_LETTER_RE = re.compile(r"[(\[]?(?P<letter>[A-Z])[)\]]?[.:,)]?(?:\s+(?P<text>.+))?", re.DOTALL)

REWARDS: Registry[RewardFn] = Registry("reward")
register_reward = REWARDS.register
# The accuracy rewards that score an answer by its class name (the option text) as well as by its
# letter: permuting the options cannot change such an answer's reward ("accuracy" scores the letter).
CLASS_NAME_ACCURACY = frozenset({"accuracy_lenient"})


def extract_answer(text: str) -> str | None:
    """The stripped text inside the first <answer>...</answer>, or None without one."""
    m = _ANSWER_RE.search(text)
    return None if m is None else m.group(1).strip()


def solution_letter(target: Target) -> str:
    """The correct letter of a target; a solution string may itself be "<answer> B </answer>"."""
    if isinstance(target, Record):
        return target.answer
    inner = extract_answer(target)
    return (inner if inner is not None else target).strip()


def _normalise(text: str) -> str:
    return " ".join(text.replace("_", " ").split()).strip(" .").casefold()


def format_reward(text: str) -> float:
    """1.0 if the completion is exactly <think>..</think> <answer>..</answer> and nothing after."""
    return 1.0 if _FORMAT_RE.match(text) else 0.0


def accuracy_reward(text: str, target: Target) -> float:
    """1.0 if the answer-tag content equals the solution letter exactly (authors' rule)."""
    answer = extract_answer(text)
    return 1.0 if answer is not None and answer == solution_letter(target) else 0.0


def lenient_accuracy_reward(text: str, target: Target) -> float:
    """Accuracy that also accepts "(A)", "A.", "A. <option text>" or the option text alone."""
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    letter = solution_letter(target)
    if answer == letter:
        return 1.0
    options = target.options if isinstance(target, Record) else ()
    correct_text = target.answer_text if isinstance(target, Record) else ""
    m = _LETTER_RE.fullmatch(answer)
    if m is not None:
        if m.group("letter") != letter:
            return 0.0
        given = m.group("text")
        if given is None or not correct_text:
            return 1.0
        return 1.0 if _normalise(given) == _normalise(correct_text) else 0.0
    if correct_text and _normalise(answer) == _normalise(correct_text):
        return 1.0
    return 0.0


@register_reward("format")
def format_rewards(completions: Sequence[str], targets: Sequence[Target]) -> list[float]:
    del targets
    return [format_reward(c) for c in completions]


@register_reward("accuracy")
def accuracy_rewards(completions: Sequence[str], targets: Sequence[Target]) -> list[float]:
    return [accuracy_reward(c, t) for c, t in zip(completions, targets, strict=True)]


@register_reward("accuracy_lenient")
def lenient_accuracy_rewards(completions: Sequence[str], targets: Sequence[Target]) -> list[float]:
    return [lenient_accuracy_reward(c, t) for c, t in zip(completions, targets, strict=True)]


def compute_rewards(
    completions: Sequence[str],
    records_or_solutions: Sequence[Target],
    names_and_weights: Mapping[str, float] | Sequence[tuple[str, float]],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted sum of registered rewards.

    Args:
      completions: N decoded completions.
      records_or_solutions: N targets (a `Record` or a solution letter), one per completion; for
        G rollouts of one prompt repeat its target G times.
      names_and_weights: {"format": 1.0, "accuracy": 1.0} or [("format", 1.0), ...].

    Returns:
      total [N] float32 = sum_k w_k r_k, and {name: r_k [N] float32} (unweighted, for logging).
    """
    if len(completions) != len(records_or_solutions):
        raise ValueError(f"{len(completions)} completions but {len(records_or_solutions)} targets")
    items = list(names_and_weights.items() if isinstance(names_and_weights, Mapping) else names_and_weights)
    total = np.zeros(len(completions), np.float32)
    per_reward: dict[str, np.ndarray] = {}
    for name, weight in items:
        values = np.asarray(REWARDS.get(name)(completions, records_or_solutions), np.float32)
        if values.shape != total.shape:
            raise ValueError(f"reward {name!r} returned shape {values.shape}, expected {total.shape}")
        per_reward[name] = values
        total += np.float32(weight) * values
    return total, per_reward

