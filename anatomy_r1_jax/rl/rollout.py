"""The rollout engine: jitted prefill plus a `lax.while_loop` decode over the KV cache.

Shapes are static (prompt length Lp, completion budget T, image budget); each row stops at EOS
(its later tokens are pad and masked) and the loop exits early once every row is done. Images are
encoded once per prompt and shared by a group's rows through `PromptBatch.image_rows`.

Prefix sharing: a group's G rows often repeat few prompts (all the same without GDQA; with GDQA,
variant j mod S for S variants). The batch may then hold S prompt rows per group (Q * S rows,
`prompts_per_group=S`, `group_size=G`): each prompt is prefilled once into a prompt cache of Q * S
rows that stays that size (models/language.py `Prefix`); row q * G + j of the N = Q * G completion
rows continues prompt row q * S + j % S. That removes (G - S) / G of the prefill, and a decode step
reads each prompt's keys once per group (models/cached_attention.py). S = G is the plain
one-prompt-per-row batch.

The decode loop. The completion tokens go to a separate cache of N rows and T slots, in the
cache dtype (default: the model's compute dtype), written in place at slot t. Step t attends to
the prompt cache, to completion slots [0, R) and to its own token, merged exactly. R is static:
the loop runs as `read_segments` while-loops, segment k covering steps [b_(k-1), b_k) with
R = b_k (`read_lengths`), so a step reads about the filled part of the cache, not all T slots,
and one program holds the few shapes every step uses.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
import jax.numpy as jnp

from anatomy_r1_jax.models.cached_attention import expand_groups
from anatomy_r1_jax.models.language import Prefix
from anatomy_r1_jax.models.rope_index import decode_position_ids
from anatomy_r1_jax.data.batch import Completions, PromptBatch
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


def shared_prefill(model, batch: PromptBatch, group_size: int = 1, prompts_per_group: int = 1, cache_dtype=None):
    """Prefills the prompt rows, each once, into a prompt cache of Lp slots (cache_dtype: default
    the model's compute dtype), shared by the completion rows (see the module docstring).

    Returns (hidden [Q * S, Lp, E] of the prompts, the `Prefix` [Q * S rows], and the N rows'
    (attention_mask [N, Lp], rope_deltas [N, 1]) that `completion_positions` needs).
    """
    p, lp = batch.input_ids.shape
    if p % prompts_per_group:
        raise ValueError(f"{p} prompt rows are not groups of prompts_per_group={prompts_per_group}")
    expand = lambda tree: expand_groups(tree, prompts_per_group, group_size)  # noqa: E731
    cache = model.init_cache(p, lp, cache_dtype)
    hidden, cache = model.forward(batch.input_ids, batch.position_ids, batch.attention_mask,
                                  image_embeddings(model, batch), cache, read_length=0)
    rows = batch.replace(attention_mask=expand(batch.attention_mask), rope_deltas=expand(batch.rope_deltas))
    return hidden, Prefix(cache, group_size=group_size, prompts_per_group=prompts_per_group), rows


READ_ALIGN = 16  # read lengths rounded up to this (the Pallas decode kernel reads keys in multiples of 16)


def read_lengths(t_max: int, segments: int) -> tuple[int, ...]:
    """The ends b_1 < ... < b_K = t_max of the decode loop's segments (about t_max * k / K, rounded
    up to READ_ALIGN); segment k's steps t in [b_(k-1), b_k) read completion slots [0, b_k)."""
    def round_up(x: int, to: int) -> int:
        return -(-x // to) * to

    segments = max(segments, 1)
    return tuple(sorted({min(t_max, round_up(round_up(t_max * k, segments) // segments, READ_ALIGN))
                         for k in range(1, segments + 1)}))


def generate(model, batch: PromptBatch, rng: jax.Array, cfg: SamplingConfig,
             cache_dtype=None, group_size: int = 1, prompts_per_group: int = 1, *,
             read_segments: int = 4) -> Completions:
    """Samples T = cfg.max_new_tokens tokens for each of N = (rows / prompts_per_group) * group_size
    rows (see the module docstring; the defaults: one row per prompt). cache_dtype: the KV caches'
    dtype (None: the model's compute dtype); read_segments: the decode loop's segments
    (`read_lengths`; 1 reads all T slots every step). Pure given (model state, batch, rng)."""
    t_max = cfg.max_new_tokens
    hidden, prefix, batch = shared_prefill(model, batch, group_size, prompts_per_group, cache_dtype)
    logits = expand_groups(model.logits(hidden[:, -1]), prompts_per_group, group_size)
    n = logits.shape[0]
    cache = model.init_cache(n, t_max, cache_dtype)
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def segment(carry, end):
        def cond(carry):
            t, _, _, done, *_ = carry
            return (t < end) & ~jnp.all(done)

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
            hidden, cache = model.forward(token[:, None], pos, live[:, None].astype(jnp.int32), None, cache,
                                          prefix=prefix, read_length=end)
            return t + 1, ids, logps, done, cache, model.logits(hidden[:, 0]), rng

        return jax.lax.while_loop(cond, body, carry)

    carry = (jnp.int32(0), jnp.full((n, t_max), cfg.pad_id, jnp.int32), jnp.zeros((n, t_max), jnp.float32),
             jnp.zeros((n,), bool), cache, logits, rng)
    for end in read_lengths(t_max, read_segments):
        carry = segment(carry, end)
    _, ids, logps, done, *_ = carry
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
