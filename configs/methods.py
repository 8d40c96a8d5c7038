"""The presets configs name, as tables of config values ("section.field": value).

A config file reads top to bottom: configs/default.py, then the tables it names, then its own
table, applied in that order by `override` (which refuses a field the config does not have):

  ARMS[method]        the ablation arm: method name, curriculum schedule, GDQA trigger, dynamic sampling
  REAL_MODEL          what every real checkpoint trains with (METHOD.md)
  REAL_MODELS[name]   per checkpoint: its preset name, family and mesh

The arms (curriculum schedule, GDQA trigger, dynamic sampling; GDQA signal, rescued groups' prompt):
  grpo                   = (none,       off,      off)       plain GRPO, the paper's baseline
  grpo_dynamic           = (none,       off,      resample)  GRPO + DAPO-style dynamic sampling (all-equal
                           groups re-rolled)
  asc                    = (competence, off,      off)       ASC: the class-stratified competence curriculum
  asc_staged             = (staged,     off,      off)       ASC as four S(q) stages (collapses onto classes: issue 23)
  gdqa                   = (none,       adaptive, off)       Group Diversity Question Augmentation, calibrated trigger
  gdqa_online            = (none,       online,   off)       GDQA, all-equal groups re-rolled over their
                           variants in the step
  gdqa_accuracy          = (none,       online,   off; accuracy, variant)   GDQA as a recognition signal: only
                           all-wrong groups re-rolled, rescued = accuracy varies, no permutation of class-name answers
  gdqa_accuracy_original = (none,       online,   off; accuracy, original)  the same, rescued groups trained on the
                           original prompt (the one evaluation asks)
  anatomy_r1             = (competence, online,   off; accuracy, variant)   ASC + GDQA, the paper's method arm
  anatomy_r1_staged      = (staged,     adaptive, off)       staged ASC + calibrated GDQA (this project's method arm
                           before issue 23)
Unnamed signal and prompt: (reward, variant). The arms named asc and anatomy_r1 before issue 23 are
asc_staged and anatomy_r1_staged (the ablation reports of docs/results/ written before issue 23 name
them by their old names).
"""

import copy

import ml_collections

ARMS = {name: {"method": name, "curriculum.schedule": schedule, "gdqa.trigger": trigger,
               "rl.dynamic_sampling": dynamic, "gdqa.signal": signal, "gdqa.rescued_prompt": prompt}
        for name, schedule, trigger, dynamic, signal, prompt in (
            ("grpo", "none", "off", "off", "reward", "variant"),
            ("grpo_dynamic", "none", "off", "resample", "reward", "variant"),
            ("asc", "competence", "off", "off", "reward", "variant"),
            ("asc_staged", "staged", "off", "off", "reward", "variant"),
            ("gdqa", "none", "adaptive", "off", "reward", "variant"),
            ("gdqa_online", "none", "online", "off", "reward", "variant"),
            ("gdqa_accuracy", "none", "online", "off", "accuracy", "variant"),
            ("gdqa_accuracy_original", "none", "online", "off", "accuracy", "original"),
            ("anatomy_r1", "competence", "online", "off", "accuracy", "variant"),
            ("anatomy_r1_staged", "staged", "adaptive", "off", "reward", "variant"))}

