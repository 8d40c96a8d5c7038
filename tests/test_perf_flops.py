"""The analytic FLOP and byte model of perf/flops.py against XLA's own count and our parameters."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from anatomy_r1_jax.models import QwenVL, QwenVLConfig
from anatomy_r1_jax.perf import flops, workloads
from anatomy_r1_jax.data.batch import Completions, PromptBatch, TrainBatch
from anatomy_r1_jax.rl.losses import GRPOLoss
from anatomy_r1_jax.train.logprobs import completion_logps
from anatomy_r1_jax.runtime.placement import split_model
from anatomy_r1_jax.train.step import StepConfig, TrainState, make_optimizer, train_step

Q, G, LP, T = 2, 4, 48, 16


@functools.lru_cache(maxsize=None)
def small():
    cfg = QwenVLConfig.from_hf(workloads.size_config("small"))
    return cfg, QwenVL(cfg, rngs=nnx.Rngs(0))


def text_prompts(rows: int) -> PromptBatch:
    ids = np.random.default_rng(0).integers(0, 1000, (rows, LP)).astype(np.int32)
    pos = np.broadcast_to(np.arange(LP, dtype=np.int32), (3, rows, LP)).copy()
    return PromptBatch(input_ids=ids, attention_mask=np.ones_like(ids), position_ids=pos,
                       rope_deltas=np.zeros((rows, 1), np.int32))


def xla_flops(fn, *args) -> float:
    """XLA's FLOP count (HloCostAnalysis) of `fn`'s lowered program: the HLO before XLA's passes,
    so nothing is compiled (the compiled program's count differs by < 0.1% here)."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("shared", [True, False])
def test_forward_and_update_flops_match_xla(shared):
    cfg, model = small()
    prompts = text_prompts(Q if shared else Q * G)
    ones = np.ones((Q * G, T), np.int32)
    graphdef, state = nnx.split(model)
    logps = lambda s, p: completion_logps(nnx.merge(graphdef, s), p, ones, ones, 1.0, T, G)[0]  # noqa: E731
    fwd = xla_flops(logps, state, prompts)
    ours = flops.sequence_flops(cfg, queries=Q, group=G, prompt_length=LP, completion_length=T, shared=shared)
    assert 1.0 <= fwd / ours < 1.02  # XLA adds the elementwise work (norms, softmax, rotary)
    if not shared:
        return  # the update is 4 forwards of either layout; one compile of it suffices

    graphdef, params, frozen = split_model(model, freeze_vision=False)
    tx = make_optimizer(1e-3)
    st = TrainState(step=np.zeros((), np.int32), params=params, frozen=frozen, ref_params=params,
                    opt_state=tx.init(params))
    rng = np.random.default_rng(1)
    batch = TrainBatch(prompt=prompts, completions=Completions(ids=ones, mask=ones, logps=ones * 0.0,
                                                              lengths=ones.sum(-1)),
                       rewards=rng.normal(size=Q * G).astype(np.float32), categories=np.zeros(Q * G, np.int32))
    batch = jax.tree.map(lambda x: np.asarray(x)[None], batch)
    step = functools.partial(train_step, graphdef, tx, StepConfig(group_size=G, loss=GRPOLoss(beta=0.04), logp_chunk=T))
    update = xla_flops(step, st, batch)
    analytic = flops.update_flops(cfg, queries=Q, group=G, prompt_length=LP, completion_length=T, shared=True)
    # + the LM head's recomputation in the chunked log-softmax's backward and the optimizer's elementwise work
    assert 1.0 <= update / analytic < 1.1


def test_decode_weights_are_the_language_model_without_the_input_table():
    for size in ("small", "100m"):  # untied, tied embeddings
        cfg = QwenVLConfig.from_hf(workloads.size_config(size))
        params = nnx.state(nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0))), nnx.Param)  # shapes only
        language = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                       if "vision" not in jax.tree_util.keystr(path))
        input_table = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
        assert flops.language_weight_count(cfg) == language - input_table
    bound = flops.decode_bound(cfg, rows=8, prompt_length=100, new_tokens=20, weight_bytes=2, cache_bytes=2)
    kv = 8 * 110 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    assert bound.cache_bytes == kv and bound.tokens_per_second(1e12) == pytest.approx(8e12 / (kv + bound.weight_bytes))


def test_device_peaks_by_longest_prefix():
    assert flops.device_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert flops.device_peaks("TPU v5 lite") == (197e12, 0.819e12)  # not TPU v5 (p)
    assert flops.device_peaks("TPU v5p")[0] == 459e12
    assert flops.device_peaks("cpu") is None


@pytest.mark.slow  # whole updates on 8 devices
def test_bench_device_reports_utilisation_with_the_device_name(capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import bench_device

    r = bench_device.main(["--size", "tiny", "--dtype", "float32", "--queries", "2", "--group", "2",
                           "--prompt-length", "48", "--new-tokens", "6", "--grid", "1", "4", "4", "--reps", "1"])
    out = capsys.readouterr().out
    assert r["peak_source"] == "measured probes" and r["device"] in out and "MFU" in out
    assert r["mfu"] > 0 and 0 < r["decode_tps"] and r["bound_tps"] > 0
    # the trainer's layout over all 8 devices: 2 queries x G 2 per device, fsdp for the update
    assert r["devices"] == 8 and r["rows"] == 4 * 8 and r["mesh"]["fsdp"] == 8 and "rollout mesh" in out
    cfg = bench_device.QwenVLConfig.from_hf(bench_device.hf_config_of("tiny"))
    assert r["model_flops"] == flops.update_flops(cfg, queries=2, group=2, prompt_length=48, completion_length=6)


def test_step_model_terms_follow_the_layout():
    """perf/step_model: the fsdp layout pays (n - 1) / n of the weights over the link per decode
    token, the local one reads them from HBM only; the trimmed update runs each micro-batch at its
    bucketed longest group (whole groups sorted by length), the padded one at T_max."""
    import dataclasses

    import numpy as np

    from anatomy_r1_jax.models import QwenVLConfig
    from anatomy_r1_jax.models.presets import preset_hf_config
    from anatomy_r1_jax.perf import flops, step_model

    lengths = np.array([3, 9, 1, 2, 16, 4, 5, 6])  # 4 groups of 2: longest 9, 2, 16, 6
    assert step_model.trimmed_lengths(lengths, 2, 2, 16, 4) == [8, 16]
    cfg = QwenVLConfig.from_hf(preset_hf_config("qwen2_5_vl_3b"))
    hw, load = step_model.HARDWARE["8x H100"], step_model.Workload()
    weights = flops.language_weight_count(cfg) * 2
    after = step_model.step(cfg, hw, load, step_model.AFTER, tensor=1, hbm_eff=1.0)
    assert weights / hw.hbm * 1e3 < after["decode_step_ms"] < 1.5 * weights / hw.hbm * 1e3
    no_gather = dataclasses.replace(step_model.BEFORE, rollout_weights="local", logits_gather=False)
    before = step_model.step(cfg, hw, load, step_model.BEFORE, hbm_eff=1.0)
    local = step_model.step(cfg, hw, load, no_gather, tensor=1, hbm_eff=1.0)
    gathered = (before["decode_step_ms"] - local["decode_step_ms"]) * 1e-3
    assert gathered > 7 / 8 * weights / hw.link
    assert before["update_lengths"] == [512] * 4 and after["update_lengths"] == sorted(after["update_lengths"])
    assert after["update_s"] < before["update_s"] and after["tokens_per_s_per_gpu"] > 10 * before["tokens_per_s_per_gpu"]
