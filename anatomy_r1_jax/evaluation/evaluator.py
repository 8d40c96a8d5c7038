"""Batched answering of questions on a device mesh: greedy answers and n samples per question.

    records -> batches of B questions (the last padded with repeats of its final question)
      -> images preprocessed once per question -> collate (static shapes; a question's n samples
         are one group sharing its image encoding)
      -> rows put on the mesh's data axes (placement.put_batch)
      -> one compiled `generate` per mode (runtime/programs.py) (greedy [B rows], sampled [B*n rows]), reused by every
         batch and every checkpoint of the same shapes -> decode -> score (scoring.py)

The compiled programs are ahead-of-time `Compiled` objects: a batch of other shapes or shardings
raises instead of recompiling (and they are shared by every Evaluator of the process). Batch b of a sweep samples with fold_in(key(seed), b), so results
depend on (model, records, batch size, seed) only: one device and eight give the same answers.
B is rounded up to a multiple of the data-parallel size so that rows divide evenly. With several
processes every process collates the whole batch (identical on all) and receives every answer.
The trainer's held-out evaluation is this evaluator too (train/trainer.py), so the accuracy a run
logs is the one scripts/evaluate.py gives its checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from anatomy_r1_jax import sharding
from anatomy_r1_jax.data.collate import BatchShape, Collator, preprocess_images
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.evaluation.scoring import score, summarize
from anatomy_r1_jax.rl.rollout import decode_completions
from anatomy_r1_jax.rl.sampling import SamplingConfig, sampling_config
from anatomy_r1_jax.runtime import distributed
from anatomy_r1_jax.runtime.programs import RolloutPrograms
from anatomy_r1_jax.runtime.placement import put_batch

log = logging.getLogger(__name__)


# Compiled generate programs by (graphdef, sampling, rules, input signature): every Evaluator of
# the process (a sweep's, a restarted sweep's in the same process, tests) shares them.
_PROGRAMS: dict = {}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """batch_size: questions per compiled call. samples: n answers sampled per question for pass@k
    (0: greedy only). ks: the k of pass@k (those <= samples are reported). temperature / top_p /
    top_k: None takes the training sampler's (config.rl). accuracy: "accuracy" (exact letter, the
    authors') or "accuracy_lenient"."""

    batch_size: int = 8
    samples: int = 0
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    accuracy: str = "accuracy"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["ks"] = list(self.ks)
        return d


def data_parallel_size(mesh, rules) -> int:
    """Number of devices batch rows are split over (the mesh axes of the logical `activation_batch` axis)."""
    spec = sharding.logical_to_spec((sharding.BATCH,), rules, mesh)
    entry = spec[0] if len(spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[a] for a in names])) if names else 1


@dataclasses.dataclass
class Timing:
    images: float = 0.0
    greedy: float = 0.0
    sampled: float = 0.0
    compile: float = 0.0
    greedy_tokens: int = 0
    sampled_tokens: int = 0


