"""How a GRPO step's groups become the micro-batches of the length-aware update (host side, NumPy).

RL completions mostly end long before the budget T = rl.max_completion_length, and an update over
[n, T] pays for every padded slot (attention over the cache, the MLPs, the LM head). The plan sorts
the step's groups by their longest row and cuts them into M micro-batches of equal size; each is
trimmed to the smallest bucket length >= its longest row, so the update costs about in proportion
to the real tokens while compiling a handful of shapes (one per bucket), never one per step:

    buckets    = (ceil(k T / K) rounded up to a multiple of 8, capped at T  for k = 1..K)
    longest_q  = max_j length[q * G + j]                       (group q's longest row)
    order      = groups sorted by longest_q (stable)           (within each data shard)
    group_m    = order[m * Q/M : (m + 1) * Q/M]
    T_m        = min{b in buckets : b >= max_{q in group_m} longest_q}

K = train.length_buckets (default 4: T/4, T/2, 3T/4, T). Linear steps rather than powers of two:
a micro-batch whose longest row is just past a bucket pays at most T/K padded slots per row
(powers of two pay up to 2x), and K shapes stay few. The multiple of 8 keeps the LM head's chunks
(train/logprobs.py `_chunk_size`: the largest divisor of T_m up to train.logp_chunk) from
collapsing to size 1 on a prime length. Whole groups stay together (advantages, the KL reference
and prefix sharing are per group), and the loss's (numerator, denominator) sums make any order and
any trim the same update (train/step.py).

Several data shards (hosts): each micro-batch takes Q / (M * shards) groups of every shard, sorted
within the shard, its rows listed shard by shard, so `DataShard.block` of a micro-batch's rows is
this shard's part and no query's images leave its host.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MULTIPLE = 8  # bucket lengths are multiples of this (or T itself)


def bucket_lengths(max_length: int, count: int, multiple: int = MULTIPLE) -> tuple[int, ...]:
    """The K = `count` trim lengths of completions of at most `max_length` tokens, ascending, the
    last `max_length` (see the module docstring); count <= 1: (max_length,)."""
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: completions need at least one token")
    out = []
    for k in range(1, max(count, 1) + 1):
        length = -(-k * max_length // max(count, 1))
        out.append(min(max_length, -(-length // multiple) * multiple))
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class MicroBatchPlan:
    """groups: per micro-batch, the step's group indices it holds (shard by shard); lengths: its
    trim length T_m (a bucket); max_length: T, the padded length."""

    groups: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]
    max_length: int

    def rows(self, m: int, group_size: int) -> np.ndarray:
        """Row indices [n] of micro-batch m into the step's rows (group q's rows q * G .. q * G + G - 1)."""
        q = np.asarray(self.groups[m], np.int64)
        return (q[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)

    @property
    def length_fraction(self) -> float:
        """sum_m T_m / (M T): the update's completion slots against the padded update's."""
        return float(sum(self.lengths)) / (len(self.lengths) * self.max_length)


def plan_micro_batches(lengths: np.ndarray, group_size: int, micro_batches: int, buckets: tuple[int, ...],
                       shard_of_group: np.ndarray | None = None) -> MicroBatchPlan:
    """The plan of a step (module docstring).

    Args:
      lengths: [Q * G] completion lengths (tokens up to and including EOS), groups contiguous.
      group_size: G.
      micro_batches: M; Q must divide into M micro-batches (times the shards).
      buckets: ascending trim lengths, the last the padded length T (`bucket_lengths`).
      shard_of_group: [Q] the data shard (host) holding each group; None: one shard.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.size % group_size:
        raise ValueError(f"lengths of shape {lengths.shape} are not [groups * {group_size}]")
    longest = lengths.reshape(-1, group_size).max(axis=1)
    q = longest.size
    if longest.max(initial=0) > buckets[-1]:
        raise ValueError(f"a completion of {int(longest.max())} tokens is longer than the longest bucket {buckets[-1]}")
    owner = np.zeros(q, np.int64) if shard_of_group is None else np.asarray(shard_of_group, np.int64)
    shards = int(owner.max(initial=0)) + 1
    per_shard = [np.flatnonzero(owner == s) for s in range(shards)]
    if any(len(p) != len(per_shard[0]) for p in per_shard) or len(per_shard[0]) % micro_batches:
        raise ValueError(f"{q} groups over {shards} shard(s) do not split into {micro_batches} micro-batches of "
                         "whole groups, an equal part from each shard")
    # Each shard's groups, shortest first (stable: equal lengths keep their order).
    ordered = [p[np.argsort(longest[p], kind="stable")] for p in per_shard]
    per = len(per_shard[0]) // micro_batches
    groups, trims = [], []
    for m in range(micro_batches):
        members = np.concatenate([o[m * per:(m + 1) * per] for o in ordered])
        groups.append(tuple(int(x) for x in members))
        need = int(longest[members].max(initial=0))
        trims.append(next(b for b in buckets if b >= need))
    return MicroBatchPlan(tuple(groups), tuple(trims), int(buckets[-1]))


def trimmed_completions(completions, rows: np.ndarray, length: int):
    """Host Completions of `rows` of a step's completions [R, T], cut to the first `length` slots
    ([n, length]; every row of the plan ends within them, so only padding is cut)."""
    rows = np.asarray(rows)
    mask = np.asarray(completions.mask)[rows]
    if mask[:, length:].any():
        raise ValueError(f"a completion of the rows is longer than the trim length {length}")
    return completions.replace(ids=np.asarray(completions.ids)[rows, :length], mask=mask[:, :length],
                               logps=np.asarray(completions.logps)[rows, :length],
                               lengths=np.asarray(completions.lengths)[rows])
