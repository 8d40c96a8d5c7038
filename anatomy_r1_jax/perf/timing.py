"""Wall-clock timing for side-by-side benchmarks on a shared, noisy machine.

Candidates are timed *interleaved* (A B A B ...) so that load from other processes falls on all of
them alike; each gets `warmup` untimed calls first (JAX compiles there). JAX results are waited for
with `jax.block_until_ready` (torch CPU calls are synchronous). The median is reported.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call over `times`: median, and the 10th / 90th percentiles (spread)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p10(self) -> float:
        return _quantile(self.times, 0.1)

    @property
    def p90(self) -> float:
        return _quantile(self.times, 0.9)


def _quantile(xs, q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def wait(result: Any) -> Any:
    """Blocks until every JAX array in `result` is computed (other leaves pass through)."""
    return jax.block_until_ready(result)


def time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    wait(fn())
    return time.perf_counter() - start


def time_interleaved(fns: dict[str, Callable[[], Any]], *, reps: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Times each zero-argument callable `reps` times, round-robin, after `warmup` untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            time_call(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(time_call(fn))
    return {name: Timing(tuple(ts)) for name, ts in times.items()}