class Evaluator:
    """Answers and scores questions with a model given as (graphdef, params, frozen) on `mesh`.

    One Evaluator serves every checkpoint of a model family: params only change values, so the
    compiled programs are reused.
    """

    def __init__(self, graphdef, collator: Collator, image_processor, tokenizer, sampling: SamplingConfig, mesh,
                 rules, settings: EvalSettings = EvalSettings()):
        self.graphdef, self.collator, self.image_processor, self.tokenizer = graphdef, collator, image_processor, tokenizer
        self.mesh, self.rules = mesh, [tuple(r) for r in rules]
        dp = data_parallel_size(mesh, self.rules)
        batch = -(-settings.batch_size // dp) * dp
        if batch != settings.batch_size:
            log.info("eval batch size %d rounded up to %d (a multiple of the %d data-parallel devices)",
                     settings.batch_size, batch, dp)
        self.settings = dataclasses.replace(settings, batch_size=batch)
        s = self.settings
        self.greedy_cfg = dataclasses.replace(sampling, greedy=True)
        self.sample_cfg = dataclasses.replace(
            sampling, greedy=False,
            temperature=sampling.temperature if s.temperature is None else s.temperature,
            top_p=sampling.top_p if s.top_p is None else s.top_p,
            top_k=sampling.top_k if s.top_k is None else s.top_k)
        self._compiled: dict[str, object] = {}
        self.timing = Timing()
        self.traces = 0  # how many times this evaluator traced (= compiled) `generate`: at most 1 per mode

    @classmethod
    def from_config(cls, config, graphdef, model_cfg, tokenizer, image_processor, mesh, rules,
                    settings: EvalSettings = EvalSettings()) -> "Evaluator":
        c = config
        shape = BatchShape(c.data.prompt_length, c.rl.max_completion_length, c.data.patches_per_query)
        collator = Collator(tokenizer, model_cfg, shape)
        return cls(graphdef, collator, image_processor, tokenizer,
                   sampling_config(config, model_cfg, tokenizer, collator.pad_id), mesh, rules, settings)

    # ---- compiled generation ----------------------------------------------------------------
    def _program(self, mode: str, params, frozen, batch, rng):
        cfg = self.greedy_cfg if mode == "greedy" else self.sample_cfg
        leaves, treedef = jax.tree.flatten((params, frozen, batch, rng))
        key = (self.graphdef, cfg, tuple(self.rules), treedef,
               tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
        if key not in _PROGRAMS:
            def count_trace():
                self.traces += 1

            t0 = time.perf_counter()
            program = RolloutPrograms.create(self.graphdef, self.mesh, self.rules).generate(cfg, on_trace=count_trace)
            _PROGRAMS[key] = program.lower(params, frozen, batch, rng).compile()
            self.timing.compile += time.perf_counter() - t0
        self._compiled[mode] = _PROGRAMS[key]
        return _PROGRAMS[key]

    def _generate(self, mode: str, params, frozen, groups, images, rng, rows: int) -> tuple[list[str], int]:
        """Decoded completions of the first `rows` rows (the rest is padding) and their token count."""
        cfg = self.greedy_cfg if mode == "greedy" else self.sample_cfg
        batch = put_batch(self.collator.prompts(groups, images), self.mesh, self.rules)
        comp = self._program(mode, params, frozen, batch, rng)(params, frozen, batch, rng)
        ids, mask = distributed.to_host((comp.ids, comp.mask))  # every process gets every row
        return decode_completions(self.tokenizer, ids[:rows], mask[:rows], cfg.eos_ids), int(mask[:rows].sum())

    # ---- answering ----------------------------------------------------------------------------
    def answer(self, params, frozen, records: Sequence[Record], progress: bool = False
               ) -> tuple[list[str], list[list[str]] | None]:
        """Greedy answers [N] and, with settings.samples = n > 0, n sampled answers per question
        [N][n]. params / frozen: the model's nnx States placed on self.mesh."""
        s, b = self.settings, self.settings.batch_size
        self.timing = Timing()
        greedy: list[str] = []
        sampled: list[list[str]] | None = [] if s.samples else None
        key = jax.random.key(s.seed)
        starts = range(0, len(records), b)
        for i, start in enumerate(tqdm(starts, desc="batches", leave=False, disable=not progress)):
            chunk = list(records[start:start + b])
            padded = chunk + [chunk[-1]] * (b - len(chunk))
            t0 = time.perf_counter()
            images = [preprocess_images(r, self.image_processor) for r in chunk]
            images += images[-1:] * (b - len(chunk))
            t1 = time.perf_counter()
            self.timing.images += t1 - t0
            rng = jax.random.fold_in(key, i)
            compile_before = self.timing.compile
            texts, tokens = self._generate("greedy", params, frozen, [[r] for r in padded], images, rng, len(chunk))
            t2 = time.perf_counter()
            self.timing.greedy += t2 - t1 - (self.timing.compile - compile_before)
            self.timing.greedy_tokens += tokens
            greedy += texts
            if s.samples:
                compile_before = self.timing.compile
                texts, tokens = self._generate("sampled", params, frozen, [[r] * s.samples for r in padded], images,
                                               jax.random.fold_in(rng, 1), len(chunk) * s.samples)
                self.timing.sampled += time.perf_counter() - t2 - (self.timing.compile - compile_before)
                self.timing.sampled_tokens += tokens
                sampled += [texts[j * s.samples:(j + 1) * s.samples] for j in range(len(chunk))]
        return greedy, sampled

    def evaluate(self, params, frozen, records: Sequence[Record], progress: bool = False) -> dict:
        """Summary (scoring.summarize) plus throughput, settings and the per-question outcomes."""
        if not records:
            raise ValueError("no records to evaluate")
        t0 = time.perf_counter()
        greedy, sampled = self.answer(params, frozen, records, progress)
        outcomes = score(records, greedy, sampled, self.settings.accuracy)
        s, t, n = self.settings, self.timing, len(records)
        result = summarize(outcomes, s.samples, s.ks)
        greedy_s = t.images + t.greedy
        result["throughput"] = {
            "answers_per_second": n / greedy_s,  # greedy answers, host preprocessing included
            "greedy_tokens_per_second": t.greedy_tokens / greedy_s,
            "greedy_seconds": greedy_s,
            "compile_seconds": t.compile,
            "wall_seconds": time.perf_counter() - t0,
            "devices": int(self.mesh.devices.size),
        }
        if s.samples:
            sampled_s = t.images + t.sampled
            result["throughput"].update(sampled_answers_per_second=n * s.samples / sampled_s,
                                        sampled_tokens_per_second=t.sampled_tokens / sampled_s,
                                        sampled_seconds=sampled_s)
        result["settings"] = {**s.to_json(), "max_new_tokens": self.greedy_cfg.max_new_tokens,
                              "sample_temperature": self.sample_cfg.temperature, "sample_top_p": self.sample_cfg.top_p,
                              "sample_top_k": self.sample_cfg.top_k}
        result["records"] = [o.to_json() for o in outcomes]
        return result
