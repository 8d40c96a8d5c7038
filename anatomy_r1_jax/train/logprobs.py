"""Per-token log-probabilities of completions under a model, memory-bounded.

The LM head is applied in chunks of the completion axis under `jax.checkpoint`, so neither the
forward nor the backward pass holds [N, T, V] float32 logits at once (V = 152k for Qwen).

Prefix sharing: a prompt batch of S rows per group (Q * S rows for the N = Q * G completions,
completion row q * G + j continuing prompt row q * S + j % S; see rl/rollout.py) is run through
the model once per prompt row, and the completions attend to its KV cache (models/language.py
`Prefix`, expanded to the N rows one layer at a time inside the layer). Causal attention makes the
prompt's states independent of what follows, so this is the same function as N full sequences, at (S Lp + G T) / (G (Lp + T)) of the token work; the
expansion's backward sums the copies' gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anatomy_r1_jax.data.batch import PromptBatch
from anatomy_r1_jax.rl.rollout import completion_positions, expand_groups, image_embeddings, shared_prefill


def prompts_per_group(prompt_rows: int, completion_rows: int, group_size: int) -> int:
    """S of a batch from its shapes: Q = N / G groups, S = prompt rows / Q (raises if inconsistent)."""
    groups, rest = divmod(completion_rows, group_size)
    if rest or prompt_rows % max(groups, 1) or not 1 <= prompt_rows // max(groups, 1) <= group_size:
        raise ValueError(f"{prompt_rows} prompt rows do not divide into the {groups} groups of {group_size} of "
                         f"{completion_rows} completion rows")
    return prompt_rows // groups


def sequence_hidden(model, prompt: PromptBatch, completion_ids: jax.Array, completion_mask: jax.Array,
                    group_size: int = 1) -> jax.Array:
    """Hidden states that predict each completion token: [N, T, hidden].

    The full sequence is [prompt (left padded) | completion (right padded)]; the state at slot
    Lp - 1 + t predicts completion token t. prompt has N rows, or S per group of group_size
    (see the module docstring).
    """
    p, lp = prompt.input_ids.shape
    n, t = completion_ids.shape
    if p != n:
        s = prompts_per_group(p, n, group_size)
        hidden, prefix, rows = shared_prefill(model, prompt, group_size, s)
        out, _ = model.forward(completion_ids, completion_positions(rows, t), completion_mask, prefix=prefix)
        return jnp.concatenate([expand_groups(hidden[:, -1:], s, group_size), out[:, :-1]], axis=1)
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
                     temperature: float = 1.0, chunk: int = 128, group_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """[N, T] log-probs and entropies of `completion_ids` given the prompts (N rows, or S rows per
    group of group_size)."""
    hidden = sequence_hidden(model, prompt, completion_ids, completion_mask, group_size)
    return token_logps(model, hidden, completion_ids, temperature, chunk)
