"""The Qwen2 decoder of Qwen2-VL / Qwen2.5-VL: GQA with q/k/v bias, RMSNorm, SwiGLU, M-RoPE, KV cache.

Shapes: B batch, L new tokens, S cache slots, E hidden, H / KVH query / key-value heads, D head_dim,
F = intermediate size, V vocabulary.

Multimodal rotary (M-RoPE): every token has three position ids (temporal, height, width). The D/2
rotary frequencies inv_freq[j] = theta^(-2j/D) are cut into consecutive sections of sizes
`mrope_section` (summing to D/2); section i takes its angle from position axis i % 3, i.e.
angle[b, l, j] = pos[axis(j), b, l] * inv_freq[j], and cos/sin are duplicated to D as in
`rotate_half` RoPE. For text tokens the three ids are equal and this is plain RoPE.

Attention masking works on cache *slots*: a token at slot q may attend to slot s iff the slot holds a
real token (attention mask) and s <= q. Without a cache the slots are simply 0..L-1.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from anatomy_r1_jax.models.config import QwenVLConfig
from anatomy_r1_jax.models.conversion import Rule
from anatomy_r1_jax.models.layers import (INIT_STD, Dense, RMSNorm, apply_rotary, attention, remat_name, run_layers,
                                          stack_modules)
from anatomy_r1_jax.sharding import constrain

_L = r"model\.layers\.(?P<i>\d+)\."
LANGUAGE_RULES: list[Rule] = [
    Rule(r"model\.embed_tokens\.weight", "language.embed_tokens.embedding"),
    Rule(_L + r"self_attn\.q_proj\.weight", "language.layers.{i}.attn.q.kernel", "transpose"),
    Rule(_L + r"self_attn\.q_proj\.bias", "language.layers.{i}.attn.q.bias"),
    Rule(_L + r"self_attn\.k_proj\.weight", "language.layers.{i}.attn.k.kernel", "transpose"),
    Rule(_L + r"self_attn\.k_proj\.bias", "language.layers.{i}.attn.k.bias"),
    Rule(_L + r"self_attn\.v_proj\.weight", "language.layers.{i}.attn.v.kernel", "transpose"),
    Rule(_L + r"self_attn\.v_proj\.bias", "language.layers.{i}.attn.v.bias"),
    Rule(_L + r"self_attn\.o_proj\.weight", "language.layers.{i}.attn.o.kernel", "transpose"),
    Rule(_L + r"mlp\.gate_proj\.weight", "language.layers.{i}.mlp.gate.kernel", "transpose"),
    Rule(_L + r"mlp\.up_proj\.weight", "language.layers.{i}.mlp.up.kernel", "transpose"),
    Rule(_L + r"mlp\.down_proj\.weight", "language.layers.{i}.mlp.down.kernel", "transpose"),
    Rule(_L + r"input_layernorm\.weight", "language.layers.{i}.input_norm.weight"),
    Rule(_L + r"post_attention_layernorm\.weight", "language.layers.{i}.post_attention_norm.weight"),
    Rule(r"model\.norm\.weight", "language.norm.weight"),
    Rule(r"lm_head\.weight", "lm_head.kernel", "transpose"),
]


@struct.dataclass
class KVCache:
    """Static-shape key/value cache for incremental decoding.

    k, v:  [layers, B, S, KVH, D] (rotary already applied to k); `map_rows` maps their rows.
    mask:  [B, S] bool, True where the slot holds a real token (False for left padding / unwritten).
    index: int32 scalar, the next slot to write; a forward over L tokens writes [index, index + L).
    The caller must keep index + L <= S (dynamic_update_slice would otherwise clamp the start).
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, *, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, batch, max_length, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32))

    def map_rows(self, fn) -> "KVCache":
        """The cache with `fn` ([B, ...] -> [B', ...]) applied to the rows of every layer's k and v and of mask."""
        return self.replace(k=jax.vmap(fn)(self.k), v=jax.vmap(fn)(self.v), mask=fn(self.mask))

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


def write_slots(cache: jax.Array, new: jax.Array, index, axis: int = 1) -> jax.Array:
    """cache [..., S, ...] with new [..., L, ...] written at slots [index, index + L) of `axis`."""
    start = [jnp.zeros((), jnp.int32)] * cache.ndim
    start[axis] = jnp.asarray(index, jnp.int32)
    return jax.lax.dynamic_update_slice(cache, new, tuple(start))


def mrope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float,
                  mrope_section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """position_ids [3, B, L] -> cos, sin [B, L, 1, D] float32 (see the module docstring)."""
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    # Same float32 arithmetic as transformers' compute_default_rope_parameters.
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    axis_of_freq = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)  # [D/2], static
    pos = jnp.moveaxis(position_ids[axis_of_freq], 0, -1).astype(jnp.float32)  # [B, L, D/2]
    angles = pos * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def slot_mask(attention_mask: jax.Array, cache_mask: jax.Array | None, index) -> tuple[jax.Array, jax.Array | None]:
    """Attention mask [B, 1, L, S] over slots, and the updated cache mask [B, S] (None without cache).

    attention_mask [B, L] marks the new tokens that are real; they occupy slots index .. index+L-1.
    """
    new = attention_mask.astype(bool)
    length = new.shape[1]
    if cache_mask is None:
        keys, q_slot = new, jnp.arange(length)
    else:
        cache_mask = write_slots(cache_mask, new, index)
        keys, q_slot = cache_mask, index + jnp.arange(length)
    causal = jnp.arange(keys.shape[1])[None, :] <= q_slot[:, None]  # [L, S]
    return keys[:, None, None, :] & causal[None, None], cache_mask


