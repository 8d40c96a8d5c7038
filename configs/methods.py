"""Shared pieces of the configs: the ablation arms and real-model presets.

An arm is the triple (curriculum schedule, GDQA trigger, dynamic sampling):
  grpo         = (none,   off,      off)       plain GRPO, the paper's baseline
  grpo_dynamic = (none,   off,      resample)  GRPO + DAPO-style dynamic sampling (all-equal groups re-rolled)
  asc          = (staged, off,      off)       Anatomical Similarity Curriculum only
  gdqa         = (none,   adaptive, off)       Group Diversity Question Augmentation, calibrated trigger
  gdqa_online  = (none,   online,   off)       GDQA, all-equal groups re-rolled over their variants in the step
  anatomy_r1   = (staged, adaptive, off)       ASC + GDQA (the paper's method)
"""

import ml_collections

ARMS = {
    "grpo": ("none", "off", "off"),
    "grpo_dynamic": ("none", "off", "resample"),
    "asc": ("staged", "off", "off"),
    "gdqa": ("none", "adaptive", "off"),
    "gdqa_online": ("none", "online", "off"),
    "anatomy_r1": ("staged", "adaptive", "off"),
}


def parse_arg(arg: str | None, **defaults) -> dict:
    """'method=asc,model=qwen2_5_vl_3b' -> {'method': 'asc', 'model': 'qwen2_5_vl_3b'} over defaults."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; expected some of {sorted(defaults)}")
        out[key] = value
    return out


def apply_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    if method not in ARMS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(ARMS)}")
    c.method = method
    c.curriculum.schedule, c.gdqa.trigger, c.rl.dynamic_sampling = ARMS[method]
    return c


# Real models, trained from a local Hugging Face directory (--config.model.path=...).
# Precision policy (train/precision.py): bf16 weights and compute, fp32 gradients, fp32 Adam moments
# and an fp32 master copy of the weights (lr 1e-5 steps are below bf16's resolution). Memory per
# trainable parameter: weights 2 + master 4 + Adam 8 + gradients 4 + frozen reference 2 = 20 B, plus
# activations (remat on); the frozen vision tower (~0.67 B params) costs 2 B/param.
#   qwen2_vl_2b   2.2 B params -> ~32 GB : one 80 GB GPU; mesh fsdp over all devices by default
#   qwen2_5_vl_3b 3.8 B params -> ~64 GB : fsdp over 2+ 80 GB GPUs; on one GPU (tight with G=8 x 512
#                                          tokens) --config.optim.master_weights=False saves 4 B/param
#   qwen2_5_vl_7b 8.3 B params -> ~154 GB: fsdp over 8 x 80 GB GPUs (~19 GB/device + activations)
REAL_MODELS = {
    "qwen2_vl_2b": dict(family="qwen2_vl", mesh=[("data", 1), ("fsdp", -1)]),
    "qwen2_5_vl_3b": dict(family="qwen2_5_vl", mesh=[("data", 1), ("fsdp", -1)]),
    "qwen2_5_vl_7b": dict(family="qwen2_5_vl", mesh=[("data", 1), ("fsdp", -1), ("tensor", 1)]),
}


def real_model(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """METHOD.md's defaults for a real checkpoint: bf16, remat, frozen vision tower (ms-swift's
    default for GRPO), G = 8, temperature 0.9, top-p 0.9, top-k 50, 512 new tokens, lr 1e-5."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(REAL_MODELS)}")
    spec = REAL_MODELS[name]
    c.model.preset = name
    c.model.family = spec["family"]
    c.model.path = ""  # required: --config.model.path=/local/checkpoint
    c.model.dtype = c.model.param_dtype = "bfloat16"
    c.optim.update(grad_dtype="float32", moment_dtype="float32", master_weights=True)
    c.model.remat = "full"
    c.model.scan_layers = True  # compile time independent of depth (docs/benchmarks.md)
    c.model.freeze_vision = True
    c.tokenizer.path = ""
    c.rl.update(group_size=8, temperature=0.9, top_p=0.9, top_k=50, max_completion_length=512, beta=0.04,
                eps_low=0.2, eps_high=0.2)
    c.optim.update(lr=1e-5, warmup_steps=10, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999)
    c.sft.steps = 0
    c.sft.answer = "letter"
    c.rl.rewards.update(format=1.0, accuracy=1.0, accuracy_lenient=0.0)  # the authors' exact-letter accuracy
    c.data.prompt_length = 1024
    # Patches per query (14x14 px each): larger images are resized to fit (data.max_pixels = 0), here
    # to at most 1296 patches (e.g. 504x504 px); ssg_vqa.py and omnimedvqa.py size it to their frames.
    c.data.patches_per_query = 1296
    c.train.update(batch_size=8, micro_batches=4, steps=1000, eval_every=100, checkpoint_every=50, logp_chunk=128)
    c.mesh = spec["mesh"]
    return c
