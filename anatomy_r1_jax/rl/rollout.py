"""The rollout engine: jitted prefill plus a `lax.while_loop` decode over the KV cache.

Shapes are static (prompt length Lp, completion budget T, image budget); each row stops at EOS
(its later tokens are pad and masked) and the loop exits early once every row is done. Images are
encoded once per prompt and shared by a group's rows through `PromptBatch.image_rows`.
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


def generate(model, batch: PromptBatch, rng: jax.Array, cfg: SamplingConfig,
             cache_dtype=jnp.float32) -> Completions:
    """Samples T = cfg.max_new_tokens tokens per row. Pure given (model state, batch, rng)."""
    n, lp = batch.input_ids.shape
    t_max = cfg.max_new_tokens
    cache = model.init_cache(n, lp + t_max, cache_dtype)
    hidden, cache = model.forward(batch.input_ids, batch.position_ids, batch.attention_mask,
                                  image_embeddings(model, batch), cache)
    logits = model.logits(hidden[:, -1])
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
