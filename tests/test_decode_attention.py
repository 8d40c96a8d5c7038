"""Decode attention in parts (models/cached_attention.py) and the decode loop that uses it (rl/rollout.py).

The parts (a shared prompt prefix read once per group, a ragged completion cache, the new token)
merged by log-sum-exp must equal one softmax over all their keys: checked against the written-out
reference at 1e-4 in fp32, by XLA and by jax's Pallas GPU decode kernel (interpreted on CPU).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from anatomy_r1_jax.models import QwenVL, cached_attention as ca, layers
from anatomy_r1_jax.models.config import QwenVLConfig
from anatomy_r1_jax.models.presets import tiny_hf_config
from anatomy_r1_jax.rl.rollout import expand_groups, generate, read_lengths
from anatomy_r1_jax.rl.sampling import SamplingConfig
from anatomy_r1_jax.train.logprobs import completion_logps

H, KVH, D = 4, 2, 16
TOL = 1e-4


def _case(seed, queries, group, per_group, lp=32, t=48):
    """q [N, 1, H, D], the new token's k, v, a left-padded prefix of Q*S rows and a completion cache
    of N rows filled to a different length each (0 for row 0)."""
    n, p = queries * group, queries * per_group
    keys = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(keys[0], (n, 1, H, D))
    k_new, v_new = (jax.random.normal(keys[i], (n, 1, KVH, D)) for i in (1, 2))
    pk, pv = (jax.random.normal(keys[i], (p, lp, KVH, D)) for i in (3, 4))
    ck, cv = (jax.random.normal(keys[i], (n, t, KVH, D)) for i in (5, 6))
    prompt_len = np.random.default_rng(seed).integers(1, lp + 1, p)
    filled = np.random.default_rng(seed + 1).integers(0, min(t, 100), n)
    filled[0] = 0
    pmask = np.arange(lp)[None] >= (lp - prompt_len)[:, None]
    cmask = np.arange(t)[None] < filled[:, None]
    prefix = ca.Part(pk, pv, jnp.asarray(pmask), jnp.asarray(lp - prompt_len, jnp.int32), jnp.full((p,), lp, jnp.int32),
                     groups=None if group == per_group else (group, per_group))
    completion = ca.Part(ck, cv, jnp.asarray(cmask), jnp.zeros((n,), jnp.int32), jnp.asarray(filled, jnp.int32))
    return q, k_new, v_new, prefix, completion


def _reference(q, k_new, v_new, prefix, completion):
    """One softmax over [prompt row's keys | completion keys | own key], the prefix expanded to N rows."""
    g, s = prefix.groups or (1, 1)
    pk, pv, pm = ca.expand_groups((prefix.k, prefix.v, prefix.mask), s, g)
    k = jnp.concatenate([pk, completion.k, k_new], 1)
    v = jnp.concatenate([pv, completion.v, v_new], 1)
    mask = jnp.concatenate([pm, completion.mask, jnp.ones((q.shape[0], 1), bool)], 1)
    return layers.reference_attention(q, k, v, mask[:, None, None, :])


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("group,per_group", [(4, 1), (4, 2), (3, 2), (2, 2)])
def test_parts_merged_equal_one_softmax(implementation, group, per_group):
    q, k_new, v_new, prefix, completion = _case(group * 10 + per_group, queries=2, group=group, per_group=per_group)
    assert ca.pallas_supports(prefix) and ca.pallas_supports(completion)
    got = jax.jit(lambda *a: ca.attend_parts(*a[:3], jnp.ones((q.shape[0], 1, 1), bool), list(a[3:]),
                                             implementation, interpret=True))(q, k_new, v_new, prefix, completion)
    ref = _reference(q, k_new, v_new, prefix, completion)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=TOL, rtol=0)


def test_pallas_kernel_reads_only_the_filled_blocks():
    """The kernel reads a row's keys only up to its filled length (rounded up to its 16-key blocks):
    NaN past that changes nothing (the mask alone would not keep NaN out of an einsum)."""
    q, k_new, v_new, prefix, completion = _case(5, queries=2, group=4, per_group=2, t=128)
    filled = np.asarray(completion.end)
    assert ca._k_splits(128) == 8 and filled.max() < 112
    unread = jnp.asarray(np.arange(128)[None] >= -(-filled[:, None] // 16) * 16)[:, :, None, None]
    poisoned = completion.replace(k=jnp.where(unread, jnp.nan, completion.k), v=jnp.where(unread, jnp.nan, completion.v))
    got = ca.attend_parts(q, k_new, v_new, jnp.ones((q.shape[0], 1, 1), bool), [prefix, poisoned], "pallas",
                          interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(q, k_new, v_new, prefix, completion)), atol=TOL)
    xla = ca.attend_parts(q, k_new, v_new, jnp.ones((q.shape[0], 1, 1), bool), [prefix, poisoned], "xla")
    assert np.isnan(np.asarray(xla)).any()  # the einsum does read them


@pytest.mark.parametrize("group,per_group", [(4, 1), (4, 2), (3, 2), (5, 3)])
def test_grouped_queries_meet_their_prompt_row(group, per_group):
    """Regrouping puts completion row n in prompt row p(n) = (n // G) S + (n % G) % S, as
    expand_groups does, and ungrouping is its exact inverse."""
    n = 2 * group
    rows = jnp.arange(n, dtype=jnp.float32)[:, None, None]
    grouped = ca.group_queries(rows, group, per_group)  # [Q S, C, 1]
    owner = np.asarray(ca.expand_groups(jnp.arange(2 * per_group), per_group, group))
    for p_row in range(2 * per_group):
        members = sorted(int(x) for x in np.asarray(grouped[p_row, :, 0]) if x or p_row == 0)
        assert set(members) >= set(np.flatnonzero(owner == p_row).tolist())
    np.testing.assert_array_equal(np.asarray(ca.ungroup_queries(grouped, group, per_group)), np.asarray(rows))


def _model(dtype=jnp.float32, attention="auto", scan_layers=True, scale=5.0):
    """A tiny random model, its weights widened (the 0.02 init makes every layer ~identity)."""
    cfg = QwenVLConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256))
    graphdef, state = nnx.split(QwenVL(cfg, dtype=dtype, attention=attention, scan_layers=scan_layers,
                                       rngs=nnx.Rngs(0)))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, state))


