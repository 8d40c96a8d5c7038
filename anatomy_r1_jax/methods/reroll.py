"""Re-rolling zero-variance groups within a GRPO step: GDQA online and DAPO-style dynamic sampling.

A group whose G rewards are all equal has advantage 0 for every member: no gradient. After a step's
rollout and rewards, and before its update, each such group is rolled out again:

- "variants" (GDQA online, `gdqa.trigger="online"`): the query's G rows spread over its variants,
  row j conditioned on variant j % n (`augmentation.spread_variants`, variant 0 the query itself);
- "same" (dynamic sampling, `rl.dynamic_sampling="resample"`): G fresh samples of the same prompts.

The group's new G completions and rewards replace its old ones, whatever they are; a group still
all-equal is re-rolled again next round, for at most `rounds` rounds. `rl.dynamic_sampling="drop"`
re-rolls nothing: the update gives all-equal groups zero weight (train/step.py).

Fixed shapes: a re-roll is one rollout call over the same P groups as the micro-batch's rollout;
groups that need none ride along unchanged as padding whose rows are discarded. The rollout and
the update then see the shapes they already compile for (P groups; S = 1 prompt row per group, or
n with variants), so nothing compiles per step; a micro-batch without an all-equal group makes no
call. The price is up to `rounds` extra micro-batch rollouts per micro-batch (padding included,
logged as `<prefix>/reroll_rows`); a call sized to the affected groups alone would need shapes of
its own and an overflow rule, and saves at most that padding.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.methods.augmentation import GDQAState, all_equal_groups, spread_variants
from anatomy_r1_jax.rl.registry import Registry

# rl.dynamic_sampling: "off"; "resample" (re-roll all-equal groups, REGROUPS "same"); "drop" (zero weight in the loss)
DYNAMIC_SAMPLING = ("off", "resample", "drop")

RegroupFn = Callable[[Sequence[Record], GDQAState, np.random.Generator], list[Record]]
REGROUPS: Registry[RegroupFn] = Registry("zero-variance re-roll")


@REGROUPS.register("variants")
def variant_group(group: Sequence[Record], state: GDQAState, rng: np.random.Generator) -> list[Record]:
    """GDQA online: the query (group[0], variant 0 of any group) spread over its variants."""
    return spread_variants(group[0], len(group), state, rng)


@REGROUPS.register("same")
def same_group(group: Sequence[Record], state: GDQAState, rng: np.random.Generator) -> list[Record]:
    """Dynamic sampling: the same G prompts, sampled afresh."""
    del state, rng
    return list(group)


@dataclasses.dataclass(frozen=True)
class RerollPolicy:
    """regroup: a REGROUPS name; rounds: most re-rolls of one group per step; prefix: of its metrics."""

    regroup: str
    rounds: int
    prefix: str


def reroll_policy(config) -> RerollPolicy | None:
    """The run's re-roll from its config (gdqa.trigger, rl.dynamic_sampling), None for none.
    Raises ValueError naming the field for an unknown mode or two re-rolls at once."""
    mode, online = config.rl.dynamic_sampling, config.gdqa.trigger == "online"
    if mode not in DYNAMIC_SAMPLING:
        raise ValueError(f"config rl.dynamic_sampling={mode!r}: use one of {DYNAMIC_SAMPLING}")
    if online and mode == "resample":
        raise ValueError("config gdqa.trigger='online' and rl.dynamic_sampling='resample' both re-roll all-equal "
                         "groups: set one of them ('off' for dynamic sampling)")
    if online:
        return RerollPolicy("variants", int(config.gdqa.max_rerolls), "gdqa")
    if mode == "resample":
        return RerollPolicy("same", int(config.rl.max_resample_rounds), "dynamic_sampling")
    return None


@dataclasses.dataclass
class MicroRollout:
    """One micro-batch's rollout on the host: groups [P][G] records (row p * G + j conditioned on
    groups[p][j]), completions (host Completions, rows [P * G]), texts [P * G], rewards [P * G],
    prompt: what the rollout that last sampled rows of `groups` was given (opaque here: the
    trainer's prompt batch of all P groups, which a re-roll's rollout builds anew)."""

    groups: list[list[Record]]
    completions: Any
    texts: list[str]
    rewards: np.ndarray
    prompt: Any = None


@dataclasses.dataclass
class RerollStats:
    """calls: re-roll rollouts; rows: rows they sampled (padding included); rerolled: groups
    re-rolled at least once; rescued: of those, the groups whose final rewards are not all equal;
    seconds: time in re-roll rollouts and their rewards."""

    calls: int = 0
    rows: int = 0
    rerolled: int = 0
    rescued: int = 0
    seconds: float = 0.0

    def __add__(self, other: "RerollStats") -> "RerollStats":
        return RerollStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/reroll_rows": float(self.rows), f"{prefix}/reroll_seconds": self.seconds,
                f"{prefix}/rerolled_groups": float(self.rerolled), f"{prefix}/rescued_groups": float(self.rescued)}


def _replace_rows(old, new, rows: np.ndarray):
    """Every leaf of `new` where rows [N] is True, of `old` elsewhere (leaves [N, ...])."""
    return jax.tree.map(lambda o, n: np.where(rows.reshape((-1,) + (1,) * (np.ndim(o) - 1)), n, o), old, new)


def reroll_zero_variance(
    micro: MicroRollout,
    *,
    group_size: int,
    rounds: int,
    regroup: Callable[[list[Record]], list[Record]],
    rollout: Callable[[list[list[Record]], int], tuple[Any, list[str]]],
    score: Callable[[list[str], list[Record]], np.ndarray],
) -> tuple[MicroRollout, RerollStats]:
    """Re-rolls the micro-batch's all-equal groups (see the module docstring).

    regroup(group) -> the G records of its re-roll; rollout(groups [P][G], round) -> (host
    Completions [P * G rows], texts [P * G], its prompt) with the micro-batch's fixed shape; score(texts,
    records) -> rewards, for the re-rolled rows only. Returns the micro-batch with the re-rolled
    groups' records, completions, texts and rewards in place of theirs, and what it cost.
    """
    g = group_size
    first = all_equal_groups(micro.rewards, g)
    todo, stats = first.copy(), RerollStats()
    for r in range(rounds):
        if not todo.any():
            break
        t0 = time.perf_counter()
        groups = [regroup(grp) if t else grp for grp, t in zip(micro.groups, todo)]
        completions, texts, prompt = rollout(groups, r)
        rows = np.repeat(todo, g)
        rewards = micro.rewards.copy()
        rewards[rows] = score([t for t, keep in zip(texts, rows) if keep],
                              [rec for grp, t in zip(groups, todo) if t for rec in grp])
        micro = MicroRollout(groups=groups, completions=_replace_rows(micro.completions, completions, rows),
                             texts=[new if keep else old for old, new, keep in zip(micro.texts, texts, rows)],
                             rewards=rewards, prompt=prompt)
        stats.calls += 1
        stats.rows += len(texts)
        stats.seconds += time.perf_counter() - t0
        todo &= all_equal_groups(rewards, g)
    stats.rerolled = int(first.sum()) if stats.calls else 0
    stats.rescued = int((first & ~all_equal_groups(micro.rewards, g)).sum())
    return micro, stats
