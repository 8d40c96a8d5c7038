"""Group Diversity Question Augmentation (GDQA), host side. Our reconstruction (METHOD.md section 7).

A triggered query's G rollouts are spread over variants of the query, so the group sees different
phrasings; its advantages are then computed over the pooled group of G as usual. Variants are
made before batching, from three kinds of change:

- "rephrase": the question re-rendered with another form of the template bank. SSG-VQA questions
  are parsed into their target phrase (e.g. "red anatomy that is above the liver anatomy") and
  re-rendered with every form seen in the released files, the GDQA file's rephrasings included
  (their "a anatomy" and "?;" quirks kept as the authors' data has them). Other questions
  (OmniMedVQA style) get generic wrappers.
- "permute": the options reordered, the answer letter remapped to where the correct text went.
- "template": another instruction template (`Record.prompt_variant`, one of data.prompts.VARIANTS).

Variants keep the query's id (same query: same S(q), same GDQA state entry). Variant 0 is the query
itself. The trigger decides which queries get variants before the rollout ("adaptive", "always",
"off"); "online" gives none before it and re-rolls a group whose rewards came out all equal with
its variants within the same step (methods/reroll.py).

The hard set (queries a calibration pass found all-equal and not all-correct: no accuracy signal
because the policy always fails them) decays: a query leaves it once one of its groups diverges.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Callable, Iterable, Sequence

import numpy as np

from anatomy_r1_jax.data.prompts import VARIANTS as PROMPT_VARIANTS
from anatomy_r1_jax.data.rephrasings import parse_ssg_question, question_rephrasings  # noqa: F401 (methods API)
from anatomy_r1_jax.data.records import LETTERS, Record
from anatomy_r1_jax.rl.advantages import all_equal_groups
from anatomy_r1_jax.rl.registry import Registry

KINDS = ("rephrase", "permute", "template")


def variant_kinds(kinds: Sequence[str], *, signal: str, accuracy_key: str) -> tuple[str, ...]:
    """The variant kinds a run uses: `kinds`, less "permute" when GDQA's signal is the accuracy
    (gdqa.signal="accuracy") and the run's accuracy reward scores the class name
    (rewards.CLASS_NAME_ACCURACY): a class-name answer scores the same under any option order, so a
    permutation adds no recognition signal, only a prompt evaluation never shows."""
    from anatomy_r1_jax.rl.rewards import CLASS_NAME_ACCURACY

    if signal == "accuracy" and accuracy_key in CLASS_NAME_ACCURACY:
        return tuple(k for k in kinds if k != "permute")
    return tuple(kinds)

def permute_options(record: Record, perm: Sequence[int]) -> Record:
    """Options reordered so new position i holds old option perm[i]; the answer letter follows."""
    perm = list(perm)
    if sorted(perm) != list(range(len(record.options))):
        raise ValueError(f"{perm} is not a permutation of {len(record.options)} options")
    options = tuple(record.options[j] for j in perm)
    answer = LETTERS[perm.index(record.answer_index)]
    return dataclasses.replace(record, options=options, answer=answer, answer_text=options[LETTERS.index(answer)])


def _cycle_shuffled(items: list, rng: np.random.Generator) -> Iterable:
    """Yield items in a random order, reshuffling after each pass (distinct before repeating)."""
    if not items:
        return itertools.repeat(None)
    return itertools.chain.from_iterable(
        [items[i] for i in rng.permutation(len(items))] for _ in itertools.count()
    )


def _other_permutations(k: int, rng: np.random.Generator, limit: int) -> list[tuple[int, ...]]:
    if k <= 6:
        return [p for p in itertools.permutations(range(k)) if p != tuple(range(k))]
    return [tuple(int(i) for i in rng.permutation(k)) for _ in range(limit)]


def make_variants(
    record: Record,
    n: int,
    rng: np.random.Generator,
    *,
    kinds: Sequence[str] = KINDS,
    templates: Sequence[str] | None = None,
) -> list[Record]:
    """n variants of `record`: [record, v1, ..., v_{n-1}], each v_k combining all `kinds`.

    Each kind draws its choices without repetition until exhausted (rephrasings, non-identity
    option permutations, instruction templates other than the record's). Every variant has
    exactly one correct option: answer_text == options[answer] == record.answer_text.
    templates: the prompt variants to draw from (default data.prompts.VARIANTS).
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown GDQA variant kinds {sorted(unknown)}; known: {KINDS}")
    if n < 1:
        raise ValueError("n must be >= 1")
    templates = PROMPT_VARIANTS if templates is None else templates
    current = record.prompt_variant
    phrasings = _cycle_shuffled(question_rephrasings(record.question) if "rephrase" in kinds else [], rng)
    perms = _cycle_shuffled(_other_permutations(len(record.options), rng, n) if "permute" in kinds else [], rng)
    other_templates = [t for t in templates if t != current] if "template" in kinds else []
    prompt_variants = _cycle_shuffled(other_templates, rng)
    out = [record]
    for _ in range(n - 1):
        variant, question, perm, template = record, next(phrasings), next(perms), next(prompt_variants)
        if question is not None:
            variant = dataclasses.replace(variant, question=question)
        if perm is not None:
            variant = permute_options(variant, perm)
        if template is not None:
            variant = dataclasses.replace(variant, prompt_variant=template)
        out.append(variant)
    return out


# ---- triggers and state -------------------------------------------------------------------------

TriggerFn = Callable[["GDQAState", str], bool]
TRIGGERS: Registry[TriggerFn] = Registry("GDQA trigger")
register_trigger = TRIGGERS.register


@register_trigger("adaptive")
def adaptive_trigger(state: "GDQAState", record_id: str) -> bool:
    """Triggered if the query's last group had all-equal rewards or calibration marked it hard."""
    return record_id in state.hard_ids or state.last_all_equal.get(record_id, False)


@register_trigger("always")
def always_trigger(state: "GDQAState", record_id: str) -> bool:
    del state, record_id
    return True


@register_trigger("off")
def off_trigger(state: "GDQAState", record_id: str) -> bool:
    del state, record_id
    return False


@register_trigger("online")
def online_trigger(state: "GDQAState", record_id: str) -> bool:
    """No variants before the rollout: a group that comes out all-equal is re-rolled with its
    variants in the same step, before the update (methods/reroll.py, gdqa.max_rerolls rounds)."""
    del state, record_id
    return False


@dataclasses.dataclass
class GDQAState:
    """Which queries get variants. Host-side, JSON-serialisable for checkpoints.

    trigger: a TRIGGERS name; num_variants: distinct variants a triggered group is spread over
    (capped at G); kinds: the variant kinds used; hard_ids: queries a calibration pass marked
    hard that have not diverged since; last_all_equal: per query id, whether its last group's
    rewards were all equal; calibrated: whether the run's calibration pass has been done.
    """

    trigger: str = "adaptive"
    num_variants: int = 4
    kinds: tuple[str, ...] = KINDS
    hard_ids: set[str] = dataclasses.field(default_factory=set)
    last_all_equal: dict[str, bool] = dataclasses.field(default_factory=dict)
    calibrated: bool = False

    def __post_init__(self):
        TRIGGERS.get(self.trigger)  # fail early on a bad name
        self.kinds = tuple(self.kinds)
        self.hard_ids = set(self.hard_ids)

    def is_triggered(self, record_id: str) -> bool:
        return TRIGGERS.get(self.trigger)(self, record_id)

    def mark_hard(self, record_ids: Iterable[str]) -> None:
        self.hard_ids.update(record_ids)

    def observe(self, record_ids: Sequence[str], rewards: np.ndarray, group_size: int) -> np.ndarray:
        """Record each group's outcome. rewards [P * G] (groups contiguous), record_ids [P]. A query
        whose group diverged (rewards not all equal) leaves the hard set.

        Returns the [P] bool all-equal mask.
        """
        all_equal = all_equal_groups(rewards, group_size)
        if len(all_equal) != len(record_ids):
            raise ValueError(f"{len(record_ids)} queries but {len(all_equal)} groups of {group_size} rewards")
        for rid, eq in zip(record_ids, all_equal):
            self.last_all_equal[rid] = bool(eq)
        self.hard_ids.difference_update(rid for rid, eq in zip(record_ids, all_equal) if not eq)
        return all_equal

    def calibrate(self, record_ids: Sequence[str], rewards: np.ndarray, correct: np.ndarray, group_size: int) -> int:
        """Mark as hard the queries whose calibration group had all-equal rewards and was not
        all-correct (all right is easy, not hard: METHOD.md section 7 augments difficult queries).
        rewards, correct [P * G] (correct: the accuracy reward > 0); returns how many were marked."""
        all_equal = all_equal_groups(rewards, group_size)
        all_correct = np.all(np.asarray(correct, bool).reshape(-1, group_size), axis=1)
        hard = [rid for rid, eq, ok in zip(record_ids, all_equal, all_correct, strict=True) if eq and not ok]
        self.mark_hard(hard)
        self.calibrated = True
        return len(hard)

    def resumed(self, saved: dict) -> "GDQAState":
        """This state's settings (from the run's config) with the history of a checkpointed state:
        a run continued under another method (the ablation's arms start from one warm-up checkpoint)
        uses its own trigger, and keeps what was observed."""
        old = GDQAState.from_json(saved)
        return dataclasses.replace(self, hard_ids=old.hard_ids, last_all_equal=old.last_all_equal,
                                   calibrated=old.calibrated)

    def calibrate_from_evaluation(self, path: str | os.PathLike, train_ids: Iterable[str]) -> int:
        """Marks hard the training queries whose sampled answers in an evaluation result were all
        wrong (no accuracy signal, and not easy; all right is easy, see `calibrate`). `path` is the JSON that
        `scripts/evaluate.py --samples G` writes for the base model on the training records. Returns
        how many were marked. Raises ValueError naming the file when it has no samples or holds a
        record id that is not in the training set."""
        with open(path) as f:
            result = json.load(f)
        samples = int(result.get("settings", {}).get("samples", 0))
        if samples < 2:
            raise ValueError(f"{path}: calibration needs sampled answers (evaluate.py --samples G >= 2), got {samples}")
        known = set(train_ids)
        hard = []
        for i, rec in enumerate(result["records"]):
            if rec["id"] not in known:
                raise ValueError(f"{path}: record {i} (id {rec['id']!r}) is not a training record")
            if rec["samples_correct"] == 0:
                hard.append(rec["id"])
        self.mark_hard(hard)
        self.calibrated = True
        return len(hard)

    def to_json(self) -> dict:
        return {
            "trigger": self.trigger,
            "num_variants": self.num_variants,
            "kinds": list(self.kinds),
            "hard_ids": sorted(self.hard_ids),
            "last_all_equal": dict(sorted(self.last_all_equal.items())),
            "calibrated": self.calibrated,
        }

    @classmethod
    def from_json(cls, d: dict) -> "GDQAState":
        return cls(
            trigger=d["trigger"],
            num_variants=int(d["num_variants"]),
            kinds=tuple(d["kinds"]),
            hard_ids=set(d["hard_ids"]),
            last_all_equal={k: bool(v) for k, v in d["last_all_equal"].items()},
            calibrated=bool(d.get("calibrated", False)),
        )

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GDQAState":
        with open(path) as f:
            return cls.from_json(json.load(f))


def spread_variants(record: Record, group_size: int, state: GDQAState, rng: np.random.Generator) -> list[Record]:
    """A group of G records over n = min(G, num_variants) variants from `make_variants`, assigned
    round-robin (rollout j gets variant j mod n; variant 0 is `record`)."""
    n = max(1, min(group_size, state.num_variants))
    variants = make_variants(record, n, rng, kinds=state.kinds)
    return [variants[j % n] for j in range(group_size)]


def assign_group_variants(
    record: Record, group_size: int, trigger_state: GDQAState, rng: np.random.Generator
) -> list[Record]:
    """The G records a query's rollouts are conditioned on: `spread_variants` when the trigger
    fires, else G copies of the record."""
    if not trigger_state.is_triggered(record.id):
        return [record] * group_size
    return spread_variants(record, group_size, trigger_state, rng)
