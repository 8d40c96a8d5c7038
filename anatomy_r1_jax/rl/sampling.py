"""Next-token sampling: temperature, top-k, top-p (nucleus), greedy, forbidden tokens.

Order and semantics follow transformers' warpers (temperature -> top-k -> top-p; top-p keeps a token
when the probability mass of strictly more likely tokens is < top_p, so at least one survives).
The log-prob returned is that of the temperature-scaled *full* distribution, i.e. exactly what the
GRPO loss recomputes from logits / temperature.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from anatomy_r1_jax import sharding

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable: a jit static argument).

    top_k = 0 and top_p = 1.0 disable those filters. forbidden_ids can never be sampled
    (image / video placeholders, vision start / end).
    """

    max_new_tokens: int = 64
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 0.9
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    forbidden_ids: tuple[int, ...] = ()


def mask_forbidden(logits: jax.Array, forbidden_ids: tuple[int, ...]) -> jax.Array:
    """logits [..., V] with the forbidden token columns set to -inf."""
    if not forbidden_ids:
        return logits
    return logits.at[..., jnp.asarray(forbidden_ids)].set(NEG_INF)


def _top_p_filter(sorted_logits: jax.Array, top_p: float) -> jax.Array:
    """sorted_logits [..., K] descending; returns them with the nucleus tail set to -inf."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    return jnp.where(mass_above < top_p, sorted_logits, NEG_INF)


def sample_token(rng: jax.Array, logits: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Samples one token per row.

    logits [B, V] float32. Returns (tokens [B] int32, logp [B] = log softmax(logits / T)[token]).
    The forbidden ids are never drawn, but logp is taken over the unfiltered vocabulary: that is the
    distribution the training forward recomputes.

    The draw is jax.random.categorical's (argmax of the candidates' logits + Gumbel noise), the noise
    made for all B rows at once, so a row's token does not depend on how rows are split over
    devices; the filtering and the draw run on each device's own rows (`sharding.map_rows`: XLA
    would gather every row of [B, V] for the top-k otherwise).
    """
    b, v = logits.shape
    k = min(cfg.top_k, v) if cfg.top_k > 0 else v
    noise = None if cfg.greedy else jax.random.gumbel(rng, (b, k), jnp.float32)
    return sharding.map_rows(functools.partial(_sample_rows, cfg=cfg), logits, noise)


def _sample_rows(logits: jax.Array, noise: jax.Array | None, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """`sample_token` of rows [b, V] given their Gumbel noise [b, K] (K = top_k, or V; None: greedy)."""
    scaled = logits / (1.0 if cfg.greedy else cfg.temperature)
    full_logp = jax.nn.log_softmax(scaled, axis=-1)
    logits = mask_forbidden(logits, cfg.forbidden_ids)
    scaled = mask_forbidden(scaled, cfg.forbidden_ids)
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        if cfg.top_k > 0:
            # Filter inside the k best only: top-p over the survivors of top-k is exact and avoids
            # sorting the whole vocabulary.
            cand_logits, cand_ids = jax.lax.top_k(scaled, noise.shape[-1])
        else:
            cand_ids = jnp.argsort(-scaled, axis=-1)
            cand_logits = jnp.take_along_axis(scaled, cand_ids, axis=-1)
        if cfg.top_p < 1.0:
            cand_logits = _top_p_filter(cand_logits, cfg.top_p)
        choice = jnp.argmax(noise + cand_logits, axis=-1)
        tokens = jnp.take_along_axis(cand_ids, choice[:, None], axis=-1)[:, 0]
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(full_logp, tokens[:, None], axis=-1)[:, 0]


def sampling_config(config, model_cfg, tokenizer, pad_id: int) -> SamplingConfig:
    """The rollout sampler of a run's config (what the trainer samples GRPO groups with)."""
    c = config
    eos = tuple(model_cfg.eos_token_ids) or (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    forbidden = tuple(sorted({model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
                              model_cfg.vision_end_token_id}))
    return SamplingConfig(max_new_tokens=c.rl.max_completion_length, temperature=c.rl.temperature, top_k=c.rl.top_k,
                          top_p=c.rl.top_p, eos_ids=eos, pad_id=pad_id, forbidden_ids=forbidden)
