"""Low-rank adapters (LoRA) on the models' Dense layers, built with flax.nnx's `LoRA` module.

    y = x @ W (+ b) + (alpha / r) * (x @ A) @ B      W [in, out] frozen; A [in, r], B [r, out] trained
                                                      A ~ he_uniform, B = 0: the adapted model starts
                                                      exactly at the base model

Targets are named by module: the decoder's q, k, v, o, gate, up, down (every layer), and with
`vision=True` the vision blocks' qkv, proj and MLP (fc1, fc2 for Qwen2-VL; gate_proj, up_proj,
down_proj for Qwen2.5-VL; the patch merger is never adapted). An adapter hangs on its Dense as
`dense.lora` (an `nnx.LoRA`), so base weights keep their paths (checkpoint names, weight tables
and sharding are unchanged) and adapters are found at `<dense path>.lora.lora_a / lora_b`.

Why flax.nnx.LoRA rather than qwix (Tunix's LoRA): it is part of the pinned flax 0.12.8 (no new
dependency to pin against jax 0.10.2); its parameters are `nnx.LoRAParam`, a subclass of nnx.Param,
so one nnx filter separates adapters (trainable) from base weights (frozen) in the existing
`split_model`; it takes Variable metadata, so adapters carry logical axes (A: (in axis,
"lora_rank"), B: ("lora_rank", out axis); "lora_rank" has no rule: replicated) and the config's
sharding rules place them and their AdamW moments; and it is a plain Module, so the adapters of a
scanned layer stack are stacked like the layers (`layers.stack_modules`, "layers" axis first) and
run inside the same `lax.scan`. nnx.LoRA has no alpha / r scaling: `Dense` applies it.

The KL reference of a LoRA run is the model with its adapters switched off (`without_adapters`),
computed from the same frozen weights: no second copy. A supervised warm-up (config.sft) trains
either the whole base model (`warmup="full"`: the adapters stay frozen at B = 0, so at GRPO's first
step the policy and its reference are the warmed-up model and GRPO trains fresh adapters on it) or
the adapters alone (`warmup="adapters"`: folded into the base weights before GRPO, `fold_adapters`). `merge_adapters` folds the adapters into the
base weights (W + alpha/r A B) for export; `save_peft_adapters` writes the adapters alone in PEFT's
format (transformers' module names).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from anatomy_r1_jax.models import layers
from anatomy_r1_jax.models.conversion import hf_name
from anatomy_r1_jax.models.weights import WEIGHT_RULES, layer_paths, to_host

LANGUAGE_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
VISION_TARGETS = ("qkv", "proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")
RANK_AXIS = "lora_rank"
# What the supervised warm-up of a LoRA run trains: "full" every base weight (adapters frozen at B = 0),
# "adapters" the adapters alone (then folded into the base weights before GRPO).
WARMUPS = ("full", "adapters")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """config.model.lora: rank 0 = off; alpha / rank scales the adapters' output; targets: decoder
    module names (LANGUAGE_TARGETS); vision: also adapt the vision blocks (VISION_TARGETS); warmup:
    what the supervised warm-up trains (WARMUPS); lr_scale: a phase that trains the adapters uses
    its learning rate times this factor."""

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LANGUAGE_TARGETS
    vision: bool = False
    warmup: str = "full"
    lr_scale: float = 1.0

    def __post_init__(self):
        if self.warmup not in WARMUPS:
            raise ValueError(f"config model.lora.warmup={self.warmup!r}: use one of {WARMUPS}")
        if self.lr_scale <= 0:
            raise ValueError(f"config model.lora.lr_scale={self.lr_scale}: expected a positive factor")
        if self.rank < 0:
            raise ValueError(f"config model.lora.rank={self.rank}: expected 0 (off) or a positive rank")
        unknown = sorted(set(self.targets) - set(LANGUAGE_TARGETS))
        if self.rank and (unknown or not self.targets):
            raise ValueError(f"config model.lora.targets={tuple(self.targets)}: expected a non-empty subset of "
                             f"{LANGUAGE_TARGETS}" + (f" (unknown: {unknown})" if unknown else ""))
        if self.rank and self.dropout != 0.0:
            # Dropout would need a random key in every forward of the update; the update's forward is
            # deterministic (the old log-probs and the ratio are computed from the same weights).
            raise ValueError(f"config model.lora.dropout={self.dropout}: adapter dropout is not supported; "
                             "set model.lora.dropout=0.0")

    @classmethod
    def from_config(cls, model_config) -> "LoraConfig":
        """From a config's `model` fields (a run config without `model.lora`: off; one without
        `model.lora.warmup`, written before it existed, trained its adapters in the warm-up)."""
        lora = model_config.get("lora") or {}
        return cls(rank=int(lora.get("rank", 0)), alpha=float(lora.get("alpha", 32.0)),
                   dropout=float(lora.get("dropout", 0.0)), targets=tuple(lora.get("targets", LANGUAGE_TARGETS)),
                   vision=bool(lora.get("vision", False)), warmup=str(lora.get("warmup", "adapters")),
                   lr_scale=float(lora.get("lr_scale", 1.0)))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def trains(self, phase: str) -> str:
        """What phase "sft" (the supervised warm-up) or "grpo" trains (placement.split_model):
        "adapters", or "base" (every weight but the adapters: no LoRA, or LoRA's full warm-up, whose
        weights become GRPO's frozen base; its adapters stay at B = 0 until GRPO trains them)."""
        if not self.enabled or (phase == "sft" and self.warmup == "full"):
            return "base"
        return "adapters"


def _targeted(model: nnx.Module, cfg: LoraConfig) -> Iterator[tuple[tuple, layers.Dense]]:
    """(path, Dense) of every Dense the config adapts."""
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, layers.Dense) or not path:
            continue
        names = [str(p) for p in path]
        if names[:2] == ["language", "layers"] and names[-1] in cfg.targets:
            yield path, node
        elif cfg.vision and names[:2] == ["vision", "blocks"] and names[-1] in VISION_TARGETS:
            yield path, node


