"""Builds what a run needs from its config: tokenizer, image processor, records, S(q) scores, model.

Everything here is host-side set-up, done once before the loop; nothing is downloaded: a model
comes from a local Hugging Face directory (`model.path`) or is made from scratch (tiny runs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import numpy as np
from flax import nnx

from anatomy_r1_jax.data import read_records
from anatomy_r1_jax.data import validation
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.methods import similarity as sim_lib
from anatomy_r1_jax.models import lora
from anatomy_r1_jax.models import QwenVL, QwenVLConfig, load_pretrained, model_options
from anatomy_r1_jax.models.presets import matching_preset, tiny_hf_config
from anatomy_r1_jax.runtime.precision import DTYPES

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Data:
    train: list[Record]
    eval: list[Record]
    categories: list[str]  # category names; index = the integer used in metrics
    matrix_path: str  # class-similarity matrix ("" when none)
    train_file: str = ""  # the files the records came from
    eval_file: str = ""
    extra: dict = dataclasses.field(default_factory=dict)  # config.evals.<name> with a records file: its records
    extra_files: dict = dataclasses.field(default_factory=dict)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # fast tokenizer, or the byte-level BPE's vocab (+ merges.txt)


def check_local_folder(field: str, path: str, *, need: tuple[str, ...], what: str) -> None:
    """Raises one line naming the config field when `path` is not a local folder holding one of
    `need` (a missing folder would otherwise be taken for a model-hub id)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config {field}={path!r}: no such folder; give a local Hugging Face checkpoint "
                                f"directory (nothing is downloaded)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in need):
        raise FileNotFoundError(f"config {field}={path!r} has no {what} ({' or '.join(need)})")


def build_tokenizer(config, workdir: str):
    """The checkpoint's tokenizer (tokenizer.path, else model.path) or the project's tiny BPE."""
    from transformers import AutoTokenizer

    path = config.tokenizer.path or config.model.path
    if config.model.path:
        check_local_folder("model.path", config.model.path, need=("config.json",), what="config.json")
    if path:
        field = "tokenizer.path" if config.tokenizer.path else "model.path"
        hint = "" if config.tokenizer.path else "; give its folder with --config.tokenizer.path"
        check_local_folder(field, path, need=TOKENIZER_FILES, what="tokenizer" + hint)
    if not path:
        from anatomy_r1_jax.data.tokenizer import build_tiny_tokenizer

        path = os.path.join(workdir, "tokenizer")
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            build_tiny_tokenizer(path, vocab_size=config.tokenizer.vocab_size)
    return AutoTokenizer.from_pretrained(path)


def build_image_processor(config, tokenizer):
    """Qwen2-VL's PIL image processor (no torchvision) with the checkpoint's (or the tiny tokenizer
    folder's) settings, its pixel range following the patch budget.

    Like Qwen's processors with `max_pixels`, every image is resized (aspect ratio kept, sides
    multiples of patch_size * merge_size) to at most max_pixels = data.max_pixels, or when that is 0
    data.patches_per_query * patch_size^2: an image then never has more patches than the budget,
    whatever its size (a checkpoint's max_pixels=12845056 is capped too). min_pixels is the
    checkpoint's (data.min_pixels when set), at most max_pixels. Runs without a checkpoint pin the
    pixels to the synthetic image size (then capped alike).
    """
    from transformers import Qwen2VLImageProcessorPil

    processor = None
    for path in (config.model.path, tokenizer.name_or_path):
        if path and os.path.exists(os.path.join(path, "preprocessor_config.json")):
            processor = Qwen2VLImageProcessorPil.from_pretrained(path)
            break
    if processor is None:
        side = config.data.synthetic.image_size
        processor = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side)
    d = config.data
    budget = d.patches_per_query * processor.patch_size ** 2
    max_pixels = d.max_pixels or min(processor.size["longest_edge"], budget)
    min_pixels = min(d.min_pixels or processor.size["shortest_edge"], max_pixels)
    processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return processor


