"""The ASC / GDQA ablation on the synthetic benchmark: the arms of configs/methods.py x seeds.

    python scripts/ablation.py --out runs/ablation --seeds 0,1,2 [--set train.steps=60 ...]

The arms differ only after the supervised warm-up, so each seed's warm-up runs once
(`train.py --config.train.steps=0`) and every arm continues from a copy of it with
`train.py --config configs/synthetic.py:method=ARM` (a stopped sweep resumes: finished runs are
skipped, interrupted ones resume from their checkpoints). Writes
docs/results/ablation.md (final held-out accuracy mean +- std, area under the reward curve,
invalid-gradient ratio) and plots in the style of the paper's figures: reward and S(q) against
steps, and the invalid-gradient ratio per anatomy class at the start and end, GRPO against GDQA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

import numpy as np  # noqa: E402

from anatomy_r1_jax.evaluation.metrics import mean_interval  # noqa: E402
from anatomy_r1_jax.train.metrics import read_metrics  # noqa: E402
from configs.methods import ARMS as METHOD_ARMS  # noqa: E402

ARMS = tuple(METHOD_ARMS)  # every arm of configs/methods.py (the one table of arms)
READINGS = "<!-- readings: kept when the report is written again -->"  # what follows it survives a new report


def _train(workdir: str, arm: str, seed: int, overrides: list[str]) -> None:
    done = os.path.join(workdir, "DONE")
    if os.path.exists(done):
        return
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/synthetic.py:method={arm}",
           f"--workdir={workdir}", f"--config.seed={seed}", *[f"--config.{o}" for o in overrides]]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    open(done, "w").close()


def arm_mismatch(workdir: str, arm: str) -> list[str]:
    """The fields of ARMS[arm] that the run in `workdir` (its config.json) trained with other values:
    a run folder named by an arm that has since changed (asc_seedN and anatomy_r1_seedN made before
    issue 23 are the staged arms, now asc_staged and anatomy_r1_staged). A field the run's config
    lacks (older runs) counts as its configs/default.py value. [] when there is no config.json of a run
    of that arm yet."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    from configs import default

    with open(path) as f:
        trained = json.load(f)
    if trained.get("method") != arm:  # the warm-up's config, copied before the arm's run wrote its own
        return []
    defaults = default.get_config().to_dict()
    wrong = []
    for dotted, want in METHOD_ARMS[arm].items():
        have, fallback = trained, defaults
        for part in dotted.split("."):
            have = have.get(part, None) if isinstance(have, dict) else None
            fallback = fallback.get(part) if isinstance(fallback, dict) else None
        have = fallback if have is None else have
        if have != want:
            wrong.append(f"{dotted}={have!r} (arm {arm}: {want!r})")
    return wrong


def check_arm(workdir: str, arm: str) -> None:
    """Stops with one line when the run folder of `arm` holds a run of another setting."""
    wrong = arm_mismatch(workdir, arm)
    if wrong:
        raise SystemExit(f"{workdir} was trained with {', '.join(wrong)}: not the arm {arm} of configs/methods.py; "
                         f"rename the folder after the arm it is (e.g. asc_seed0 -> asc_staged_seed0) or remove it")


def run_arm(arm: str, seed: int, out: str, overrides: list[str]) -> str:
    warmup = os.path.join(out, f"warmup_seed{seed}")
    _train(warmup, "grpo", seed, [*overrides, "train.steps=0"])
    workdir = os.path.join(out, f"{arm}_seed{seed}")
    check_arm(workdir, arm)
    if not os.path.exists(workdir):
        shutil.copytree(warmup, workdir, ignore=shutil.ignore_patterns("DONE", "tensorboard"))
    _train(workdir, arm, seed, overrides)
    return workdir


def finished_seeds(out: str, seeds: list[int], arms: list[str]) -> list[int]:
    """The seeds whose every arm has run to its end (a DONE marker in `{arm}_seed{seed}`)."""
    return [s for s in seeds if all(os.path.exists(os.path.join(out, f"{arm}_seed{s}", "DONE")) for arm in arms)]


def grpo_rows(workdir: str) -> list[dict]:
    return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r.get("phase") == 1.0]