def add_adapters(model: nnx.Module, cfg: LoraConfig, *, seed: int, dtype=jnp.float32,
                 param_dtype=jnp.float32) -> nnx.Module:
    """Attaches an nnx.LoRA of rank cfg.rank to every targeted Dense of `model` (in place; returned).

    A Dense of a scanned stack (kernel [n, in, out], axes ("layers", ...)) gets n adapters stacked
    [n, in, r] / [n, r, out]. Adapters are stored in `param_dtype` (the weights' dtype) and run in
    `dtype` (compute). No-op when cfg.rank == 0.
    """
    if not cfg.enabled:
        return model
    rngs = nnx.Rngs(seed)
    for _, dense in _targeted(model, cfg):
        kernel = dense.kernel
        axes = tuple(kernel.get_metadata().get("axes") or (None, None))
        stacked = axes[0] == "layers"
        din, dout = kernel.shape[-2:]
        in_axis, out_axis = axes[-2:]
        make = lambda: nnx.LoRA(din, cfg.rank, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,  # noqa: E731,B023
                                a_metadata={"axes": (in_axis, RANK_AXIS)},  # noqa: B023
                                b_metadata={"axes": (RANK_AXIS, out_axis)})  # noqa: B023
        dense.lora = layers.stack_modules(make, kernel.shape[0]) if stacked else make()
        dense.lora_scale = cfg.scale
    return model


