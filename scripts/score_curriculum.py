"""Score every record's option similarity S(q) once, for the ASC curriculum.

    python scripts/score_curriculum.py --data shared/data/anatomy_r1/GRPO.json \
        --backend matrix --matrix class_similarity.json --out runs/scores.json

Backends: "matrix" (--matrix FILE: {"classes": [...], "matrix": [[...]]}) and "confusion"
(--rollouts FILE: JSONL of {"id": record id, "prediction": letter or null} from a calibration pass
of the base model, or the result JSON of `scripts/evaluate.py` for the base model on these records;
the derived matrix is also written to --save-matrix when given). The
"embedding" backend needs the policy LM's embedding table and runs inside the trainer
(anatomy_r1_jax.methods.similarity.token_embedder). The output is score_records' cache file:
{"fingerprint": ..., "scores": {record id: S(q)}}; existing scores with the same fingerprint are kept.

What a curriculum will do with a records file, before training (the table of docs/methods.md):

    python scripts/score_curriculum.py --table --data GRPO.json GRPO-ASC-Learning.json GRPO-GDQA.json

For each file, similarity backend (the synthetic benchmark's class matrix, or --matrix FILE; and the
tiny default model's own token embeddings, seeds --embedding-seeds) and question score (S(q),
S_sym): R^2 of the score on the answer class, and for the "staged" and "competence" schedules (a real
run's batch of --batch-size, one epoch, windows of --window-steps steps) the largest and smallest
class share over the windows, the share of the largest class in each window, and the odd-one-out
rule's and the best single-class rule's best window against their whole-file scores, and the
Spearman correlation of the batch S(q) with the step (methods/curriculum_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

import numpy as np  # noqa: E402

from anatomy_r1_jax.data import read_records  # noqa: E402
from anatomy_r1_jax.methods.curriculum import Curriculum, curriculum_order, stage_slices  # noqa: E402
from anatomy_r1_jax.methods.curriculum_check import check_order  # noqa: E402
from anatomy_r1_jax.methods.similarity import (ClassSimilarity, answer_classes, make_similarity,  # noqa: E402
                                               score_records, scores_array)


def read_rollouts(path: str) -> list[dict]:
    """[{"id", "prediction"}] from a JSONL of such rows, or from the JSON result that
    `scripts/evaluate.py` writes (each record's greedy `predicted` letter)."""
    with open(path) as f:
        text = f.read()
    try:
        result = json.loads(text)
    except json.JSONDecodeError:
        result = None
    if isinstance(result, dict) and "records" in result:
        return [{"id": r["id"], "prediction": r["predicted"]} for r in result["records"]]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _backend(args, records):
    if args.backend == "matrix":
        if not args.matrix:
            raise SystemExit("--backend matrix needs --matrix FILE")
        return make_similarity("matrix", matrix=args.matrix), f"matrix:{os.path.abspath(args.matrix)}"
    if args.backend == "confusion":
        if not args.rollouts:
            raise SystemExit("--backend confusion needs --rollouts FILE")
        by_id = {r.id: r for r in records}
        rows = read_rollouts(args.rollouts)
        unknown = sorted({row["id"] for row in rows} - set(by_id))
        if unknown:
            raise SystemExit(f"{len(unknown)} rollout ids are not in --data, e.g. {unknown[:3]}")
        sim = make_similarity("confusion", rollouts=[(by_id[row["id"]], row.get("prediction")) for row in rows])
        if args.save_matrix:
            sim.save(args.save_matrix, note=f"confusion similarity from {args.rollouts}")
        return sim, f"confusion:{os.path.abspath(args.rollouts)}"
    raise SystemExit(f"backend {args.backend!r} is not available from the command line")


def _table_backends(args) -> list[tuple[str, object]]:
    """(name, similarity) for --table: the class matrix, then the tiny model's embeddings per seed."""
    if args.matrix:
        out = [(f"matrix {os.path.basename(args.matrix)}", make_similarity("matrix", matrix=args.matrix))]
    else:
        from anatomy_r1_jax.data.synthetic import CLASS_SIMILARITY, CLASSES

        out = [("matrix (synthetic benchmark's)", ClassSimilarity(CLASSES, CLASS_SIMILARITY))]
    if args.embedding_seeds:
        import tempfile

        from anatomy_r1_jax.methods.similarity import token_embedder
        from anatomy_r1_jax.runtime import builders
        from configs import default

        workdir = tempfile.mkdtemp(prefix="score_curriculum_")
        for seed in (int(x) for x in args.embedding_seeds.split(",")):
            config = default.get_config()
            config.seed = seed
            tokenizer = builders.build_tokenizer(config, workdir)
            table = builders.build_model(config, tokenizer).language.embed_tokens.embedding[...]
            embed = token_embedder(table, lambda t, tok=tokenizer: tok(t, add_special_tokens=False)["input_ids"])
            out.append((f"embedding (tiny model, seed {seed})", make_similarity("embedding", embed=embed)))
    return out


def curriculum_table(args) -> str:
    """The markdown table of --table (see the module docstring)."""
    lines = ["| records | backend | score | R^2 on class | schedule | largest class share per window "
             "(max / min over windows) | smallest share (min) | odd-one-out: best window (all) | "
             "best single class: best window (all) | Spearman batch S(q) ~ step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    backends = _table_backends(args)
    for path in args.data:
        records = read_records(path, format=args.format)
        for name, sim in backends:
            for score in ("distractors", "symmetric"):
                for schedule in ("staged", "competence"):
                    cur = Curriculum(schedule=schedule, num_stages=args.stages, c0=args.c0, batch_size=args.batch_size,
                                     span=len(records))
                    check = check_order(records, sim, cur, score=score, window_steps=args.window_steps)
                    top = [f"{row.max():.2f} {check.classes[int(row.argmax())][:3]}" for row in check.shares]
                    lines.append(f"| {os.path.basename(path)} | {name} | {score} | {check.r2:.2f} | {schedule} | "
                                 f"{', '.join(top)} ({check.shares.max():.2f} / "
                                 f"{check.shares.max(axis=1).min():.2f}) | "
                                 f"{check.shares.min():.2f} | {check.odd_one_out.max():.2f} "
                                 f"({check.odd_one_out_all:.2f}) | {check.best_class.max():.2f} "
                                 f"({check.best_class_all:.2f}) | {check.spearman:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, nargs="+", help="records file(s) (any format read_records accepts; "
                        "several only with --table)")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--backend", default="matrix", choices=("matrix", "confusion"))
    parser.add_argument("--matrix", help="class-similarity JSON (backend matrix)")
    parser.add_argument("--rollouts", help="calibration predictions: JSONL or an evaluate.py result (backend confusion)")
    parser.add_argument("--save-matrix", help="where to write the confusion-derived matrix")
    parser.add_argument("--out", help="scores JSON (also the cache); required without --table")
    parser.add_argument("--stages", type=int, default=5, help="stages to summarise S(q) over (--table: of 'staged')")
    parser.add_argument("--table", action="store_true", help="print what the curricula do with each --data file")
    parser.add_argument("--embedding-seeds", default="0,1",
                        help="--table: tiny-model seeds of the embedding backend ('' for none)")
    parser.add_argument("--batch-size", type=int, default=8, help="--table: queries per step (REAL_MODEL's 8)")
    parser.add_argument("--window-steps", type=int, default=25, help="--table: steps per window")
    parser.add_argument("--c0", type=float, default=Curriculum.c0, help="--table: the competence schedule's c(0)")
    args = parser.parse_args(argv)
    if args.table:
        print(curriculum_table(args))
        return {}
    if not args.out or len(args.data) != 1:
        parser.error("give one --data file and --out (or --table)")
    args.data = args.data[0]

    records = read_records(args.data, format=args.format)
    backend, fingerprint = _backend(args, records)
    scores = score_records(records, backend, args.out, fingerprint=fingerprint)
    values = np.sort(np.array(list(scores.values())))
    print(f"{len(values)} records: S(q) mean {values.mean():.3f} min {values.min():.3f} max {values.max():.3f}")
    stage_means = [values[s].mean() for s in stage_slices(len(values), args.stages) if s.stop > s.start]
    print("staged curriculum, mean S(q) per stage:", " ".join(f"{m:.3f}" for m in stage_means))
    sq = scores_array(records, scores)
    classes, names = answer_classes(records)
    order = curriculum_order(sq, classes, Curriculum(schedule="staged", num_stages=args.stages), seed=0, epoch=0)
    for k, part in enumerate(stage_slices(len(order), args.stages)):
        shares = np.bincount(classes[order[part]], minlength=len(names)) / max(part.stop - part.start, 1)
        print(f"stage {k + 1} (seed 0, epoch 0):", ", ".join(f"{names[c]} {shares[c]:.0%}"
                                                            for c in np.argsort(-shares) if shares[c] > 0))
    return scores


if __name__ == "__main__":
    main()
