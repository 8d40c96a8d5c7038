"""One set of weights and one prompt batch for our model and the transformers reference.

A random transformers model is built from a preset-style config and saved in the hub layout; ours
is loaded from that directory with `load_pretrained`, so both hold identical weights. Prompts are
synthetic token ids around one image per query (random pixels), repeated G times per group, left
padded: `image_prompts` returns our `PromptBatch` and the transformers inputs of the same rows.

Sizes (language model; the vision towers are small):
    tiny  configs/default.py `model.tiny` with the tiny tokenizer's 1024 tokens (~0.7M parameters)
    small hidden 256, 4 layers, 8 heads / 2 kv heads, vocab 8192, untied (~8M; the sharding study)
    100m  Qwen2-VL-shaped: hidden 768, 12 layers, 12 heads / 2 kv heads, MLP 2048, vocab 32k, tied
          embeddings (~100M parameters)
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from anatomy_r1_jax.models.config import QwenVLConfig
from anatomy_r1_jax.models.presets import hf_config
from anatomy_r1_jax.models.rope_index import get_rope_index
from anatomy_r1_jax.models.vision_inputs import pad_pixel_values, vision_inputs
from anatomy_r1_jax.data.batch import PromptBatch

PATCH_DIM = 3 * 2 * 14 * 14  # processor row: C * temporal_patch * patch * patch

SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vision_depth=2, vision_hidden_size=64, vision_num_heads=2,
                 vision_intermediate_size=128, window_size=56, fullatt_block_indexes=(1,)),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vision_depth=2, vision_hidden_size=128,
                  vision_num_heads=4, vision_intermediate_size=512, window_size=56, fullatt_block_indexes=(1,)),
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=2, vision_depth=4, vision_hidden_size=384,
                 vision_num_heads=6, vision_intermediate_size=1536, window_size=112,
                 fullatt_block_indexes=(3,), tie_word_embeddings=True),
}


def size_config(size: str, family: str = "qwen2_vl", **overrides) -> dict:
    """A transformers-5 config.json dict of a named benchmark size (see the module docstring);
    `overrides` replace hf_config arguments (e.g. num_hidden_layers=1)."""
    if size not in SIZES:
        raise KeyError(f"unknown size {size!r}; available: {sorted(SIZES)}")
    return hf_config(family, rope_theta=10_000.0, max_position_embeddings=4096, **{**SIZES[size], **overrides})


@dataclasses.dataclass(frozen=True)
class Case:
    """A benchmark workload: model size, queries x group rows, prompt length Lp, completion length T."""

    size: str
    queries: int
    group: int
    prompt_length: int
    new_tokens: int

    @classmethod
    def parse(cls, text: str) -> "Case":
        """From `size,queries,group,prompt_length,new_tokens`, e.g. `tiny,8,8,160,24`."""
        size, *numbers = text.split(",")
        if len(numbers) != 4:
            raise ValueError(f"case {text!r} is not size,queries,group,prompt_length,new_tokens")
        return cls(size, *map(int, numbers))

    @property
    def rows(self) -> int:
        return self.queries * self.group


def save_reference(config: dict, path: str | os.PathLike, *, seed: int = 0):
    """Builds a randomly initialised transformers model from `config`, saves it (hub layout) and
    returns it in eval mode."""
    import torch
    import transformers

    classes = {"qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
               "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration)}
    config_cls, model_cls = classes[config["model_type"]]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    model.save_pretrained(path)
    return model


def reference_pair(size: str, workdir: str | os.PathLike, *, seed: int = 0, **model_options):
    """(transformers model, our QwenVL loaded from its saved checkpoint, config dict): identical weights.
    model_options go to `load_pretrained` (e.g. scan_layers=True)."""
    from anatomy_r1_jax.models.weights import load_pretrained

    config = size_config(size)
    path = os.path.join(workdir, size)
    ref = save_reference(config, path, seed=seed)
    return ref, load_pretrained(path, **model_options), config


def parameter_count(config: dict) -> int:
    """Number of parameters of our model built from `config` (abstractly, no memory)."""
    return model_parameter_count(QwenVLConfig.from_hf(config))


@functools.lru_cache(maxsize=None)
def model_parameter_count(cfg: QwenVLConfig) -> int:
    """Number of parameters of our model of `cfg` (abstractly, no memory; vision tower included)."""
    import jax
    from flax import nnx

    from anatomy_r1_jax.models.weights import abstract_model

    params = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def image_prompts(cfg: QwenVLConfig, *, queries: int, group: int, prompt_length: int,
                  grid: tuple[int, int, int] = (1, 4, 4), seed: int = 0) -> tuple[PromptBatch, dict[str, np.ndarray]]:
    """`queries` prompts of text + one image (grid t, h, w in patches) + text, of different lengths
    (at most prompt_length tokens), each repeated `group` times (N = queries * group rows).

    Returns (our PromptBatch of NumPy arrays, transformers inputs: input_ids, attention_mask,
    mm_token_type_ids [N, Lp] int64, pixel_values [N * patches, 1176] (a group's rows repeat their
    query's image), image_grid_thw [N, 3]).
    """
    rng = np.random.default_rng(seed)
    merge = cfg.vision.spatial_merge_size
    patches = int(np.prod(grid))
    n_image = patches // merge ** 2
    n_text = cfg.vocab_size - 16  # special tokens sit in the top 16 ids
    budget_text = prompt_length - n_image - 2
    if budget_text < 8:
        raise ValueError(f"prompt_length {prompt_length} leaves no room for text around {n_image} image tokens")
    rows, image_rows, pixels = [], [], []
    for q in range(queries):
        length = budget_text - int(rng.integers(0, max(1, budget_text // 4)))
        head = int(rng.integers(1, length))
        ids = (rng.integers(0, n_text, head).tolist() + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image
               + [cfg.vision_end_token_id] + rng.integers(0, n_text, length - head).tolist())
        pixels.append(rng.standard_normal((patches, PATCH_DIM)).astype(np.float32))
        for _ in range(group):
            rows.append(ids)
            image_rows += list(range(q * n_image, (q + 1) * n_image))
    n = len(rows)
    input_ids = np.zeros((n, prompt_length), np.int64)
    mask = np.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, prompt_length - len(r):] = r
        mask[i, prompt_length - len(r):] = 1
    grids = np.array([grid] * n, np.int64)
    pos, deltas = get_rope_index(input_ids, image_grid_thw=grids, attention_mask=mask, spatial_merge_size=merge,
                                 image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
    ours = PromptBatch(
        input_ids=input_ids.astype(np.int32), attention_mask=mask.astype(np.int32), position_ids=pos.astype(np.int32),
        rope_deltas=deltas.astype(np.int32), pixel_values=pad_pixel_values(np.concatenate(pixels), queries * patches),
        vision=vision_inputs(np.array([grid] * queries), cfg.vision, patch_budget=queries * patches,
                             frame_budget=patches),
        image_rows=np.array(image_rows, np.int32))
    hf = {"input_ids": input_ids, "attention_mask": mask,
          "mm_token_type_ids": (input_ids == cfg.image_token_id).astype(np.int64),
          "pixel_values": np.concatenate([pixels[i // group] for i in range(n)]), "image_grid_thw": grids}
    return ours, hf


def select_groups(cfg: QwenVLConfig, prompts: PromptBatch, groups, *, grid: tuple[int, int, int] = (1, 4, 4),
                  prompts_per_group: int = 1) -> PromptBatch:
    """The PromptBatch of `groups` (query indices, in that order) of an `image_prompts` batch built
    with group=prompts_per_group (S rows and one image of `grid` per query): what image_prompts
    would give for those queries alone."""
    s, patches = prompts_per_group, int(np.prod(grid))
    n_image = patches // cfg.vision.spatial_merge_size ** 2
    rows = [q * s + j for q in groups for j in range(s)]
    k = len(groups)
    return prompts.replace(
        input_ids=prompts.input_ids[rows], attention_mask=prompts.attention_mask[rows],
        position_ids=prompts.position_ids[:, rows], rope_deltas=prompts.rope_deltas[rows],
        pixel_values=np.concatenate([prompts.pixel_values[q * patches:(q + 1) * patches] for q in groups]),
        vision=vision_inputs(np.array([grid] * k), cfg.vision, patch_budget=k * patches, frame_budget=patches),
        image_rows=np.concatenate([np.arange(i * n_image, (i + 1) * n_image) for i in range(k)
                                   for _ in range(s)]).astype(np.int32))


def case_prompts(cfg: QwenVLConfig, case: "Case") -> tuple[PromptBatch, PromptBatch, dict[str, np.ndarray]]:
    """A case's prompts three ways: (ours with one prompt row per group (prefix sharing), ours with
    one per row, the transformers inputs of the rows). The same prompts and images in all three."""
    kw = dict(queries=case.queries, prompt_length=case.prompt_length)
    shared, _ = image_prompts(cfg, group=1, **kw)
    per_row, hf = image_prompts(cfg, group=case.group, **kw)
    return shared, per_row, hf


def torch_inputs(batch: dict[str, np.ndarray]) -> dict:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def random_completions(cfg: QwenVLConfig, rows: int, length: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Sampled-looking completions for an update benchmark: ids [N, T] (text tokens, pad 0 after the
    end), mask [N, T] (lengths between T/2 and T) and rewards [N] in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, length // 2), length + 1, rows)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(0, cfg.vocab_size - 16, (rows, length)).astype(np.int32) * mask
    return {"ids": ids, "mask": mask, "rewards": rng.integers(0, 3, rows).astype(np.float32)}


def train_batch(prompts: PromptBatch, comp: dict[str, np.ndarray]):
    """A NumPy TrainBatch with a leading micro-batch axis of 1 ([1, N, ...]) from image prompts and
    `random_completions`."""
    from anatomy_r1_jax.data.batch import Completions, TrainBatch

    n = comp["ids"].shape[0]
    batch = TrainBatch(prompt=prompts, completions=Completions(
        ids=comp["ids"], mask=comp["mask"], logps=np.zeros(comp["ids"].shape, np.float32),
        lengths=comp["mask"].sum(-1).astype(np.int32)), rewards=comp["rewards"], categories=np.zeros(n, np.int32))
    import jax

    return jax.tree.map(lambda x: np.asarray(x)[None], batch)


def one_device_update(model, cfg, rules, *, lr: float, grad_clip: float, b1: float, b2: float):
    """(the jitted GRPO update, its initial TrainState) of `model` under StepConfig `cfg`, compiled as
    the trainer compiles it (train/compiled.py `Programs`, AdamW, a KL reference copy) on the first
    device. The model's weights are copied (the update donates its state)."""
    import jax
    import jax.numpy as jnp

    from anatomy_r1_jax import sharding
    from anatomy_r1_jax.runtime.placement import split_model
    from anatomy_r1_jax.train.compiled import Programs
    from anatomy_r1_jax.train.step import make_optimizer

    graphdef, params, frozen = split_model(model, freeze_vision=False)
    params, frozen = jax.tree.map(jnp.copy, (params, frozen))
    tx = make_optimizer(lr, grad_clip=grad_clip, b1=b1, b2=b2)
    programs = Programs.create(graphdef, sharding.make_mesh([("data", 1)], devices=jax.devices()[:1]), rules)
    state = programs.init_state(tx, cfg.precision, params, frozen, reference=True)
    return programs.update(tx, cfg, state), state
