#!/usr/bin/env python
"""Write the synthetic anatomy VQA benchmark: <out>/{train,val,test}.jsonl, images/, class_similarity.json.

    python scripts/make_synthetic_data.py --out data/synthetic --n 1200 --seed 0 [--image-size 84]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

from anatomy_r1_jax.data.synthetic import make_synthetic_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=1200, help="records in all splits together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=84, help="multiple of 28: 84 -> 3x3 cells, 56 -> 2x2")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the folder holds this dataset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    paths = make_synthetic_dataset(args.out, n=args.n, seed=args.seed, image_size=args.image_size,
                                   overwrite=args.overwrite)
    meta = json.loads((Path(args.out) / "meta.json").read_text())
    for split, path in paths.items():
        info = meta["splits"][split]
        print(f"{split:5s} {info['records']:6d} records  {path}  question types {info['question_types']}  "
              f"S(q) quantiles {info['similarity_quantiles']}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