def build_data(config, workdir: str) -> Data:
    """Reads (or, for "synthetic", generates into workdir/data) the train and eval records.
    data.eval="synthetic" is the synthetic benchmark's val split when training on it; a run that
    trains on a records file has no synthetic eval set (none is generated): give data.eval=FILE."""
    c = config.data
    matrix = config.curriculum.matrix
    paths = {}
    if not c.train:
        raise ValueError("config data.train is empty: give a records file (--config.data.train=PATH) or 'synthetic'")
    eval_spec = c.eval
    if c.eval == "synthetic" and c.train != "synthetic":
        log.warning("data.train=%s is a records file: no synthetic eval set (data.eval='synthetic' is the synthetic "
                    "benchmark's own split); give held-out questions with --config.data.eval=FILE", c.train)
        eval_spec = ""
    if c.train == "synthetic":
        from anatomy_r1_jax.data.synthetic import make_synthetic_dataset

        out = os.path.join(workdir, "data")
        paths = make_synthetic_dataset(out, n=c.synthetic.n, seed=c.synthetic.seed, image_size=c.synthetic.image_size)
        matrix = matrix or os.path.join(out, "class_similarity.json")
    if c.on_error not in validation.ON_ERROR:
        raise ValueError(f"config data.on_error={c.on_error!r}: use one of {validation.ON_ERROR}")
    # images are checked by validate_data (headers only: fast), with the prompt and patch checks
    read = dict(format=c.format, image_root=c.image_root or None, check_images=False,
                on_bad_record="error" if c.on_error == "raise" else "skip")
    train_file = paths["train"] if c.train == "synthetic" else c.train
    eval_file = (paths["val"] if eval_spec == "synthetic" else eval_spec) if eval_spec else ""
    train = read_records(train_file, **read)
    evals = read_records(eval_file, **read) if eval_file else []
    def with_variant(records):  # data.prompt_variant for records that name none
        if not c.prompt_variant:
            return records
        return [r if r.prompt_variant else dataclasses.replace(r, prompt_variant=c.prompt_variant) for r in records]

    train, evals = with_variant(train), with_variant(evals)
    evals = evals[: c.eval_size] if c.eval_size else evals
    extra_files = {name: ev.records for name, ev in config.evals.items() if ev.records not in ("eval", "")}
    extra = {name: with_variant(read_records(path, **read))[: config.evals[name].limit or None]
             for name, path in extra_files.items()}
    categories = sorted({r.category for r in train + evals + [r for recs in extra.values() for r in recs]})
    log.info("data: %d train, %d eval records, %d categories%s", len(train), len(evals), len(categories),
             "".join(f"; evals.{name}: {len(recs)} records" for name, recs in extra.items()))
    return Data(train, evals, categories, matrix, train_file, eval_file, extra, extra_files)


def validate_data(config, data: Data, tokenizer, image_processor, workdir: str) -> Data:
    """The start-up pass over all records (data/validation.py): images, prompts (GDQA variants of
    training records included when GDQA is on), patch budget. data.on_error="raise" stops with every
    problem listed; "skip" leaves those records out. Either way they are listed in
    workdir/invalid_records.jsonl."""
    c = config.data
    gdqa_on = config.gdqa.trigger != "off" and min(config.rl.group_size, config.gdqa.num_variants) > 1
    check = functools.partial(validation.find_problems, tokenizer=tokenizer, image_processor=image_processor,
                              prompt_length=c.prompt_length, patches_per_query=c.patches_per_query)
    t0 = time.perf_counter()
    splits = {"train": (data.train, check(data.train, file=data.train_file,
                                          gdqa_kinds=tuple(config.gdqa.kinds) if gdqa_on else ())),
              "eval": (data.eval, check(data.eval, file=data.eval_file)),
              **{f"evals.{name}": (recs, check(recs, file=data.extra_files[name])) for name, recs in data.extra.items()}}
    kept = validation.drop_or_raise(splits, c.on_error, os.path.join(workdir, "invalid_records.jsonl"))
    log.info("data: checked %d records in %.1f s", sum(len(recs) for recs, _ in splits.values()),
             time.perf_counter() - t0)
    return dataclasses.replace(data, train=kept["train"], eval=kept["eval"],
                               extra={name: kept[f"evals.{name}"] for name in data.extra})


def similarity_scores(config, data: Data, model, tokenizer, workdir: str) -> np.ndarray:
    """S(q) per training record (cached in workdir) with the configured backend. A run whose order
    does not use S(q) (curriculum.schedule="none": plain GRPO, GDQA alone) and has no class-similarity
    matrix gets NaN scores (its sq_mean metric is NaN) instead of needing one."""
    backend = config.curriculum.backend
    if backend == "matrix" and not data.matrix_path and config.curriculum.schedule == "none":
        log.info("no class-similarity matrix (curriculum.matrix): S(q) is not computed; the shuffled order "
                 "(curriculum.schedule='none') does not use it")
        return np.full(len(data.train), np.nan, np.float32)
    if backend == "matrix":
        if not data.matrix_path:
            raise ValueError(f"curriculum.schedule={config.curriculum.schedule!r} orders by S(q): curriculum.backend="
                             "'matrix' needs curriculum.matrix (a class-similarity JSON), or use "
                             "--config.curriculum.backend=embedding")
        sim = sim_lib.make_similarity("matrix", matrix=data.matrix_path)
        fingerprint = f"matrix:{os.path.abspath(data.matrix_path)}"
    elif backend == "embedding":
        table = model.language.embed_tokens.embedding[...]
        sim = sim_lib.make_similarity("embedding", embed=sim_lib.token_embedder(
            table, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]))
        fingerprint = f"embedding:{config.model.path or 'tiny'}"
    else:
        raise ValueError(f"unknown curriculum.backend {backend!r} (matrix, embedding)")
    scores = sim_lib.score_records(data.train, sim, os.path.join(workdir, "sq_scores.json"), fingerprint=fingerprint,
                                   score=config.curriculum.score)
    return sim_lib.scores_array(data.train, scores)