class Embedding(nnx.Module):
    """Token table [V, E]; `__call__` looks rows up, `attend` is the tied output projection."""

    def __init__(self, vocab_size: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            (INIT_STD * jax.random.normal(rngs.params(), (vocab_size, dim))).astype(param_dtype),
            axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [..., E] -> logits [..., V] in float32."""
        return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)


class Attention(nnx.Module):
    """GQA self-attention: q/k/v projections with bias, M-RoPE on q and k, output without bias."""

    def __init__(self, cfg: QwenVLConfig, *, dtype, param_dtype, attention: str = "auto", rngs: nnx.Rngs):
        e, d = cfg.hidden_size, cfg.head_dim
        self.implementation = attention
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Dense(e, self.num_heads * d, axes=("embed", "heads"), **kw)
        self.k = Dense(e, self.num_kv_heads * d, axes=("embed", "kv_heads"), **kw)
        self.v = Dense(e, self.num_kv_heads * d, axes=("embed", "kv_heads"), **kw)
        self.o = Dense(self.num_heads * d, e, axes=("heads", "embed"), use_bias=False, **kw)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        """x [B, L, E]; cos, sin [B, L, 1, D]; mask [B, 1, L, S]; kv = (k, v) this layer's cache
        [B, S, KVH, D] or None; the queries attend to it with the new keys and values at slots
        [index, index + L).

        Returns (y [B, L, E], the new (k, v) [B, L, KVH, D] in the cache's dtype, or None). Only the
        new entries come back: the caller writes them into the stacked cache once, in place, where
        returning the layer's updated [B, S, ...] slice would copy the whole cache every decode step.
        """
        b, length, _ = x.shape
        q = constrain(self.q(x).reshape(b, length, self.num_heads, self.head_dim),
                      ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        k = self.k(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new = None
        if kv is not None:  # written at slot index into this layer's slice, then the whole slice attended to
            new = tuple(n.astype(c.dtype) for c, n in zip(kv, (k, v)))
            k, v = (constrain(write_slots(c, n, index),
                              ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
                    for c, n in zip(kv, new))
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.implementation)
        return self.o(out.reshape(b, length, self.num_heads * self.head_dim)), new


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: QwenVLConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Dense(e, f, axes=("embed", "mlp"), **kw)
        self.up = Dense(e, f, axes=("embed", "mlp"), **kw)
        self.down = Dense(f, e, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        h = constrain(jax.nn.silu(self.gate(x)) * self.up(x), ("activation_batch", "activation_length", "activation_mlp"))
        return self.down(h)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: QwenVLConfig, *, dtype, param_dtype, attention: str = "auto", rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, attention=attention, **kw)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        h, kv = self.attn(self.input_norm(x), cos, sin, mask, kv, index)
        x = x + h
        x = x + self.mlp(self.post_attention_norm(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed")), kv


class LanguageModel(nnx.Module):
    """Token embedding, decoder layers and the final norm.

    layers: an `nnx.List` of DecoderLayers, or with scan_layers one DecoderLayer whose parameters are
    stacked [num_hidden_layers, ...] and run by `jax.lax.scan`. remat: "none" | "full" | "save_dots"
    (or a bool), the per-layer `jax.checkpoint` policy.
    """

    def __init__(self, cfg: QwenVLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False,
                 attention: str = "auto", scan_layers: bool = False, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        make = lambda: DecoderLayer(cfg, attention=attention, **kw)  # noqa: E731
        n = cfg.num_hidden_layers
        self.layers = stack_modules(make, n) if scan_layers else nnx.List([make() for _ in range(n)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.mrope_section = tuple(cfg.mrope_section)
        self.remat, self.scan_layers = remat_name(remat), scan_layers

    def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, L, E], position_ids [3, B, L], attention_mask [B, L] -> (hidden [B, L, E], cache).

        With a cache the L tokens are written at slots [cache.index, cache.index + L) and the returned
        cache has index + L; `hidden` is after the final norm.
        """
        x = constrain(inputs_embeds, ("activation_batch", "activation_length", "activation_embed"))
        cos, sin = mrope_cos_sin(position_ids, self.head_dim, self.rope_theta, self.mrope_section)
        index = None if cache is None else cache.index
        mask, cache_mask = slot_mask(attention_mask, None if cache is None else cache.mask, index)

        def step(layer, x, i, kv):  # kv: this layer's (k, v), a slice of the cache (run_layers' per_layer)
            return layer(x, cos, sin, mask, kv, index)

        if cache is None:
            x = run_layers(self.layers, x, lambda layer, x, i: step(layer, x, i, None)[0], scanned=self.scan_layers,
                           remat=self.remat)
        else:
            x, (k, v) = run_layers(self.layers, x, step, scanned=self.scan_layers, remat=self.remat,
                                   per_layer=(cache.k, cache.v))  # k, v: the new entries [layers, B, L, KVH, D]
            cache = KVCache(k=write_slots(cache.k, k, cache.index, axis=2), v=write_slots(cache.v, v, cache.index, axis=2),
                            mask=cache_mask, index=cache.index + x.shape[1])
        return self.norm(x), cache
