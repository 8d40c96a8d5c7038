"""The one assembly of a training run: `build_run(config, workdir) -> Run`, everything built from the config here.

    mesh, rules, data shard             config.mesh / sharding_rules (runtime/placement.py)
    tokenizer, image processor, data    runtime/builders.py (validated before anything trains)
    model -> graphdef, params, frozen   the split each phase trains (LoRA: adapters or base)
    S(q), curriculum order, pipelines   methods/, data/pipeline.py (a warm-up pipeline when sft.steps > 0)
    sampling, GDQA state, re-roll       rl/sampling.py, methods/augmentation.py, methods/reroll.py
    programs                            the update's (train/compiled.py) and the rollout's, on its own
                                        layout (runtime/programs.py, config.rollout_mesh / _rules)
    evaluations (config.evals)          evaluation/heldout.py over the evaluator scripts/evaluate.py uses
    step configs, optimizers            train/step.py, train/schedules.py (one per phase)
    the step collector                  train/collector.py
    checkpointer, initial TrainState    train/checkpoint.py, train/compiled.py

Nothing here runs a step; train/trainer.py is the loop over what this builds.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from anatomy_r1_jax import sharding
from anatomy_r1_jax.data.collate import BatchShape, Collator
from anatomy_r1_jax.data.pipeline import QueryPipeline
from anatomy_r1_jax.evaluation.evaluator import EvalSettings, Evaluator
from anatomy_r1_jax.evaluation.heldout import HeldOut
from anatomy_r1_jax.evaluation.scoring import run_accuracy
from anatomy_r1_jax.methods.augmentation import GDQAState, variant_kinds
from anatomy_r1_jax.methods.curriculum import Curriculum, curriculum_order
from anatomy_r1_jax.methods.reroll import reroll_policy
from anatomy_r1_jax.methods.similarity import answer_classes
from anatomy_r1_jax.models import lora
from anatomy_r1_jax.rl.rollout import decode_completions
from anatomy_r1_jax.rl.sampling import sampling_config
from anatomy_r1_jax.runtime import builders, distributed
from anatomy_r1_jax.runtime.placement import RolloutWeights, rollout_calls, split_model
from anatomy_r1_jax.runtime.precision import Precision
from anatomy_r1_jax.runtime.programs import rollout_programs
from anatomy_r1_jax.train.checkpoint import Checkpointer
from anatomy_r1_jax.train.collector import StepCollector
from anatomy_r1_jax.train.compiled import Programs
from anatomy_r1_jax.train.micro_batches import bucket_lengths
from anatomy_r1_jax.train.schedules import phase_optimizers, phase_schedules
from anatomy_r1_jax.train.step import step_configs


@dataclasses.dataclass
class Run:
    """A training run's parts (see the module docstring). `gdqa` and the iterators `it` / `it_sft`
    are the host state that changes step by step (checkpointed in train/state.py); the rest is fixed."""

    config: Any
    workdir: str
    precision: Precision
    mesh: Any
    rules: list
    shard: distributed.DataShard
    tokenizer: Any
    image_processor: Any
    data: builders.Data
    model_cfg: Any
    collator: Collator
    sampling: Any
    lora: lora.LoraConfig
    graphdef: Any
    programs: Programs
    rollout_programs: Any
    rollout_weights: RolloutWeights
    rollout: Any  # the compiled rollout: (params, frozen, prompts, key, sampling, G, S) -> Completions
    evals: dict[str, HeldOut]  # config.evals with records (evals.heldout: data.eval, when there is one)
    step_configs: dict
    old_logps: Any  # the padded update's old log-probs program (rl.num_iterations > 1)
    length_buckets: tuple[int, ...] | None
    prompt_widths: tuple[int, ...]  # the rollout's prompt widths (rl.prompt_buckets of data.prompt_length)
    schedules: dict
    tx: dict
    kl_reference: bool
    initial_state: Any
    collector: StepCollector
    gdqa: GDQAState
    pipeline: QueryPipeline
    pipeline_sft: QueryPipeline | None
    ckpt: Checkpointer
    it: Any = None
    it_sft: Any = None

    @property
    def eos_id(self) -> int:
        return self.sampling.eos_ids[0]

    def decode(self, completions) -> list[str]:
        return decode_completions(self.tokenizer, completions.ids, completions.mask, self.sampling.eos_ids)


def _check_batch_sizes(c, shards: int) -> None:
    for name, size, parts in (("train.batch_size", c.train.batch_size, c.train.micro_batches * shards),
                              ("sft.batch_size", c.sft.batch_size, shards)):
        if size % parts:
            raise ValueError(f"config {name}={size} must be a multiple of {parts} (train.micro_batches x the "
                             f"{shards} data shards (hosts) of the mesh)")


def _evaluations(config, evaluator: Evaluator, data: builders.Data) -> dict[str, HeldOut]:
    """config.evals -> {name: HeldOut} of those that have records (data.eval may be empty: no held-out set)."""
    out = {}
    for name, ev in config.evals.items():
        records = data.eval if ev.records == "eval" else data.extra.get(name, [])  # records "": switched off
        if records:
            out[name] = HeldOut(evaluator, records, name=name, every=int(ev.every))
    return out


def build_run(config, workdir: str) -> Run:
    """Every part of the run `config` describes, built once (workdir: where it writes)."""
    c = config
    os.makedirs(workdir, exist_ok=True)
    precision = Precision.from_config(c)
    mesh = sharding.make_mesh([tuple(a) for a in c.mesh])
    rules = [tuple(r) for r in c.sharding_rules]
    shard = distributed.data_shard(mesh, rules)
    with distributed.primary_first("tokenizer and data"):
        tokenizer = builders.build_tokenizer(c, workdir)
        data = builders.build_data(c, workdir)
    image_processor = builders.build_image_processor(c, tokenizer)
    data = builders.validate_data(c, data, tokenizer, image_processor, workdir)
    with sharding.use_rules(mesh, rules):
        model = builders.build_model(c, tokenizer, mesh, rules)
    if distributed.is_primary():
        with open(os.path.join(workdir, "config.json"), "w") as f:  # what is trained (family, preset)
            f.write(builders.trained_config(c, model.config).to_json_best_effort(indent=1))
    with distributed.primary_first("similarity scores"):
        sq = builders.similarity_scores(c, data, model, tokenizer, workdir)

    g = c.rl.group_size
    collator = Collator(tokenizer, model.config, BatchShape(c.data.prompt_length, c.rl.max_completion_length,
                                                            c.data.patches_per_query))
    sampling = sampling_config(c, model.config, tokenizer, collator.pad_id)
    # The accuracy reward the run trains on (the first with a non-zero weight) is its reported accuracy.
    accuracy_key = run_accuracy(c.rl.rewards)
    gdqa = GDQAState(trigger=c.gdqa.trigger, num_variants=c.gdqa.num_variants,
                     kinds=variant_kinds(c.gdqa.kinds, signal=c.gdqa.signal, accuracy_key=accuracy_key))

    # State: trainable params (+ frozen rest), a frozen reference copy in GRPO when beta != 0 (made
    # when GRPO starts: the warm-up holds none), AdamW (and a float32 master copy of params when the
    # precision policy keeps one). Each phase (warm-up, GRPO) has its own schedule and optimizer state.
    # A LoRA run's full warm-up trains the base weights and GRPO the adapters (lora.LoraConfig.trains):
    # the state is split per phase, and each phase's update is built for its split (trainer `_update`).
    adapters = lora.LoraConfig.from_config(c.model)
    first = "sft" if c.sft.steps > 0 else "grpo"
    graphdef, params, frozen = split_model(model, c.model.freeze_vision, adapters.trains(first))
    programs = Programs.create(graphdef, mesh, rules)
    # The rollout's own layout (config.rollout_mesh / rollout_sharding_rules): the weights resharded
    # onto it once per step (RolloutWeights), so the decode loop holds no weight collective.
    rollout = rollout_programs(c, graphdef, mesh)
    distributed.check_same_data_shard(shard, rollout.mesh, rollout.rules)
    # Held-out evaluation is scripts/evaluate.py's evaluator (greedy answers, compiled once), batched
    # like a GRPO step's rows, on the rollout's layout.
    evaluator = Evaluator(graphdef, collator, image_processor, tokenizer, sampling, rollout.mesh, rollout.rules,
                          EvalSettings(batch_size=c.train.batch_size * g, accuracy=accuracy_key))
    schedules, tx = phase_schedules(c), phase_optimizers(c)
    configs = step_configs(c, num_categories=max(1, len(data.categories)), precision=precision)
    # A LoRA run holds no reference copy: its reference is the base model (adapters off).
    kl_reference = configs["grpo"].needs_reference and not adapters.enabled
    initial_state = programs.init_state(tx[first], precision, params, frozen, reference=kl_reference and first == "grpo")
    # The length-aware GRPO update (train.length_buckets K > 0): micro-batches of groups sorted by
    # length, each trimmed to one of K bucket lengths (train/micro_batches.py); 0: padded to T.
    k = c.train.length_buckets
    length_buckets = bucket_lengths(c.rl.max_completion_length, k) if k > 0 else None

    _check_batch_sizes(c, shard.count)
    calls = rollout_calls(c.train.batch_size, c.rl.rollout_batch_size, shard.count)
    pipe = dict(image_processor=image_processor, shard_index=shard.index, shard_count=shard.count,
                workers=c.data.workers, on_unreadable=c.data.on_error)
    # The warm-up's own pipeline only when there is a warm-up (its batch may not fit a small set).
    pipeline_sft = QueryPipeline(data.train, batch_size=c.sft.batch_size // shard.count, order_fn=None,
                                 seed=c.seed + 1, shard_block=c.sft.batch_size // shard.count,
                                 **pipe) if c.sft.steps > 0 else None
    order = functools.partial(curriculum_order, sq, answer_classes(data.train)[0], Curriculum.from_config(c),
                              seed=c.seed)
    pipeline = QueryPipeline(data.train, batch_size=c.train.batch_size // shard.count,
                             order_fn=lambda epoch: order(epoch=epoch), seed=c.seed,
                             shard_block=c.train.batch_size // calls // shard.count, **pipe)
    # The base a LoRA run's GRPO checkpoints name (the full warm-up's last checkpoint) is kept.
    base = builders.adapter_base(c, c.sft.steps + 1, "") if adapters.enabled else {}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.train.keep_checkpoints,
                        preserve=(base["base_step"],) if "base_step" in base else ())

    run = Run(
        config=c, workdir=workdir, precision=precision, mesh=mesh, rules=rules, shard=shard, tokenizer=tokenizer,
        image_processor=image_processor, data=data, model_cfg=model.config, collator=collator, sampling=sampling,
        lora=adapters, graphdef=graphdef, programs=programs, rollout_programs=rollout,
        rollout_weights=RolloutWeights(rollout.mesh, rollout.rules),
        rollout=rollout.rollout(cache_dtype=precision.compute_dtype),
        evals=_evaluations(c, evaluator, data),
        step_configs=configs, old_logps=programs.old_logps(configs["grpo"]),
        length_buckets=length_buckets, prompt_widths=bucket_lengths(c.data.prompt_length, c.rl.prompt_buckets),
        schedules=schedules, tx=tx, kl_reference=kl_reference,
        initial_state=initial_state, collector=None, gdqa=gdqa, pipeline=pipeline, pipeline_sft=pipeline_sft,
        ckpt=ckpt)
    run.collector = StepCollector(
        group_size=g, rewards=dict(c.rl.rewards), accuracy_key=accuracy_key, share_prompts=c.train.share_prompts,
        calls=calls, micro_batches=c.train.micro_batches, length_buckets=length_buckets, reroll=reroll_policy(c),
        shard=shard, collator=collator, decode=run.decode, records=data.train,
        sq_by_id=dict(zip((r.id for r in data.train), sq)),
        category_index={name: i for i, name in enumerate(data.categories)})
    run.it = iter(pipeline)
    run.it_sft = iter(pipeline_sft) if pipeline_sft is not None else None
    return run
