"""Evaluation statistics: Wilson intervals, paired differences, the unbiased pass@k estimator,
per-group accuracy.

Pure Python / NumPy on per-question outcomes; no model code here.

    Wilson 95% interval of p = s / n (z = 1.96):
        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

    Paired difference of two evaluations of the same n questions (correctness a_i before, b_i after):
        d_i  = b_i - a_i                gain = mean(d) = accuracy_after - accuracy_before
        half = z sd(d) / sqrt(n)        sd with n - 1 degrees of freedom (normal approximation)
    Pairing removes the between-question variance both evaluations share, so the interval is
    narrower than two independent Wilson intervals would suggest.

    pass@k from n samples of which c are correct (Chen et al. 2021, unbiased):
        pass@k = 1 - C(n - c, k) / C(n, k)  = 1 - prod_{i = n-c+1}^{n} (1 - k / i)
    averaged over questions.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for a binomial proportion; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact ends (no rounding residue)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def paired_difference(before: Sequence[float], after: Sequence[float], z: float = Z95) -> dict:
    """{"gain": mean(after - before), "ci95": z sd(d) / sqrt(n) (half-width; NaN when n < 2), "n": n,
    "before": mean(before), "after": mean(after)} of per-question scores [n] of the same questions in
    the same order (e.g. 0/1 correctness at the start and the end of GRPO)."""
    a, b = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two equal-length lists, got shapes {a.shape} and {b.shape}")
    n = a.size
    d = b - a
    half = float(z * d.std(ddof=1) / math.sqrt(n)) if n >= 2 else float("nan")
    mean = lambda x: float(x.mean()) if n else float("nan")  # noqa: E731
    return {"gain": mean(d), "ci95": half, "n": int(n), "before": mean(a), "after": mean(b)}


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of a mean over a few independent runs (e.g. per-seed results):
    t_{(1+level)/2, n-1} sd(x) / sqrt(n) with Student's t (scipy); the half-width is NaN when n < 2."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    n = x.size
    if n < 2:
        return (float(x.mean()) if n else float("nan")), float("nan")
    return float(x.mean()), float(stats.t.ppf((1 + level) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k samples (drawn without replacement from the
    n generated, c of them correct) is correct."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct out of n={n} samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def proportion(successes: float, n: int) -> dict:
    """{"value", "ci95": [lo, hi], "successes", "n"} of a proportion (value NaN when n == 0)."""
    lo, hi = wilson_interval(successes, n)
    return {"value": successes / n if n else float("nan"), "ci95": [lo, hi], "successes": float(successes), "n": n}


def group_accuracy(outcomes: Sequence, key: Callable[[object], str],
                   correct: Callable[[object], float]) -> dict[str, dict]:
    """Accuracy with its Wilson interval per group: {group: proportion(...)}, groups sorted by name;
    outcomes whose key is "" are left out (the source has no such label)."""
    groups: dict[str, list[float]] = {}
    for o in outcomes:
        name = key(o)
        if name:
            groups.setdefault(name, []).append(correct(o))
    return {name: proportion(float(sum(v)), len(v)) for name, v in sorted(groups.items())}


def mean_pass_at_k(samples_correct: Iterable[int], n: int, ks: Sequence[int]) -> dict[str, float]:
    """{"k": mean over questions of pass@k} for each k <= n."""
    counts = list(samples_correct)
    return {str(k): float(np.mean([pass_at_k(n, c, k) for c in counts])) if counts else float("nan")
            for k in ks if k <= n}
