"""Building blocks shared by the vision tower and the language model.

Parameters carry logical axis names (`axes` metadata) that `anatomy_r1_jax.sharding` maps to a mesh.
Computation runs in `dtype`; norms and softmax are computed in float32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

INIT_STD = 0.02


class Dense(nnx.Module):
    """y = x @ kernel (+ bias) (+ lora_scale * lora(x)); kernel [in, out] (the transpose of torch's
    Linear weight). `lora`: an optional low-rank adapter (models/lora.py attaches it), None here."""

    def __init__(self, din: int, dout: int, *, axes: Sequence[str | None], use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(
            (INIT_STD * jax.random.normal(rngs.params(), (din, dout))).astype(param_dtype), axes=tuple(axes))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype), axes=(axes[-1],)) if use_bias else None
        self.dtype = dtype
        self.lora: nnx.Module | None = nnx.data(None)  # a pytree attribute: holds an nnx.LoRA when adapted
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + (self.lora_scale * self.lora(x.astype(self.dtype))).astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in float32 then cast back (as transformers does)."""

    def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x32.astype(dtype)


class LayerNorm(nnx.Module):
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last axis (torch.nn.LayerNorm,
    biased variance); statistics and affine map in float32, result cast back to x's dtype."""

    def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., L, H, D]; cos, sin broadcastable to it ([..., L, 1, D]); computed in float32."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(dtype)