def trained_config(config, model_cfg: QwenVLConfig):
    """A copy of `config` that records what is trained: model.family from the model itself (a
    checkpoint's config.json) and model.preset the published shape it has ("" for other shapes),
    whatever the config file assumed."""
    c = config.copy_and_resolve_references()
    preset = ""
    if c.model.path:
        with open(os.path.join(c.model.path, "config.json")) as f:
            preset = matching_preset(json.load(f))
    if (c.model.get("preset") or preset) and c.model.get("preset") != preset:
        log.warning("model.path %s is a %s checkpoint (preset %r); the run records that, not model.preset=%r",
                    c.model.path, model_cfg.family, preset, c.model.get("preset"))
    c.model.family, c.model.preset = model_cfg.family, preset
    return c


def build_model(config, tokenizer, mesh=None, rules=()) -> QwenVL:
    """Loads model.path, or makes a tiny model of model.family sized to the tokenizer; with
    model.lora.rank > 0, low-rank adapters on the targeted layers (`with_adapters`)."""
    c = config.model
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    if not c.path and c.get("preset"):
        raise ValueError(f"config model.preset={c.preset!r} needs --config.model.path=<local HF checkpoint directory>")
    if c.path:
        model = load_pretrained(c.path, dtype=dtype, mesh=mesh, rules=rules, param_dtype=param_dtype,
                                **model_options(c))
    else:
        cfg = QwenVLConfig.from_hf(tiny_hf_config_for(tokenizer, c.family, **dict(c.tiny)))
        model = QwenVL(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(config.seed), **model_options(c))
    return with_adapters(config, model)


def with_adapters(config, model: QwenVL) -> QwenVL:
    """`model` with the adapters of config.model.lora (models/lora.py; none at rank 0), initialised
    from config.seed, stored in model.param_dtype and run in model.dtype."""
    c = config.model
    adapters = lora.LoraConfig.from_config(c)
    if adapters.enabled and adapters.vision and c.freeze_vision:
        raise ValueError("config model.lora.vision=True puts adapters on the vision tower, which "
                         "model.freeze_vision=True freezes: set model.freeze_vision=False (or model.lora.vision=False)")
    return lora.add_adapters(model, adapters, seed=config.seed + 1, dtype=DTYPES[c.dtype],
                             param_dtype=DTYPES[c.param_dtype])


def base_checkpoint(config) -> str:
    """What a LoRA run's adapters apply to (named in its checkpoints and exports): model.path, or
    the tiny model made from config.seed."""
    return config.model.path or f"tiny {config.model.family} model made from seed {config.seed}"


def adapter_base(config, step: int | None, checkpoints: str) -> dict:
    """What the adapters of a LoRA run's checkpoint `step` (in the folder `checkpoints`; None / 0:
    the model as built) apply to: {"base": its name, "base_saved": whether the checkpoint holds
    those base weights itself} and, when they are another checkpoint of the run, "base_step".

        no warm-up, or before it                  base: the config's (model.path / tiny model of seed)
        lora.warmup="adapters", after the warm-up base_saved: the warm-up was folded into the base weights
        lora.warmup="full", within the warm-up    base_saved: the warm-up trains the base weights
        lora.warmup="full", GRPO                  base: the warm-up's last checkpoint, checkpoints/<sft.steps>
    """
    warm, step = config.sft.steps, step or 0
    saved = {"base": base_checkpoint(config), "base_saved": True}
    if warm == 0 or step == 0:
        return {**saved, "base_saved": False}
    if lora.LoraConfig.from_config(config.model).warmup == "adapters":
        return saved if step > warm else {**saved, "base_saved": False}
    if step <= warm:
        return saved
    return {"base": os.path.join(checkpoints, str(warm)), "base_saved": False, "base_step": warm}


def tiny_hf_config_for(tokenizer, family: str, **tiny) -> dict:
    """A tiny config.json dict sized to `tokenizer` (vocabulary and Qwen special-token ids)."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    hf = tiny_hf_config(family, vocab_size=len(tokenizer), **tiny)
    hf.update(ids)
    hf["text_config"].update(ids)
    hf["eos_token_id"] = hf["text_config"]["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hf["pad_token_id"] = hf["text_config"]["pad_token_id"] = tokenizer.pad_token_id
    return hf
