"""Re-rolling zero-variance groups within a GRPO step: GDQA online and DAPO-style dynamic sampling.

A group whose G rewards are all equal has advantage 0 for every member: no gradient. After a step's
rollout and rewards, and before its update, the groups that the run's signal says need it are
rolled out again:

- "variants" (GDQA online, `gdqa.trigger="online"`): the query's G rows spread over its variants,
  row j conditioned on variant j % n (`augmentation.spread_variants`, variant 0 the query itself);
- "same" (dynamic sampling, `rl.dynamic_sampling="resample"`): G fresh samples of the same prompts.

Which groups, and which count as rescued, is the group signal (`gdqa.signal`, SIGNALS):

- "reward":   re-roll a group whose total rewards are all equal; rescued when they are not after.
  A group whose only spread is the format reward counts as diverse, and all-correct groups are
  re-rolled too (the behaviour before issue 23; dynamic sampling always uses it).
- "accuracy": re-roll a group whose accuracy rewards are all 0 (all wrong, whatever its format
  spread); rescued when its accuracy rewards vary after: a recognition signal. All-correct groups
  are left alone.

The group's new G completions and rewards replace its old ones, whatever they are; a group that
still needs it is re-rolled again next round, for at most `rounds` rounds. With
`gdqa.rescued_prompt="original"`, a group a variant re-roll rescued is trained on its original
prompt (`on_original_prompt`: the records, hence the prompt and the re-scored rewards, of the query
itself), the one evaluation asks. `rl.dynamic_sampling="drop"` re-rolls nothing: the update gives
all-equal groups zero weight (train/step.py).

Per step (RerollStats.metrics): re-rolled and rescued groups, both also by the group's outcome
before the re-roll (`group_outcomes`: all wrong, all correct, format only), and how many re-rolled
groups have accuracy that varies after it.

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
from anatomy_r1_jax.methods.augmentation import GDQAState, spread_variants
from anatomy_r1_jax.rl.advantages import all_equal_groups
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
class GroupSignal:
    """needs_reroll(total [P*G], accuracy [P*G], G) -> [P] bool: groups to re-roll;
    learns(total, accuracy, G) -> [P] bool: groups that carry the signal (rescued, after a re-roll)."""

    needs_reroll: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    learns: Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def _all_wrong(total: np.ndarray, accuracy: np.ndarray, g: int) -> np.ndarray:
    del total
    return np.all(np.asarray(accuracy).reshape(-1, g) <= 0, axis=1)


SIGNALS: Registry[GroupSignal] = Registry("group signal")
SIGNALS.register("reward")(GroupSignal(needs_reroll=lambda total, acc, g: all_equal_groups(total, g),
                                       learns=lambda total, acc, g: ~all_equal_groups(total, g)))
SIGNALS.register("accuracy")(GroupSignal(needs_reroll=_all_wrong,
                                         learns=lambda total, acc, g: ~all_equal_groups(acc, g)))

OUTCOMES = ("all_wrong", "all_correct", "format_only")


def group_outcomes(total: np.ndarray, accuracy: np.ndarray, group_size: int) -> np.ndarray:
    """[P] str per group of G rows: "format_only" (accuracy all equal, total rewards not: the only
    spread is the format), "all_wrong" / "all_correct" (total rewards all equal, accuracy all 0 / all
    positive), else "diverse" (accuracy varies)."""
    acc = np.asarray(accuracy, np.float64).reshape(-1, group_size)
    same_acc, same_total = all_equal_groups(acc.ravel(), group_size), all_equal_groups(total, group_size)
    return np.where(~same_acc, "diverse", np.where(~same_total, "format_only",
                                                   np.where(acc[:, 0] > 0, "all_correct", "all_wrong")))


@dataclasses.dataclass(frozen=True)
class RerollPolicy:
    """regroup: a REGROUPS name; rounds: most re-rolls of one group per step; prefix: of its metrics;
    signal: a SIGNALS name; rescued_prompt: "variant" | "original" (see the module docstring)."""

    regroup: str
    rounds: int
    prefix: str
    signal: str = "reward"
    rescued_prompt: str = "variant"


RESCUED_PROMPTS = ("variant", "original")


def reroll_policy(config) -> RerollPolicy | None:
    """The run's re-roll from its config (gdqa.trigger, rl.dynamic_sampling), None for none.
    Raises ValueError naming the field for an unknown mode or two re-rolls at once."""
    mode, online = config.rl.dynamic_sampling, config.gdqa.trigger == "online"
    if mode not in DYNAMIC_SAMPLING:
        raise ValueError(f"config rl.dynamic_sampling={mode!r}: use one of {DYNAMIC_SAMPLING}")
    if online and mode == "resample":
        raise ValueError("config gdqa.trigger='online' and rl.dynamic_sampling='resample' both re-roll all-equal "
                         "groups: set one of them ('off' for dynamic sampling)")
    signal, prompt = config.gdqa.signal, config.gdqa.rescued_prompt
    SIGNALS.get(signal)
    if prompt not in RESCUED_PROMPTS:
        raise ValueError(f"config gdqa.rescued_prompt={prompt!r}: use one of {RESCUED_PROMPTS}")
    if not online and (signal, prompt) != ("reward", "variant") and config.gdqa.trigger != "off":
        raise ValueError(f"config gdqa.signal={signal!r} / gdqa.rescued_prompt={prompt!r} apply to the online re-roll "
                         f"(gdqa.trigger='online'), not to gdqa.trigger={config.gdqa.trigger!r}")
    if online:
        return RerollPolicy("variants", int(config.gdqa.max_rerolls), "gdqa", signal, prompt)
    if mode == "resample":
        return RerollPolicy("same", int(config.rl.max_resample_rounds), "dynamic_sampling")
    return None


@dataclasses.dataclass
class MicroRollout:
    """A rollout call's groups on the host: groups [P][G] records (row p * G + j conditioned on
    groups[p][j]), completions (host Completions, rows [P * G]), texts [P * G], rewards [P * G]
    (total), accuracy [P * G] (the run's accuracy reward), per_reward {name: [P * G]} (every
    reward's values) and prompt: (the PromptBatch the rows were sampled from, S its prompt rows per
    group), None once the groups changed without a rollout (to be collated again)."""

    groups: list[list[Record]]
    completions: Any
    texts: list[str]
    rewards: np.ndarray
    accuracy: np.ndarray
    per_reward: dict = dataclasses.field(default_factory=dict)
    prompt: tuple[Any, int] | None = None


@dataclasses.dataclass
class RerollStats:
    """calls: re-roll rollouts; rows: rows they sampled (padding included); rerolled: groups
    re-rolled at least once; rescued: of those, the groups that carry the signal after it
    (GroupSignal.learns); by_outcome: {outcome: [rerolled, rescued]} by the group's outcome before the
    re-roll (OUTCOMES); accuracy_varies: re-rolled groups whose accuracy rewards vary after it;
    seconds: time in re-roll rollouts and their rewards."""

    calls: int = 0
    rows: int = 0
    rerolled: int = 0
    rescued: int = 0
    accuracy_varies: int = 0
    seconds: float = 0.0
    by_outcome: dict = dataclasses.field(default_factory=lambda: {o: [0, 0] for o in OUTCOMES})

    def __add__(self, other: "RerollStats") -> "RerollStats":
        counts = {f.name: getattr(self, f.name) + getattr(other, f.name)
                  for f in dataclasses.fields(self) if f.name != "by_outcome"}
        by = {o: [a + b for a, b in zip(self.by_outcome[o], other.by_outcome[o])] for o in OUTCOMES}
        return RerollStats(**counts, by_outcome=by)

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/reroll_rows": float(self.rows), f"{prefix}/reroll_seconds": self.seconds,
               f"{prefix}/rerolled_groups": float(self.rerolled), f"{prefix}/rescued_groups": float(self.rescued),
               f"{prefix}/accuracy_varies_after": float(self.accuracy_varies)}
        for o, (rerolled, rescued) in self.by_outcome.items():
            out[f"{prefix}/rerolled/{o}"], out[f"{prefix}/rescued/{o}"] = float(rerolled), float(rescued)
        return out


def _replace_rows(old, new, rows: np.ndarray):
    """Every leaf of `new` where rows [N] is True, of `old` elsewhere (leaves [N, ...])."""
    return jax.tree.map(lambda o, n: np.where(rows.reshape((-1,) + (1,) * (np.ndim(o) - 1)), n, o), old, new)


def replace_groups(micro: MicroRollout, new: MicroRollout, todo: np.ndarray) -> MicroRollout:
    """`micro` with the groups where todo [P] is True taken from `new` (records, completions, texts,
    rewards; `new`'s prompt, which sampled every row)."""
    rows = np.repeat(todo, len(micro.groups[0]))
    return MicroRollout(groups=[n if t else o for o, n, t in zip(micro.groups, new.groups, todo)],
                        completions=_replace_rows(micro.completions, new.completions, rows),
                        texts=[n if keep else o for o, n, keep in zip(micro.texts, new.texts, rows)],
                        rewards=np.where(rows, new.rewards, micro.rewards),
                        accuracy=np.where(rows, new.accuracy, micro.accuracy),
                        per_reward=_replace_rows(micro.per_reward, new.per_reward, rows), prompt=new.prompt)


def reroll_zero_variance(
    micro: MicroRollout,
    *,
    group_size: int,
    rounds: int,
    regroup: Callable[[list[Record]], list[Record]],
    roll: Callable[[list[list[Record]], int, np.ndarray], MicroRollout],
    signal: str = "reward",
) -> tuple[MicroRollout, RerollStats, np.ndarray]:
    """Re-rolls the groups of `micro` that `signal` (a SIGNALS name) says need it (see the module
    docstring), for at most `rounds` rounds.

    regroup(group) -> the G records of its re-roll; roll(groups [P][G], round, todo [P] bool) -> a
    MicroRollout of all P groups with the call's fixed shape, whose rows of the `todo` groups are
    scored (the rollout itself: the collector's, train/collector.py). Returns `micro` with the
    re-rolled groups' records, completions, texts and rewards in place of theirs, what it cost and
    found, and rescued [P] bool (re-rolled groups that carry the signal after it).
    """
    g, sig = group_size, SIGNALS.get(signal)
    outcomes = group_outcomes(micro.rewards, micro.accuracy, g)
    first = sig.needs_reroll(micro.rewards, micro.accuracy, g)
    todo, stats = first.copy(), RerollStats()
    for r in range(rounds):
        if not todo.any():
            break
        t0 = time.perf_counter()
        new = roll([regroup(grp) if t else grp for grp, t in zip(micro.groups, todo)], r, todo)
        micro = replace_groups(micro, new, todo)
        stats.calls += 1
        stats.rows += len(new.texts)
        stats.seconds += time.perf_counter() - t0
        todo &= sig.needs_reroll(micro.rewards, micro.accuracy, g)
    rerolled = first if stats.calls else np.zeros_like(first)
    rescued = rerolled & sig.learns(micro.rewards, micro.accuracy, g)
    stats.rerolled, stats.rescued = int(rerolled.sum()), int(rescued.sum())
    stats.accuracy_varies = int((rerolled & ~all_equal_groups(micro.accuracy, g)).sum())
    for o in OUTCOMES:
        stats.by_outcome[o] = [int((rerolled & (outcomes == o)).sum()), int((rescued & (outcomes == o)).sum())]
    return micro, stats, rescued


def on_original_prompt(micro: MicroRollout, rescued: np.ndarray) -> MicroRollout:
    """The micro-batch with each rescued group's G records replaced by its query (groups[p][0], the
    original prompt), so that the update trains its completions on the prompt evaluation asks; its
    prompt batch is to be built again (prompt None) and those rows' rewards scored again against
    the query (the collector does both)."""
    if not np.any(rescued):
        return micro
    groups = [[grp[0]] * len(grp) if r else grp for grp, r in zip(micro.groups, rescued)]
    return dataclasses.replace(micro, groups=groups, prompt=None)
