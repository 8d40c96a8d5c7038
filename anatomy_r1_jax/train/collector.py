"""The host side of a GRPO step: its queries -> the update's TrainBatches and the step's metrics.

    queries (this data shard's, pipeline order) -> records of every shard, call by call
      -> GDQA variants per group (methods/augmentation.py, the step's rng)
      -> R rollout calls (rl.rollout_batch_size; `rollout` is the compiled program, given)
      -> decode -> rewards, once per completion and target
      -> re-rolls of the groups the re-roll policy names (GDQA online / dynamic sampling,
         methods/reroll.py; the calls' fixed shapes)
      -> M micro-batches (train.micro_batches; in step order, or the length-aware plan of
         train/micro_batches.py) -> TrainBatches (host arrays; row p * G + j of micro-batch i is
         the j-th rollout of its group p, its reward and record aligned; S prompt rows per group,
         one S for the whole step)

`StepCollector.collect` is the whole of it; nothing here holds device state, so a test drives it
with a scripted rollout. GDQA's calibration (`calibrate_gdqa`) rolls out with the same `roll`; a
warm-up step's batch is `warmup_batch`. Several processes:
each collates its own queries (images) and sees every shard's completions (runtime/placement.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from anatomy_r1_jax.data.batch import Completions, PromptBatch, TrainBatch
from anatomy_r1_jax.data.collate import Collator
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.methods.augmentation import GDQAState, assign_group_variants
from anatomy_r1_jax.methods.reroll import (REGROUPS, MicroRollout, RerollPolicy, RerollStats, on_original_prompt,
                                          reroll_zero_variance)
from anatomy_r1_jax.rl.advantages import all_equal_groups
from anatomy_r1_jax.rl.rewards import compute_rewards
from anatomy_r1_jax.runtime import distributed
from anatomy_r1_jax.runtime.distributed import DataShard
from anatomy_r1_jax.runtime.placement import shard_prompts, step_order, step_records
from anatomy_r1_jax.train.micro_batches import MicroBatchPlan, plan_micro_batches, trimmed_completions

log = logging.getLogger(__name__)

# (this shard's PromptBatch [q / shards * S rows], key, G, S) -> host Completions of every shard's q * G rows
Rollout = Callable[[PromptBatch, jax.Array, int, int], Completions]


@dataclasses.dataclass(frozen=True)
class StepCollector:
    """What a GRPO step's host side needs, from the run's config (train/assembly.py builds it).

    rewards: config.rl.rewards ({name: weight}); accuracy_key: the run's accuracy reward; calls: R;
    micro_batches: M; length_buckets: the length-aware update's T_m (None: padded to T);
    records: the training records (queries index them); sq_by_id: S(q) per record id (a metric)."""

    group_size: int
    rewards: dict
    accuracy_key: str
    share_prompts: bool
    calls: int
    micro_batches: int
    length_buckets: tuple[int, ...] | None
    reroll: RerollPolicy | None
    shard: DataShard
    collator: Collator
    decode: Callable[[Completions], list[str]]
    records: Sequence[Record]
    sq_by_id: dict
    category_index: dict

    # ---- pieces ---------------------------------------------------------------------------------
    def prompts_per_group(self, groups) -> int:
        """S for a step's groups: the fewest prompt rows per group such that row j of every group
        repeats row j % S (1 without GDQA variants; the number of variants with them; G when
        train.share_prompts is off). See rl/rollout.py."""
        g = len(groups[0])
        if not self.share_prompts:
            return g
        return next(s for s in range(1, g + 1) if all(grp[j] == grp[j % s] for grp in groups for j in range(g)))

    def prompt_batch(self, groups, images, prompts_per_group: int) -> PromptBatch:
        """This shard's PromptBatch of `groups` [q][G] (every shard's groups; images [q / shards],
        this shard's queries): the first S rows of each of this shard's groups (prefix sharing)."""
        s = prompts_per_group
        return shard_prompts(self.shard, self.collator,
                             self.collator.prompts([grp[:s] for grp in self.shard.block(groups)], images))

    def categories(self, records) -> np.ndarray:
        return np.array([self.category_index.get(r.category, -1) for r in records], np.int32)

    def score(self, texts: list[str], rows: list[Record]) -> tuple[np.ndarray, np.ndarray, dict]:
        """(total rewards, the run's accuracy reward, every reward) [N] of `texts` against `rows`."""
        total, per = compute_rewards(texts, rows, dict(self.rewards))
        return total, np.asarray(per[self.accuracy_key], np.float64), per

    def roll(self, rollout: Rollout, groups, images, key, prompts_per_group: int,
             scored: np.ndarray | None = None) -> MicroRollout:
        """One rollout call of `groups` [q][G] (images: this shard's queries), decoded and scored:
        the rows of the groups `scored` [q] names (None: all; the others' rewards are 0)."""
        g, s = len(groups[0]), prompts_per_group
        batch = self.prompt_batch(groups, images, s)
        completions = rollout(batch, key, g, s)
        texts = self.decode(completions)
        records = [r for grp in groups for r in grp]
        if scored is None:
            total, accuracy, per = self.score(texts, records)
        else:  # the other rows are discarded: zeros of the same dtypes
            total, accuracy, per = self._score_rows(texts, records, np.repeat(scored, g))
        return MicroRollout(groups, completions, texts, total, accuracy, per, prompt=(batch, s))

    def _score_rows(self, texts, records, rows: np.ndarray, base: MicroRollout | None = None):
        """(total, accuracy, per-reward) [N] with the rows where rows [N] is True scored against their
        records and the others `base`'s values (None: zeros of the same dtypes)."""
        total, accuracy, per = self.score([t for t, keep in zip(texts, rows) if keep],
                                          [r for r, keep in zip(records, rows) if keep])

        def place(values, old):
            out = np.zeros(len(rows), np.asarray(values).dtype) if old is None else np.array(old)
            out[rows] = values
            return out

        old = base or MicroRollout([], None, [], None, None, {})
        return (place(total, old.rewards), place(accuracy, old.accuracy),
                {k: place(v, old.per_reward.get(k)) for k, v in per.items()})

    # ---- the step ---------------------------------------------------------------------------------
    def collect(self, queries, unreadable: np.ndarray, rollout: Rollout, gdqa: GDQAState, key: jax.Array,
                rng: np.random.Generator) -> tuple[list[TrainBatch], dict]:
        """The M TrainBatches of a GRPO step (this shard's rows) and its metrics. queries: this
        shard's (data/pipeline.py Query); unreadable [its queries] bool: images that could not be
        read (data.on_error=skip: their groups are masked out); gdqa: the run's GDQA state (its
        variants chosen here, its observations updated); key / rng: the step's."""
        g, calls, m = self.group_size, self.calls, self.micro_batches
        t0 = time.perf_counter()
        records = step_records(self.shard, queries, calls, self.records)  # every shard's, call by call
        per_call, local = len(records) // calls, len(queries) // calls
        images = [[q.images for q in queries[i * local:(i + 1) * local]] for i in range(calls)]
        groups_all = [[assign_group_variants(r, g, gdqa, rng) for r in records[i * per_call:(i + 1) * per_call]]
                      for i in range(calls)]
        triggered = sum(gdqa.is_triggered(r.id) for r in records)
        s = self.prompts_per_group([grp for groups in groups_all for grp in groups])  # one S for all calls
        rolled = [self.roll(rollout, groups, images[i], jax.random.fold_in(key, i), s)
                  for i, groups in enumerate(groups_all)]
        t_rollout = time.perf_counter() - t0
        tokens_rolled = sum(int(np.asarray(mr.completions.mask).sum()) for mr in rolled)
        out = {}
        if self.reroll is not None:
            rolled, stats = self._reroll(rolled, images, rollout, gdqa, key, rng)
            out.update(stats.metrics(self.reroll.prefix))
        plan = self._length_plan(rolled, len(queries)) if self.length_buckets else None
        micro = rolled if calls == m and plan is None else self._to_micro_batches(rolled, len(queries), plan)
        rows_all = [r for mr in micro for grp in mr.groups for r in grp]
        rewards = np.concatenate([mr.rewards for mr in micro])
        per = {k: np.concatenate([mr.per_reward[k] for mr in micro]) for k in micro[0].per_reward}
        gdqa.observe([grp[0].id for mr in micro for grp in mr.groups], rewards, g)
        s_final = self.prompts_per_group([grp for mr in micro for grp in mr.groups])
        per_micro, local_micro = len(records) // m, len(queries) // m
        batches = []
        for i, mr in enumerate(micro):
            mine = plan[2][i] if plan else range(i * local_micro, (i + 1) * local_micro)  # this shard's queries
            batch, rows_per_group = mr.prompt or (None, None)  # a call's prompt batch, reused when it is this one's
            if rows_per_group != s_final:
                batch = self.prompt_batch(mr.groups, [queries[j].images for j in mine], s_final)
            rows = [r for grp in mr.groups for r in grp]
            comp = mr.completions if plan is None else trimmed_completions(mr.completions, np.arange(len(rows)),
                                                                           plan[0].lengths[i])
            comp = self._leave_out_unreadable(jax.tree.map(self.shard.block, comp), unreadable[list(mine)])
            batches.append(TrainBatch(prompt=batch, completions=comp,
                                      rewards=self.shard.block(rewards[i * per_micro * g:(i + 1) * per_micro * g]),
                                      categories=self.shard.block(self.categories(rows))))
        tokens = sum(int(np.asarray(mr.completions.mask).sum()) for mr in micro)
        out.update({
            "reward/total": float(rewards.mean()), "reward/format": float(per["format"].mean()),
            "reward/accuracy": float(per[self.accuracy_key].mean()),
            # groups whose accuracy rewards are all equal (no recognition signal, whatever the format)
            "accuracy_invalid_ratio": float(all_equal_groups(per[self.accuracy_key], g).mean()),
            "sq_mean": float(np.mean([self.sq_by_id[r.id] for r in records])),
            "completion_length": tokens / len(rows_all), "tokens_per_second": tokens_rolled / max(t_rollout, 1e-9),
            "gdqa_triggered": triggered / len(records), "prompts_per_group": float(s_final),
        })
        if plan is not None:
            out["update_length_fraction"] = plan[0].length_fraction  # sum_m T_m / (M T)
        return batches, out

    def _reroll(self, rolled: list[MicroRollout], images, rollout: Rollout, gdqa: GDQAState, key,
                rng) -> tuple[list[MicroRollout], RerollStats]:
        """Each call's groups after the re-roll policy's rounds (methods/reroll.py), each round a
        rollout call of its own key; groups rescued by a variant re-roll trained on their original
        prompt when the policy says so (their rows scored again against it)."""
        policy, stats = self.reroll, RerollStats()
        regroup = functools.partial(REGROUPS.get(policy.regroup), state=gdqa, rng=rng)
        out = []
        for i, mr in enumerate(rolled):
            call_key = jax.random.fold_in(key, i)

            def roll(groups, round_index, todo, images=images[i], call_key=call_key):
                return self.roll(rollout, groups, images, jax.random.fold_in(call_key, 1 + round_index),
                                 self.prompts_per_group(groups), scored=todo)

            mr, st, rescued = reroll_zero_variance(mr, group_size=self.group_size, rounds=policy.rounds,
                                                   regroup=regroup, roll=roll, signal=policy.signal)
            if policy.rescued_prompt == "original" and rescued.any():
                mr = self._rescored(on_original_prompt(mr, rescued), rescued)
            out.append(mr)
            stats += st
        return out, stats

    def _rescored(self, mr: MicroRollout, groups: np.ndarray) -> MicroRollout:
        """`mr` with the rewards of the rows of `groups` [P] scored again against their records."""
        total, accuracy, per = self._score_rows(mr.texts, [r for grp in mr.groups for r in grp],
                                                np.repeat(groups, self.group_size), base=mr)
        return dataclasses.replace(mr, rewards=total, accuracy=accuracy, per_reward={**mr.per_reward, **per})

    def _length_plan(self, rolled: list[MicroRollout], local: int):
        """The length-aware update's plan of the calls' groups (train/micro_batches.py: sorted by
        their longest row within each data shard, M micro-batches each holding an equal part of every
        shard, trimmed to bucket lengths): (MicroBatchPlan, the groups' order micro-batch by
        micro-batch as indices into the calls' order, per micro-batch this shard's local query
        indices). In the calls' order, query k sits in call k // (shards * c) at shard
        (k // c) % shards, local index (k // (shards * c)) * c + k % c (c = local / calls)."""
        c, shards = local // len(rolled), self.shard.count
        lengths = np.concatenate([np.asarray(mr.completions.mask).sum(-1) for mr in rolled])
        k = np.arange(shards * local)
        owner, local_index = (k // c) % shards, (k // (shards * c)) * c + k % c
        plan: MicroBatchPlan = plan_micro_batches(lengths, self.group_size, self.micro_batches, self.length_buckets,
                                                  owner)
        mine = [[int(local_index[q]) for q in groups if owner[q] == self.shard.index] for groups in plan.groups]
        return plan, np.concatenate([np.asarray(groups, np.int64) for groups in plan.groups]), mine

    def _to_micro_batches(self, rolled: list[MicroRollout], local: int, plan=None) -> list[MicroRollout]:
        """The rollout calls' groups (in `step_records` order of the R calls) regrouped into the
        update's M micro-batches (the order of M parts, or of the length-aware `plan`): each
        micro-batch holds every data shard's local part, so each process collates its own queries'
        images. `local`: a shard's queries."""
        g, m = self.group_size, self.micro_batches
        cat = lambda xs: [x for part in xs for x in part]  # noqa: E731
        joined = lambda *xs: np.concatenate(xs)  # noqa: E731
        groups, texts = cat(mr.groups for mr in rolled), cat(mr.texts for mr in rolled)
        completions = jax.tree.map(joined, *(mr.completions for mr in rolled))
        rewards, accuracy = joined(*(mr.rewards for mr in rolled)), joined(*(mr.accuracy for mr in rolled))
        per_reward = jax.tree.map(joined, *(mr.per_reward for mr in rolled))
        order = step_order(self.shard.count, local, len(rolled), m) if plan is None else plan[1]
        rows = (order[:, None] * g + np.arange(g)).reshape(-1)
        per = len(order) // m
        take = lambda x, i: x[rows[i * per * g:(i + 1) * per * g]]  # noqa: E731
        return [MicroRollout(groups=[groups[k] for k in order[i * per:(i + 1) * per]],
                             completions=jax.tree.map(lambda x, i=i: take(x, i), completions),
                             texts=[texts[k] for k in rows[i * per * g:(i + 1) * per * g]],
                             rewards=take(rewards, i), accuracy=take(accuracy, i),
                             per_reward={k: take(v, i) for k, v in per_reward.items()})
                for i in range(m)]

    def _leave_out_unreadable(self, completions: Completions, unreadable: np.ndarray) -> Completions:
        """This shard's completions of a micro-batch with the masks of the groups of every query
        whose image could not be read (data.on_error=skip; unreadable [its queries] bool) zeroed:
        such a group adds nothing to the loss, its denominator or the KL, and the shapes stay fixed."""
        if not unreadable.any():
            return completions
        keep = np.repeat(~unreadable, self.group_size)[:, None].astype(completions.mask.dtype)
        return completions.replace(mask=completions.mask * keep)

    # ---- the warm-up ----------------------------------------------------------------------------------
    def warmup_batch(self, queries, unreadable: np.ndarray, target: Callable[[Record], str], eos_id: int) -> TrainBatch:
        """A supervised warm-up step's TrainBatch: each query's prompt and its `target` text (a query
        whose image could not be read, unreadable [its queries], masked out)."""
        records = [q.record for q in queries]
        batch = self.collator.prompts([[rec] for rec in records], [q.images for q in queries])
        ids, mask = self.collator.targets([target(rec) for rec in records], eos_id)
        mask = mask * ~unreadable[:, None]
        comp = Completions(ids=ids, mask=mask, logps=np.zeros(ids.shape, np.float32), lengths=mask.sum(-1))
        return TrainBatch(prompt=shard_prompts(self.shard, self.collator, batch), completions=comp,
                          rewards=np.zeros((len(records),), np.float32), categories=self.categories(records))

    # ---- GDQA calibration ---------------------------------------------------------------------------
    def calibration_rollouts(self, queries, rollout: Rollout, key, index: int) -> tuple[list[str], np.ndarray,
                                                                                          np.ndarray]:
        """G plain samples of each of a step's queries (GDQA's "auto" calibration), call by call:
        (record ids, total rewards [q * G], correct [q * G] bool). `index`: the step's place in the
        calibration (its keys)."""
        g, calls = self.group_size, self.calls
        records = step_records(self.shard, queries, calls, self.records)
        per_call, local = len(records) // calls, len(queries) // calls
        ids, rewards, correct = [], [], []
        for m, i in enumerate(range(0, len(records), per_call)):
            chunk = records[i:i + per_call]
            groups = [[r] * g for r in chunk]
            mr = self.roll(rollout, groups, [q.images for q in queries[m * local:(m + 1) * local]],
                           jax.random.fold_in(key, index * len(records) + i), self.prompts_per_group(groups))
            rewards.append(mr.rewards)
            correct.append(mr.accuracy > 0)
            ids += [r.id for r in chunk]
        return ids, np.concatenate(rewards), np.concatenate(correct)


def calibrate_gdqa(collector: StepCollector, gdqa: GDQAState, iterator, rollout: Rollout, config) -> float:
    """GDQA's calibration, once, before the first GRPO step (also when the run resumes from a
    warm-up checkpoint). gdqa.calibration = FILE: an evaluate.py result of the base model on the
    training records. "auto": the current policy rolls out G plain samples for each query of the
    GRPO run ahead (train.steps batches of `iterator`, in the curriculum order the run will use, at
    most one epoch or gdqa.calibration_steps batches; the iterator is rewound afterwards). Queries
    whose G rewards are all equal and not all correct are marked hard, so the adaptive trigger fires
    on their first visit (they leave the hard set once a group of theirs diverges). Returns the
    fraction marked hard (of the queries rolled out for "auto", of the training records for a FILE)."""
    c, records = config, collector.records
    if c.gdqa.calibration != "auto":
        hard = gdqa.calibrate_from_evaluation(c.gdqa.calibration, [r.id for r in records])
        log.info("GDQA calibration %s: %d of %d training queries marked hard", c.gdqa.calibration, hard, len(records))
        return hard / max(len(records), 1)
    steps = min(c.train.steps, -(-len(records) // c.train.batch_size))
    steps = min(steps, c.gdqa.calibration_steps) if c.gdqa.calibration_steps > 0 else steps
    resume_at, key = iterator.get_state(), jax.random.key(c.seed + 1_000_003)
    parts = [collector.calibration_rollouts(next(iterator), rollout, key, step)
             for step in tqdm(range(steps), desc="GDQA calibration", leave=False, disable=not distributed.is_primary())]
    iterator.set_state(resume_at)
    ids = [i for part in parts for i in part[0]]
    hard = gdqa.calibrate(ids, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                          collector.group_size)
    log.info("GDQA calibration: %d of %d upcoming queries marked hard", hard, len(ids))
    return hard / max(len(ids), 1)
