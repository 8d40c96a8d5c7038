"""Per-token log-probabilities of completions under a model, memory-bounded.

The LM head is applied in chunks of the completion axis under `jax.checkpoint`, so neither the
forward nor the backward pass holds [N, T, V] float32 logits at once (V = 152k for Qwen).

Prefix sharing: a prompt batch of Q = N / G rows (one per group, the G completions of prompt q
being rows q * G .. q * G + G - 1) is run through the model once per prompt; its KV cache is
repeated to the N rows and the completions attend to it. Causal attention makes the prompt's
states independent of what follows, so this is the same function as N full sequences, at
(Lp + G T) / (G (Lp + T)) of the token work; the repeat's backward sums the G rows' gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anatomy_r1_jax.rl.batch import PromptBatch
from anatomy_r1_jax.rl.rollout import completion_positions, image_embeddings, repeat_rows, shared_prefill


def sequence_hidden(model, prompt: PromptBatch, completion_ids: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """Hidden states that predict each completion token: [N, T, hidden].

    The full sequence is [prompt (left padded) | completion (right padded)]; the state at slot
    Lp - 1 + t predicts completion token t. prompt has N rows, or N / G (shared by groups of G).
    """
    q, lp = prompt.input_ids.shape
    n, t = completion_ids.shape
    if n % q:
        raise ValueError(f"{n} completion rows are not a whole number of groups of the {q} prompt rows")
    if q != n:
        hidden, cache, rows = shared_prefill(model, prompt, t, n // q)
        out, _ = model.forward(completion_ids, completion_positions(rows, t), completion_mask, None, cache)
        return jnp.concatenate([repeat_rows(hidden[:, -1:], n // q), out[:, :-1]], axis=1)
    ids = jnp.concatenate([prompt.input_ids, completion_ids], axis=1)
    mask = jnp.concatenate([prompt.attention_mask, completion_mask.astype(prompt.attention_mask.dtype)], axis=1)
    pos = jnp.concatenate([prompt.position_ids, completion_positions(prompt, t)], axis=2)
    hidden, _ = model.forward(ids, pos, mask, image_embeddings(model, prompt), None)
    return hidden[:, lp - 1: lp - 1 + t]


def _chunk_size(t: int, chunk: int) -> int:
    c = max(1, min(chunk, t))
    while t % c:
        c -= 1
    return c


def token_logps(model, hidden: jax.Array, targets: jax.Array, temperature: float = 1.0,
                chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """log softmax(logits / temperature)[target] and the entropy, both [N, T] float32.

    hidden [N, T, hidden]; targets [N, T] int.
    """
    n, t, _ = hidden.shape
    c = _chunk_size(t, chunk)

    @jax.checkpoint
    def one(args):
        h, y = args  # [N, c, hidden], [N, c]
        logp = jax.nn.log_softmax(model.logits(h).astype(jnp.float32) / temperature, axis=-1)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0], entropy

    hs = hidden.reshape(n, t // c, c, -1).swapaxes(0, 1)
    ys = targets.reshape(n, t // c, c).swapaxes(0, 1)
    logps, entropy = jax.lax.map(one, (hs, ys))
    return logps.swapaxes(0, 1).reshape(n, t), entropy.swapaxes(0, 1).reshape(n, t)


def completion_logps(model, prompt: PromptBatch, completion_ids: jax.Array, completion_mask: jax.Array,
                     temperature: float = 1.0, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """[N, T] log-probs and entropies of `completion_ids` given the prompts."""
    hidden = sequence_hidden(model, prompt, completion_ids, completion_mask)
    return token_logps(model, hidden, completion_ids, temperature, chunk)
