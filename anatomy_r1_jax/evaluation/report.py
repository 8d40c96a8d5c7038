"""Sweep reports: a markdown summary and two PNG plots from the per-pair result dicts.

    summary.md                  accuracy (95% Wilson CI) per model x dataset; per dataset the
                                details (lenient accuracy, format failures, pass@k, answers/s)
                                and accuracy per category / question type
    accuracy_by_category.png    per dataset: bars per category, one per model, CI whiskers
    accuracy_by_checkpoint.png  accuracy with CI across the models in sweep order, one line per dataset
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def _pct(p: dict) -> str:
    if not p["n"]:
        return "-"
    lo, hi = p["ci95"]
    return f"{100 * p['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _order(results: Sequence[dict], key: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in results:
        seen.setdefault(r[key], None)
    return list(seen)


def _group_table(results: Sequence[dict], field: str, title: str) -> list[str]:
    models = _order(results, "model")
    groups = sorted({g for r in results for g in r[field]})
    if not groups:
        return []
    by_model = {r["model"]: r[field] for r in results}
    lines = [f"**{title}** (accuracy %, 95% CI, n)", "", "| " + " | ".join([title] + models) + " |",
             "|" + "---|" * (len(models) + 1)]
    for g in groups:
        cells = [f"{_pct(by_model[m][g])} (n={by_model[m][g]['n']})" if g in by_model.get(m, {}) else "-"
                 for m in models]
        lines.append("| " + " | ".join([g] + cells) + " |")
    return lines + [""]


def markdown_summary(results: Sequence[dict], failures: Sequence[tuple[str, str, str]] = ()) -> str:
    models, datasets = _order(results, "model"), _order(results, "dataset")
    cell = {(r["model"], r["dataset"]): r for r in results}
    lines = ["# Evaluation sweep", "", "Accuracy % (greedy, exact answer letter) with 95% Wilson interval.", "",
             "| model | " + " | ".join(datasets) + " |", "|" + "---|" * (len(datasets) + 1)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(_pct(cell[m, d]["accuracy"]) if (m, d) in cell else "-"
                                              for d in datasets) + " |")
    lines.append("")
    for d in datasets:
        rows = [cell[m, d] for m in models if (m, d) in cell]
        ks = sorted({k for r in rows for k in r.get("pass_at_k", {})}, key=int)
        lines += [f"## {d}", "",
                  "| model | n | accuracy % | lenient % | format failures % | " + "".join(f"pass@{k} % | " for k in ks)
                  + "answers/s |", "|" + "---|" * (5 + len(ks) + 1)]
        for r in rows:
            passes = "".join(f"{100 * r['pass_at_k'][k]:.1f} | " if k in r.get("pass_at_k", {}) else "- | " for k in ks)
            lines.append(f"| {r['model']} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['accuracy_lenient'])} | "
                         f"{_pct(r['format_failure_rate'])} | {passes}{r['throughput']['answers_per_second']:.2f} |")
        lines.append("")
        lines += _group_table(rows, "by_category", "category")
        lines += _group_table(rows, "by_question_type", "question type")
    if failures:
        lines += ["## Failed pairs", ""] + [f"- {m} on {d}: {e}" for m, d, e in failures] + [""]
    return "\n".join(lines)


def _errors(props: Sequence[dict]) -> np.ndarray:
    """[2, n] distances from each value down / up to its CI ends (matplotlib's yerr)."""
    v = np.array([p["value"] for p in props])
    lo, hi = np.array([p["ci95"][0] for p in props]), np.array([p["ci95"][1] for p in props])
    return np.clip(np.stack([v - lo, hi - v]), 0, None)


def plot_by_category(results: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets, models = _order(results, "dataset"), _order(results, "model")
    fig, axes = plt.subplots(len(datasets), 1, figsize=(max(6.0, 1.2 * 8), 3.2 * len(datasets)), squeeze=False)
    for ax, d in zip(axes[:, 0], datasets):
        rows = {r["model"]: r for r in results if r["dataset"] == d}
        cats = sorted({c for r in rows.values() for c in r["by_category"]}) or ["all"]
        width = 0.8 / max(len(rows), 1)
        x = np.arange(len(cats))
        for i, m in enumerate(m for m in models if m in rows):
            groups = rows[m]["by_category"] or {"all": rows[m]["accuracy"]}
            props = [groups.get(c, {"value": np.nan, "ci95": [np.nan, np.nan]}) for c in cats]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, [p["value"] for p in props], width,
                   yerr=_errors(props), capsize=2, label=m)
        ax.set_xticks(x, cats, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{d}: accuracy per category (95% CI)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_by_checkpoint(results: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _order(results, "model")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(models) + 2), 3.6))
    x = np.arange(len(models))
    for d in _order(results, "dataset"):
        rows = {r["model"]: r["accuracy"] for r in results if r["dataset"] == d}
        idx = [i for i, m in enumerate(models) if m in rows]
        props = [rows[models[i]] for i in idx]
        ax.errorbar(x[idx], [p["value"] for p in props], yerr=_errors(props), marker="o", capsize=3, label=d)
    ax.set_xticks(x, models, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy across checkpoints (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Sequence[dict], out_dir: str, failures: Sequence[tuple[str, str, str]] = ()) -> None:
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown_summary(results, failures))
    plot_by_category(results, os.path.join(out_dir, "accuracy_by_category.png"))
    plot_by_checkpoint(results, os.path.join(out_dir, "accuracy_by_checkpoint.png"))
