#!/usr/bin/env python
"""Build the tiny Qwen2-VL tokenizer folder and print its special token ids.

    python scripts/make_tokenizer.py --out runs/tokenizer [--vocab-size 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

from anatomy_r1_jax.data.tokenizer import build_tiny_tokenizer, load_processor, special_token_ids  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vocab-size", type=int, default=1024, help="upper bound on len(tokenizer)")
    args = parser.parse_args(argv)
    path = build_tiny_tokenizer(args.out, vocab_size=args.vocab_size)
    for name, value in special_token_ids(load_processor(path).tokenizer).items():
        print(f"{name:22s} {value}")
    print(f"saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
