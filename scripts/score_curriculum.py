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
from anatomy_r1_jax.methods.curriculum import stage_slices  # noqa: E402
from anatomy_r1_jax.methods.similarity import make_similarity, score_records  # noqa: E402


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


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="records file (any format read_records accepts)")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--backend", default="matrix", choices=("matrix", "confusion"))
    parser.add_argument("--matrix", help="class-similarity JSON (backend matrix)")
    parser.add_argument("--rollouts", help="calibration predictions: JSONL or an evaluate.py result (backend confusion)")
    parser.add_argument("--save-matrix", help="where to write the confusion-derived matrix")
    parser.add_argument("--out", required=True, help="scores JSON (also the cache)")
    parser.add_argument("--stages", type=int, default=5, help="stages to summarise S(q) over")
    args = parser.parse_args(argv)

    records = read_records(args.data, format=args.format)
    backend, fingerprint = _backend(args, records)
    scores = score_records(records, backend, args.out, fingerprint=fingerprint)
    values = np.sort(np.array(list(scores.values())))
    print(f"{len(values)} records: S(q) mean {values.mean():.3f} min {values.min():.3f} max {values.max():.3f}")
    stage_means = [values[s].mean() for s in stage_slices(len(values), args.stages) if s.stop > s.start]
    print("staged curriculum, mean S(q) per stage:", " ".join(f"{m:.3f}" for m in stage_means))
    return scores


if __name__ == "__main__":
    main()
