"""The Qwen2 decoder of Qwen2-VL / Qwen2.5-VL: GQA with q/k/v bias, RMSNorm, SwiGLU, M-RoPE, KV cache.

Shapes: B batch, L new tokens, S cache slots, E hidden, H / KVH query / key-value heads, D head_dim,
F = intermediate size, V vocabulary.

Multimodal rotary (M-RoPE): every token has three position ids (temporal, height, width). The D/2
rotary frequencies inv_freq[j] = theta^(-2j/D) are cut into consecutive sections of sizes
`mrope_section` (summing to D/2); section i takes its angle from position axis i % 3, i.e.
angle[b, l, j] = pos[axis(j), b, l] * inv_freq[j], and cos/sin are duplicated to D as in
`rotate_half` RoPE. For text tokens the three ids are equal and this is plain RoPE.

Attention masking: a new token attends to the earlier new tokens that are real (causal & attention
mask) and to every real token of what it is given besides: a row cache (`KVCache`, the slots before
`index` whose mask is set, read up to `read_length`) and / or a prompt prefix shared by groups of
rows (`Prefix`). Those are separate parts of one softmax (models/cached_attention.py), so the new
keys are never written into a copy of a cache to attend; each forward writes them into its cache
once, after the layers.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from anatomy_r1_jax.models.cached_attention import Part, attend_parts, expand_groups
from anatomy_r1_jax.models.config import QwenVLConfig
from anatomy_r1_jax.models.conversion import Rule
from anatomy_r1_jax.models.layers import (INIT_STD, Dense, RMSNorm, apply_rotary, attention, decode_implementation,
                                          remat_name, run_layers, stack_modules)
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


@struct.dataclass
class Prefix:
    """A prefilled prompt cache shared by groups of rows: the Q * S prompt rows of `cache`
    ([layers, Q S, Lp, KVH, D], mask [Q S, Lp]) are the prefix of the N = Q * G rows of a forward,
    row q * G + j reading prompt row q * S + j % S (G = group_size, S = prompts_per_group;
    rl/rollout.py). Left-padded prompts: the real slots of row p are [Lp - sum(mask[p]), Lp)."""

    cache: KVCache
    group_size: int = struct.field(pytree_node=False, default=1)
    prompts_per_group: int = struct.field(pytree_node=False, default=1)

    def part(self, k: jax.Array, v: jax.Array) -> Part:
        """This prefix as an attention part, with one layer's k, v [Q S, Lp, KVH, D]."""
        mask = self.cache.mask
        lp = mask.shape[1]
        groups = None if self.group_size == self.prompts_per_group else (self.group_size, self.prompts_per_group)
        return Part(k, v, mask, start=lp - mask.sum(-1).astype(jnp.int32), end=jnp.full(mask.shape[:1], lp, jnp.int32),
                    groups=groups)


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