def summarize(runs: dict[str, list[str]]) -> tuple[str, dict]:
    """Per arm and seed: the warm-up's and the final held-out accuracy (the run's paired gain over its
    warm-up), reward AUC, invalid-gradient ratio, GDQA-triggered share and re-rolled groups; per arm
    the paired per-seed difference of final accuracy against grpo (same warm-up and data per seed)."""
    stats = {}
    for arm, dirs in runs.items():
        s = {k: [] for k in ("warmup_accuracy", "final_accuracy", "gain", "gain_ci95", "reward_auc",
                             "invalid_gradient_ratio", "accuracy_invalid_ratio", "gdqa_triggered", "rerolled_groups",
                             "rescued_groups", "seconds")}
        for d in dirs:
            rows = grpo_rows(d)
            evals = [r for r in read_metrics(os.path.join(d, "metrics.jsonl")) if "eval/accuracy" in r]
            s["warmup_accuracy"].append(evals[0]["eval/accuracy"])  # the shared warm-up's last evaluation
            s["final_accuracy"].append(evals[-1]["eval/accuracy"])
            s["gain"].append(evals[-1].get("eval/gain", np.nan))
            s["gain_ci95"].append(evals[-1].get("eval/gain_ci95", np.nan))
            s["reward_auc"].append(float(np.mean([r["reward/total"] for r in rows])))
            s["invalid_gradient_ratio"].append(float(np.mean([r["invalid_gradient_ratio"] for r in rows])))
            # groups with all-equal accuracy (logged since issue 23; NaN for runs made before)
            s["accuracy_invalid_ratio"].append(float(np.mean([r.get("accuracy_invalid_ratio", np.nan) for r in rows])))
            s["gdqa_triggered"].append(float(np.mean([r.get("gdqa_triggered", 0.0) for r in rows])))
            s["rerolled_groups"].append(float(np.sum([r.get("gdqa/rerolled_groups", 0.0)
                                                      + r.get("dynamic_sampling/rerolled_groups", 0.0) for r in rows])))
            s["rescued_groups"].append(float(np.sum([r.get("gdqa/rescued_groups", 0.0)
                                                     + r.get("dynamic_sampling/rescued_groups", 0.0) for r in rows])))
            s["seconds"].append(float(rows[-1]["time"] - rows[0]["time"]) if "time" in rows[0] else np.nan)
        stats[arm] = s
    if "grpo" in stats:
        base = np.array(stats["grpo"]["final_accuracy"])
        for arm, s in stats.items():
            if arm != "grpo" and len(s["final_accuracy"]) == len(base):
                s["vs_grpo"] = list(np.array(s["final_accuracy"]) - base)
    f = lambda xs: "{:.3f} ± {:.3f}".format(*mean_interval(xs)) if len(xs) > 1 else f"{xs[0]:.3f}"  # noqa: E731
    lines = ["| arm | seeds | accuracy after warm-up | final accuracy | gain over warm-up | final minus grpo "
             "(paired by seed) | reward AUC | invalid-gradient ratio | accuracy-only invalid ratio | GDQA-triggered | "
             "re-rolled groups | rescued groups | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in stats.items():
        vs = f(s["vs_grpo"]) if "vs_grpo" in s else "-"
        lines.append(f"| {arm} | {len(s['final_accuracy'])} | {f(s['warmup_accuracy'])} | {f(s['final_accuracy'])} | "
                     f"{f(s['gain'])} | {vs} | {f(s['reward_auc'])} | {f(s['invalid_gradient_ratio'])} | "
                     f"{f(s['accuracy_invalid_ratio'])} | {f(s['gdqa_triggered'])} | "
                     f"{np.mean(s['rerolled_groups']):.0f} | {np.mean(s['rescued_groups']):.0f} | "
                     f"{np.mean(s['seconds']):.0f} |")
    lines.append("")
    lines.append("Values: mean over seeds ± the 95% half-width of that mean (t with seeds - 1 degrees of freedom; "
                 "one seed: its value alone). "
                 "\"final minus grpo\" pairs each seed's arm with that seed's grpo run (same warm-up, data and eval "
                 "questions). Held-out accuracy is greedy on the whole validation split.")
    return "\n".join(lines), stats


def per_seed_table(stats: dict, seeds: list[int]) -> str:
    """Seed by seed: the warm-up's held-out accuracy, each arm's gain over it (± the run's paired 95%
    interval over the questions) and its final accuracy minus grpo's on the same seed."""
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| arm | {head} |", "|---|" + "---|" * len(seeds),
             "| warm-up accuracy | " + " | ".join(f"{x:.3f}" for x in next(iter(stats.values()))["warmup_accuracy"]) + " |"]
    for arm, s in stats.items():
        cells = []
        for i, (gain, ci) in enumerate(zip(s["gain"], s["gain_ci95"])):
            vs = f"; {s['vs_grpo'][i]:+.3f} vs grpo" if "vs_grpo" in s else ""
            cells.append(f"{gain:+.3f} ± {ci:.3f}{vs}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Per seed: gain of the final held-out accuracy over the warm-up's (± its paired 95% interval over "
                 "the validation questions) and, after the semicolon, the final accuracy minus that seed's grpo run.")
    return "\n".join(lines)


