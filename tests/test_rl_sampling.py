"""Sampling and the rollout's token bookkeeping, with tests that fail when the feature is switched off:
the filters' order against transformers' warpers, forbidden placeholders under a model that prefers
them, EOS kept and everything after it masked in rows that do stop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from anatomy_r1_jax.rl.rollout import decode_completions, generate
from anatomy_r1_jax.rl.sampling import SamplingConfig, sample_token
from test_rollout_step import make_model, prompt_batch, tiny_model_cfg


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' sampling distribution: temperature -> top-k -> top-p warpers, then softmax."""
    scores = torch.from_numpy(logits[None].astype(np.float32))
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        scores = warper(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(2.0, 6, 0.7), (0.5, 6, 0.85), (1.0, 3, 0.95)])
def test_filters_apply_in_transformers_order(temperature, top_k, top_p):
    """The logits are chosen so that any other order (top-p before temperature, top-p before top-k)
    gives another support: temperature 2 flattens the distribution (more tokens in the nucleus),
    0.5 sharpens it; top-k 3 cuts a nucleus that would hold more."""
    logits = np.array([3.0, 2.6, 2.2, 1.9, 1.5, 1.2, 0.8, 0.2], np.float32)
    want = reference_distribution(logits, temperature, top_k, top_p)
    # The wrong order (top-p on the raw logits, then temperature) has another support.
    wrong = reference_distribution(logits, 1.0, top_k, top_p) > 0
    if temperature != 1.0:
        assert (wrong != (want > 0)).any()
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(0), 20000)
    tokens = jax.vmap(lambda k: sample_token(k, jnp.asarray(logits)[None], cfg)[0])(keys)
    freq = np.bincount(np.asarray(tokens).ravel(), minlength=len(logits)) / len(keys)
    np.testing.assert_array_equal(freq > 0, want > 0)
    np.testing.assert_allclose(freq, want, atol=0.015)  # 20000 draws: sd <= 0.0035


class _BiasedLogits:
    """The tiny model with `bias` added to its next-token logits (a model that prefers some tokens)."""

    def __init__(self, model, bias):
        self.model, self.bias = model, bias

    def logits(self, hidden):
        return self.model.logits(hidden) + self.bias

    def __getattr__(self, name):
        return getattr(self.model, name)


def _rollout(bias, forbidden=(), eos=(), tokens=8, seed=1):
    cfg = tiny_model_cfg()
    model = _BiasedLogits(make_model(), jnp.asarray(bias))
    batch = jax.tree.map(jnp.asarray, prompt_batch(queries=1, group=8))
    sc = SamplingConfig(max_new_tokens=tokens, temperature=1.0, top_k=64, top_p=1.0, eos_ids=eos, pad_id=0,
                        forbidden_ids=forbidden)
    comp = jax.jit(lambda b, k: generate(model, b, k, sc))(batch, jax.random.key(seed))
    return cfg, jax.device_get(comp)


def test_placeholders_are_never_sampled_even_when_the_model_prefers_them():
    cfg = tiny_model_cfg()
    forbidden = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    bias = np.zeros(cfg.vocab_size, np.float32)
    bias[list(forbidden)] = 8.0  # each placeholder far likelier than any other token
    _, free = _rollout(bias)
    assert np.isin(free.ids, forbidden).mean() > 0.5  # without the filter the model samples them
    _, comp = _rollout(bias, forbidden=forbidden)
    assert not np.isin(comp.ids, forbidden).any()
    assert (comp.mask == 1).all()  # no EOS configured: every row runs the whole budget


def test_eos_is_kept_and_everything_after_it_is_masked():
    cfg = tiny_model_cfg()
    eos = 7
    bias = np.zeros(cfg.vocab_size, np.float32)
    bias[eos] = 4.5  # EOS likely but not certain at each step: rows stop at different steps
    _, comp = _rollout(bias, eos=(eos,), tokens=16)
    first = [np.flatnonzero(row == eos) for row in comp.ids]
    assert all(len(f) for f in first), "every row should emit EOS within the budget"
    stops = np.array([f[0] for f in first])
    assert len(set(stops)) > 1 and stops.max() < 15  # rows stop at different steps, before the end
    for row, mask, logp, stop in zip(comp.ids, comp.mask, comp.logps, stops):
        assert mask[: stop + 1].all() and not mask[stop + 1:].any()  # EOS itself is a trained token
        assert (row[stop + 1:] == 0).all() and (logp[stop + 1:] == 0).all() and logp[stop] < 0
    np.testing.assert_array_equal(comp.lengths, stops + 1)

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    texts = decode_completions(Tok(), comp.ids, comp.mask, (eos,))
    assert all(not t.split() or t.split()[-1] != str(eos) for t in texts)  # the closing EOS is dropped
    assert [len(t.split()) for t in texts] == list(stops)
