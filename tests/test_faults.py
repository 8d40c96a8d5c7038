"""Fault injection: whatever stops a run (kill -9, SIGTERM, a broken checkpoint, a full disk, an image
that vanishes, a NaN), nothing finished is lost and a resume ends where the uninterrupted run ends.

Faults are injected at exact points through the test-only ANATOMY_R1_FAULT variable
(anatomy_r1_jax/anatomy_r1_jax/faults.py); signals are real signals the process sends itself there. To keep
the suite short one run is stopped again and again, each time at the next point, and resumed, and
compared with the session's uninterrupted run of the same config (test_train_e2e.uninterrupted_run)."""

import json
import os
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from conftest import subprocess_env
from test_train_e2e import CACHE, ROOT, TIMING, TINY, seed_tokenizer, uninterrupted_run

from anatomy_r1_jax.train import preemption

# Only the last step (6) is a periodic checkpoint: every other one is the stop's own.
CHAIN = ["--config.train.checkpoint_every=100"]


def _start(workdir, *extra, fault=""):
    env = subprocess_env(devices=1, ANATOMY_R1_FAULT=fault)
    seed_tokenizer(workdir)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *TINY,
           f"--config.compilation_cache={CACHE}", *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc, returncode: int) -> str:
    _, err = proc.communicate(timeout=1500)  # a start takes 20-40 s, minutes on a machine shared by many jobs
    assert proc.returncode == returncode, f"exit {proc.returncode}, expected {returncode}:\n{err[-4000:]}"
    return err


def _run(workdir, *extra, fault="", returncode=0) -> str:
    return _finish(_start(workdir, *extra, fault=fault), returncode)


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _steps(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _arrays(workdir, step: int) -> dict:
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restored = checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                                    tree))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(restored)}


def _truncate_largest_array_file(step_dir: str) -> None:
    files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state")) for n in names
             if os.sep + "d" + os.sep in os.path.join(d, n)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


@pytest.mark.slow
def test_a_run_killed_and_stopped_in_every_phase_resumes_to_the_uninterrupted_run(tmp_path):
    """Steps 1-2 warm-up, 3-6 GRPO, evaluations at 2, 4, 6. One run, started seven times:
    kill -9 at start-up; SIGTERM in the warm-up, a second SIGTERM while its checkpoint is written;
    kill -9 at the switch to GRPO; SIGTERM at the switch; SIGTERM in an evaluation, then kill -9 in
    the middle of that stop's save; the latest checkpoint truncated and kill -9 in an evaluation;
    the last start runs to the end. Its metrics and final checkpoint equal the uninterrupted run's
    (the session's run of the same config, which saves a checkpoint every step: checkpoints alone
    change nothing either)."""
    workdir = str(tmp_path / "stopped")
    checkpoints = os.path.join(workdir, "checkpoints")

    _run(workdir, *CHAIN, fault="sigkill@start:0", returncode=-signal.SIGKILL)
    assert _steps(workdir) == []

    err = _run(workdir, *CHAIN, fault="sigterm@step:1,sigterm@save:1", returncode=preemption.EXIT_STOPPED)
    assert f"stopped by SIGTERM after step 1: checkpoint 1 saved in {checkpoints}; run the same command to resume" \
        in _last_line(err)
    assert _steps(workdir) == ["1"]

    _run(workdir, *CHAIN, fault="sigkill@grpo:2", returncode=-signal.SIGKILL)
    assert _steps(workdir) == ["1"]

    err = _run(workdir, *CHAIN, fault="sigterm@grpo:2", returncode=preemption.EXIT_STOPPED)
    assert "stopped by SIGTERM after step 3: checkpoint 3 saved" in _last_line(err)
    assert _steps(workdir) == ["1", "3"]

    _run(workdir, *CHAIN, fault="sigterm@eval:4,sigkill@save:4", returncode=-signal.SIGKILL)
    names = _steps(workdir)
    assert "4" not in names and any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names  # killed mid-save

    _truncate_largest_array_file(os.path.join(checkpoints, "3"))
    err = _run(workdir, *CHAIN, fault="sigkill@eval:4", returncode=-signal.SIGKILL)
    (line,) = [x for x in err.splitlines() if "cannot be restored" in x]
    assert "checkpoint 3 cannot be restored: " in line and f'at local file "{checkpoints}/3/state/"' in line
    assert line.endswith(f"set aside as {checkpoints}.unreadable/3")
    assert _steps(workdir) == ["1"] and os.listdir(f"{checkpoints}.unreadable") == ["3"]

    _run(workdir, *CHAIN)
    reference, _ = uninterrupted_run()  # (made meanwhile by the other xdist worker, or now)
    assert _metrics(workdir) == _metrics(reference)
    assert [r["step"] for r in _metrics(workdir)] == list(range(1, 7))
    final, expected = _arrays(workdir, 6), _arrays(reference, 6)
    assert final.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(final[key], expected[key], err_msg=key)


