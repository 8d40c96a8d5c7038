"""The Qwen2-VL / Qwen2.5-VL vision tower (ViT + patch merger) in Flax NNX, and its weight-name table.

    pixel_values [P, C*T*p*p] --patch_embed--> [P, E]
      (Qwen2.5-VL: permute merged units into window order)
      --depth x block--> [P, E]  block: x += attn(norm1(x)); x += mlp(norm2(x))
      --merger--> [P/m^2, out]  norm, fuse each run of m^2 patches, Linear-GELU-Linear
      (Qwen2.5-VL: permute back into input order)

Attention is block-diagonal over segments (`vision_inputs.VisionInputs`): one segment per frame
(transformers' `cu_seqlens`), and for Qwen2.5-VL one per window in all blocks not listed in
`fullatt_block_indexes`. It runs on segments packed into fixed-length rows (`AttentionRows`: frames
in rows of the frame budget, windows in rows of one window), so its cost is linear in the number of
images and every layout under one patch budget shares one compiled program. Rotary is 2-D: the
first half of the rotated dims turn with the patch row, the second half with the column.

                      Qwen2-VL                     Qwen2.5-VL
    norms             LayerNorm (eps 1e-6)         RMSNorm (eps 1e-6)
    MLP               fc2(quick_gelu(fc1 x))       down(silu(gate x) * up x)
    attention         full, per frame              window, full in fullatt_block_indexes
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from anatomy_r1_jax.models import layers
from anatomy_r1_jax.models.config import VisionConfig
from anatomy_r1_jax.models.conversion import Rule
from anatomy_r1_jax.models.vision_inputs import AttentionRows, VisionInputs, pad_pixel_values, vision_inputs
from anatomy_r1_jax.sharding import constrain

__all__ = ["VisionConfig", "VisionTower", "VisionInputs", "vision_inputs", "pad_pixel_values", "VISION_RULES"]

NORM_EPS = 1e-6  # fixed in transformers' vision blocks and merger


def rotary_cos_sin(position_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2-D rotary tables for `position_ids [P, 2]` (row, col) -> cos, sin [P, 1, head_dim].

    With f_k = theta^(-4k/head_dim), k < head_dim/4, the angles are
    [row*f, col*f, row*f, col*f] (the duplication pairs with `rotate_half`), as transformers' axial rope.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim // 2, 2, dtype=jnp.float32) / (head_dim // 2))
    angles = position_ids.astype(jnp.float32)[:, :, None] * inv_freq  # [P, 2, head_dim/4]
    angles = angles.reshape(angles.shape[0], -1)  # [P, head_dim/2]: rows then columns
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def row_attention(q: jax.Array, k: jax.Array, v: jax.Array, rows: AttentionRows,
                  implementation: str = "reference") -> jax.Array:
    """Attention within segments, computed on packed rows: q, k, v [P, H, D] -> [P, H, D].

    Gathers the patches into rows [n, R, H, D] (empty slots read a zero row), attends inside each
    row under the mask segment(query slot) == segment(key slot) != -1, and gathers the results back
    (padding patches read a zero row). Cost n * R^2 per head instead of P^2.
    """
    def to_rows(x):
        return jnp.concatenate([x, jnp.zeros_like(x[:1])])[rows.index]

    seg = rows.segments
    mask = ((seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, None, :])[:, None]  # [n, 1, R, R]
    out = layers.attention(to_rows(q), to_rows(k), to_rows(v), mask, implementation)
    out = out.reshape((-1,) + out.shape[2:])
    return jnp.concatenate([out, jnp.zeros_like(out[:1])])[rows.slots]


class VisionAttention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection ([E, 3E], columns in (3, heads, head_dim)
    order as in transformers) and 2-D rotary on q and k."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention: str = "auto", rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = layers.Dense(cfg.width, 3 * cfg.width, axes=("vision_embed", "vision_heads"), **kw)
        self.proj = layers.Dense(cfg.width, cfg.width, axes=("vision_heads", "vision_embed"), **kw)
        self.num_heads = cfg.num_heads
        self.implementation = attention

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, rows: AttentionRows) -> jax.Array:
        """x [P, E]; cos, sin [P, 1, D]; rows: the segments attention stays within -> [P, E]."""
        p = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(p, 3, self.num_heads, -1), 1, 0)
        q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
        return self.proj(row_attention(q, k, v, rows, self.implementation).reshape(p, -1))


class VisionMlp(nnx.Module):
    """Qwen2-VL: fc2(act(fc1 x)), act = quick_gelu."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.Dense(cfg.width, cfg.intermediate_size, axes=("vision_embed", "vision_mlp"), **kw)
        self.fc2 = layers.Dense(cfg.intermediate_size, cfg.width, axes=("vision_mlp", "vision_embed"), **kw)
        self.act = layers.ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMlp(nnx.Module):
    """Qwen2.5-VL: down_proj(act(gate_proj x) * up_proj x), act = silu, all with biases."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = layers.Dense(cfg.width, cfg.intermediate_size, axes=("vision_embed", "vision_mlp"), **kw)
        self.up_proj = layers.Dense(cfg.width, cfg.intermediate_size, axes=("vision_embed", "vision_mlp"), **kw)
        self.down_proj = layers.Dense(cfg.intermediate_size, cfg.width, axes=("vision_mlp", "vision_embed"), **kw)
        self.act = layers.ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(cfg: VisionConfig, dim: int, param_dtype) -> nnx.Module:
    norm = layers.LayerNorm if cfg.family == "qwen2_vl" else layers.RMSNorm
    return norm(dim, eps=NORM_EPS, axis_name="vision_embed", param_dtype=param_dtype)


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x += attn(norm1 x); x += mlp(norm2 x)."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention: str = "auto", rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _norm(cfg, cfg.width, param_dtype)
        self.norm2 = _norm(cfg, cfg.width, param_dtype)
        self.attn = VisionAttention(cfg, attention=attention, **kw)
        self.mlp = VisionMlp(cfg, **kw) if cfg.family == "qwen2_vl" else VisionGatedMlp(cfg, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, rows: AttentionRows) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, rows)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ("activation_patches", "activation_vision_embed"))


class PatchMerger(nnx.Module):
    """norm over E, then each run of m^2 consecutive patches (one m x m block) concatenated to
    [P/m^2, m^2 E] and projected: fc2(gelu(fc1 .)) -> [P/m^2, out_hidden_size]."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        fused = cfg.width * cfg.spatial_merge_size ** 2
        self.ln_q = _norm(cfg, cfg.width, param_dtype)
        self.fc1 = layers.Dense(fused, fused, axes=("vision_embed", "vision_mlp"), **kw)
        self.fc2 = layers.Dense(fused, cfg.out_hidden_size, axes=("vision_mlp", "embed"), **kw)
        self.fused = fused

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.fused)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # torch nn.GELU(): exact erf


