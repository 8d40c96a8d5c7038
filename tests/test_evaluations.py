"""Evaluations declared in the config (config.evals), their cadence, and their starts across a restart."""

import pytest

from anatomy_r1_jax.data.synthetic import make_synthetic_dataset
from anatomy_r1_jax.evaluation.heldout import itstime
from anatomy_r1_jax.train.trainer import Trainer
from configs import default


def test_itstime():
    assert [s for s in range(1, 10) if itstime(s, 3)] == [3, 6, 9]
    assert [s for s in range(1, 10) if itstime(s, 3, first=2)] == [5, 8]  # counted from step 2, not at it
    assert itstime(7, 3, last=True) and not itstime(7, 0) and itstime(7, 0, last=True)


def _config(workdir, extra_records):
    c = default.get_config()
    c.sft.update(steps=1, batch_size=4)
    c.train.update(steps=1, batch_size=4, eval_every=2, checkpoint_every=1)
    c.rl.update(group_size=4, max_completion_length=24)
    c.data.update(eval_size=4)
    c.data.synthetic.n = 60
    c.model.tiny.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    c.gdqa.update(trigger="off", calibration="")
    c.compilation_cache = ""
    c.evals.train_sample = dict(records=extra_records, every=1, limit=6)
    return c


@pytest.mark.slow  # two in-process runs (build, compile, evaluate twice)
def test_a_second_evaluation_runs_on_its_own_records_and_cadence_and_keeps_its_start_across_a_restart(tmp_path):
    """evals.train_sample (6 training records, every GRPO step) beside evals.heldout (data.eval, every
    2 GRPO steps): each logs its own metrics at its own steps, each paired against its own start (the
    warm-up's last step); a run resumed from step 2 keeps the second one's start (checkpoint meta)."""
    paths = make_synthetic_dataset(str(tmp_path / "data"), n=60, seed=0,
                                   image_size=default.get_config().data.synthetic.image_size)
    workdir = str(tmp_path / "run")
    first = Trainer(_config(workdir, paths["train"]), workdir).run()  # steps 1 (warm-up) and 2
    config = _config(workdir, paths["train"])
    config.train.steps = 2
    rows = first + Trainer(config, workdir).run()  # resumes after step 2, runs step 3
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [1, 2, 3]
    assert [s for s in (1, 2, 3) if "eval_train_sample/accuracy" in by_step[s]] == [1, 2, 3]
    assert [s for s in (1, 2, 3) if "eval/accuracy" in by_step[s]] == [1, 2, 3]  # warm-up end, last of each run
    assert all(by_step[s]["eval_train_sample/n"] == 6.0 for s in (1, 2, 3))
    assert by_step[1]["eval/n"] == 4.0 and "eval_train_sample/gain" not in by_step[1]
    # step 3 (the resumed run) is paired against the warm-up's evaluation, kept in checkpoint 2's meta
    assert by_step[3]["eval_train_sample/gain_n"] == 6.0
    assert by_step[3]["eval_train_sample/accuracy_start"] == pytest.approx(by_step[1]["eval_train_sample/accuracy"])
    assert by_step[3]["eval/accuracy_start"] == pytest.approx(by_step[1]["eval/accuracy"])