def adapted_layers(model: nnx.Module) -> Iterator[tuple[tuple, layers.Dense]]:
    """(path, Dense) of every Dense that carries an adapter."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, layers.Dense) and node.lora is not None:
            yield path, node


def has_adapters(model: nnx.Module) -> bool:
    return next(adapted_layers(model), None) is not None


def without_adapters(model: nnx.Module) -> nnx.Module:
    """`model` with its adapters switched off (removed; in place, returned): the base model, the KL
    reference of a LoRA run. Call it on a model merged for this purpose (nnx.merge in the traced
    function), never on the policy."""
    for _, dense in list(adapted_layers(model)):
        dense.lora, dense.lora_scale = None, 0.0
    return model


def adapter_delta(dense: layers.Dense) -> jax.Array:
    """(alpha / r) * A @ B in float32: [in, out], or [n, in, out] for a stacked Dense."""
    a = dense.lora.lora_a[...].astype(jnp.float32)
    b = dense.lora.lora_b[...].astype(jnp.float32)
    return dense.lora_scale * jnp.matmul(a, b)


def fold_adapters(model: nnx.Module) -> nnx.Module:
    """W <- W + (alpha / r) A B (rounded to W's dtype) and B <- 0, in place: the same function (up
    to that rounding), its change now in the base weights and the adapters restarting from zero.
    The warm-up -> GRPO switch of a LoRA run, so that GRPO's reference (adapters off) is the
    warmed-up policy, as a full fine-tune's reference copy is."""
    for _, dense in adapted_layers(model):
        kernel = dense.kernel[...]
        dense.kernel.set_value((kernel.astype(jnp.float32) + adapter_delta(dense)).astype(kernel.dtype))
        dense.lora.lora_b.set_value(jnp.zeros_like(dense.lora.lora_b[...]))
    return model


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """The adapted model as a plain one (in place, returned): adapters folded into the base weights
    and removed, so it has exactly the base model's parameters (what export writes)."""
    return without_adapters(fold_adapters(model))


PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def _hf_module(hub_key: str) -> str:
    """A hub-layout weight key -> the name of its module in transformers 5's live model (what PEFT
    names adapters by): "model.layers.3.self_attn.q_proj.weight" -> "model.language_model.layers.3.
    self_attn.q_proj"; "visual.blocks.0.attn.qkv.weight" -> "model.visual.blocks.0.attn.qkv"."""
    name = hub_key.removesuffix(".weight")
    if name.startswith("visual."):
        return "model." + name
    return "model.language_model." + name.removeprefix("model.")


def save_peft_adapters(model: nnx.Module, path: str, *, base: str) -> list[str]:
    """Writes the adapters of `model` in PEFT's format: `adapter_model.safetensors` (per adapted
    module M: `base_model.model.M.lora_A.weight` = A^T [r, in], `...lora_B.weight` = B^T [out, r])
    and `adapter_config.json` (r, lora_alpha, the adapted modules' names as target_modules,
    base_model_name_or_path = `base`), so that W_hf + lora_alpha / r * B^T A^T is the merged weight.
    Every process must call it (sharded arrays are gathered); process 0 writes. Returns the
    adapted modules' names."""
    tensors, modules, ranks, alphas = {}, [], set(), set()
    for where, dense in adapted_layers(model):
        a, b = to_host(dense.lora.lora_a[...]), to_host(dense.lora.lora_b[...])
        ranks.add(a.shape[-1])
        alphas.add(dense.lora_scale * a.shape[-1])
        kernel = ".".join(map(str, where)) + ".kernel"
        for i, ours in enumerate(layer_paths(kernel, dense.kernel)):
            module = _hf_module(hf_name(ours, WEIGHT_RULES)[0])
            rows = (a, b) if ours == kernel else (a[i], b[i])
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(rows[0].T)
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(rows[1].T)
            modules.append(module)
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"PEFT needs one rank and alpha for all adapters, found ranks {ranks}, alphas {alphas}")
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, PEFT_WEIGHTS), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": None, "r": ranks.pop(), "lora_alpha": alphas.pop(),
                  "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                  "target_modules": sorted(modules), "modules_to_save": None, "base_model_name_or_path": base}
        with open(os.path.join(path, PEFT_CONFIG), "w") as f:
            json.dump(config, f, indent=1)
    return modules
