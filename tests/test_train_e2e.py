"""train.py end to end on a minute-sized config, and kill -9 / resume equality.

The uninterrupted run of the tiny config (`uninterrupted`) is made once per session and read by the
tests that compare with it (here and test_faults.py); every run uses the session's compilation
cache and starts from the session's tiny tokenizer (a fresh workdir would train the same BPE again)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import RUN_CACHE, shared_run, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.sft.steps=2", "--config.train.steps=4", "--config.train.batch_size=2", "--config.rl.group_size=2",
        "--config.sft.batch_size=4", "--config.train.eval_every=2", "--config.train.checkpoint_every=1",
        "--config.data.eval_size=4", "--config.data.synthetic.n=60", "--config.rl.max_completion_length=32",
        "--config.model.tiny.hidden_size=32", "--config.model.tiny.intermediate_size=64",
        "--config.model.tiny.num_hidden_layers=1", "--config.gdqa.trigger=off"]
LORA = ["--config.model.lora.rank=16", "--config.train.keep_checkpoints=6"]
# One compilation cache for the session's runs: a restart (and every later run) loads its programs.
CACHE = RUN_CACHE
TIMING = ("step_seconds", "tokens_per_second", "time")


def tiny_tokenizer() -> str:
    """The tiny BPE tokenizer a run makes in workdir/tokenizer (configs/default.py's vocab size), made
    once per session."""
    def make(folder):
        from anatomy_r1_jax.data.tokenizer import build_tiny_tokenizer
        from configs.default import get_config

        build_tiny_tokenizer(folder, vocab_size=get_config().tokenizer.vocab_size)

    return shared_run("tiny_tokenizer", make)


def seed_tokenizer(workdir) -> None:
    """A new workdir starts with the session's tiny tokenizer (train.py reuses workdir/tokenizer, as
    on a restart) instead of training it again."""
    if not os.path.exists(os.path.join(workdir, "tokenizer")):
        shutil.copytree(tiny_tokenizer(), os.path.join(workdir, "tokenizer"), ignore=shutil.ignore_patterns(".made"))


def _train(workdir, *extra, wait=True, check=True, cache=CACHE, tokenizer=True):
    env = subprocess_env(devices=1)
    if tokenizer:
        seed_tokenizer(workdir)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *TINY,
           f"--config.compilation_cache={cache}", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 or not check, out.stderr[-4000:]
    return out


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def uninterrupted_run() -> tuple[str, str]:
    """The tiny config's uninterrupted run (made once per session from a bare workdir: it trains its
    own tokenizer) and its stderr. Read it, never write into it."""
    def make(folder):
        out = _train(os.path.join(folder, "run"), tokenizer=False)
        with open(os.path.join(folder, "stderr.txt"), "w") as f:
            f.write(out.stderr)

    folder = shared_run("tiny_uninterrupted", make)
    with open(os.path.join(folder, "stderr.txt")) as f:
        return os.path.join(folder, "run"), f.read()


@pytest.fixture
def uninterrupted() -> tuple[str, str]:
    return uninterrupted_run()


def test_train_writes_metrics_plots_and_checkpoints(uninterrupted):
    """The uninterrupted run: metrics of every step, plots, checkpoints, evaluations paired with the
    warm-up's last, the final held-out line, compiled programs kept for a restart."""
    uninterrupted, stderr = uninterrupted
    rows = _metrics(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, 7))
    with open(os.path.join(uninterrupted, "metrics.jsonl")) as f:
        times = [json.loads(line)["time"] for line in f]
    assert times == sorted(times) and times[-1] - times[0] < 600  # wall-clock seconds
    grpo = [r for r in rows if r["phase"] == 1.0]
    for key in ("reward/total", "reward/format", "reward/accuracy", "invalid_gradient_ratio", "sq_mean", "kl",
                "clip_fraction", "completion_length", "entropy", "loss"):
        assert all(key in r for r in grpo), key
    assert any("eval/accuracy" in r for r in grpo)
    # No GDQA variants: every step runs one prompt row per group (prefix sharing).
    assert [r["prompts_per_group"] for r in grpo] == [1.0] * 4
    # Every GRPO evaluation is paired with the warm-up's last (step 2); the final line reports it.
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and "eval/gain" not in evals[0]
    for r in evals[1:]:
        assert r["eval/accuracy_start"] == evals[0]["eval/accuracy"] and r["eval/gain_n"] == 4
        assert abs(r["eval/gain"] - (r["eval/accuracy"] - evals[0]["eval/accuracy"])) < 1e-9
    end = evals[-1]
    assert (f"held-out accuracy {evals[0]['eval/accuracy']:.3f} -> {end['eval/accuracy']:.3f} (4 questions): gain "
            f"{end['eval/gain']:+.3f} +- {end['eval/gain_ci95']:.3f} (95% CI, paired)") in stderr
    assert os.path.exists(os.path.join(uninterrupted, "curves.png"))
    assert os.listdir(os.path.join(uninterrupted, "tensorboard"))
    assert "6" in os.listdir(os.path.join(uninterrupted, "checkpoints"))
    assert [n for n in os.listdir(CACHE) if n.endswith("-cache")]  # compiled programs kept for a restart


