"""scripts/ablation.py --summarize: a sweep still running is reported on its finished seeds only, paired
per seed against grpo (no training; the run folders are written here)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import ablation  # noqa: E402


def _fake_run(path: str, warmup_acc: float, final_acc: float, done: bool) -> None:
    os.makedirs(path)
    rows = [{"step": 1, "eval/accuracy": warmup_acc}]
    rows += [{"step": s, "phase": 1.0, "time": float(s), "reward/total": 1.0, "sq_mean": 0.3,
              "invalid_gradient_ratio": 0.5, "invalid_gradient_ratio/liver": 0.5} for s in range(2, 12)]
    rows.append({"step": 11, "eval/accuracy": final_acc, "eval/gain": final_acc - warmup_acc, "eval/gain_ci95": 0.01})
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if done:
        open(os.path.join(path, "DONE"), "w").close()


def test_summarize_reports_finished_seeds_paired_against_grpo(tmp_path):
    out, report = tmp_path / "sweep", tmp_path / "report"
    arms = ["grpo", "gdqa"]
    for seed, (g, d) in enumerate([(0.30, 0.40), (0.20, 0.25), (0.9, 0.9)]):
        _fake_run(str(out / f"grpo_seed{seed}"), 0.1, g, done=True)
        _fake_run(str(out / f"gdqa_seed{seed}"), 0.1, d, done=seed < 2)  # seed 2 still running
    assert ablation.finished_seeds(str(out), [0, 1, 2], arms) == [0, 1]

    summarize = ["--summarize", "--out", str(out), "--seeds", "0,1,2", "--arms", ",".join(arms),
                 "--report", str(report)]
    ablation.main(summarize)  # in this process: the command line without a Python start
    stats = json.loads((report / "ablation.json").read_text())
    assert stats["grpo"]["final_accuracy"] == [0.30, 0.20]  # seed 2 left out: its gdqa run has not finished
    assert [round(x, 6) for x in stats["gdqa"]["vs_grpo"]] == [0.10, 0.05]
    text = (report / "ablation.md").read_text()
    assert "| gdqa | 2 |" in text and "seeds [0, 1]" in text
    assert "| arm | seed 0 | seed 1 |\n" in text and "| warm-up accuracy | 0.100 | 0.100 |" in text
    assert "| gdqa | +0.300 ± 0.010; +0.100 vs grpo | +0.150 ± 0.010; +0.050 vs grpo |" in text
    assert (report / "ablation_reward_sq.png").exists()

    # Readings written below the marker survive the next report (seed 2 finished meanwhile).
    (report / "ablation.md").write_text(text + "GDQA helps on seed 0.\n")
    open(out / "gdqa_seed2" / "DONE", "w").close()
    ablation.main(summarize)
    text = (report / "ablation.md").read_text()
    assert "| gdqa | 3 |" in text and text.endswith(ablation.READINGS + "\nGDQA helps on seed 0.\n")


def test_summarize_with_no_finished_seed_fails_in_one_line(tmp_path, capsys):
    _fake_run(str(tmp_path / "grpo_seed0"), 0.1, 0.2, done=False)
    with pytest.raises(SystemExit) as stop:
        ablation.main(["--summarize", "--out", str(tmp_path), "--seeds", "0", "--arms", "grpo", "--report",
                       str(tmp_path / "r")])
    assert stop.value.code == 2 and "no seed has finished every arm" in capsys.readouterr().err


def test_a_run_folder_of_an_arm_that_changed_is_refused(tmp_path):
    """asc_seed0 made before issue 23 trained the staged curriculum: it is not the arm asc any more."""
    run = tmp_path / "asc_seed0"
    _fake_run(str(run), 0.1, 0.2, done=True)
    (run / "config.json").write_text(json.dumps({"method": "asc", "curriculum": {"schedule": "staged"}}))
    assert ablation.arm_mismatch(str(run), "asc") == ["curriculum.schedule='staged' (arm asc: 'competence')"]
    _fake_run(str(tmp_path / "grpo_seed0"), 0.1, 0.2, done=True)
    with pytest.raises(SystemExit) as stop:  # one line, exit code 1 (SystemExit with a message)
        ablation.main(["--summarize", "--out", str(tmp_path), "--seeds", "0", "--arms", "grpo,asc", "--report",
                       str(tmp_path / "r")])
    assert "not the arm asc of configs/methods.py" in str(stop.value.code)
    (run / "config.json").write_text(json.dumps({"method": "asc_staged", "curriculum": {"schedule": "staged"}}))
    assert ablation.arm_mismatch(str(run), "asc_staged") == []  # the fields it lacks: configs/default.py's
