"""`QwenVL`: vision tower + Qwen2 decoder + output head, with the entry points rollout and training use.

Jitted paths (static shapes throughout):
    image_embeds = model.encode_images(pixel_values [P, C*T*p*p], vision_inputs)      # [N, E]
    hidden, cache = model.forward(input_ids [B, L], position_ids [3, B, L], attention_mask [B, L],
                                  image_embeds, cache)                              # [B, L, E]
    logits = model.logits(hidden)                                                   # [B, L, V] float32
`__call__` is a host-side convenience with transformers' inputs (it computes vision inputs and
M-RoPE position ids in NumPy, then runs the jittable pieces).

Image embeddings replace the <|image_pad|> tokens in row-major order over the batch, as
transformers' `masked_scatter`: the k-th image token (counting through the flattened [B*L] ids)
takes row k of image_embeds. The gather index is the cumulative count of image tokens, so the
number of images and their sizes never change a shape (image_embeds may carry padding rows at the end).
Video tokens are not replaced (this model is used for images only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anatomy_r1_jax.models.config import QwenVLConfig
from anatomy_r1_jax.models.language import KVCache, LanguageModel, Prefix
from anatomy_r1_jax.models.layers import Dense
from anatomy_r1_jax.models.rope_index import get_rope_index
from anatomy_r1_jax.models.vision import VisionInputs, VisionTower, vision_inputs
from anatomy_r1_jax.models.vision_inputs import frame_budgets, pad_pixel_values
from anatomy_r1_jax.sharding import constrain


def scatter_image_embeds(inputs_embeds: jax.Array, input_ids: jax.Array, image_embeds: jax.Array,
                         image_token_id: int) -> jax.Array:
    """inputs_embeds [B, L, E] with its image-token rows replaced, in row-major order, by image_embeds [N, E].

    Row k of image_embeds goes to the k-th image token of the flattened ids (cumsum - 1), a static-shape
    equivalent of `masked_scatter`; image tokens beyond N reuse row N-1 (the caller sizes N correctly).
    """
    b, length, e = inputs_embeds.shape
    is_image = (input_ids == image_token_id).reshape(-1)
    rows = jnp.clip(jnp.cumsum(is_image.astype(jnp.int32)) - 1, 0, image_embeds.shape[0] - 1)
    gathered = jnp.take(image_embeds.astype(inputs_embeds.dtype), rows, axis=0)
    return jnp.where(is_image[:, None], gathered, inputs_embeds.reshape(-1, e)).reshape(b, length, e)


OPTIONS = ("remat", "attention", "scan_layers")


def model_options(model_config) -> dict:
    """QwenVL's options among a config's `model` fields (absent ones keep QwenVL's defaults)."""
    return {name: model_config[name] for name in OPTIONS if name in model_config}


class QwenVL(nnx.Module):
    """Qwen2-VL / Qwen2.5-VL for conditional generation.

    Attributes: `vision` (VisionTower), `language` (embed_tokens, layers, norm), `lm_head` (only when
    the output projection is not tied to the embedding). dtype is the compute dtype, param_dtype the
    storage dtype. Options (`model_options` reads them from a config): remat, the per-layer
    recomputation policy ("none" | "full" | "save_dots", or a bool); attention, the implementation
    (`layers.ATTENTION`; "auto" picks by backend and dtype); scan_layers, decoder layers and vision
    blocks as stacked parameters run by `jax.lax.scan` (compile time independent of depth).
    """

    def __init__(self, cfg: QwenVLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False,
                 attention: str = "auto", scan_layers: bool = False, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.dtype = dtype
        options = dict(remat=remat, attention=attention, scan_layers=scan_layers)
        self.vision = VisionTower(cfg.vision, **options, **kw)
        self.language = LanguageModel(cfg, **options, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, **kw)

    def encode_images(self, pixel_values: jax.Array, vision_inputs: VisionInputs) -> jax.Array:
        """pixel_values [P, C*T*p*p] (padded to vision_inputs' patch budget) -> image_embeds [P/m^2, E]."""
        return self.vision(pixel_values.astype(self.dtype), vision_inputs)

    def embed(self, input_ids: jax.Array, image_embeds: jax.Array | None = None) -> jax.Array:
        """input_ids [B, L] -> inputs_embeds [B, L, E] with image tokens replaced by image_embeds [N, E]."""
        x = self.language.embed_tokens(input_ids)
        if image_embeds is not None:
            x = scatter_image_embeds(x, input_ids, image_embeds, self.config.image_token_id)
        return x

    def forward(self, input_ids: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
                image_embeds: jax.Array | None = None, cache: KVCache | None = None, *,
                prefix: Prefix | None = None, read_length: int | None = None) -> tuple[jax.Array, KVCache | None]:
        """-> (hidden [B, L, E] after the final norm, cache advanced by L or None).

        input_ids [B, L]; position_ids [3, B, L] (rope_index); attention_mask [B, L] (1 = real token);
        image_embeds [N, E] from encode_images; cache from init_cache (prefill and decode alike),
        read only up to the static `read_length` when given; prefix: a shared prompt cache the
        tokens also attend to (LanguageModel.__call__).
        """
        return self.language(self.embed(input_ids, image_embeds), position_ids, attention_mask, cache, prefix,
                             read_length)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, L, E] -> logits [B, L, V] in float32 (lm_head, or the tied embedding transposed)."""
        lm_head = getattr(self, "lm_head", None)
        if lm_head is None:
            out = self.language.embed_tokens.attend(hidden)
        else:
            out = jnp.einsum("...e,ev->...v", hidden.astype(self.dtype), lm_head.kernel[...].astype(self.dtype),
                             preferred_element_type=jnp.float32)
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        """An empty KVCache with `max_length` slots (dtype defaults to the compute dtype)."""
        cfg = self.config
        return KVCache.init(num_layers=cfg.num_hidden_layers, batch=batch, max_length=max_length,
                            num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                            dtype=self.dtype if dtype is None else dtype)

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None) -> tuple[np.ndarray, np.ndarray]:
        """Host M-RoPE ids for a prompt batch: (position_ids [3, B, L], rope_deltas [B, 1])."""
        cfg = self.config
        return get_rope_index(np.asarray(input_ids), None, image_grid_thw, None, attention_mask,
                              spatial_merge_size=cfg.vision.spatial_merge_size, image_token_id=cfg.image_token_id,
                              video_token_id=cfg.video_token_id)

    def vision_batch(self, pixel_values, image_grid_thw) -> tuple[jax.Array, VisionInputs]:
        """Host-side tower inputs for the processor's pixel_values [P, C*T*p*p] and image_grid_thw
        [n, 3]: (pixel_values padded to the patch budget, VisionInputs) with attention in rows of the
        largest frame (`vision_inputs.frame_budgets`), so the tower's cost is linear in the images."""
        grid = np.asarray(image_grid_thw)
        patch_budget, frame_budget = frame_budgets(grid, self.config.vision.spatial_merge_size)
        inputs = vision_inputs(grid, self.config.vision, patch_budget=patch_budget, frame_budget=frame_budget)
        return jnp.asarray(pad_pixel_values(np.asarray(pixel_values), patch_budget)), inputs

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 position_ids=None) -> jax.Array:
        """transformers-style forward -> logits [B, L, V] float32.

        input_ids [B, L]; attention_mask [B, L] (default all ones); pixel_values [P, C*T*p*p] and
        image_grid_thw [n_images, 3] (host NumPy) as the processor returns them; position_ids
        [3, B, L] computed on the host by get_rope_index when not given. Those skip padding, as in
        transformers' generate and its forward with images; transformers' forward without images
        uses arange(L) even over left padding, so pass position_ids to reproduce that case.
        """
        input_ids = np.asarray(input_ids)
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        if position_ids is None:
            position_ids, _ = self.position_ids(input_ids, attention_mask, image_grid_thw)
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.encode_images(*self.vision_batch(pixel_values, image_grid_thw))
        hidden, _ = self.forward(jnp.asarray(input_ids), jnp.asarray(position_ids), jnp.asarray(attention_mask),
                                 image_embeds)
        return self.logits(hidden)