@pytest.mark.slow
def test_non_finite_updates_are_skipped_counted_and_stop_the_run_and_a_full_disk_stops_it(tmp_path):
    """NaN rewards at step 3: its update is skipped and counted, its checkpoint holds finite weights
    (the step 2 weights). The disk reports no space at checkpoint 4: one line naming the folder and
    the bytes, exit 1, checkpoints 2 and 3 intact, no temporary folder. Resumed with NaNs at steps
    5 and 6 and train.max_consecutive_errors=2: the run stops at step 6 in one line, checkpoint 5
    (a skipped update) finite."""
    workdir = str(tmp_path / "run")
    checkpoints = os.path.join(workdir, "checkpoints")
    every = ["--config.train.checkpoint_every=1", "--config.train.max_consecutive_errors=2"]
    err = _run(workdir, *every, fault="nan@update:3,nospace@save:4", returncode=1)
    line = _last_line(err)
    assert f"no space left for checkpoint 4 in {checkpoints}: it needs " in line and " bytes, 0 are free" in line
    needed = int(line.split("it needs ")[1].split(" bytes")[0])
    assert needed > sum(a.nbytes for a in _arrays(workdir, 3).values()) * 0.9
    assert _steps(workdir) == ["2", "3"]
    rows = {r["step"]: r for r in _metrics(workdir)}
    assert rows[3]["update_skipped"] == 1.0 and rows[3]["updates_skipped_total"] == 1.0
    assert rows[4]["update_skipped"] == 0.0 and rows[4]["updates_skipped_consecutive"] == 0.0
    after_warm_up, skipped = _arrays(workdir, 2), _arrays(workdir, 3)
    for key, value in skipped.items():
        assert np.isfinite(value).all(), key
        if key.startswith("['params']"):
            np.testing.assert_array_equal(value, after_warm_up[key], err_msg=key)

    err = _run(workdir, *every, fault="nan@update:5,nan@update:6", returncode=1)
    assert ("step 6: the last 2 updates had a non-finite loss or gradient and were skipped "
            "(train.max_consecutive_errors=2); the last checkpoint is step 5") in _last_line(err)
    rows = {r["step"]: r for r in _metrics(workdir)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [rows[s]["updates_skipped_consecutive"] for s in (4, 5, 6)] == [0.0, 1.0, 2.0]
    assert rows[6]["updates_skipped_total"] == 3.0  # since GRPO began: steps 3, 5 and 6
    assert _steps(workdir) == ["4", "5"]
    for key, value in _arrays(workdir, 5).items():
        assert np.isfinite(value).all(), key


# The tiny run's synthetic benchmark: 48 training records; the warm-up (seed + 1) reads 2 batches of
# 4, GRPO (seed 0, curriculum "none": a seeded shuffle) 4 batches of 2, in these orders.
TRAIN_RECORDS = 48


def _vanishing_record(grpo_step: int) -> int:
    """A record GRPO reads in its step `grpo_step` (0-based) and nowhere else in the run, nor in
    the pipelines' read-ahead."""
    from anatomy_r1_jax.data.pipeline import seeded_shuffle
    from anatomy_r1_jax.methods.curriculum import Curriculum, curriculum_order

    warm_up = seeded_shuffle(TRAIN_RECORDS, 1)(0)[:24]
    grpo = curriculum_order(np.zeros(TRAIN_RECORDS), None, Curriculum(schedule="none"), seed=0, epoch=0)
    elsewhere = set(warm_up) | set(grpo[:2 * grpo_step]) | set(grpo[2 * grpo_step + 2:24])
    return next(int(i) for i in grpo[2 * grpo_step:2 * grpo_step + 2] if i not in elsewhere)


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_an_image_that_vanishes_after_the_start_up_validation(tmp_path, on_error):
    """The image of a record GRPO reads at step 4 is deleted just before it is loaded. skip: the
    query is left out of step 4 (counted in data/unreadable_queries, one line naming the record and
    file) and the run finishes. raise: the run stops with that line and a checkpoint of step 3."""
    record = _vanishing_record(1)
    workdir = str(tmp_path / on_error)
    err = _run(workdir, f"--config.data.on_error={on_error}", "--config.train.checkpoint_every=100",
               fault=f"vanish@record:{record}", returncode=0 if on_error == "skip" else 1)
    with open(os.path.join(workdir, "data", "train.jsonl")) as f:
        lines = f.readlines()
    assert len(lines) == TRAIN_RECORDS
    path = os.path.join(workdir, "data", json.loads(lines[record])["images"][0])
    named = f"record 'synthetic-train-{record:06d}' (index {record}): image file not found: {path}"
    rows = _metrics(workdir)
    if on_error == "skip":
        assert [x for x in err.splitlines() if "image file not found" in x][0].endswith(
            f"{named}: left out of its step (data.on_error=skip)")
        assert [r["data/unreadable_queries"] for r in rows] == [0, 0, 0, 1, 0, 0]
        assert _steps(workdir) == ["6"]
    else:
        assert f"step 4: {named}; the last finished step 3 is checkpointed" in _last_line(err)
        assert [r["step"] for r in rows] == [1, 2, 3] and _steps(workdir) == ["3"]


def test_no_restorable_checkpoint_stops_with_exit_code_2(tmp_path):
    """The trainer's restore over real checkpoints: an emptied newest step and a missing metadata
    file are each named and set aside, the oldest good one restores; with none good the run stops
    with one line (exit code 2)."""
    from anatomy_r1_jax.train.checkpoint import Checkpointer
    from anatomy_r1_jax.train.state import RunState

    directory = str(tmp_path / "checkpoints")
    state = {"w": jax.numpy.arange(5000.0)}  # above OCDBT's inline size: its own data file
    ckpt = Checkpointer(directory, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": state["w"] * step}, {"step": step})
    ckpt.close()
    os.remove(os.path.join(directory, "2", "meta", "metadata"))
    for name in os.listdir(os.path.join(directory, "3")):
        path = os.path.join(directory, "3", name)
        os.remove(path) if os.path.isfile(path) else __import__("shutil").rmtree(path)

    class Restoring:  # what RunState.restore uses of a run's state
        def __init__(self):
            self.run, self.train = types.SimpleNamespace(ckpt=Checkpointer(directory, keep=3)), state

        def _restore(self, step):
            self.train, meta = self.run.ckpt.restore(step, state)
            assert meta == {"step": step}
            return step

    trainer = Restoring()
    assert RunState.restore(trainer) == 1
    np.testing.assert_array_equal(trainer.train["w"], state["w"])
    assert sorted(os.listdir(f"{directory}.unreadable")) == ["2", "3"]
    trainer.run.ckpt.close()

    _truncate_largest_array_file(os.path.join(directory, "1"))
    trainer = Restoring()
    with pytest.raises(preemption.RunStopped) as stop:
        RunState.restore(trainer)
    assert stop.value.exit_code == preemption.EXIT_NO_CHECKPOINT == 2
    assert str(stop.value) == (f"{directory}: none of the checkpoints [1] restores (each moved to {directory}"
                               f".unreadable/); running the same command again starts from step 0")
    assert sorted(os.listdir(f"{directory}.unreadable")) == ["1", "2", "3"] and os.listdir(directory) == []
    trainer.run.ckpt.close()


def test_a_query_whose_image_was_unreadable_is_masked_out_of_its_step_and_counted():
    """StepCollector._leave_out_unreadable zeroes exactly the completion rows of the groups whose query's
    image could not be read (row p * G + j of a micro-batch the j-th rollout of its query p; the
    collector hands it the flags of the micro-batch's own queries, in the length plan's order), and
    Trainer._unreadable_count counts them."""
    from anatomy_r1_jax.data.batch import Completions
    from anatomy_r1_jax.runtime.distributed import DataShard
    from anatomy_r1_jax.train.collector import StepCollector
    from anatomy_r1_jax.train.trainer import Trainer

    g, local = 2, 2
    ones = np.ones((local * g, 3), np.int32)
    completions = Completions(ids=ones, mask=ones, logps=ones * 0.0, lengths=ones.sum(-1))

    class Stepping:  # what the two methods use of a collector and a trainer
        group_size, shard = g, DataShard()
        run_parts = types.SimpleNamespace(shard=shard)
        it = type("Iterator", (), {"unreadable": np.array([False, False, False, True])})()

    kept = StepCollector._leave_out_unreadable(Stepping(), completions, np.array([False, False]))
    np.testing.assert_array_equal(kept.mask, np.ones((4, 3)))
    left = StepCollector._leave_out_unreadable(Stepping(), completions, np.array([False, True]))
    np.testing.assert_array_equal(left.mask[:, 0], [1, 1, 0, 0])  # its second query: rows 2, 3
    assert Trainer._unreadable_count(Stepping(), Stepping.it) == 1.0
