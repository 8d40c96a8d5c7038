"""Metrics of the training shell: the update's metrics as logged rows, and their sinks (JSON lines,
TensorBoard, PNG curves)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Iterable

import numpy as np


log = logging.getLogger(__name__)

CURVES = ("reward/total", "reward/format", "reward/accuracy", "eval/accuracy", "invalid_gradient_ratio", "sq_mean",
          "kl", "clip_fraction", "entropy", "completion_length", "loss", "tokens_per_second")

UPDATE_METRICS = ("loss", "kl", "clip_fraction", "entropy", "grad_norm", "invalid_gradient_ratio", "update_skipped",
                  "updates_skipped_total", "updates_skipped_consecutive")


def update_metrics(metrics: dict, category_index: dict[str, int]) -> dict[str, float]:
    """A GRPO update's metrics (host values of train/step.py's dict) -> logged scalars: UPDATE_METRICS
    and the invalid-gradient ratio of each anatomy class that had groups in the step,
    `invalid_gradient_ratio/<class>` = invalid_groups_by_category[c] / groups_by_category[c]."""
    out = {k: float(metrics[k]) for k in UPDATE_METRICS}
    bad, total = metrics["invalid_groups_by_category"], metrics["groups_by_category"]
    for name, j in category_index.items():
        if total[j] > 0:
            out[f"invalid_gradient_ratio/{name}"] = float(bad[j] / total[j])
    return out


def _scalar(v):
    v = np.asarray(v)
    return float(v) if v.ndim == 0 else None


class MetricsWriter:
    """Appends one JSON object per logged step (train.log_every) to `{workdir}/metrics.jsonl` and mirrors scalars to
    TensorBoard. On resume, lines of steps after the restored checkpoint are dropped so the file
    equals that of an uninterrupted run."""

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            keep = [r for r in read_metrics(self.path) if resume_step is not None and r["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        """One row: the step, the wall-clock time it was written (Unix seconds: start-up and
        throughput over time need no outside clock) and the scalar metrics."""
        row = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            s = _scalar(v) if not isinstance(v, (float, int)) else float(v)
            if s is not None:
                row[k] = s
                if math.isfinite(s):
                    self.tb.add_scalar(k, s, step)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(rows: list[dict], out_path: str, keys: Iterable[str], title: str = "",
                bands: dict[str, tuple[str, str]] | None = None) -> str:
    """One subplot per metric key against step; saved as PNG. bands: {key: (low key, high key)}
    shades an interval around a key's curve (e.g. eval/accuracy's 95% interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return out_path
    cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.0 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        lo, hi = (bands or {}).get(key, (None, None))
        band = [(r["step"], r[lo], r[hi]) for r in rows if lo in r and hi in r]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], alpha=0.25,
                            label="95% interval")
            ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    # Fixed margins in inches (tight_layout measures every tick label: half the time of a 12-panel plot)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.55 / width, right=1 - 0.15 / width, bottom=0.45 / height,
                        top=1 - (0.7 if title else 0.35) / height, wspace=0.3, hspace=0.6)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def report_run(path: str, workdir: str, warm_up: int) -> list[dict]:
    """The run's rows (metrics.jsonl at `path`), its GRPO curves in workdir/curves.png (from the
    step GRPO starts, `warm_up`), and its last line: the held-out accuracy with the paired gain."""
    rows = read_metrics(path)
    grpo = [row for row in rows if row.get("phase") == 1.0 or row["step"] == warm_up]
    plot_curves(grpo if len(grpo) > 1 else rows, os.path.join(workdir, "curves.png"),
                CURVES, title="GRPO", bands={"eval/accuracy": ("eval/accuracy_lo", "eval/accuracy_hi")})
    final = [row for row in rows if "eval/accuracy" in row]
    if final and "eval/gain" in final[-1]:
        f = final[-1]
        log.info("held-out accuracy %.3f -> %.3f (%d questions): gain %+.3f +- %.3f (95%% CI, paired)",
                 f["eval/accuracy_start"], f["eval/accuracy_start"] + f["eval/gain"], f["eval/gain_n"],
                 f["eval/gain"], f["eval/gain_ci95"])
    elif final:
        log.info("final held-out accuracy %.3f (step %d)", final[-1]["eval/accuracy"], final[-1]["step"])
    return rows
