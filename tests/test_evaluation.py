"""Evaluation: Wilson intervals and pass@k against references, scoring of hand-written answers,
the sharded evaluator against one device and against a direct `generate` (padding, one compile per
mode), and a resumable sweep over a saved checkpoint."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.sharding import PartitionSpec as P

from anatomy_r1_jax import sharding
from anatomy_r1_jax.data import read_records
from anatomy_r1_jax.data.collate import preprocess_images
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.data.synthetic import make_synthetic_dataset
from anatomy_r1_jax.evaluation import evaluator as evaluator_lib
from anatomy_r1_jax.evaluation import metrics
from anatomy_r1_jax.evaluation import sweep as sweep_lib
from anatomy_r1_jax.evaluation.checkpoints import base_state, build_setup, resolve_checkpoint
from anatomy_r1_jax.evaluation.evaluator import EvalSettings, Evaluator, decode_completions
from anatomy_r1_jax.evaluation.scoring import score, summarize
from anatomy_r1_jax.rl.rollout import generate
from anatomy_r1_jax.train.checkpoint import Checkpointer
from anatomy_r1_jax.runtime.placement import place_state
from anatomy_r1_jax.train.step import TrainState, make_optimizer

REPO = Path(__file__).resolve().parents[1]


def default_config():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # configs/ is a folder of the repository, not of the package
    module = importlib.import_module("configs.default")
    c = module.get_config()
    c.data.synthetic.n = 40
    c.rl.max_completion_length = 12
    c.model.tiny.num_hidden_layers = 1  # compile time is most of these tests' time
    c.model.tiny.vision_depth = 1
    return c


# ---- statistics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n", [(0, 1), (0, 10), (3, 10), (10, 10), (57, 200), (1, 3), (199, 200)])
def test_wilson_interval_matches_scipy(k, n):
    ref = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    np.testing.assert_allclose(metrics.wilson_interval(k, n), (ref.low, ref.high), rtol=0, atol=1e-12)


def test_pass_at_k_is_the_probability_over_k_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
                assert math.isclose(metrics.pass_at_k(n, c, k), brute, abs_tol=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 1, 5)


def test_paired_difference_hand_example():
    """Five questions: two gained, one lost, two unchanged: d = (1, 1, -1, 0, 0), mean 0.2,
    sd (n - 1) = sqrt(0.7), half-width 1.96 sqrt(0.7) / sqrt(5)."""
    before, after = [0, 0, 1, 1, 0], [1, 1, 0, 1, 0]
    out = metrics.paired_difference(before, after)
    assert out["n"] == 5 and out["before"] == 0.4 and out["after"] == 0.6
    assert math.isclose(out["gain"], 0.2, abs_tol=1e-12)
    assert math.isclose(out["ci95"], metrics.Z95 * math.sqrt(0.7) / math.sqrt(5), rel_tol=1e-12)
    assert metrics.paired_difference([1, 0], [1, 0])["ci95"] == 0.0  # identical answers: no uncertainty
    assert math.isnan(metrics.paired_difference([1], [0])["ci95"])
    with pytest.raises(ValueError):
        metrics.paired_difference([1, 0], [1])


def test_paired_difference_interval_matches_bootstrap_and_covers_95_percent():
    """Correlated 0/1 outcomes of 400 questions (the same model before and after a small update):
    the half-width equals the bootstrap's (2.5 / 97.5 percentiles of resampled mean differences)
    within 10%, is much narrower than an unpaired interval, and over 2000 simulated evaluations
    covers the true gain 93-97% of the time."""
    rng = np.random.default_rng(0)
    n, p_before, p_flip_up, p_flip_down = 400, 0.6, 0.25, 0.08
    true_gain = (1 - p_before) * p_flip_up - p_before * p_flip_down

    def draw(size):
        before = rng.random(size) < p_before
        up, down = rng.random(size) < p_flip_up, rng.random(size) < p_flip_down
        return before.astype(float), np.where(before, ~down, up).astype(float)

    before, after = draw(n)
    out = metrics.paired_difference(before, after)
    idx = rng.integers(0, n, size=(4000, n))
    boot = (after[idx] - before[idx]).mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert abs(out["ci95"] - (hi - lo) / 2) < 0.1 * out["ci95"]
    unpaired = metrics.Z95 * math.sqrt(before.var(ddof=1) / n + after.var(ddof=1) / n)
    assert out["ci95"] < 0.8 * unpaired

    sims = [metrics.paired_difference(*draw(n)) for _ in range(2000)]
    coverage = np.mean([abs(s["gain"] - true_gain) <= s["ci95"] for s in sims])
    assert 0.93 <= coverage <= 0.97, coverage


def _record(i, answer, category, qtype="location"):
    options = ("Liver", "Gut", "Omentum", "Gallbladder")
    return Record(id=f"q{i}", images=("x.png",), question="Which?", options=options, answer=answer,
                  answer_text=options["ABCD".index(answer)], category=category, question_type=qtype, source="s")


def test_score_and_summarize_hand_written_answers():
    records = [_record(0, "A", "Liver"), _record(1, "B", "Gut"), _record(2, "C", "Omentum", "relation"),
               _record(3, "D", "Gallbladder", "relation")]
    greedy = ["<think>x</think><answer>A</answer>",  # correct, formatted
              "<think>x</think><answer>B. Gut</answer>",  # lenient only
              "<answer>C</answer>",  # correct, format failure (no think)
              "<think>x</think><answer>A</answer>\n"]  # wrong, and a trailing newline fails the format
    samples = [["<think></think><answer>A</answer>"] * 3,
               ["<think></think><answer>A</answer>", "<think></think><answer>B</answer>", "B"],
               ["no"] * 3,
               ["<think></think><answer>D</answer>"] * 3]
    outcomes = score(records, greedy, samples)
    assert [o.correct for o in outcomes] == [1, 0, 1, 0]
    assert [o.correct_lenient for o in outcomes] == [1, 1, 1, 0]
    assert [o.formatted for o in outcomes] == [1, 1, 0, 0]
    assert [o.samples_correct for o in outcomes] == [3, 1, 0, 3]
    assert outcomes[1].predicted == "B. Gut" and outcomes[3].predicted == "A"
    s = summarize(outcomes, samples=3, ks=(1, 2, 3, 4))
    assert s["accuracy"]["value"] == 0.5 and s["accuracy_lenient"]["value"] == 0.75
    assert s["format_failure_rate"]["value"] == 0.5
    assert s["accuracy"]["ci95"] == list(metrics.wilson_interval(2, 4))
    assert s["by_question_type"]["relation"]["value"] == 0.5 and s["by_question_type"]["location"]["n"] == 2
    assert s["by_category"]["Gut"]["value"] == 0.0 and s["by_category"]["Liver"]["value"] == 1.0
    assert set(s["pass_at_k"]) == {"1", "2", "3"}  # k = 4 > n samples is not reported
    assert math.isclose(s["pass_at_k"]["1"], (1 + 1 / 3 + 0 + 1) / 4)
    assert math.isclose(s["pass_at_k"]["2"], (1 + 2 / 3 + 0 + 1) / 4)
    assert s["sample_accuracy"]["value"] == 7 / 12
    lenient = summarize(score(records, greedy, samples, accuracy="accuracy_lenient"))
    assert lenient["accuracy"]["value"] == 0.75


# ---- the evaluator on a mesh ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval")
    config = default_config()
    mesh8 = sharding.make_mesh([("data", -1)])
    assert mesh8.devices.size == 8
    setup = build_setup(config, str(workdir), mesh=mesh8)
    params, frozen = base_state(setup)
    paths = make_synthetic_dataset(workdir / "synthetic", n=40, seed=3, image_size=56)
    variant = config.data.prompt_variant  # as the sweep reads records
    records = [dataclasses.replace(r, prompt_variant=variant or r.prompt_variant)
               for r in read_records(paths["train"])[:11]]
    return {"config": config, "setup": setup, "params": params, "frozen": frozen, "records": records,
            "workdir": workdir}


def _evaluator(tiny, mesh, **settings):
    s = tiny["setup"]
    return Evaluator.from_config(tiny["config"], s.graphdef, s.model_cfg, s.tokenizer, s.image_processor, mesh, s.rules,
                                 EvalSettings(**settings))


def _reference_greedy(tiny, records, evaluator):
    """Greedy answers from `generate` on one unsharded batch holding exactly these records."""
    s = tiny["setup"]
    params, frozen = jax.device_get((tiny["params"], tiny["frozen"]))
    batch = evaluator.collator.prompts([[r] for r in records], [preprocess_images(r, s.image_processor) for r in records])
    from flax import nnx

    run = jax.jit(lambda p, f, b: generate(nnx.merge(s.graphdef, p, f), b, jax.random.key(0), evaluator.greedy_cfg))
    comp = run(params, frozen, batch)
    return decode_completions(s.tokenizer, np.asarray(comp.ids), np.asarray(comp.mask), evaluator.greedy_cfg.eos_ids)


def test_sharded_evaluation_equals_one_device_and_direct_generate(tiny):
    evaluator_lib._PROGRAMS.clear()  # count this test's compiles from zero
    records = tiny["records"]  # 11 questions: batches of 8, the last padded with 5 repeats
    ev8 = _evaluator(tiny, tiny["setup"].mesh, batch_size=8, samples=3, ks=(1, 3))
    greedy8, sampled8 = ev8.answer(tiny["params"], tiny["frozen"], records)
    assert ev8.traces == 2, "one compile for greedy and one for sampled, reused by both batches"
    compiled = ev8._compiled["greedy"]
    batch_sharding = compiled.input_shardings[0][2]  # (params, frozen, batch, rng) -> batch
    assert batch_sharding.input_ids.spec == P("data", None), "rows must be split over the data axis"

    mesh1 = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
    rules = tiny["setup"].rules
    params1, frozen1 = place_state(tiny["params"], mesh1, rules), place_state(tiny["frozen"], mesh1, rules)
    ev1 = _evaluator(tiny, mesh1, batch_size=8, samples=3, ks=(1, 3))
    greedy1, sampled1 = ev1.answer(params1, frozen1, records)
    assert greedy8 == greedy1 and sampled8 == sampled1
    assert len(greedy8) == 11 and [len(s) for s in sampled8] == [3] * 11
    assert len(set(greedy8)) > 1, "a degenerate model would hide mix-ups between rows"
    assert any(len(set(s)) > 1 for s in sampled8), "samples of a question should differ"

    # Rows are independent: each answer equals the answer in a batch of other neighbours and padding.
    assert _reference_greedy(tiny, records[:8], ev8) == greedy8[:8]
    assert _reference_greedy(tiny, records[8:] + records[:5], ev8)[:3] == greedy8[8:]

    r8 = ev8.evaluate(tiny["params"], tiny["frozen"], records)
    r1 = ev1.evaluate(params1, frozen1, records)
    assert ev8.traces == 2 and ev1.traces == 2, "evaluate reuses the compiled programs"
    for key in ("accuracy", "format_failure_rate", "pass_at_k", "by_category", "by_question_type", "records"):
        assert r8[key] == r1[key], key
    assert [r["text"] for r in r8["records"]] == greedy8
    assert r8["throughput"]["answers_per_second"] > 0 and r8["throughput"]["devices"] == 8


# ---- checkpoints and sweeps -------------------------------------------------------------------
def save_checkpoint(workdir, params, frozen, step, seed=0, scale=0.05):
    """A TrainState (params perturbed so the checkpoint differs from the base model) saved the way
    the trainer saves it; returns the perturbed (params, frozen)."""
    keys = iter(jax.random.split(jax.random.key(seed), 4096))
    perturb = lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype)  # noqa: E731
    params, frozen = jax.tree.map(perturb, params), jax.tree.map(perturb, frozen)
    tx = make_optimizer(1e-3)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, frozen=frozen,
                       ref_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(step, state, {"note": "test"})
    ckpt.close()
    return params, frozen


def test_sweep_writes_results_and_resumes(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, tiny["params"], tiny["frozen"], step=3)
    save_checkpoint(run, tiny["params"], tiny["frozen"], step=5, seed=1)
    ref = resolve_checkpoint(str(run))
    assert (ref.step, ref.name) == (5, "run-step5")
    assert resolve_checkpoint(f"early={run}/checkpoints/3").step == 3

    config, out = tiny["config"], tmp_path / "sweep"
    data_file = tmp_path / "few.json"  # OmniMedVQA's layout: category = modality
    data_file.write_text(json.dumps([
        {"question_id": f"omni-{i}", "question": r.question, "gt_answer": r.answer_text, "image_path": r.images[0],
         "modality_type": "Endoscopy", "question_type": "Anatomy Identification",
         **{f"option_{letter}": text for letter, text in zip("ABCD", r.options)}}
        for i, r in enumerate(tiny["records"][:3])]))
    checkpoints = ["base", str(run), f"early={run}/checkpoints/3"]
    datasets = ["synthetic:val", f"few={data_file}"]
    settings = EvalSettings(batch_size=8)
    results = sweep_lib.run_sweep(config, checkpoints, datasets, str(out), settings, limit=4,
                                  mesh=tiny["setup"].mesh, progress=False)
    assert [(r["model"], r["dataset"]) for r in results] == [
        (m, d) for m in ("base", "run-step5", "early") for d in ("synthetic-val", "few")]
    files = sorted(os.listdir(out / "results"))
    assert files == sorted(f"{m}__{d}.json" for m in ("base", "run-step5", "early") for d in ("synthetic-val", "few"))
    texts = {(r["model"], r["dataset"]): [x["text"] for x in r["records"]] for r in results}
    assert texts["base", "few"] != texts["run-step5", "few"] != texts["early", "few"], "checkpoints were not loaded"
    # The base model on the 3 file records answers as the evaluator does directly.
    direct = _evaluator(tiny, tiny["setup"].mesh, batch_size=8)
    assert texts["base", "few"] == direct.answer(tiny["params"], tiny["frozen"], tiny["records"][:3])[0]
    few = results[1]
    assert few["n"] == 3 and set(few["by_category"]) == {"Endoscopy"}
    assert set(few["by_question_type"]) == {"Anatomy Identification"}
    assert direct.traces == 0, "evaluators of the same shapes share the compiled program"
    assert (out / "summary.md").read_text().count("| base |") >= 3
    assert (out / "accuracy_by_category.png").stat().st_size > 0 and (out / "accuracy_by_checkpoint.png").exists()
    assert not [n for n in os.listdir(out / "results") if n.startswith(".tmp")]

    # Started again: nothing is evaluated; with one result removed, only that pair is.
    calls = []
    original = Evaluator.evaluate

    def counting(self, params, frozen, records, progress=False):
        calls.append(len(records))
        return original(self, params, frozen, records, progress)

    monkeypatch.setattr(Evaluator, "evaluate", counting)
    again = sweep_lib.run_sweep(config, checkpoints, datasets, str(out), settings, limit=4, mesh=tiny["setup"].mesh,
                                progress=False)
    assert calls == [] and [r["records"] for r in again] == [r["records"] for r in results]
    os.remove(out / "results" / "early__few.json")
    (out / "results" / "run-step5__synthetic-val.json").write_text('{"truncated": ')  # a torn file is redone
    sweep_lib.run_sweep(config, checkpoints, datasets, str(out), settings, limit=4, mesh=tiny["setup"].mesh,
                        progress=False)
    assert sorted(calls) == [3, 4]
    redone = json.loads((out / "results" / "early__few.json").read_text())
    assert [x["text"] for x in redone["records"]] == texts["early", "few"]


def test_mean_interval_is_students_t_over_runs():
    from anatomy_r1_jax.evaluation.metrics import mean_interval

    mean, half = mean_interval([0.1, 0.2, 0.3, 0.4, 0.5])  # sd 0.1581, t_{0.975, 4} = 2.7764
    assert mean == pytest.approx(0.3) and half == pytest.approx(2.7764451 * 0.15811388 / math.sqrt(5), rel=1e-6)
    assert math.isnan(mean_interval([0.3])[1])
