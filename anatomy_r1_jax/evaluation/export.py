"""A trained checkpoint as a Hugging Face model directory that transformers loads unchanged.

    out/config.json, generation_config.json, model.safetensors   models.save_pretrained (hub layout)
    out/tokenizer.json, tokenizer_config.json, chat template     the run's tokenizer
    out/preprocessor_config.json                                 the run's image processor
    out/processor_config.json, processing_image_only_qwen2_vl.py the processor without torchvision:
        AutoProcessor.from_pretrained(out, trust_remote_code=True) (see processing_image_only_qwen2_vl.py)
    out/anatomy_r1_export.json                                   which checkpoint / step it came from
    out/peft_adapters/adapter_model.safetensors, adapter_config.json   a LoRA run's adapters alone (PEFT)

The weights keep the run's dtype (config.model.param_dtype) unless another is asked for. A LoRA
run (model.lora.rank > 0) is exported merged: W + alpha/r A B in every adapted layer, rounded once
to that dtype; its adapters alone go to out/peft_adapters in PEFT's format when the checkpoint does
not hold its base weights itself (runtime/builders.adapter_base): they apply to model.path (no
warm-up: sft.steps = 0, as in the real-model configs; or a checkpoint of an adapter warm-up), or,
after a full warm-up (model.lora.warmup="full"), to the run's warm-up checkpoint that
base_model_name_or_path names (export it with scripts/export_hf.py for the base in Hugging Face
layout). The merged export holds everything either way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from anatomy_r1_jax.evaluation import processing_image_only_qwen2_vl
from anatomy_r1_jax.evaluation.checkpoints import build_setup, load_model_state, resolve_checkpoint
from anatomy_r1_jax.models import lora, save_pretrained
from anatomy_r1_jax.runtime import builders
from anatomy_r1_jax.runtime.precision import DTYPES

log = logging.getLogger(__name__)

PEFT_DIR = "peft_adapters"
PROCESSOR_CLASS = processing_image_only_qwen2_vl.ImageOnlyQwen2VLProcessor.__name__
PROCESSOR_MODULE = os.path.basename(processing_image_only_qwen2_vl.__file__)


def write_processor_files(out_dir: str) -> None:
    """processor_config.json naming transformers' Qwen2VLProcessor (what AutoProcessor loads by
    default) and, under auto_map, the image-only processor shipped beside it (what it loads with
    trust_remote_code=True, no torchvision needed)."""
    shutil.copyfile(processing_image_only_qwen2_vl.__file__, os.path.join(out_dir, PROCESSOR_MODULE))
    auto_map = {"AutoProcessor": f"{os.path.splitext(PROCESSOR_MODULE)[0]}.{PROCESSOR_CLASS}"}
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "Qwen2VLProcessor", "auto_map": auto_map}, f, indent=1)


def export_checkpoint(config, checkpoint: str, out_dir: str, *, dtype: str | None = None,
                      workdir: str | None = None, max_shard_bytes: int = 4 * 2**30) -> str:
    """Writes the model of `checkpoint` (a spec of checkpoints.resolve_checkpoint, "base" included)
    with the tokenizer and image processor of `config` to out_dir; returns out_dir.

    config: the run's (scripts/export_hf.py reads it from the run's config.json).
    workdir: where the run keeps its tokenizer folder (default: the checkpoint's run workdir); read only.
    dtype: "float32" / "bfloat16" to cast the stored weights (default: as trained, model.param_dtype).
    """
    ref = resolve_checkpoint(checkpoint)
    setup = build_setup(config, workdir or ref.workdir)
    params, frozen = load_model_state(setup, ref)
    if dtype is not None:
        cast = lambda x: x.astype(DTYPES[dtype]) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        params, frozen = jax.tree.map(cast, params), jax.tree.map(cast, frozen)
    model = nnx.merge(setup.graphdef, params, frozen)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
    if lora.has_adapters(model):
        # The adapters alone in PEFT's format while their base is another checkpoint, then the merged model.
        base = builders.adapter_base(config, ref.step, os.path.dirname(ref.path or ""))
        if not base["base_saved"]:
            lora.save_peft_adapters(model, os.path.join(out_dir, PEFT_DIR), base=base["base"])
        else:
            log.info("no PEFT adapters: the base weights of %s are its own (trained in the warm-up)", ref.name)
        model = lora.merge_adapters(model)
    save_pretrained(model, out_dir, max_shard_bytes=max_shard_bytes)
    if jax.process_index() == 0:
        setup.tokenizer.save_pretrained(out_dir)
        setup.image_processor.save_pretrained(out_dir)
        write_processor_files(out_dir)
        with open(os.path.join(out_dir, "anatomy_r1_export.json"), "w") as f:
            json.dump({"checkpoint": ref.path or "base", "step": ref.step, "name": ref.name,
                       "model_path": config.model.path, "family": model.config.family,
                       "dtype": dtype or config.model.param_dtype}, f, indent=1)
    log.info("exported %s to %s", ref.name, out_dir)
    return out_dir
