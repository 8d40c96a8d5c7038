"""The imperative shell: feeds data, calls the compiled rollout / update, logs, checkpoints.

Per GRPO step (B queries, G rollouts each, M micro-batches):
  queries (Grain, curriculum order) -> GDQA variants per group -> collate (fixed shapes)
  -> rollout (jit) -> decode + rewards (host) -> [re-roll all-equal groups: GDQA online /
  dynamic sampling, same shapes] -> update (jit, donated state) -> metrics.
A supervised warm-up (config.sft.steps, tiny runs) precedes GRPO on the same step counter.
Randomness is a pure function of (seed, step), so a killed run resumes exactly.
Several processes (hosts): each reads and collates its data shard's queries; host-side decisions
(GDQA variants, rewards, metrics) see the whole step on every process (train/distributed.py), and
process 0 alone writes metrics and plots.
Stops (train/preemption.py): SIGTERM / SIGINT end the run after the step in flight with a checkpoint
of that step on every host; an unreadable latest checkpoint is set aside and the newest one that
restores resumes; a checkpoint that does not fit on the disk, an image unreadable under
data.on_error=raise (after a checkpoint of the last finished step) and train.max_consecutive_errors
non-finite updates in a row each stop the run with one line.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from anatomy_r1_jax import sharding
from anatomy_r1_jax.data.collate import BatchShape, Collator
from anatomy_r1_jax.data.pipeline import QueryPipeline
from anatomy_r1_jax.data.readers import DataError
from anatomy_r1_jax.data import prompts
from anatomy_r1_jax.evaluation.evaluator import EvalSettings, Evaluator
from anatomy_r1_jax.evaluation.metrics import paired_difference
from anatomy_r1_jax.evaluation.scoring import run_accuracy, score, summarize
from anatomy_r1_jax.methods.augmentation import GDQAState, all_equal_groups, assign_group_variants, variant_kinds
from anatomy_r1_jax.methods.curriculum import Curriculum, curriculum_order
from anatomy_r1_jax.methods.reroll import (REGROUPS, MicroRollout, RerollStats, on_original_prompt, reroll_policy,
                                          reroll_zero_variance)
from anatomy_r1_jax.methods.similarity import answer_classes
from anatomy_r1_jax.models import lora
from anatomy_r1_jax.rl.batch import Completions, TrainBatch
from anatomy_r1_jax.rl.rewards import compute_rewards
from anatomy_r1_jax.rl.rollout import decode_completions
from anatomy_r1_jax.rl.sampling import sampling_config
from anatomy_r1_jax.train import distributed, experiment, faults, preemption
from anatomy_r1_jax.train.checkpoint import Checkpointer, UnreadableCheckpoint
from anatomy_r1_jax.train.metrics import MetricsWriter, plot_curves, read_metrics, update_metrics
from anatomy_r1_jax.train.micro_batches import bucket_lengths, plan_micro_batches, trimmed_completions
from anatomy_r1_jax.train.compiled import Programs, rollout_programs, run_iterations
from anatomy_r1_jax.train.partitioning import place_state, put_batch, shard_rows, split_model
from anatomy_r1_jax.train.precision import Precision
from anatomy_r1_jax.train.schedules import phase_optimizers, phase_schedules
from anatomy_r1_jax.train.step import step_configs

log = logging.getLogger(__name__)

CURVES = ("reward/total", "reward/format", "reward/accuracy", "eval/accuracy", "invalid_gradient_ratio", "sq_mean",
          "kl", "clip_fraction", "entropy", "completion_length", "loss", "tokens_per_second")


def _stack(items):
    return jax.tree.map(lambda *xs: np.stack(xs), *items)


def rollout_calls(batch_size: int, rollout_batch_size: int, shards: int) -> int:
    """R, a GRPO step's rollout calls: train.batch_size / rl.rollout_batch_size queries each (0: one
    call). Raises one line when the sizes do not divide (each call holds every data shard's part)."""
    size = rollout_batch_size or batch_size
    if size < 1 or batch_size % size or size % shards:
        raise ValueError(f"config rl.rollout_batch_size={rollout_batch_size} must divide train.batch_size="
                         f"{batch_size} and be a multiple of the {shards} data shards (hosts) of the mesh (0: one "
                         f"rollout call per step)")
    return batch_size // size


def step_order(shards: int, local: int, parts_from: int, parts_to: int) -> np.ndarray:
    """A step's shards x local queries (each shard's in its pipeline order) in the order of
    `parts_to` parts, as indices into their order in `parts_from` parts. In P parts, part by part
    and in each the shards' local parts in turn (`Trainer._step_records`), query i of shard h sits
    at (i // (local / P)) * shards * local / P + h * local / P + i % (local / P). Returns idx [B]:
    the k-th query of the `parts_to` order is the idx[k]-th of the `parts_from` order."""
    h, i = np.divmod(np.arange(shards * local), local)

    def position(parts):
        per = local // parts
        return (i // per) * shards * per + h * per + i % per

    order = np.empty(shards * local, np.int64)
    order[position(parts_to)] = position(parts_from)
    return order


class Trainer:
    """Owns the compiled functions and the run's host state."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.precision = Precision.from_config(config)
        os.makedirs(workdir, exist_ok=True)
        c = config
        self.mesh = sharding.make_mesh([tuple(a) for a in c.mesh])
        self.rules = [tuple(r) for r in c.sharding_rules]
        self.shard = distributed.data_shard(self.mesh, self.rules)
        with distributed.primary_first("tokenizer and data"):
            self.tokenizer = experiment.build_tokenizer(c, workdir)
            self.data = experiment.build_data(c, workdir)
        self.image_processor = experiment.build_image_processor(c, self.tokenizer)
        self.data = experiment.validate_data(c, self.data, self.tokenizer, self.image_processor, workdir)
        with sharding.use_rules(self.mesh, self.rules):
            model = experiment.build_model(c, self.tokenizer, self.mesh, self.rules)
        self.model_cfg = model.config
        if distributed.is_primary():
            with open(os.path.join(workdir, "config.json"), "w") as f:  # what is trained (family, preset)
                f.write(experiment.trained_config(c, model.config).to_json_best_effort(indent=1))
        with distributed.primary_first("similarity scores"):
            self.sq = experiment.similarity_scores(c, self.data, model, self.tokenizer, workdir)
        self.sq_by_id = dict(zip((r.id for r in self.data.train), self.sq))
        self.category_index = {name: i for i, name in enumerate(self.data.categories)}

        self.group_size = c.rl.group_size
        self.shape = BatchShape(c.data.prompt_length, c.rl.max_completion_length, c.data.patches_per_query)
        self.collator = Collator(self.tokenizer, self.model_cfg, self.shape)
        self.sampling = sampling_config(c, self.model_cfg, self.tokenizer, self.collator.pad_id)
        self.eos_id = self.sampling.eos_ids[0]
        # The accuracy reward the run trains on (the first with a non-zero weight) is its reported accuracy.
        self.accuracy_key = run_accuracy(c.rl.rewards)
        self.gdqa = GDQAState(trigger=c.gdqa.trigger, num_variants=c.gdqa.num_variants,
                              kinds=variant_kinds(c.gdqa.kinds, signal=c.gdqa.signal, accuracy_key=self.accuracy_key))
        self.reroll = reroll_policy(c)  # GDQA online / dynamic sampling: all-equal groups re-rolled in the step

        # State: trainable params (+ frozen rest), a frozen reference copy in GRPO when beta != 0 (made
        # when GRPO starts: the warm-up holds none), AdamW (and a float32 master copy of params when the
        # precision policy keeps one).
        # Each phase (warm-up, GRPO) has its own schedule and optimizer state (train/schedules.py).
        # A LoRA run's full warm-up trains the base weights and GRPO the adapters (lora.LoraConfig.trains):
        # the state is split per phase, and each phase's update is built for its split (`_update`).
        self.lora = lora.LoraConfig.from_config(c.model)
        first = "sft" if c.sft.steps > 0 else "grpo"
        self.graphdef, params, frozen = split_model(model, c.model.freeze_vision, self.lora.trains(first))
        self.programs = Programs.create(self.graphdef, self.mesh, self.rules)
        # The rollout's own layout (config.rollout_mesh / rollout_sharding_rules): the weights resharded
        # onto it once per step (`_rollout_weights`), so the decode loop holds no weight collective.
        self.rollout_programs = rollout_programs(c, self.graphdef, self.mesh)
        distributed.check_same_data_shard(self.shard, self.rollout_programs.mesh, self.rollout_programs.rules)
        self._rollout_cache: tuple | None = None  # (the params it was made from, (params, frozen) resharded)
        # Held-out evaluation is scripts/evaluate.py's evaluator (greedy answers, compiled once),
        # batched like a GRPO step's rows, on the rollout's layout.
        self.evaluator = Evaluator(self.graphdef, self.collator, self.image_processor, self.tokenizer, self.sampling,
                                   self.rollout_programs.mesh, self.rollout_programs.rules,
                                   EvalSettings(batch_size=c.train.batch_size * self.group_size,
                                                accuracy=self.accuracy_key))
        # Per-question correctness of the evaluation at the start of GRPO (the warm-up's last):
        # {"step", "correct": {id: 0/1}}; every later evaluation reports its paired gain against it.
        # Saved in every checkpoint's meta, so a resumed run keeps it.
        self.eval_start: dict | None = None
        self.schedules, self.tx = phase_schedules(c), phase_optimizers(c)
        # A LoRA run holds no reference copy: its reference is the base model (adapters off).
        self.kl_reference = c.rl.beta != 0 and not self.lora.enabled
        self.state = self.programs.init_state(self.tx[first], self.precision, params, frozen,
                                              reference=self.kl_reference and first == "grpo")
        self._compile()

        shards = self.shard.count
        for name, size, parts in (("train.batch_size", c.train.batch_size, c.train.micro_batches * shards),
                                  ("sft.batch_size", c.sft.batch_size, shards)):
            if size % parts:
                raise ValueError(f"config {name}={size} must be a multiple of {parts} (train.micro_batches x the "
                                 f"{shards} data shards (hosts) of the mesh)")
        shard = dict(shard_index=self.shard.index, shard_count=shards, workers=c.data.workers,
                     on_unreadable=c.data.on_error)
        # The warm-up's own pipeline only when there is a warm-up (its batch may not fit a small set).
        self.pipeline_sft = QueryPipeline(self.data.train, batch_size=c.sft.batch_size // shards,
                                          image_processor=self.image_processor, order_fn=None, seed=c.seed + 1,
                                          shard_block=c.sft.batch_size // shards, **shard) if c.sft.steps > 0 else None
        order = functools.partial(curriculum_order, self.sq, answer_classes(self.data.train)[0],
                                  Curriculum.from_config(c), seed=c.seed)
        self.pipeline = QueryPipeline(self.data.train, batch_size=c.train.batch_size // shards,
                                      image_processor=self.image_processor,
                                      order_fn=lambda epoch: order(epoch=epoch), seed=c.seed,
                                      shard_block=c.train.batch_size // self._rollout_calls() // shards, **shard)
        self.it = iter(self.pipeline)
        self.it_sft = iter(self.pipeline_sft) if self.pipeline_sft is not None else None
        # The base a LoRA run's GRPO checkpoints name (the full warm-up's last checkpoint) is kept.
        base = experiment.adapter_base(c, c.sft.steps + 1, "") if self.lora.enabled else {}
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.train.keep_checkpoints,
                                 preserve=(base["base_step"],) if "base_step" in base else ())
        self.saved = 0  # the newest step this run checkpointed or resumed from

    # ---- compiled functions ------------------------------------------------------------------
    def _compile(self):
        """The update of each phase (built when first used, for the state that phase trains), the old
        log-probs (num_iterations > 1) and the rollout, all built by train/compiled.py (traced under
        the sharding rules, compiled once)."""
        c = self.config
        self.step_configs = step_configs(c, num_categories=len(self.data.categories), precision=self.precision)
        grpo, self.updates = self.step_configs["grpo"], {}
        # The length-aware GRPO update (train.length_buckets K > 0): micro-batches of groups sorted by
        # length, each trimmed to one of K bucket lengths (train/micro_batches.py); 0: padded to T.
        k = c.train.length_buckets
        self.length_buckets = bucket_lengths(c.rl.max_completion_length, k) if k > 0 else None
        self.old_logps = self.programs.old_logps(grpo)
        self.rollout = self.rollout_programs.rollout(cache_dtype=self.precision.compute_dtype)

    def _update(self, phase: str):
        """The compiled update of `phase` ("sft" | "grpo"), built once, for the state that phase trains."""
        if phase not in self.updates and phase == "grpo" and self.length_buckets:
            self.updates[phase] = self.programs.length_aware_update(self.tx[phase], self.step_configs[phase],
                                                                    self.state, self.length_buckets)
        if phase not in self.updates:
            self.updates[phase] = self.programs.update(self.tx[phase], self.step_configs[phase], self.state)
        return self.updates[phase]

    # ---- host-side pieces -------------------------------------------------------------------
    def _place(self, batch, micro_axis=False):
        return put_batch(batch, self.mesh, self.rules, micro_axis, self.shard.count)

    def _shard_prompts(self, batch):
        """This data shard's collated PromptBatch -> what `_place` takes: its rows and patches of the
        batch all shards' prompts make together (frame and window ids shifted past earlier shards'),
        and that batch's gather indices. Only the bookkeeping travels between hosts, not pixels."""
        if self.shard.count == 1:
            return batch
        joined = self.collator.concat(self.shard.gather(batch.replace(pixel_values=batch.pixel_values[:, :1])))
        return shard_rows(joined, self.shard.index, self.shard.count).replace(pixel_values=batch.pixel_values)

    def _rollout_calls(self) -> int:
        """R, the rollout calls of a GRPO step (`rollout_calls` of the config)."""
        c = self.config
        return rollout_calls(c.train.batch_size, c.rl.rollout_batch_size, self.shard.count)

    def _step_records(self, queries, parts: int):
        """The records of a step's queries on all data shards, in the order of `parts` parts (rollout
        calls, micro-batches): part by part, each the shards' local parts in turn (`step_order`)."""
        if self.shard.count == 1:
            return [q.record for q in queries]
        local = self.shard.gather(np.array([q.index for q in queries], np.int64))
        per = len(queries) // parts
        return [self.data.train[i] for m in range(parts) for part in local for i in part[m * per:(m + 1) * per]]

    def decode(self, completions: Completions) -> list[str]:
        return decode_completions(self.tokenizer, completions.ids, completions.mask, self.sampling.eos_ids)

    def _categories(self, records) -> np.ndarray:
        return np.array([self.category_index.get(r.category, -1) for r in records], np.int32)

    def evaluate(self, records) -> tuple[dict, dict[str, float]]:
        """Greedy answers to `records` by the evaluator scripts/evaluate.py uses, scored by
        evaluation/scoring.py. Returns (eval/* metrics: accuracy with its Wilson 95% interval, strict
        accuracy, format rate, n; per-question correctness {id: 0/1})."""
        greedy, _ = self.evaluator.answer(*self._rollout_weights(), records)
        outcomes = score(records, greedy, None, self.evaluator.settings.accuracy)
        summary = summarize(outcomes)
        accuracy = summary["accuracy"]
        out = {"eval/accuracy": accuracy["value"], "eval/accuracy_lo": accuracy["ci95"][0],
               "eval/accuracy_hi": accuracy["ci95"][1], "eval/accuracy_strict": summary["accuracy_strict"]["value"],
               "eval/format": 1.0 - summary["format_failure_rate"]["value"], "eval/n": float(len(outcomes))}
        return out, {o.id: o.correct for o in outcomes}

    def _gain(self, correct: dict[str, float]) -> dict:
        """eval/gain and eval/gain_ci95 (paired over the questions both evaluations answered,
        evaluation/metrics.paired_difference) of `correct` against the start of GRPO, and that
        start's accuracy on the same questions."""
        start = self.eval_start["correct"]
        ids = [i for i in correct if i in start]
        if not ids:
            log.warning("no held-out question of this evaluation was answered at the start of GRPO: no gain")
            return {}
        paired = paired_difference([start[i] for i in ids], [correct[i] for i in ids])
        return {"eval/gain": paired["gain"], "eval/gain_ci95": paired["ci95"], "eval/accuracy_start": paired["before"],
                "eval/gain_n": float(paired["n"])}

    def sft_iteration(self, step: int) -> dict:
        queries = next(self.it_sft)
        records = [q.record for q in queries]
        batch = self.collator.prompts([[r] for r in records], [q.images for q in queries])
        c = self.config.sft
        ids, mask = self.collator.targets([prompts.warmup_target(r, c.target, c.answer) for r in records], self.eos_id)
        mask = mask * ~self.it_sft.unreadable[:, None]  # a query whose image could not be read is left out
        comp = Completions(ids=ids, mask=mask, logps=np.zeros(ids.shape, np.float32), lengths=mask.sum(-1))
        n = len(records)
        tb = TrainBatch(prompt=self._shard_prompts(batch), completions=comp, rewards=np.zeros((n,), np.float32),
                        categories=self._categories(records))
        self.state, metrics = self._update("sft")(self.state, self._place(_stack([tb]), micro_axis=True))
        return {"sft/loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                "updates_skipped_consecutive": metrics["updates_skipped_consecutive"],
                "data/unreadable_queries": self._unreadable_count(self.it_sft)}

    def _prompts_per_group(self, groups) -> int:
        """S for a step's groups: the fewest prompt rows per group such that row j of every group
        repeats row j % S (1 without GDQA variants; the number of variants with them; G when
        train.share_prompts is off). See rl/rollout.py."""
        g = len(groups[0])
        if not self.config.train.share_prompts:
            return g
        return next(s for s in range(1, g + 1) if all(grp[j] == grp[j % s] for grp in groups for j in range(g)))

    def _prompt_batch(self, groups, images, prompts_per_group: int):
        """This shard's PromptBatch of `groups` [q][G] (all data shards' groups; images [q / shards],
        this shard's queries): the first `prompts_per_group` rows of each of this shard's groups
        (prefix sharing), q / shards * S rows as `_shard_prompts` gives them."""
        s = prompts_per_group
        return self._shard_prompts(self.collator.prompts([grp[:s] for grp in self.shard.block(groups)], images))

    def _rollout_groups(self, groups, images, key, prompts_per_group: int):
        """G sampled completions per query: groups [q][G] records (a query's variants, all data
        shards'), images [q / shards] (this shard's queries). Returns (this shard's PromptBatch,
        see `_prompt_batch`; Completions on the host, rows [q * G]; their records and decoded texts
        [q * G])."""
        g = len(groups[0])
        batch = self._prompt_batch(groups, images, prompts_per_group)
        layout = self.rollout_programs
        placed = put_batch(batch, layout.mesh, layout.rules, False, self.shard.count)
        comp = distributed.to_host(self.rollout(*self._rollout_weights(), placed, key, self.sampling, g,
                                                prompts_per_group))
        return batch, comp, [r for grp in groups for r in grp], self.decode(comp)

    def _rollout_weights(self):
        """(params, frozen) resharded onto the rollout's layout, once per state: a step's rollout
        calls, its re-rolls and an evaluation of the same weights share one copy (dropped before the
        update, `grpo_iteration`). The decode loop then reads weights local to each device."""
        if self._rollout_cache is None or self._rollout_cache[0] is not self.state.params:
            layout = self.rollout_programs
            self._rollout_cache = (self.state.params, (place_state(self.state.params, layout.mesh, layout.rules),
                                                       place_state(self.state.frozen, layout.mesh, layout.rules)))
        return self._rollout_cache[1]

    def calibrate_gdqa(self) -> float:
        """GDQA's calibration, once, before the first GRPO step (also when the run resumes from a
        warm-up checkpoint). gdqa.calibration = FILE: an evaluate.py result of the base model on
        the training records. "auto": the current policy rolls out G plain samples for each query of
        the GRPO run ahead (train.steps batches, in the curriculum order the run will use, at most
        one epoch or gdqa.calibration_steps batches; the data iterator is rewound afterwards).
        Queries whose G rewards are all equal and not all correct are marked hard, so the adaptive
        trigger fires on their first visit (they leave the hard set once a group of theirs diverges).
        Returns the fraction marked hard (of the queries rolled out for "auto", of the training
        records for a FILE)."""
        c, g = self.config, self.group_size
        if c.gdqa.calibration != "auto":
            hard = self.gdqa.calibrate_from_evaluation(c.gdqa.calibration, [r.id for r in self.data.train])
            log.info("GDQA calibration %s: %d of %d training queries marked hard", c.gdqa.calibration, hard,
                     len(self.data.train))
            return hard / max(len(self.data.train), 1)
        steps = min(c.train.steps, -(-len(self.data.train) // c.train.batch_size))
        steps = min(steps, c.gdqa.calibration_steps) if c.gdqa.calibration_steps > 0 else steps
        resume_at = self.it.get_state()
        key = jax.random.key(c.seed + 1_000_003)
        calls = self._rollout_calls()
        per_call = c.train.batch_size // calls
        ids, rewards, correct = [], [], []
        local = per_call // self.shard.count
        for step in tqdm(range(steps), desc="GDQA calibration", leave=False, disable=not distributed.is_primary()):
            queries = next(self.it)
            records = self._step_records(queries, calls)
            for m, i in enumerate(range(0, len(records), per_call)):
                chunk = records[i:i + per_call]
                groups = [[r] * g for r in chunk]
                _, _, rows, texts = self._rollout_groups(groups, [q.images for q in queries[m * local:(m + 1) * local]],
                                                         jax.random.fold_in(key, step * len(records) + i),
                                                         self._prompts_per_group(groups))
                total, per = compute_rewards(texts, rows, dict(c.rl.rewards))
                rewards.append(total)
                correct.append(per[self.accuracy_key] > 0)
                ids += [r.id for r in chunk]
        self.it.set_state(resume_at)
        hard = self.gdqa.calibrate(ids, np.concatenate(rewards), np.concatenate(correct), g)
        log.info("GDQA calibration: %d of %d upcoming queries marked hard", hard, len(ids))
        return hard / max(len(ids), 1)

    def _grpo_batches(self, step: int) -> tuple[list[TrainBatch], dict]:
        """A GRPO step's host side: its queries -> GDQA variants -> R rollout calls (one by default:
        rl.rollout_batch_size, apart from the update's micro-batches) -> rewards -> re-rolls of
        all-equal groups (GDQA online / dynamic sampling, methods/reroll.py; the calls' shapes) ->
        the M TrainBatches of the update (host arrays; row p * G + j of micro-batch i is the j-th
        rollout of its group p, its reward and record aligned; S prompt rows per group, one S for the
        whole step) and the step's metrics."""
        c, g = self.config, self.group_size
        t0 = time.perf_counter()
        queries = next(self.it)  # this data shard's
        rng = np.random.default_rng([c.seed, step])
        key = jax.random.fold_in(jax.random.key(c.seed), step)
        calls, m = self._rollout_calls(), c.train.micro_batches
        records = self._step_records(queries, calls)  # all shards', call by call
        per_call, local = len(records) // calls, len(queries) // calls
        images = [[q.images for q in queries[i * local:(i + 1) * local]] for i in range(calls)]
        chunks = [records[i * per_call:(i + 1) * per_call] for i in range(calls)]
        groups_all = [[assign_group_variants(r, g, self.gdqa, rng) for r in chunk] for chunk in chunks]
        triggered = sum(self.gdqa.is_triggered(r.id) for r in records)
        s = self._prompts_per_group([grp for groups in groups_all for grp in groups])  # one S for all calls
        rolled = []
        for i, groups in enumerate(groups_all):
            batch, comp, rows, texts = self._rollout_groups(groups, images[i], jax.random.fold_in(key, i), s)
            rolled.append(MicroRollout(groups, comp, texts, *self._score(texts, rows), prompt=(batch, s)))
        t_rollout = time.perf_counter() - t0
        tokens_rolled = sum(int(np.asarray(mr.completions.mask).sum()) for mr in rolled)
        out = {}
        if self.reroll is not None:
            stats = RerollStats()
            regroup = functools.partial(REGROUPS.get(self.reroll.regroup), state=self.gdqa, rng=rng)
            for i in range(calls):
                rollout = functools.partial(self._reroll_rollout, images[i], jax.random.fold_in(key, i))
                rolled[i], st, rescued = reroll_zero_variance(rolled[i], group_size=g, rounds=self.reroll.rounds,
                                                              regroup=regroup, rollout=rollout, score=self._score,
                                                              signal=self.reroll.signal)
                if self.reroll.rescued_prompt == "original":
                    rolled[i] = on_original_prompt(rolled[i], rescued)
                stats += st
            out.update(stats.metrics(self.reroll.prefix))
        plan = self._length_plan(rolled, len(queries), m) if self.length_buckets else None
        micro = rolled if calls == m and plan is None else self._to_micro_batches(rolled, len(queries), m, plan)
        rows_all = [r for mr in micro for grp in mr.groups for r in grp]
        rewards, per = compute_rewards([t for mr in micro for t in mr.texts], rows_all, dict(c.rl.rewards))
        self.gdqa.observe([grp[0].id for mr in micro for grp in mr.groups], rewards, g)
        s_final = self._prompts_per_group([grp for mr in micro for grp in mr.groups])
        per_micro, local_micro = len(records) // m, len(queries) // m
        batches = []
        unreadable = self.it.unreadable  # this shard's queries whose image could not be read (on_error=skip)
        for i, mr in enumerate(micro):
            mine = plan[2][i] if plan else range(i * local_micro, (i + 1) * local_micro)  # this shard's queries
            batch, rows_per_group = mr.prompt or (None, None)  # a call's prompt batch, reused when it is this one's
            if rows_per_group != s_final:
                batch = self._prompt_batch(mr.groups, [queries[j].images for j in mine], s_final)
            rows = [r for grp in mr.groups for r in grp]
            comp = mr.completions if plan is None else trimmed_completions(mr.completions, np.arange(len(rows)),
                                                                           plan[0].lengths[i])
            comp = self._leave_out_unreadable(jax.tree.map(self.shard.block, comp), unreadable[list(mine)])
            batches.append(TrainBatch(prompt=batch, completions=comp,
                                      rewards=self.shard.block(rewards[i * per_micro * g:(i + 1) * per_micro * g]),
                                      categories=self.shard.block(self._categories(rows))))
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

    def _score(self, texts, rows) -> tuple[np.ndarray, np.ndarray]:
        """(total rewards, the run's accuracy reward) [N] of completions `texts` against `rows`."""
        total, per = compute_rewards(texts, rows, dict(self.config.rl.rewards))
        return total, np.asarray(per[self.accuracy_key], np.float64)

    def _length_plan(self, rolled: list[MicroRollout], local: int, micro_batches: int):
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
        plan = plan_micro_batches(lengths, self.group_size, micro_batches, self.length_buckets, owner)
        mine = [[int(local_index[q]) for q in groups if owner[q] == self.shard.index] for groups in plan.groups]
        return plan, np.concatenate([np.asarray(groups, np.int64) for groups in plan.groups]), mine

    def _to_micro_batches(self, rolled: list[MicroRollout], local: int, micro_batches: int,
                          plan=None) -> list[MicroRollout]:
        """The rollout calls' groups (in `_step_records` order of the R calls) regrouped into the
        update's M micro-batches (the order of M parts, or of the length-aware `plan`): each
        micro-batch holds every data shard's local part, so each process collates its own queries'
        images. `local`: a shard's queries."""
        g = self.group_size
        cat = lambda xs: [x for part in xs for x in part]  # noqa: E731
        groups, texts = cat(mr.groups for mr in rolled), cat(mr.texts for mr in rolled)
        completions = jax.tree.map(lambda *xs: np.concatenate(xs), *(mr.completions for mr in rolled))
        rewards = np.concatenate([mr.rewards for mr in rolled])
        accuracy = np.concatenate([mr.accuracy for mr in rolled])
        order = step_order(self.shard.count, local, len(rolled), micro_batches) if plan is None else plan[1]
        rows = (order[:, None] * g + np.arange(g)).reshape(-1)
        per = len(order) // micro_batches
        return [MicroRollout(groups=[groups[k] for k in order[i * per:(i + 1) * per]],
                             completions=jax.tree.map(lambda x: x[rows[i * per * g:(i + 1) * per * g]], completions),
                             texts=[texts[k] for k in rows[i * per * g:(i + 1) * per * g]],
                             rewards=rewards[rows[i * per * g:(i + 1) * per * g]],
                             accuracy=accuracy[rows[i * per * g:(i + 1) * per * g]])
                for i in range(micro_batches)]

    def _leave_out_unreadable(self, completions: Completions, unreadable: np.ndarray) -> Completions:
        """This shard's completions of a micro-batch with the masks of the groups of every query
        whose image could not be read (data.on_error=skip; unreadable [its queries] bool) zeroed:
        such a group adds nothing to the loss, its denominator or the KL, and the shapes stay fixed."""
        if not unreadable.any():
            return completions
        keep = np.repeat(~unreadable, self.group_size)[:, None].astype(completions.mask.dtype)
        return completions.replace(mask=completions.mask * keep)

    def _unreadable_count(self, iterator) -> float:
        """How many of the last batch's queries (all data shards') were left out: their image could
        not be read."""
        return float(sum(int(part) for part in self.shard.gather(np.int32(iterator.unreadable.sum()))))

    def _reroll_rollout(self, images, key, groups, round_index: int):
        """A re-roll's rollout of one call's groups (methods/reroll.py): (host Completions, texts,
        (its prompt batch, S)), its own key per round."""
        s = self._prompts_per_group(groups)
        batch, comp, _, texts = self._rollout_groups(groups, images, jax.random.fold_in(key, 1 + round_index), s)
        return comp, texts, (batch, s)

    def grpo_iteration(self, step: int) -> dict:
        c = self.config
        t0 = time.perf_counter()
        batches, out = self._grpo_batches(step)
        self._rollout_cache = None  # the rollout's copy of the weights is not held through the update
        out["data/unreadable_queries"] = self._unreadable_count(self.it)
        if faults.active("nan", "update", step + 1):  # test-only (train/faults.py): a non-finite loss
            batches = [b.replace(rewards=b.rewards * np.float32("nan")) for b in batches]
        update = self._update("grpo")
        if self.length_buckets:  # micro-batches of their own widths, placed one by one
            tb, old_logps = tuple(self._place(b) for b in batches), update.old_logps
        else:
            tb, old_logps = self._place(_stack(batches), micro_axis=True), self.old_logps
        self.state, metrics = run_iterations(update, old_logps, self.state, tb, c.rl.num_iterations)
        metrics = jax.device_get(metrics)
        out["step_seconds"] = time.perf_counter() - t0
        out.update(update_metrics(metrics, self.category_index))
        if out["update_skipped"]:
            log.warning("step %d: non-finite loss or gradient; update skipped", step)
        return out

    # ---- the loop -----------------------------------------------------------------------------
    def _begin_grpo(self):
        """After the warm-up: GRPO's reference policy is the policy it starts from (the warmed-up
        one); its optimizer starts afresh (moments 0, its own schedule from its step 0). A LoRA run's
        full warm-up: its weights become the frozen base (the reference, adapters off) and GRPO trains
        the adapters, still at B = 0; else the reference is a copy of the policy (or, LoRA with an
        adapter warm-up, the adapters folded into the base)."""
        if self.lora.trains("sft") != self.lora.trains("grpo"):
            self.state = self.programs.switch_trainable(self.state, self.lora.trains("grpo"),
                                                        self.config.model.freeze_vision)
        else:
            self.state = self.programs.copy_params(self.state, reference=self.kl_reference)
        self.state = self.programs.reset_optimizer(self.tx["grpo"], self.precision, self.state)

    def _lora_base(self, step: int) -> dict:
        """experiment.adapter_base of checkpoint `step` ({"base_saved": True} without LoRA)."""
        if not self.lora.enabled:
            return {"base_saved": True}
        return experiment.adapter_base(self.config, step, self.ckpt.directory)

    def _meta(self, step: int) -> dict:
        meta = {"pipeline": self.it.get_state(),
                "pipeline_sft": self.it_sft.get_state() if self.it_sft is not None else None,
                "gdqa": self.gdqa.to_json(), "eval_start": self.eval_start,
                "kl_reference": self.state.ref_params is not None}
        if self.lora.enabled:
            meta["lora"] = self._lora_base(step)
        return meta

    def _save(self, done: int, meta: dict | None = None) -> None:
        """A LoRA checkpoint holds the adapters and their optimizer state, and the frozen base weights
        only where they are its own (trained in a full warm-up, or the warm-up's adapters folded into
        them); else its meta names the checkpoint they come from (experiment.adapter_base)."""
        base_saved = self._lora_base(done)["base_saved"]
        self.ckpt.save(done, self.state if base_saved else self.state.replace(frozen=None), meta or self._meta(done))
        self.saved = done
        faults.reached("save", done)

    def restore(self) -> int:
        """Resumes from the newest checkpoint that restores (0: none). An unreadable one
        (checkpoint.UnreadableCheckpoint) is named in one line and set aside, and the next older
        one tried; when checkpoints exist but none restores, the run stops (exit code 2)."""
        steps, initial = self.ckpt.steps(), self.state  # every attempt starts from the state built here
        for step in steps:
            try:
                return self._restore(step)
            except UnreadableCheckpoint as error:
                self.state = initial
                log.error("%s; set aside as %s", error, self.ckpt.set_aside(step))
        if steps:
            raise preemption.RunStopped(
                f"{self.ckpt.directory}: none of the checkpoints {steps} restores (each moved to "
                f"{self.ckpt.directory}.unreadable/); running the same command again starts from step 0",
                preemption.EXIT_NO_CHECKPOINT)
        return 0

    def _restore(self, step: int) -> int:
        base = self._lora_base(step)
        if "base_step" in base:  # GRPO after a full warm-up: the base is the warm-up's last checkpoint
            self.state, _ = self.ckpt.restore(base["base_step"], self.state)
        if step > self.config.sft.steps > 0:  # a GRPO checkpoint: the state in GRPO's form to restore into
            self._begin_grpo()
        wanted = self.state.ref_params is not None
        like = self._like_saved_reference(step)
        if base["base_saved"]:
            self.state, meta = self.ckpt.restore(step, like)
        else:  # the base weights built at start-up are the checkpoint's
            state, meta = self.ckpt.restore(step, like.replace(frozen=None))
            self.state = state.replace(frozen=self.state.frozen)
        if not wanted:  # an older warm-up checkpoint's unused reference copy is dropped
            self.state = self.state.replace(ref_params=None)
        self.it.set_state(meta["pipeline"])
        if self.it_sft is not None and meta.get("pipeline_sft") is not None:
            self.it_sft.set_state(meta["pipeline_sft"])
        self.gdqa = self.gdqa.resumed(meta["gdqa"])
        self.eval_start = meta.get("eval_start")
        log.info("resumed from step %d", step)
        self.saved = step
        return step

    def _like_saved_reference(self, step: int):
        """The state to restore checkpoint `step` into: with a KL reference copy where the checkpoint
        holds one. A GRPO checkpoint must hold one exactly when this run has one (rl.beta != 0);
        warm-up checkpoints from before 2026-11-30 hold an unused copy (dropped after the restore)."""
        saved = self.ckpt.restore_meta(step).get("kl_reference", self.kl_reference)  # older: as this config
        wanted = self.state.ref_params is not None
        if step > self.config.sft.steps and saved != wanted:
            raise ValueError(
                f"{self.ckpt.directory}: GRPO checkpoint {step} was saved {'with' if saved else 'without'} a KL "
                f"reference policy (rl.beta {'!=' if saved else '=='} 0) and this run has rl.beta={self.config.rl.beta}: "
                f"resume it with rl.beta {'!= 0' if saved else '= 0'}, or train in a new workdir")
        if saved and not wanted:
            return self.state.replace(ref_params=self.state.params)  # a placeholder of the right shapes
        return self.state

    def run(self) -> list[dict]:
        """The loop: resumes from the last complete checkpoint, trains to sft.steps + train.steps.
        Whatever ends it (also an exception), in-flight checkpoint saves finish before it returns,
        so no half-written step is left behind."""
        start = self.restore()
        faults.reached("start", start)
        writer = MetricsWriter(self.workdir, resume_step=start if start else None) if distributed.is_primary() else None
        # The signal handlers stay until the last save is written: a second signal cannot cut it short.
        with preemption.StopSignals() as self.signals:
            try:
                rows = self._loop(start, writer)
            finally:
                self.ckpt.close()
                if writer is not None:
                    writer.close()
                self.it.close()
                if self.it_sft is not None:
                    self.it_sft.close()
        if writer is None:  # processes other than 0 return this session's rows
            return rows
        rows = read_metrics(writer.path)
        grpo = [r for r in rows if r.get("phase") == 1.0 or r["step"] == self.config.sft.steps]  # + where it starts
        plot_curves(grpo if len(grpo) > 1 else rows, os.path.join(self.workdir, "curves.png"),
                    CURVES, title="GRPO", bands={"eval/accuracy": ("eval/accuracy_lo", "eval/accuracy_hi")})
        final = [r for r in rows if "eval/accuracy" in r]
        if final and "eval/gain" in final[-1]:
            r = final[-1]
            log.info("held-out accuracy %.3f -> %.3f (%d questions): gain %+.3f +- %.3f (95%% CI, paired)",
                     r["eval/accuracy_start"], r["eval/accuracy_start"] + r["eval/gain"], r["eval/gain_n"],
                     r["eval/gain"], r["eval/gain_ci95"])
        elif final:
            log.info("final held-out accuracy %.3f (step %d)", final[-1]["eval/accuracy"], final[-1]["step"])
        return rows

    def _loop(self, start: int, writer: MetricsWriter | None) -> list[dict]:
        """Steps start..end; metrics rows of this session (written by process 0 only)."""
        c = self.config
        rows = []
        total = c.sft.steps + c.train.steps
        if start == c.sft.steps and c.train.steps and self.data.eval and self.eval_start is None:
            # GRPO starts here without a warm-up evaluation (no warm-up, or a checkpoint from before
            # one was kept): evaluate the policy it starts from.
            self.eval_start = {"step": start, "correct": self.evaluate(self.data.eval)[1]}
        bar = tqdm(range(start, total), initial=start, total=total, desc="train", dynamic_ncols=True,
                   disable=writer is None)
        for step in bar:
            sft = step < c.sft.steps
            before = self._meta(step)  # what a checkpoint of the last finished step holds
            if step == c.sft.steps and step > 0:
                faults.reached("grpo", step)
                self._begin_grpo()
            calibration = {}
            if (step == c.sft.steps and c.gdqa.calibration and self.gdqa.trigger == "adaptive"
                    and not self.gdqa.calibrated):
                calibration = {"gdqa/calibration_hard": self.calibrate_gdqa()}
            try:
                out = self.sft_iteration(step) if sft else self.grpo_iteration(step)
            except DataError as error:  # an image unreadable under data.on_error=raise
                if self.saved < step and not (step == c.sft.steps and step > 0):  # (not in GRPO's form already)
                    self._save(step, before)
                raise preemption.RunStopped(f"step {step + 1}: {error}; the last finished step {self.saved} is "
                                            f"checkpointed (data.on_error=skip leaves such queries out)") from error
            out.update(calibration)
            out["lr"] = self.schedules["sft" if sft else "grpo"](step if sft else step - c.sft.steps)
            done = step + 1
            last = done == total
            due = (not sft and (done - c.sft.steps) % c.train.eval_every == 0) or last or (sft and done == c.sft.steps)
            if due and self.data.eval:  # no eval metrics without eval records
                faults.reached("eval", done)
                metrics, correct = self.evaluate(self.data.eval)
                out.update(metrics)
                if done == c.sft.steps:  # the warm-up's last evaluation: where GRPO starts
                    self.eval_start = {"step": done, "correct": correct}
                elif self.eval_start is not None:
                    out.update(self._gain(correct))
            out = {k: float(v) for k, v in out.items()}
            out = {"phase": 0.0 if sft else 1.0, **out}
            rows.append({"step": done, **out})
            logged = done % c.train.log_every == 0 or due or calibration or last
            if writer is not None and logged:
                writer.write(done, out)
            bar.set_postfix({k: f"{out[k]:.3f}" for k in ("sft/loss", "reward/total", "eval/accuracy") if k in out})
            skipped = int(out.get("updates_skipped_consecutive", 0))
            if skipped >= c.train.max_consecutive_errors:
                raise preemption.RunStopped(
                    f"step {done}: the last {skipped} updates had a non-finite loss or gradient and were skipped "
                    f"(train.max_consecutive_errors={c.train.max_consecutive_errors}); the last checkpoint is "
                    f"step {self.saved}")
            faults.reached("step", done)
            # (the full warm-up's last checkpoint always: it becomes the base of a LoRA run's GRPO checkpoints)
            if done % c.train.checkpoint_every == 0 or last or done in self.ckpt.preserve:
                self._save(done)
            if not last and self.signals.should_stop(done):  # every host stops after the same step
                if self.saved != done:
                    self._save(done)
                raise preemption.RunStopped(
                    f"stopped by {self.signals.received} after step {done}: checkpoint {done} saved in "
                    f"{self.ckpt.directory}; run the same command to resume", preemption.EXIT_STOPPED)
        return rows
