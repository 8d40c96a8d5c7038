"""Attention of new tokens over what a cache holds: a shared prompt prefix and a row cache, in parts.

Shapes: B rows of new tokens, L new tokens, H / KVH query / key-value heads, D head_dim; a part's
keys are [B', S, KVH, D] with a mask [B', S] (True = a real token, visible to every new token: a
part holds only tokens before the new ones).

A decode step (L = 1) attends to up to three parts: the prompt prefix, the completion cache, and
the new token itself. Each part is reduced on its own to flash-attention statistics per query and
head,

    s_j = q . k_j / sqrt(D)    m = max_j s_j    l = sum_j exp(s_j - m)    o = sum_j exp(s_j - m) v_j

(masked keys excluded; an all-masked part has m = finfo.min, l = 0, o = 0), and the parts are merged
exactly, as one softmax over the union of their keys (log-sum-exp merge):

    M = max_p m_p    w_p = exp(m_p - M)    out = sum_p w_p o_p / sum_p w_p l_p    (0 where no key at all)

So nothing is concatenated or written into a copy of the cache before attending: the caller writes
the new keys and values into its cache once, in place, after the layer.

Prefix sharing. Completion row n = q G + j (group q of G rows) continues prompt row
p(n) = q S + j mod S of the prefix (S prompts per group, `expand_groups`). The prefix part is read
once per prompt row: the queries are regrouped [N, L] -> [Q S, C L] (C = ceil(G / S); row q S + s
takes the rows q G + c S + s, c < C, padded with dummy queries when S does not divide G), attend to
their prompt row's keys as one longer block of queries, and are scattered back (`group_queries`,
`ungroup_queries`). Exact for any G, S.

Implementations of a part (`model.attention`, resolved by `decode_implementation`): "xla" (einsums,
any backend) and "pallas" (jax.experimental.pallas.ops.gpu.decode_attention.gqa, a split-K flash
decode kernel that reads only each row's range [start, end) of keys; GPU, or any backend with
interpret=True). The Pallas path needs each part's real keys contiguous: a left-padded prompt
([Lp - len, Lp)) and a completion cache filled from slot 0 ([0, t)).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from flax import struct

NEG = jnp.finfo(jnp.float32).min


@struct.dataclass
class Part:
    """Keys the new tokens attend to besides themselves.

    k, v:   [B', S, KVH, D] (rotary applied to k).
    mask:   [B', S] bool, True where the slot holds a real token.
    start, end: [B'] int32, the real slots are [start, end) (used by the Pallas kernel instead of
            mask; must agree with it for the rows whose output is read: left padding then tokens).
    groups: None (B' = B, row b attends to row b), or (G, S): B' = Q S prompt rows shared by the
            B = Q G query rows (see the module docstring).
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    start: jax.Array | None = None
    end: jax.Array | None = None
    groups: tuple[int, int] | None = struct.field(pytree_node=False, default=None)


def expand_groups(tree, prompts_per_group: int, group_size: int):
    """Every array of `tree` from prompt rows to completion rows along its leading axis:
    [Q * S, ...] -> [Q * G, ...], row q * G + j a copy of row q * S + j % S (S = prompts_per_group,
    G = group_size). A tile within each group: the batch axis stays where it is sharded, and the
    backward pass sums the copies' cotangents."""
    s, g = prompts_per_group, group_size
    if s == g:
        return tree

    def expand(x):
        q = x.shape[0] // s
        y = x.reshape((q, s) + x.shape[1:])
        y = jnp.tile(y, (1, -(-g // s)) + (1,) * (x.ndim - 1))[:, :g]
        return y.reshape((q * g,) + x.shape[1:])

    return jax.tree.map(expand, tree)


def group_queries(x: jax.Array, group_size: int, prompts_per_group: int) -> jax.Array:
    """[N = Q G, L, ...] -> [Q S, C L, ...], C = ceil(G / S): prompt row q S + s gets the query rows
    q G + c S + s (c = 0 .. C-1) one after another; rows past G (S not dividing G) are zeros."""
    g, s = group_size, prompts_per_group
    c = -(-g // s)
    n, length = x.shape[:2]
    y = x.reshape((n // g, g) + x.shape[1:])
    if c * s != g:
        y = jnp.pad(y, [(0, 0), (0, c * s - g)] + [(0, 0)] * (x.ndim - 1))
    y = y.reshape((n // g, c, s) + x.shape[1:])
    y = jnp.swapaxes(y, 1, 2)  # [Q, S, C, L, ...]
    return y.reshape((n // g * s, c * length) + x.shape[2:])


def ungroup_queries(y: jax.Array, group_size: int, prompts_per_group: int) -> jax.Array:
    """The inverse of `group_queries`: [Q S, C L, ...] -> [Q G, L, ...] (dummy rows dropped)."""
    g, s = group_size, prompts_per_group
    c = -(-g // s)
    p = y.shape[0]
    length = y.shape[1] // c
    x = y.reshape((p // s, s, c, length) + y.shape[2:])
    x = jnp.swapaxes(x, 1, 2).reshape((p // s, c * s, length) + y.shape[2:])[:, :g]
    return x.reshape((p // s * g, length) + y.shape[2:])


def part_statistics(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array):
    """Softmax statistics of queries over one part (module docstring), written out in XLA.

    q [B, Lq, H, D]; k, v [B, S, KVH, D]; mask [B, S] (one for all queries) or [B, Lq, S].
    Returns o [B, Lq, H, D] (unnormalized), m, l [B, Lq, H], all float32.
    """
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, lq, kvh, h // kvh, d)
    s = jnp.einsum("bqkgd,bskd->bqkgs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    s = s / jnp.sqrt(jnp.float32(d))
    mask = (mask[:, None] if mask.ndim == 2 else mask)[:, :, None, None, :]  # [B, Lq|1, 1, 1, S]
    s = jnp.where(mask, s, NEG)
    m = s.max(axis=-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    o = jnp.einsum("bqkgs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, lq, h, d), m.reshape(b, lq, h), p.sum(axis=-1).reshape(b, lq, h)


def _k_splits(length: int) -> int | None:
    """The most key splits (<= 16) of the Pallas kernel for `length` keys: each split a multiple of
    16 keys; None when `length` is not a multiple of 16 (the kernel would need padded keys)."""
    for splits in (16, 8, 4, 2, 1):
        if length % splits == 0 and (length // splits) % 16 == 0:
            return splits
    return None


def pallas_supports(part: Part) -> bool:
    """Whether the Pallas GPU kernel can read `part` as it is (ranges given, S a multiple of 16)."""
    return part.start is not None and _k_splits(part.k.shape[1]) is not None


def pallas_part_statistics(q: jax.Array, part: Part, interpret: bool = False):
    """`part_statistics` by jax's Pallas GPU decode kernel (decode_attention.gqa), reading each row's
    keys [start, end) only. q [B, Lq, H, D] (Lq queries of a row are folded into the heads: the
    kernel takes one query per row); returns o [B, Lq, H, D], m, l [B, Lq, H] float32."""
    from jax.experimental.pallas.ops.gpu import decode_attention

    b, lq, h, d = q.shape
    kvh = part.k.shape[2]
    # Query head (kv, g) of query position i -> kernel head kv * (Lq g) + i g + g': the kernel maps
    # head j to kv head j // (Lq H / KVH).
    qk = jnp.moveaxis(q.reshape(b, lq, kvh, h // kvh, d), 1, 2).reshape(b, kvh * lq * (h // kvh), d)
    block_k = min(128, part.k.shape[1] // _k_splits(part.k.shape[1]))
    o, (l, m) = decode_attention.gqa(qk, part.k.astype(q.dtype), part.v.astype(q.dtype), part.start, part.end,
                                     k_splits=_k_splits(part.k.shape[1]), block_k=block_k, interpret=interpret,
                                     return_residuals=True, normalize_output=False)

    def back(x):  # [B, KVH * Lq * g, ...] -> [B, Lq, H, ...]
        x = x.reshape((b, kvh, lq, h // kvh) + x.shape[2:])
        return jnp.moveaxis(x, 2, 1).reshape((b, lq, h) + x.shape[4:])

    # The kernel leaves m at finfo.min and l at 0 for a row without keys, as part_statistics does.
    return back(o.astype(jnp.float32)), back(m), back(l)


def merge(stats) -> jax.Array:
    """Exact softmax attention over the union of the parts' keys from their statistics (module
    docstring): [(o [B, L, H, D], m, l [B, L, H]), ...] -> [B, L, H, D] float32 (0 where no key)."""
    top = functools.reduce(jnp.maximum, [m for _, m, _ in stats])
    weights = [jnp.exp(m - top) for _, m, _ in stats]
    total = sum(w * l for w, (_, _, l) in zip(weights, stats))
    out = sum(w[..., None] * o for w, (o, _, _) in zip(weights, stats))
    return jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)


def attend_parts(q: jax.Array, k: jax.Array, v: jax.Array, self_mask: jax.Array, parts: list[Part],
                 implementation: str = "xla", interpret: bool | None = None) -> jax.Array:
    """Attention of the new tokens q [B, L, H, D] over their own keys k, v [B, L, KVH, D] (under
    self_mask [B, L, L], causal & real) and over `parts`, merged exactly -> [B, L, H, D] in q's
    dtype. implementation "xla" | "pallas" (the parts the Pallas kernel supports; the others and
    the new tokens' own part by XLA). interpret: run the Pallas kernel interpreted (default: off
    the GPU, so that CPU tests run the kernel's own code)."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    stats = [part_statistics(q, k, v, self_mask)]
    for part in parts:
        queries = q if part.groups is None else group_queries(q, *part.groups)
        if implementation == "pallas" and pallas_supports(part):
            o, m, l = pallas_part_statistics(queries, part, interpret=interpret)
        else:
            o, m, l = part_statistics(queries, part.k, part.v, part.mask)
        if part.groups is not None:
            o, m, l = (ungroup_queries(x, *part.groups) for x in (o, m, l))
        stats.append((o, m, l))
    return merge(stats).astype(q.dtype)
