"""Builds what a run needs from its config: tokenizer, image processor, records, S(q) scores, model.

Everything here is host-side set-up, done once before the loop; nothing is downloaded: a model
comes from a local Hugging Face directory (`model.path`) or is made from scratch (tiny runs).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from anatomy_r1_jax.data import read_records
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.methods import similarity as sim_lib
from anatomy_r1_jax.models import QwenVL, QwenVLConfig, load_pretrained, model_options
from anatomy_r1_jax.models.presets import tiny_hf_config

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Data:
    train: list[Record]
    eval: list[Record]
    categories: list[str]  # category names; index = the integer used in metrics
    matrix_path: str  # class-similarity matrix ("" when none)


def build_tokenizer(config, workdir: str):
    """The checkpoint's tokenizer (tokenizer.path, else model.path) or the project's tiny BPE."""
    from transformers import AutoTokenizer

    path = config.tokenizer.path or config.model.path
    if not path:
        from anatomy_r1_jax.data.tokenizer import build_tiny_tokenizer

        path = os.path.join(workdir, "tokenizer")
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            build_tiny_tokenizer(path, vocab_size=config.tokenizer.vocab_size)
    return AutoTokenizer.from_pretrained(path)


def build_image_processor(config, tokenizer):
    """Qwen2-VL's PIL image processor (no torchvision) with the checkpoint's (or the tiny tokenizer
    folder's) settings; synthetic runs pin the pixel budget to the synthetic image size."""
    from transformers import Qwen2VLImageProcessorPil

    for path in (config.model.path, tokenizer.name_or_path):
        if path and os.path.exists(os.path.join(path, "preprocessor_config.json")):
            return Qwen2VLImageProcessorPil.from_pretrained(path)
    size = config.data.synthetic.image_size
    return Qwen2VLImageProcessorPil(min_pixels=size * size, max_pixels=size * size)


def build_data(config, workdir: str) -> Data:
    """Reads (or, for "synthetic", generates into workdir/data) the train and eval records."""
    c = config.data
    matrix = config.curriculum.matrix
    paths = {}
    if "synthetic" in (c.train, c.eval):
        from anatomy_r1_jax.data.synthetic import make_synthetic_dataset

        out = os.path.join(workdir, "data")
        paths = make_synthetic_dataset(out, n=c.synthetic.n, seed=c.synthetic.seed, image_size=c.synthetic.image_size)
        matrix = matrix or os.path.join(out, "class_similarity.json")
    if not c.train:
        raise ValueError("config data.train is empty: give a records file (--config.data.train=PATH) or 'synthetic'")
    read = dict(format=c.format, image_root=c.image_root or None)
    train = read_records(paths["train"] if c.train == "synthetic" else c.train, **read)
    evals = read_records(paths["val"] if c.eval == "synthetic" else c.eval, **read) if c.eval else []
    if c.prompt_variant:
        train = [r if r.prompt_variant else dataclasses.replace(r, prompt_variant=c.prompt_variant) for r in train]
        evals = [r if r.prompt_variant else dataclasses.replace(r, prompt_variant=c.prompt_variant) for r in evals]
    evals = evals[: c.eval_size] if c.eval_size else evals
    categories = sorted({r.category for r in train + evals})
    log.info("data: %d train, %d eval records, %d categories", len(train), len(evals), len(categories))
    return Data(train, evals, categories, matrix)


def similarity_scores(config, data: Data, model, tokenizer, workdir: str) -> np.ndarray:
    """S(q) per training record (cached in workdir) with the configured backend."""
    backend = config.curriculum.backend
    if backend == "matrix":
        if not data.matrix_path:
            raise ValueError("curriculum.backend='matrix' needs curriculum.matrix (a class-similarity JSON)")
        sim = sim_lib.make_similarity("matrix", matrix=data.matrix_path)
        fingerprint = f"matrix:{os.path.abspath(data.matrix_path)}"
    elif backend == "embedding":
        table = model.language.embed_tokens.embedding[...]
        sim = sim_lib.make_similarity("embedding", embed=sim_lib.token_embedder(
            table, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]))
        fingerprint = f"embedding:{config.model.path or 'tiny'}"
    else:
        raise ValueError(f"unknown curriculum.backend {backend!r} (matrix, embedding)")
    scores = sim_lib.score_records(data.train, sim, os.path.join(workdir, "sq_scores.json"), fingerprint=fingerprint)
    return sim_lib.scores_array(data.train, scores)


def build_model(config, tokenizer, mesh=None, rules=()) -> QwenVL:
    """Loads model.path, or makes a tiny model of model.family sized to the tokenizer."""
    c = config.model
    dtype, param_dtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
    if not c.path and c.get("preset"):
        raise ValueError(f"config model.preset={c.preset!r} needs --config.model.path=<local HF checkpoint directory>")
    if c.path:
        return load_pretrained(c.path, dtype=dtype, mesh=mesh, rules=rules, param_dtype=param_dtype,
                               **model_options(c))
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    hf = tiny_hf_config(c.family, vocab_size=len(tokenizer), **dict(c.tiny))
    hf.update(ids)
    hf["text_config"].update(ids)
    hf["eos_token_id"] = hf["text_config"]["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hf["pad_token_id"] = hf["text_config"]["pad_token_id"] = tokenizer.pad_token_id
    cfg = QwenVLConfig.from_hf(hf)
    model = QwenVL(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(config.seed), **model_options(c))
    return model