@pytest.mark.slow
def test_train_writes_metrics_plots_checkpoints_and_resumes_after_sigkill(tmp_path, uninterrupted):
    """The uninterrupted run (its metrics, plots and checkpoints: test_train_writes_metrics_plots_and_checkpoints),
    then the same run killed with SIGKILL after its 3rd checkpoint and restarted: the metrics equal the
    uninterrupted run's. (The uninterrupted run is made once per session for every test that compares
    with it.) The killed run has a compilation cache of its own, a copy of the session's that holds
    the uninterrupted run's programs, whose entries it cuts in half before the restart."""
    uninterrupted, _ = uninterrupted
    cache = str(tmp_path / "xla_cache")
    shutil.copytree(CACHE, cache, ignore=shutil.ignore_patterns("*.lock", ".lockfile"))
    assert [n for n in os.listdir(cache) if n.endswith("-cache")]  # compiled programs kept for a restart
    _kill_and_resume(tmp_path, uninterrupted, f"--config.compilation_cache={cache}", truncate_cache=cache)


@pytest.mark.slow
def test_lora_run_resumes_after_sigkill(tmp_path):
    """The same with LoRA adapters (rank 16) and an adapter warm-up: checkpoints of the warm-up hold
    the adapters alone and name the base model; after the warm-up is folded into the base weights
    they hold those too."""
    uninterrupted = str(tmp_path / "full")
    _train(uninterrupted, *LORA, "--config.model.lora.warmup=adapters")
    rows = _metrics(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for step, base_saved in ((2, False), (3, True)):
        with open(os.path.join(uninterrupted, "checkpoints", str(step), "meta", "metadata")) as f:
            assert json.load(f)["lora"] == {"base": "tiny qwen2_vl model made from seed 0", "base_saved": base_saved}
    # Killed after the warm-up's last checkpoint (adapters alone): the restart folds them after restoring.
    _kill_and_resume(tmp_path, uninterrupted, *LORA, "--config.model.lora.warmup=adapters", after=(2,))


@pytest.mark.slow
def test_lora_run_with_a_full_warm_up_resumes_after_sigkill_in_either_phase(tmp_path):
    """LoRA (rank 16) with the default full warm-up: warm-up checkpoints hold the whole model; GRPO
    checkpoints hold the adapters and name the warm-up's last checkpoint (step 2) as their base, which
    is kept although only the latest 2 are. Killed in the warm-up (after checkpoint 1), restarted,
    killed in GRPO (after checkpoint 4), restarted: the metrics equal the uninterrupted run's."""
    lora = ["--config.model.lora.rank=16", "--config.train.keep_checkpoints=2"]
    uninterrupted = str(tmp_path / "full")
    _train(uninterrupted, *lora)
    assert [r["step"] for r in _metrics(uninterrupted)] == list(range(1, 7))
    checkpoints = os.path.join(uninterrupted, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["2", "5", "6"]
    expected = {2: {"base": "tiny qwen2_vl model made from seed 0", "base_saved": True},
                6: {"base": os.path.join(checkpoints, "2"), "base_saved": False, "base_step": 2}}
    for step, meta in expected.items():
        with open(os.path.join(checkpoints, str(step), "meta", "metadata")) as f:
            assert json.load(f)["lora"] == meta
    sizes = {step: sum(os.path.getsize(os.path.join(d, n)) for d, _, names in
                       os.walk(os.path.join(checkpoints, step, "state")) for n in names) for step in ("2", "6")}
    assert sizes["6"] * 3 < sizes["2"], sizes  # adapters + their moments, no base weights
    _kill_and_resume(tmp_path, uninterrupted, *lora, after=(1, 4))


def _kill_and_resume(tmp_path, uninterrupted: str, *extra, after: tuple[int, ...] = (3,), truncate_cache: str = ""):
    """The run of `uninterrupted`, killed with SIGKILL once its checkpoint after[0] is complete and
    restarted, (killed again once after[1] is, ...), ends with the same metrics. truncate_cache: the
    run's compilation-cache folder, whose every program is cut in half before the final restart (as a kill during a cache write
    leaves one), which must only cost a recompilation."""
    # The later steps of this tiny model take about a second, so under load the run may finish before
    # the kill lands: then start over in a fresh workdir.
    for attempt in range(3):
        workdir = str(tmp_path / f"killed{attempt}")
        for step in after:
            proc = _train(workdir, *extra, wait=False)
            ckpt = os.path.join(workdir, "checkpoints", str(step))
            deadline = time.time() + 500
            while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-4000:]
            if proc.returncode != -signal.SIGKILL or len(_metrics(workdir)) >= 6:
                break
        else:
            break
    else:
        raise AssertionError("the run finished before it could be killed, three times")
    if truncate_cache:  # the folder of the cache the run uses (given in `extra`)
        for name in os.listdir(truncate_cache):
            with open(os.path.join(truncate_cache, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)
    _train(workdir, *extra)
    assert _metrics(workdir) == _metrics(uninterrupted)


@pytest.mark.slow
def test_rl_beta_may_change_between_the_warm_up_and_grpo_but_not_within_grpo(tmp_path):
    """The warm-up holds no KL reference copy (GRPO makes it from the policy it starts from), so GRPO
    may continue a warm-up with any rl.beta; a GRPO checkpoint holds the reference exactly when
    rl.beta != 0, and resuming it with the other kind of beta stops in one line naming rl.beta."""
    workdir = str(tmp_path / "run")

    def saved(step):
        state = os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA")
        with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f, open(state) as g:
            return json.load(f)["kl_reference"], any(k.startswith("('ref_params', ") for k in json.load(g)["tree_metadata"])

    _train(workdir, "--config.train.steps=0")  # the warm-up alone, at the default rl.beta 0.04
    assert saved(2) == (False, False)
    _train(workdir, "--config.train.steps=2", "--config.rl.beta=0")
    assert [r["step"] for r in _metrics(workdir)] == [1, 2, 3, 4] and saved(4) == (False, False)
    out = _train(workdir, "--config.train.steps=4", "--config.rl.beta=0.04", check=False)
    assert out.returncode != 0
    assert "GRPO checkpoint 4 was saved without a KL reference policy (rl.beta == 0) and this run has " \
           "rl.beta=0.04" in out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_gdqa_auto_calibration_marks_the_upcoming_queries(tmp_path):
    """An untrained model earns no reward, so the calibration pass finds every upcoming group
    all-equal; GRPO then triggers GDQA on every query of its first steps, which also shows the
    data iterator was rewound to the queries that were calibrated."""
    workdir = str(tmp_path / "calibrated")
    _train_with(workdir, sft_steps=0, train_steps=2, calibration="auto")
    rows = _metrics(workdir)
    assert rows[0]["gdqa/calibration_hard"] == 1.0 and "gdqa/calibration_hard" not in rows[1]
    assert [r["gdqa_triggered"] for r in rows] == [1.0, 1.0]
    assert [r["prompts_per_group"] for r in rows] == [2.0, 2.0]  # G = 2 different variants per group


@pytest.mark.slow
def test_gdqa_calibration_file_applies_when_grpo_resumes_from_a_warm_up(tmp_path):
    """The ablation's path: GRPO continues from a warm-up checkpoint and takes its calibration from
    an evaluate.py result (here: every sample of every training query wrong, so all are hard) and
    triggers GDQA on them; the restored checkpoint's empty history must not erase the calibration."""
    workdir = str(tmp_path / "from_warmup")
    _train_with(workdir, sft_steps=1, train_steps=0, calibration="")
    result = {"settings": {"samples": 4},
              "records": [{"id": f"synthetic-train-{i:06d}", "samples_correct": 0} for i in range(48)]}
    path = tmp_path / "base_on_train.json"
    path.write_text(json.dumps(result))
    _train_with(workdir, sft_steps=1, train_steps=2, calibration=str(path), group_size=4, num_variants=2)
    rows = _metrics(workdir)
    assert rows[1]["gdqa/calibration_hard"] == 1.0
    assert [r["gdqa_triggered"] for r in rows[1:]] == [1.0, 1.0]
    # Rollout j of a group gets variant j % 2: two prompt rows per group of four (prefix sharing).
    assert [r["prompts_per_group"] for r in rows[1:]] == [2.0, 2.0]


def _train_with(workdir, *, sft_steps, train_steps, calibration, group_size=2, num_variants=4):
    _train(workdir, f"--config.sft.steps={sft_steps}", f"--config.train.steps={train_steps}",
           "--config.gdqa.trigger=adaptive", f"--config.gdqa.calibration={calibration}",
           f"--config.rl.group_size={group_size}", f"--config.gdqa.num_variants={num_variants}")  # later flags win


@pytest.mark.slow
def test_held_out_accuracy_equals_evaluate_py(tmp_path):
    """One evaluation path: a warm-up that learns the answer format (a constant structure name,
    lenient accuracy about 1/6, strict accuracy 0) logs the held-out accuracy scripts/evaluate.py
    gives its checkpoint, question by question (the warm-up's per-question correctness, where GRPO
    would start, is kept in the checkpoint)."""
    workdir = str(tmp_path / "run")
    warm = {"--config.sft.steps": "60", "--config.sft.lr": "1e-2", "--config.sft.batch_size": "8",
            "--config.train.steps": "0", "--config.train.checkpoint_every": "60", "--config.data.eval_size": "0",
            "--config.data.synthetic.n": "200"}
    _train(workdir, *[f"{k}={v}" for k, v in warm.items()])
    start = [r for r in _metrics(workdir) if "eval/accuracy" in r][-1]
    assert start["step"] == 60 and start["eval/n"] == 20 and start["eval/format"] == 1.0
    assert 0.0 < start["eval/accuracy"] < 1.0  # a non-trivial answer set to compare
    assert start["eval/accuracy_lo"] < start["eval/accuracy"] < start["eval/accuracy_hi"]

    env = subprocess_env(devices=1)
    out_dir = str(tmp_path / "eval")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), f"--checkpoints={workdir}",
           "--datasets=synthetic:val", f"--out={out_dir}", f"--config.compilation_cache={CACHE}"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    (name,) = os.listdir(os.path.join(out_dir, "results"))
    with open(os.path.join(out_dir, "results", name)) as f:
        result = json.load(f)
    assert result["accuracy"]["value"] == start["eval/accuracy"]
    assert result["format_failure_rate"]["value"] == 1.0 - start["eval/format"]
    with open(os.path.join(workdir, "checkpoints", "60", "meta", "metadata")) as f:
        kept = json.load(f)["eval_start"]
    assert kept["step"] == 60 and kept["correct"] == {r["id"]: r["correct"] for r in result["records"]}