def _prompts(model, queries, lp=24, seed=0):
    from anatomy_r1_jax.data.batch import PromptBatch

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 60, (queries, lp)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    pos, deltas = model.position_ids(ids, mask)
    return PromptBatch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos),
                       rope_deltas=jnp.asarray(deltas))


def test_read_lengths_cover_every_step():
    assert read_lengths(64, 4) == (16, 32, 48, 64)
    assert read_lengths(24, 4) == (16, 24)
    assert read_lengths(100, 1) == (100,)
    assert read_lengths(1, 4) == (1,)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_segmented_reads_equal_full_reads_and_teacher_forcing(attention):
    """The decode loop in 4 segments of static read lengths samples what one full-length loop
    samples (same rng: same token ids and log-probs), with S = 2 of G = 4 prompts per group, and its
    log-probs are those of the full forward over [prompt | completion] (no cache) at 1e-4. With
    "pallas" (interpreted here) the kernel reads the prompt (32 slots) and every segment (16, 32, 48)."""
    model = _model(attention=attention)
    batch = _prompts(model, 4, lp=32)
    cfg = SamplingConfig(max_new_tokens=48, temperature=1.0, top_k=0, top_p=1.0)
    assert read_lengths(48, 4) == (16, 32, 48)
    graphdef, state = nnx.split(model)

    def run(segments):
        fn = jax.jit(lambda s, b, r: generate(nnx.merge(graphdef, s), b, r, cfg, group_size=4, prompts_per_group=2,
                                              read_segments=segments))
        return fn(state, batch, jax.random.key(3))

    full, split = run(1), run(4)
    np.testing.assert_array_equal(np.asarray(split.ids), np.asarray(full.ids))
    np.testing.assert_allclose(np.asarray(split.logps), np.asarray(full.logps), atol=1e-5)
    ex = lambda x: expand_groups(x, 2, 4)  # noqa: E731  the N prompt rows, one per completion
    rows = batch.replace(input_ids=ex(batch.input_ids), attention_mask=ex(batch.attention_mask),
                         position_ids=jax.vmap(ex)(batch.position_ids), rope_deltas=ex(batch.rope_deltas))
    forced, _ = jax.jit(lambda s, b, i, m: completion_logps(nnx.merge(graphdef, s), b, i, m))(
        state, rows, split.ids, split.mask)
    np.testing.assert_allclose(np.asarray(forced * split.mask), np.asarray(split.logps), atol=TOL)
    assert int(split.mask.sum()) > 100


def _shapes(stablehlo: str, dtype: str) -> set[tuple[int, ...]]:
    """The shapes of the `dtype` tensors in StableHLO text (tensor<2x8x16xbf16>)."""
    return {tuple(int(d) for d in m.split("x") if d) for m in re.findall(r"tensor<((?:\d+x)+)" + dtype + ">", stablehlo)}


def test_prompt_cache_is_not_expanded_and_caches_are_in_the_compute_dtype():
    """The bf16 rollout of Q = 2 prompts x G = 4 rows, as traced for XLA, holds the prompt keys at
    Q rows and the completion cache in bf16: no [.., N, >= Lp, KVH, D] array (the prompt cache
    expanded to the N rows, or one cache of Lp + T slots) and no float32 cache. (Checked before XLA's
    CPU passes, which compute bf16 dots in float32.)"""
    model = _model(dtype=jnp.bfloat16)
    lp, t, q, g = 24, 8, 2, 4
    batch = _prompts(model, q, lp)
    cfg = SamplingConfig(max_new_tokens=t)
    graphdef, state = nnx.split(model)
    text = jax.jit(lambda s, b, r: generate(nnx.merge(graphdef, s), b, r, cfg, group_size=g)).lower(
        state, batch, jax.random.key(0)).as_text()
    kv = model.config.num_key_value_heads, model.config.head_dim
    bf16, f32 = ([s for s in _shapes(text, d) if len(s) >= 4 and s[-2:] == kv] for d in ("bf16", "f32"))
    layers_ = model.config.num_hidden_layers
    assert (layers_, q * g, t) + kv in bf16, bf16  # the completion cache
    assert (layers_, q, lp) + kv in bf16, bf16  # the prompt cache, at Q rows
    assert not [s for s in bf16 + f32 if s[-4] == q * g and s[-3] >= lp], bf16 + f32
    assert not [s for s in f32 if len(s) == 5 and s[1] in (q, q * g) and s[2] in (lp, t, lp + t)], f32  # no f32 cache