ATTENTION = ("auto", "reference", "xla", "cudnn", "chunked", "pallas")
QUERY_BLOCK = 512  # query rows per block of the chunked implementation


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads, written out (the tests' reference).

    q [B, Lq, H, D]; k, v [B, Lk, KVH, D] with H % KVH == 0 (K/V are not repeated: query heads are
    grouped per KV head); mask bool [B, 1, Lq, Lk] (True = may attend), or [B, H, Lq, Lk]. Returns
    [B, Lq, H, D]. Logits [B, KVH, H/KVH, Lq, Lk] and softmax in float32; a query row with no allowed
    key returns zeros instead of NaN.
    """
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, lq, kvh, h // kvh, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(
        jnp.float32)
    if mask.shape[1] == 1:  # one mask for all heads: broadcast, never materialised per head
        mask = mask[:, :, None]
    else:
        mask = mask.reshape(b, kvh, h // kvh, lq, mask.shape[-1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, h, d).astype(q.dtype)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      block: int | None = None) -> jax.Array:
    """`reference_attention` one block of `block` (default QUERY_BLOCK) query rows at a time (a scan),
    each block under `jax.checkpoint`: the forward and the backward hold the logits of one block,
    [B, H, block, Lk], never [B, H, Lq, Lk]. Exact (every block sees all keys); any backend."""
    block = block or QUERY_BLOCK
    b, lq = q.shape[:2]
    if lq <= block:
        return reference_attention(q, k, v, mask)
    n = -(-lq // block)
    pad = n * block - lq
    mask = jnp.broadcast_to(mask, (b, mask.shape[1], lq, k.shape[1]))
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape((b, n, block) + q.shape[2:])
    mb = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(mask.shape[:2] + (n, block, mask.shape[-1]))
    step = jax.checkpoint(lambda qm: reference_attention(qm[0], k, v, qm[1]))
    out = jax.lax.map(step, (jnp.moveaxis(qb, 1, 0), jnp.moveaxis(mb, 2, 0)))  # [n, B, block, H, D]
    return jnp.moveaxis(out, 0, 1).reshape((b, n * block) + q.shape[2:])[:, :lq]


def resolve_attention(implementation: str, dtype, query_length: int) -> str:
    """The implementation `attention` runs: "auto" picks cuDNN flash attention on GPU for bf16 / fp16
    blocks of queries (training, prefill), the chunked XLA form on TPU for long query blocks, and XLA's
    `jax.nn.dot_product_attention` otherwise (CPU; decode steps). "pallas" names a decode kernel
    (`decode_implementation`); blocks of queries run by XLA under it."""
    if implementation not in ATTENTION:
        raise ValueError(f"model.attention={implementation!r}: expected one of {ATTENTION}")
    if implementation == "pallas":  # a decode kernel (decode_implementation); blocks of queries run by XLA
        return "xla"
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and query_length > 1:
        return "cudnn"
    if backend == "tpu" and query_length > QUERY_BLOCK:
        return "chunked"
    return "xla"


def decode_implementation(implementation: str) -> str:
    """How a decode step (one new token per row) reads its cache parts (models/cached_attention.py):
    "pallas" runs jax's Pallas GPU decode kernel on the parts it supports (GPU only; it reads each
    row's filled range of keys); every other setting, "auto" included, the XLA einsums (on CPU and
    TPU, and on GPU until the kernel is measured there). The kernel is a custom call without a
    partitioning rule (not checked here: expect XLA to gather its operands when rows are sharded by
    GSPMD); use it with rows on one device or under shard_map."""
    if implementation not in ATTENTION:
        raise ValueError(f"model.attention={implementation!r}: expected one of {ATTENTION}")
    return "pallas" if implementation == "pallas" else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              implementation: str = "reference") -> jax.Array:
    """Scaled dot-product attention, GQA without repeating K/V: q [B, Lq, H, D], k, v [B, Lk, KVH, D],
    mask bool [B, 1, Lq, Lk] (True = may attend) -> [B, Lq, H, D] (see `resolve_attention`).

    "reference" and "chunked" return zeros for a query row with no allowed key; "xla" and "cudnn"
    return some average of V there (such rows are padding, never read).
    """
    impl = resolve_attention(implementation, q.dtype, q.shape[1])
    if impl == "reference":
        return reference_attention(q, k, v, mask)
    if impl == "chunked":
        return chunked_attention(q, k, v, mask)
    if impl == "cudnn" and jnp.dtype(q.dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention='cudnn' needs bfloat16 or float16 compute, not {jnp.dtype(q.dtype)}")
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                        implementation=impl)


REMAT = ("none", "full", "save_dots")
_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
             "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_name(remat: bool | str) -> str:
    """A remat setting as a policy name: True -> "full", False -> "none"; "none" | "full" | "save_dots"
    (recompute nothing / everything / all but the weight matmuls' outputs in the backward pass)."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT:
        raise ValueError(f"model.remat={remat!r}: expected one of {REMAT} (or a bool)")
    return remat


def stack_modules(make: Callable[[], nnx.Module], n: int) -> nnx.Module:
    """n modules from `make()`, as one module whose Variables hold the n values stacked on a leading
    axis [n, ...], with the logical axis name "layers" prepended to their `axes`. Under
    `nnx.eval_shape` nothing is allocated."""
    modules = [make() for _ in range(n)]
    graphdef, _ = nnx.split(modules[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in modules])
    for _, var in nnx.to_flat_state(stacked):
        var.set_metadata(axes=("layers",) + tuple(var.get_metadata().get("axes") or ()))
    return nnx.merge(graphdef, stacked)


def run_layers(layers_: nnx.Module, carry, step: Callable, *, scanned: bool, remat: str, per_layer=None):
    """carry <- step(layer_i, carry, i) for i = 0 .. n-1; returns the last carry.

    per_layer: a pytree of [n, ...] arrays (e.g. the KV cache) handed to the layers one slice each:
    then step(layer_i, carry, i, per_layer[i]) -> (carry, y_i) and the result is (carry, ys), ys
    the y_i stacked [n, ...]. A per-layer value must come this way, not in the carry: the backward
    pass saves each step's inputs, so a whole-cache carry would be saved n times (n^2 layer-slices
    of memory; the update's shared-prefix path differentiates through the cache).

    scanned: `layers_` is one module of stacked parameters (`stack_modules`), run by `jax.lax.scan`
    (one compiled layer whatever the depth; i is traced); otherwise an `nnx.List`, a Python loop.
    remat: each step under `jax.checkpoint` with that policy (`remat_name`). Functional on purpose
    (split outside, merge inside the transformed function) rather than nnx.scan / nnx.remat: the
    forward mutates no state, and nnx's graph transforms would try to write the Variables back, which
    fails when they were merged from arrays of an outer trace (the frozen reference policy inside the
    micro-batch scan).
    """
    def remat_(fn):
        return fn if remat == "none" else jax.checkpoint(fn, policy=_POLICIES[remat])

    sliced = per_layer is not None
    call = step if sliced else (lambda layer, carry, i, _: (step(layer, carry, i), None))
    if scanned:
        graphdef, state = nnx.split(layers_)
        n = jax.tree.leaves(state)[0].shape[0]
        body = remat_(lambda carry, xs: call(nnx.merge(graphdef, xs[0]), carry, xs[1], xs[2]))
        carry, ys = jax.lax.scan(body, carry, (state, jnp.arange(n, dtype=jnp.int32), per_layer))
        return (carry, ys) if sliced else carry
    ys = []
    for i, layer in enumerate(layers_):  # i stays a Python int (static) here
        x_i = jax.tree.map(lambda a: a[i], per_layer)  # noqa: B023
        if remat == "none":
            carry, y = call(layer, carry, i, x_i)
        else:
            graphdef, state = nnx.split(layer)
            carry, y = remat_(lambda state, carry, x_i: call(nnx.merge(graphdef, state), carry, i, x_i))(  # noqa: B023
                state, carry, x_i)
        ys.append(y)
    return (carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)) if sliced else carry