# METHOD.md's recipe for a real checkpoint (--config.model.path=/local/checkpoint is required). The
# sampler and optimizer values are written out, not inherited, so that tuning the tiny default run
# never changes them. Precision policy (runtime/precision.py): bf16 weights and compute, fp32 gradients,
# fp32 Adam moments and an fp32 master copy of the weights (lr 1e-5 steps are below bf16's
# resolution). Memory per trainable parameter: weights 2 + master 4 + Adam 8 + gradients 4 + frozen
# reference 2 = 20 B, plus activations (remat on); the frozen vision tower (~0.67 B params) costs 2 B/param.
REAL_MODEL = {
    "model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
    "optim.grad_dtype": "float32", "optim.moment_dtype": "float32", "optim.master_weights": True,
    "model.remat": "full",
    "model.scan_layers": True,  # compile time independent of depth (docs/benchmarks.md)
    "model.freeze_vision": True,  # ms-swift's default for GRPO
    # G = 8, temperature 0.9, top-p 0.9, top-k 50, 512 new tokens, KL 0.04, clip 0.2
    "rl.group_size": 8, "rl.temperature": 0.9, "rl.top_p": 0.9, "rl.top_k": 50, "rl.max_completion_length": 512,
    "rl.beta": 0.04, "rl.eps_low": 0.2, "rl.eps_high": 0.2,
    "optim.lr": 1e-5, "optim.warmup_steps": 10, "optim.schedule": "cosine", "optim.weight_decay": 0.0, "optim.grad_clip": 1.0,
    "optim.b1": 0.9, "optim.b2": 0.999,
    "model.lora.lr_scale": 1.0,  # LoRA (--config.model.lora.rank=R) at optim.lr, whatever the tiny default's factor
    "sft.steps": 0, "sft.answer": "letter",
    # the authors' exact-letter accuracy
    "rl.rewards.format": 1.0, "rl.rewards.accuracy": 1.0, "rl.rewards.accuracy_lenient": 0.0,
    "data.prompt_length": 1024,
    # Patches per query (14x14 px each): larger images are resized to fit (data.max_pixels = 0), here
    # to at most 1296 patches (e.g. 504x504 px); ssg_vqa.py and omnimedvqa.py size it to their frames.
    "data.patches_per_query": 1296,
    "train.batch_size": 8, "train.micro_batches": 4, "train.steps": 1000, "train.eval_every": 100,
    "train.checkpoint_every": 50, "train.logp_chunk": 128,
}

# Memory (20 B per trainable parameter, see REAL_MODEL):
#   qwen2_vl_2b   2.2 B params -> ~32 GB : one 80 GB GPU; mesh fsdp over all devices by default
#   qwen2_5_vl_3b 3.8 B params -> ~64 GB : fsdp over 2+ 80 GB GPUs; on one GPU (tight with G=8 x 512
#                                          tokens) --config.optim.master_weights=False saves 4 B/param
#   qwen2_5_vl_7b 8.3 B params -> ~154 GB: fsdp over 8 x 80 GB GPUs (~19 GB/device + activations)
REAL_MODELS = {
    "qwen2_vl_2b": {"model.preset": "qwen2_vl_2b", "model.family": "qwen2_vl", "mesh": [("data", 1), ("fsdp", -1)]},
    "qwen2_5_vl_3b": {"model.preset": "qwen2_5_vl_3b", "model.family": "qwen2_5_vl",
                      "mesh": [("data", 1), ("fsdp", -1)]},
    "qwen2_5_vl_7b": {"model.preset": "qwen2_5_vl_7b", "model.family": "qwen2_5_vl",
                      "mesh": [("data", 1), ("fsdp", -1), ("tensor", 1)]},
}


def paper_update(c: ml_collections.ConfigDict, *, group: int, length: int,
                 logp_chunk: int) -> ml_collections.ConfigDict:
    """`c` with REAL_MODEL's GRPO settings (rl.*: temperature 0.9, KL 0.04, clip 0.2, ...) at G = group
    rollouts of T = length tokens, log-probs in chunks of logp_chunk: the update the benchmark scripts
    time (train/step.py step_configs builds their StepConfig from it, as the trainer does)."""
    rl = {k: v for k, v in REAL_MODEL.items() if k.startswith("rl.") and not k.startswith("rl.rewards.")}
    return override(c, rl, {"rl.group_size": group, "rl.max_completion_length": length, "train.logp_chunk": logp_chunk})


def parse_arg(arg: str | None, **choices: tuple[str, dict]) -> dict:
    """'method=asc,model=qwen2_5_vl_3b' -> {'method': ARMS['asc'], 'model': REAL_MODELS[...]}: each
    keyword is (default name, its table of presets); unknown keys or names raise one line."""
    names = {key: default for key, (default, _) in choices.items()}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in choices:
            raise ValueError(f"unknown config argument {key!r}; expected some of {sorted(choices)}")
        names[key] = value
    out = {}
    for key, name in names.items():
        table = choices[key][1]
        if name not in table:
            raise ValueError(f"unknown {key} {name!r}; expected one of {sorted(table)}")
        out[key] = table[name]
    return out


def override(c: ml_collections.ConfigDict, *tables: dict) -> ml_collections.ConfigDict:
    """Sets every "section.field": value of `tables`, in order, on existing fields of `c`."""
    for table in tables:
        for dotted, value in table.items():
            *path, field = dotted.split(".")
            node = c
            for part in path:
                node = node[part]
            if field not in node:
                raise KeyError(f"preset field {dotted!r} is not a field of the config")
            node[field] = copy.deepcopy(value)
    return c
