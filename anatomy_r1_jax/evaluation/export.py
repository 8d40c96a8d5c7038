"""A trained checkpoint as a Hugging Face model directory that transformers loads unchanged.

    out/config.json, generation_config.json, model.safetensors   models.save_pretrained (hub layout)
    out/tokenizer.json, tokenizer_config.json, chat template     the run's tokenizer
    out/preprocessor_config.json                                 the run's image processor
    out/anatomy_r1_export.json                                   which checkpoint / step it came from
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

from anatomy_r1_jax.evaluation.checkpoints import build_setup, load_model_state, resolve_checkpoint
from anatomy_r1_jax.models import save_pretrained
from anatomy_r1_jax.train.experiment import DTYPES

log = logging.getLogger(__name__)


def export_checkpoint(config, checkpoint: str, out_dir: str, *, dtype: str | None = None,
                      workdir: str | None = None, max_shard_bytes: int = 4 * 2**30) -> str:
    """Writes the model of `checkpoint` (a spec of checkpoints.resolve_checkpoint, "base" included)
    with the tokenizer and image processor of `config` to out_dir; returns out_dir.

    workdir: where the run keeps its tokenizer folder (default: the checkpoint's run workdir).
    dtype: "float32" / "bfloat16" to cast the stored weights (default: as trained).
    """
    ref = resolve_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as scratch:
        setup = build_setup(config, workdir or ref.workdir or scratch)
        params, frozen = load_model_state(setup, ref)
        if dtype is not None:
            cast = lambda x: x.astype(DTYPES[dtype]) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
            params, frozen = jax.tree.map(cast, params), jax.tree.map(cast, frozen)
        model = nnx.merge(setup.graphdef, params, frozen)
        if jax.process_index() == 0:
            os.makedirs(out_dir, exist_ok=True)
        save_pretrained(model, out_dir, max_shard_bytes=max_shard_bytes)
        if jax.process_index() == 0:
            setup.tokenizer.save_pretrained(out_dir)
            setup.image_processor.save_pretrained(out_dir)
            with open(os.path.join(out_dir, "anatomy_r1_export.json"), "w") as f:
                json.dump({"checkpoint": ref.path or "base", "step": ref.step, "name": ref.name,
                           "model_path": config.model.path, "family": model.config.family}, f, indent=1)
    log.info("exported %s to %s", ref.name, out_dir)
    return out_dir