def _mean_curve(dirs: list[str], key: str) -> tuple[np.ndarray, np.ndarray]:
    curves = [[(r["step"], r[key]) for r in grpo_rows(d) if key in r] for d in dirs]
    n = min(len(c) for c in curves)
    steps = np.array([p[0] for p in curves[0][:n]])
    return steps - steps[0] + 1, np.mean([[p[1] for p in c[:n]] for c in curves], axis=0)


def plot(runs: dict[str, list[str]], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, dirs in runs.items():
        for ax, key in zip(axes, ("reward/total", "sq_mean")):
            steps, curve = _mean_curve(dirs, key)
            ax.plot(steps, curve, label=arm)
            ax.set_title(key)
            ax.set_xlabel("GRPO step")
    axes[0].legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ablation_reward_sq.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.6))
    classes = sorted({k.split("/", 1)[1] for d in runs["grpo"] for r in grpo_rows(d) for k in r
                      if k.startswith("invalid_gradient_ratio/")})
    arms = [a for a in ("grpo", "gdqa", "gdqa_online", "gdqa_accuracy", "gdqa_accuracy_original") if a in runs]
    width = 0.8 / (2 * len(arms))
    for i, arm in enumerate(arms):
        for j, (phase, sl) in enumerate((("start", slice(0, 10)), ("end", slice(-10, None)))):
            vals = []
            for cls in classes:
                key = f"invalid_gradient_ratio/{cls}"
                vals.append(np.nanmean([np.mean([r[key] for r in grpo_rows(d)[sl] if key in r] or [np.nan])
                                        for d in runs[arm]]))
            ax.bar(np.arange(len(classes)) + (2 * i + j - len(arms) + 0.5) * width, vals, width, label=f"{arm} {phase}")
    ax.set_xticks(np.arange(len(classes)), classes, rotation=15, fontsize=8)
    ax.set_ylabel("invalid-gradient ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ablation_invalid_by_class.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. train.steps=60")
    p.add_argument("--report", default=os.path.join(ROOT, "docs", "results"))
    p.add_argument("--summarize", action="store_true",
                   help="train nothing: report the seeds of --seeds whose every arm has finished (a sweep still running)")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    unknown = sorted(set(a.arms.split(",")) - set(ARMS))
    if unknown:
        p.error(f"--arms: unknown {unknown}; the arms of configs/methods.py are {','.join(ARMS)}")
    arms = a.arms.split(",")
    if a.summarize:
        seeds = finished_seeds(a.out, seeds, arms)
        if not seeds:
            p.error(f"--summarize: no seed has finished every arm under {a.out}")
        print(f"summarizing seeds {seeds} (every arm finished)", flush=True)
    if a.summarize:
        for seed in seeds:
            for arm in arms:
                check_arm(os.path.join(a.out, f"{arm}_seed{seed}"), arm)
    runs = {arm: [] for arm in arms}
    for seed in seeds:  # seed by seed: a stopped sweep has complete, paired seeds
        for arm in arms:
            runs[arm].append(os.path.join(a.out, f"{arm}_seed{seed}") if a.summarize else run_arm(arm, seed, a.out, a.set))
    table, stats = summarize(runs)
    os.makedirs(a.report, exist_ok=True)
    plots = plot(runs, a.report) if "grpo" in runs and "gdqa" in runs else []
    with open(os.path.join(a.report, "ablation.json"), "w") as f:
        json.dump(stats, f, indent=1)
    cmd = "python scripts/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = os.path.join(a.report, "ablation.md")
    readings = ""  # what people wrote below READINGS survives a new report
    if os.path.exists(report):
        with open(report) as f:
            text = f.read()
        readings = text[text.index(READINGS):] if READINGS in text else ""
    with open(report, "w") as f:
        f.write(f"# ASC / GDQA ablation on the synthetic benchmark\n\nCommand: `{cmd}` (seeds {seeds})\n\n{table}\n\n"
                f"{per_seed_table(stats, seeds)}\n\n")
        f.writelines(f"![{os.path.basename(pth)}]({os.path.basename(pth)})\n" for pth in plots)
        f.write("\n" + (readings or READINGS + "\n"))
    print(table)


if __name__ == "__main__":
    main()