class VisionTower(nnx.Module):
    """pixel_values [P, C*T*p*p] + VisionInputs -> image tokens [P/m^2, out_hidden_size] in
    transformers' output order (input order of the merged units), padding rows last."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False,
                 attention: str = "auto", scan_layers: bool = False, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.remat, self.scan_layers = layers.remat_name(remat), scan_layers
        # Conv3d with stride = kernel over one patch is a matmul over the flattened patch.
        self.patch_embed = layers.Dense(cfg.patch_dim, cfg.width, axes=(None, "vision_embed"), use_bias=False, **kw)
        make = lambda: VisionBlock(cfg, attention=attention, **kw)  # noqa: E731
        self.blocks = layers.stack_modules(make, cfg.depth) if scan_layers else nnx.List(
            [make() for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)

    def __call__(self, pixel_values: jax.Array, inputs: VisionInputs) -> jax.Array:
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values)  # [P, E]
        p = x.shape[0]
        if cfg.uses_windows:  # gather whole merged units into window order
            x = x.reshape(p // unit, unit, -1)[inputs.window_index].reshape(p, -1)
        x = constrain(x, ("activation_patches", "activation_vision_embed"))
        cos, sin = rotary_cos_sin(inputs.position_ids, cfg.head_dim, cfg.rope_theta)
        if not cfg.uses_windows:
            step = lambda block, x, i: block(x, cos, sin, inputs.frame_rows)  # noqa: E731
        elif self.scan_layers:  # i is traced: a cond picks the attention (both compiled, one runs)
            full_blocks = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
            step = lambda block, x, i: jax.lax.cond(  # noqa: E731
                full_blocks[i], lambda: block(x, cos, sin, inputs.frame_rows),
                lambda: block(x, cos, sin, inputs.window_rows))
        else:
            step = lambda block, x, i: block(  # noqa: E731
                x, cos, sin, inputs.frame_rows if i in cfg.fullatt_block_indexes else inputs.window_rows)
        x = layers.run_layers(self.blocks, x, step, scanned=self.scan_layers, remat=self.remat)
        out = self.merger(x)  # [U, out], compute order
        if cfg.uses_windows:
            out = out[inputs.reverse_index]
        return out


# Hub keys (`save_pretrained` layout) -> our paths; the top model holds the tower as `vision`.
# Keys of the other family simply never occur (Qwen2-VL: LayerNorm biases, fc1/fc2;
# Qwen2.5-VL: gate/up/down_proj).
_B = r"visual\.blocks\.(?P<i>\d+)\."
_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
VISION_RULES: list[Rule] = [
    Rule(r"visual\.patch_embed\.proj\.weight", "vision.patch_embed.kernel", "conv_to_dense"),
    *[Rule(_B + rf"{n}\.{p}", f"vision.blocks.{{i}}.{n}.{p}") for n in ("norm1", "norm2") for p in ("weight", "bias")],
    *[Rule(_B + re.escape(m) + r"\.weight", f"vision.blocks.{{i}}.{m}.kernel", "transpose") for m in _LINEARS],
    *[Rule(_B + re.escape(m) + r"\.bias", f"vision.blocks.{{i}}.{m}.bias") for m in _LINEARS],
    Rule(r"visual\.merger\.ln_q\.weight", "vision.merger.ln_q.weight"),
    Rule(r"visual\.merger\.ln_q\.bias", "vision.merger.ln_q.bias"),
    Rule(r"visual\.merger\.mlp\.0\.weight", "vision.merger.fc1.kernel", "transpose"),
    Rule(r"visual\.merger\.mlp\.0\.bias", "vision.merger.fc1.bias"),
    Rule(r"visual\.merger\.mlp\.2\.weight", "vision.merger.fc2.kernel", "transpose"),
    Rule(r"visual\.merger\.mlp\.2\.bias", "vision.merger.fc2.bias"),
]
