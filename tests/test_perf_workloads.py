"""Benchmark workloads: our model and the transformers reference see identical weights and prompts,
and the plain-PyTorch GRPO update of bench_step.py computes our loss."""

import sys
from pathlib import Path

import numpy as np
import pytest

from anatomy_r1_jax.perf import workloads
from anatomy_r1_jax.perf.timing import Timing, time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_rollout  # noqa: E402
import bench_step  # noqa: E402


def test_case_parse_and_timing_order():
    case = workloads.Case.parse("tiny,8,4,160,24")
    assert (case.size, case.rows, case.prompt_length, case.new_tokens) == ("tiny", 32, 160, 24)
    with pytest.raises(ValueError):
        workloads.Case.parse("tiny,8,4")
    calls = []
    out = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then round-robin
    t = Timing((3.0, 1.0, 2.0, 10.0))
    assert t.median == 2.5 and t.p10 <= t.median <= t.p90


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return workloads.reference_pair("tiny", tmp_path_factory.mktemp("ref"))


def test_identical_weights_and_prompts(pair):
    ref, model, config = pair
    assert workloads.parameter_count(config) == sum(p.numel() for p in ref.parameters())
    prompts, hf = workloads.image_prompts(model.config, queries=2, group=3, prompt_length=64)
    assert prompts.input_ids.shape == (6, 64) and hf["pixel_values"].shape[0] == 6 * 16
    assert (prompts.input_ids == hf["input_ids"]).all() and len(set(map(tuple, hf["input_ids"]))) == 2
    assert bench_rollout.prefill_agreement(model, ref, prompts, hf) < 1e-4


def test_torch_grpo_update_matches_ours(pair):
    ref, model, _ = pair
    case = workloads.Case("tiny", 2, 4, 48, 8)
    _, hf = workloads.image_prompts(model.config, queries=2, group=4, prompt_length=48)
    comp = workloads.random_completions(model.config, 8, 8)
    shared, per_row = bench_step.our_steppers(model, case, comp).values()
    assert shared.batch.prompt.input_ids.shape[1] == 2 and per_row.batch.prompt.input_ids.shape[1] == 8
    theirs = bench_step.TorchStepper(ref, workloads.torch_inputs(hf), comp, 4)
    for _ in range(2):  # the first update, then the second after one AdamW step on each side
        ours_shared, ours_rows, torch_loss = float(shared()["loss"]), float(per_row()["loss"]), theirs()
        np.testing.assert_allclose([ours_shared, ours_rows], torch_loss, rtol=1e-4, atol=1e-6)
