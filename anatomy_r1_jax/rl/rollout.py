"""The rollout engine: jitted prefill plus a `lax.while_loop` decode over the KV cache.

Shapes are static (prompt length Lp, completion budget T, image budget); each row stops at EOS
(its later tokens are pad and masked) and the loop exits early once every row is done. Images are
encoded once per prompt and shared by a group's rows through `PromptBatch.image_rows`.

Prefix sharing: when a group's G rows have the same prompt, the batch may hold one row per group
(Q = N / G rows) and `group_size=G`; the prompt is then prefilled once per group and its KV cache
and last logits repeated to the N rows (row q * G + j is sample j of prompt q), which removes
(G - 1) / G of the prefill.
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


def repeat_rows(tree, g: int):
    """Every array of `tree` with its leading (row) axis repeated g times: [Q, ...] -> [Q * g, ...],
    row q * g + j a copy of row q. The backward pass sums the g copies' cotangents."""
    return tree if g == 1 else jax.tree.map(lambda x: jnp.repeat(x, g, axis=0, total_repeat_length=x.shape[0] * g),
                                            tree)


def shared_prefill(model, batch: PromptBatch, length: int, group_size: int = 1, cache_dtype=None):
    """Prefills the prompts into a KV cache of Lp + `length` slots, once per prompt row, then
    repeats it to N = rows * group_size rows.

    Returns (hidden [Q, Lp, E] of the prompts, the cache [N rows, index Lp], and the N rows'
    (attention_mask [N, Lp], rope_deltas [N, 1]) that `completion_positions` needs).
    """
    q, lp = batch.input_ids.shape
    cache = model.init_cache(q, lp + length, cache_dtype)
    hidden, cache = model.forward(batch.input_ids, batch.position_ids, batch.attention_mask,
                                  image_embeddings(model, batch), cache)
    cache = cache.replace(k=repeat_rows(cache.k, group_size), v=repeat_rows(cache.v, group_size),
                          mask=repeat_rows(cache.mask, group_size))
    rows = batch.replace(attention_mask=repeat_rows(batch.attention_mask, group_size),
                         rope_deltas=repeat_rows(batch.rope_deltas, group_size))
    return hidden, cache, rows


def generate(model, batch: PromptBatch, rng: jax.Array, cfg: SamplingConfig,
             cache_dtype=jnp.float32, group_size: int = 1) -> Completions:
    """Samples T = cfg.max_new_tokens tokens for each of N = rows * group_size rows (group_size > 1:
    the batch holds one prompt per group, see the module docstring). Pure given (model state,
    batch, rng)."""
    t_max = cfg.max_new_tokens
    hidden, cache, batch = shared_prefill(model, batch, t_max, group_size, cache_dtype)
    logits = repeat_rows(model.logits(hidden[:, -1]), group_size)
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
