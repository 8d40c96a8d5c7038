"""The attention implementations (models/layers.py) against the written-out reference."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from anatomy_r1_jax.models import layers
from anatomy_r1_jax.models.language import new_token_mask

B, L, H, KVH, D = 2, 40, 4, 2, 16


def _inputs(seed=0, length=L, slots=L):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, length, H, D))
    k = jax.random.normal(kk, (B, slots, KVH, D))
    v = jax.random.normal(kv, (B, slots, KVH, D))
    return q, k, v


def _prompt_mask(length=L):
    """Row 0 full, row 1 left-padded by 7 (its first 7 queries attend to nothing)."""
    attention_mask = np.ones((B, length), np.int32)
    attention_mask[1, :7] = 0
    mask = new_token_mask(jnp.asarray(attention_mask))[:, None]
    return mask, attention_mask.astype(bool)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_implementations_match_reference(implementation, monkeypatch):
    monkeypatch.setattr(layers, "QUERY_BLOCK", 16)  # 40 queries: 3 blocks, the last one padded
    q, k, v = _inputs()
    mask, real = _prompt_mask()
    ref = layers.attention(q, k, v, mask, "reference")
    got = jax.jit(lambda *a: layers.attention(*a, implementation))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.where(real[:, :, None, None], layers.attention(q, k, v, mask, impl), 0) ** 2)

    g_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.jit(jax.grad(loss(implementation), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_decode_reads_the_cache_with_one_mask_for_all_heads():
    """One query against a cache of 40 slots, of which the first 7 of row 1 are padding."""
    q, k, v = _inputs(seed=1, length=1)
    _, real = _prompt_mask()
    cache_mask = jnp.asarray(real)
    mask = cache_mask.at[:, -1].set(False)[:, None, None, :]
    assert mask.shape == (B, 1, 1, L)
    ref = layers.attention(q, k, v, mask, "reference")
    expected = layers.attention(q, k, v, jnp.broadcast_to(mask, (B, H, 1, L)), "reference")  # per-head mask
    np.testing.assert_allclose(np.asarray(ref), np.asarray(expected), atol=1e-6)
    np.testing.assert_allclose(np.asarray(layers.attention(q, k, v, mask, "xla")), np.asarray(ref), atol=1e-5)


def test_chunked_holds_one_block_of_logits(monkeypatch):
    """jit(grad) of 1024 queries x 1024 keys: the chunked form's temporaries stay well below the
    reference's [B, H, L, S] float32 logits (and their softmax)."""
    monkeypatch.setattr(layers, "QUERY_BLOCK", 128)
    length = 1024
    q, k, v = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _inputs(length=length, slots=length))
    mask = jax.ShapeDtypeStruct((B, 1, length, length), jnp.bool_)

    def temp_bytes(impl):
        fn = jax.grad(lambda q, k, v, m: jnp.sum(layers.attention(q, k, v, m, impl)), argnums=(0, 1, 2))
        return jax.jit(fn).lower(q, k, v, mask).compile().memory_analysis().temp_size_in_bytes

    reference = temp_bytes("reference")
    assert reference >= B * H * length * length * 4  # at least the logits
    assert temp_bytes("chunked") <= reference / 4  # 8 blocks: measured 6.7x less


def test_auto_picks_by_backend_and_errors_are_clear():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_attention("auto", jnp.bfloat16, 512) == "xla"
    assert layers.resolve_attention("chunked", jnp.float32, 1) == "chunked"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        layers.resolve_attention("flash", jnp.float32, 4)
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        layers.attention(q, k, v, _prompt_mask()[0], "cudnn")
