"""The rollout engine: jitted prefill plus a `lax.while_loop` decode over the KV cache.

Shapes are static (prompt length Lp, completion budget T, image budget); each row stops at EOS
(its later tokens are pad and masked) and the loop exits early once every row is done. Images are
encoded once per prompt and shared by a group's rows through `PromptBatch.image_rows`.

Prefix sharing: a group's G rows often repeat few prompts (all the same without GDQA; with GDQA,
variant j mod S for S variants). The batch may then hold S prompt rows per group (Q * S rows,
`prompts_per_group=S`, `group_size=G`): each prompt is prefilled once and its KV cache and last
logits are expanded to the N = Q * G rows, row q * G + j taking prompt row q * S + j % S. That
removes (G - S) / G of the prefill; S = G is the plain one-prompt-per-row batch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
import jax.numpy as jnp

from anatomy_r1_jax.models.rope_index import decode_position_ids
from anatomy_r1_jax.rl.batch import Completions, PromptBatch
from anatomy_r1_jax.rl.sampling import SamplingConfig, sample_token


def image_embeddings(model, batch: PromptBatch) -> jax.Array | None:
    """Encoded images gathered into placeholder order: [E, hidden], or None for text-only."""
    if batch.pixel_values is None:
        return None
    embeds = model.encode_images(batch.pixel_values, batch.vision)
    return embeds[batch.image_rows]


def completion_positions(batch: PromptBatch, length: int, offset: int | jax.Array = 0) -> jax.Array:
    """M-RoPE position ids [3, N, length] of the tokens written after the prompt, starting at
    completion step `offset` (what transformers' generate uses after a multimodal prompt)."""
    lp = batch.input_ids.shape[1]
    return decode_position_ids(lp + offset, batch.rope_deltas, batch.attention_mask, length)


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


def shared_prefill(model, batch: PromptBatch, length: int, group_size: int = 1, prompts_per_group: int = 1,
                   cache_dtype=None):
    """Prefills the prompt rows into a KV cache of Lp + `length` slots, each once, then expands it to
    the completion rows (`expand_groups`).

    Returns (hidden [Q * S, Lp, E] of the prompts, the cache [N rows, index Lp], and the N rows'
    (attention_mask [N, Lp], rope_deltas [N, 1]) that `completion_positions` needs).
    """
    p, lp = batch.input_ids.shape
    if p % prompts_per_group:
        raise ValueError(f"{p} prompt rows are not groups of prompts_per_group={prompts_per_group}")
    expand = lambda tree: expand_groups(tree, prompts_per_group, group_size)  # noqa: E731
    cache = model.init_cache(p, lp + length, cache_dtype)
    hidden, cache = model.forward(batch.input_ids, batch.position_ids, batch.attention_mask,
                                  image_embeddings(model, batch), cache)
    cache = cache.map_rows(expand)
    rows = batch.replace(attention_mask=expand(batch.attention_mask), rope_deltas=expand(batch.rope_deltas))
    return hidden, cache, rows


def generate(model, batch: PromptBatch, rng: jax.Array, cfg: SamplingConfig,
             cache_dtype=jnp.float32, group_size: int = 1, prompts_per_group: int = 1) -> Completions:
    """Samples T = cfg.max_new_tokens tokens for each of N = (rows / prompts_per_group) * group_size
    rows (see the module docstring; the defaults: one row per prompt). Pure given (model state,
    batch, rng)."""
    t_max = cfg.max_new_tokens
    hidden, cache, batch = shared_prefill(model, batch, t_max, group_size, prompts_per_group, cache_dtype)
    logits = expand_groups(model.logits(hidden[:, -1]), prompts_per_group, group_size)
    n = logits.shape[0]
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def cond(carry):
        t, _, _, done, *_ = carry
        return (t < t_max) & ~jnp.all(done)

    def body(carry):
        t, ids, logps, done, cache, logits, rng = carry
        rng, step_rng = jax.random.split(rng)
        token, logp = sample_token(step_rng, logits, cfg)
        token = jnp.where(done, cfg.pad_id, token)
        ids = ids.at[:, t].set(token)
        logps = logps.at[:, t].set(jnp.where(done, 0.0, logp))
        live = ~done
        done = done | jnp.isin(token, eos)
        pos = completion_positions(batch, 1, offset=t)
        hidden, cache = model.forward(token[:, None], pos, live[:, None].astype(jnp.int32), None, cache)
        return t + 1, ids, logps, done, cache, model.logits(hidden[:, 0]), rng

    init = (jnp.int32(0), jnp.full((n, t_max), cfg.pad_id, jnp.int32), jnp.zeros((n, t_max), jnp.float32),
            jnp.zeros((n,), bool), cache, logits, rng)
    _, ids, logps, done, *_ = jax.lax.while_loop(cond, body, init)
    mask = completion_mask(ids, cfg.eos_ids)
    return Completions(ids=ids, mask=mask, logps=logps * mask, lengths=mask.sum(-1))


def completion_mask(ids: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """mask [N, T]: 1 for tokens up to and including the first EOS, 0 after it."""
    is_eos = jnp.isin(ids, jnp.asarray(eos_ids or (-1,), jnp.int32))
    after_eos = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS seen strictly before t
    return (after_eos == 0).astype(jnp.int32)


def decode_completions(tokenizer, ids: np.ndarray, mask: np.ndarray, eos_ids: Sequence[int]) -> list[str]:
    """Completion texts [N] from ids / mask [N, T], without the closing EOS (the format reward
    needs the exact tail) and with special tokens kept (so a stray <|im_start|> is seen)."""
    out = []
    for row, m in zip(np.asarray(ids), np.asarray(mask)):
        toks = [int(t) for t in row[: int(m.sum())]]
        if toks and toks[-1] in eos_ids:
            toks = toks[:-1]
        out.append(tokenizer.decode(toks, skip_special_tokens=False))
    return out