def new_token_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, L, L] bool: new token i may attend to new token j iff j <= i and j is real (attention_mask [B, L])."""
    length = attention_mask.shape[1]
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    return attention_mask.astype(bool)[:, None, :] & causal[None]


def attend_joined(q, k, v, mask, parts: list[Part], implementation: str) -> jax.Array:
    """q [B, L, H, D] over the parts' keys and its own k, v [B, L, KVH, D] joined into one key axis
    (a shared prefix expanded to the B rows), by `attention(implementation)`: for blocks of new
    tokens (L > 1), where the keys are a small share of the work. mask [B, L, L] among the new tokens."""
    keys, values, masks = [], [], []
    for part in parts:
        pk, pv, pm = part.k, part.v, part.mask
        if part.groups is not None:
            pk, pv, pm = expand_groups((pk, pv, pm), part.groups[1], part.groups[0])
        keys.append(pk.astype(q.dtype))
        values.append(pv.astype(q.dtype))
        masks.append(jnp.broadcast_to(pm[:, None, :], (q.shape[0], q.shape[1], pm.shape[1])))
    keys, values, masks = keys + [k], values + [v], masks + [mask]
    return attention(q, jnp.concatenate(keys, 1), jnp.concatenate(values, 1), jnp.concatenate(masks, -1)[:, None],
                     implementation)


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

    def __call__(self, x, cos, sin, mask, parts=None):
        """x [B, L, E]; cos, sin [B, L, 1, D]; mask [B, L, L] (causal & real) among the new tokens;
        parts: what they also attend to (`cached_attention.Part`s with this layer's slices of a row
        cache and of a shared prefix), or None.

        Returns (y [B, L, E], the new (k, v) [B, L, KVH, D]). The caller writes the new entries into
        its cache once, in place: nothing here copies the cache. A decode step (L = 1) attends to
        the parts and merges them exactly (models/cached_attention.py); a block of new tokens (a
        prefill into a cache, the update's shared-prefix forward) attends to the cache's keys
        joined with its own, by `attention` (cuDNN / chunked / XLA, memory-efficient and
        differentiable).
        """
        b, length, _ = x.shape
        q = constrain(self.q(x).reshape(b, length, self.num_heads, self.head_dim),
                      ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        k = self.k(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if not parts:
            out = attention(q, k, v, mask[:, None], self.implementation)
        elif length == 1:
            out = attend_parts(q, k, v, mask, parts, decode_implementation(self.implementation))
        else:
            out = attend_joined(q, k, v, mask, parts, self.implementation)
        return self.o(out.reshape(b, length, self.num_heads * self.head_dim)), (k, v)


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

    def __call__(self, x, cos, sin, mask, parts=None):
        h, kv = self.attn(self.input_norm(x), cos, sin, mask, parts)
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
                 cache: KVCache | None = None, prefix: Prefix | None = None,
                 read_length: int | None = None) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, L, E], position_ids [3, B, L], attention_mask [B, L] -> (hidden [B, L, E], cache).

        cache: the L tokens attend to its real slots and are written at slots [cache.index,
        cache.index + L), once, after the layers; the returned cache has index + L. read_length
        (static): only slots [0, read_length) of the cache are read (0: none, a prefill into an
        empty cache); the caller guarantees no real token sits at or past it. prefix: a shared
        prompt cache the L tokens also attend to (`Prefix`). `hidden` is after the final norm.
        """
        x = constrain(inputs_embeds, ("activation_batch", "activation_length", "activation_embed"))
        cos, sin = mrope_cos_sin(position_ids, self.head_dim, self.rope_theta, self.mrope_section)
        mask = new_token_mask(attention_mask)
        read = None if cache is None else (cache.max_length if read_length is None else int(read_length))
        if read:  # the real slots of a row as one range [first real slot, index) (for the Pallas kernel)
            read_mask = cache.mask[:, :read]
            start = jnp.argmax(read_mask, axis=1).astype(jnp.int32)
            end = jnp.where(read_mask.any(axis=1), jnp.minimum(cache.index, read), 0).astype(jnp.int32)

        def step(layer, x, i, kv):  # kv: this layer's slices of the cache and the prefix (run_layers' per_layer)
            parts = []
            if read:
                k, v = kv["cache"]
                parts.append(Part(k[:, :read], v[:, :read], read_mask, start=start, end=end))
            if prefix is not None:
                parts.append(prefix.part(*kv["prefix"]))
            return layer(x, cos, sin, mask, parts)

        if cache is None and prefix is None:  # a plain forward: nothing to read, nothing to keep
            x = run_layers(self.layers, x, lambda layer, x, i: layer(x, cos, sin, mask)[0], scanned=self.scan_layers,
                           remat=self.remat)
            return self.norm(x), None
        per_layer = {}
        if read:
            per_layer["cache"] = (cache.k, cache.v)
        if prefix is not None:
            per_layer["prefix"] = (prefix.cache.k, prefix.cache.v)
        x, (k, v) = run_layers(self.layers, x, step, scanned=self.scan_layers, remat=self.remat,
                               per_layer=per_layer)  # k, v: the new entries [layers, B, L, KVH, D]
        if cache is not None:
            cache = KVCache(k=write_slots(cache.k, k.astype(cache.k.dtype), cache.index, axis=2),
                            v=write_slots(cache.v, v.astype(cache.v.dtype), cache.index, axis=2),
                            mask=write_slots(cache.mask, attention_mask.astype(bool), cache.index),
                            index=cache.index + x.shape[1])
        return self.norm(x), cache
