"""Throughput of the Grain query pipeline (data/pipeline.py) against the number of worker processes.

    .venv/bin/python scripts/bench_pipeline.py [--sizes 56 448] [--workers 0 1 2] [--queries 256]
        [--repeats 3]

Writes synthetic RGB-noise PNGs of each size, then for each worker count builds a QueryPipeline
(batch_size 8, Qwen2VLImageProcessorPil with min_pixels 56*56, max_pixels 448*448: a 56x56 image is
4x4 patches, 448x448 is 32x32), reads the first batch (worker start-up, reported on its own) and 6
more untimed (whatever was prefetched meanwhile), then times --repeats windows of --queries queries
(best and median reported: the machine may be shared). A "serial" row is the plain loop over
`preprocess_images` in this process, without Grain. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from anatomy_r1_jax.data.collate import preprocess_images  # noqa: E402
from anatomy_r1_jax.data.pipeline import QueryPipeline  # noqa: E402
from anatomy_r1_jax.data.records import Record  # noqa: E402

BATCH = 8
DRAIN = 6  # batches read untimed after the first one (more than the prefetch buffers hold)


def synthetic_records(folder: Path, size: int, count: int) -> list[Record]:
    rng = np.random.default_rng(size)
    records = []
    for i in range(count):
        path = folder / f"{size}_{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        records.append(Record(id=f"bench-{size}-{i}", images=(str(path),), question="Which organ?",
                              options=("Liver", "Gut"), answer="A", answer_text="Liver"))
    return records


def time_serial(records, processor, queries: int, repeats: int) -> tuple[float, list[float]]:
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(queries):
            preprocess_images(records[(r * queries + i) % len(records)], processor)
        rates.append(queries / (time.perf_counter() - start))
    return 0.0, rates


def time_pipeline(records, processor, workers: int, queries: int, repeats: int) -> tuple[float, list[float]]:
    """(seconds to the first batch, queries/s of each timed window after it)."""
    it = iter(QueryPipeline(records, batch_size=BATCH, image_processor=processor, workers=workers))
    start = time.perf_counter()
    next(it)
    startup = time.perf_counter() - start
    for _ in range(DRAIN):  # empty what was prefetched during start-up: time the steady state only
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(queries // BATCH):
            next(it)
        rates.append((queries // BATCH) * BATCH / (time.perf_counter() - start))
    it.close()
    return startup, rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 448])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--queries", type=int, default=256, help="timed queries per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per row (best and median shown)")
    parser.add_argument("--images", type=int, default=64, help="distinct image files per size")
    args = parser.parse_args()
    processor = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=448 * 448)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            records = synthetic_records(Path(tmp), size, args.images)
            grid = preprocess_images(records[0], processor).grid_thw[0].tolist()
            runs = [("serial", lambda: time_serial(records, processor, args.queries, args.repeats))]
            runs += [(str(w), lambda w=w: time_pipeline(records, processor, w, args.queries, args.repeats))
                     for w in args.workers]
            for name, run in runs:
                startup, rates = run()
                rows.append((size, grid, name, startup, max(rates), float(np.median(rates))))
                print(f"# {size}x{size} workers={name}: start-up {startup:.1f} s, queries/s "
                      f"{[round(r, 1) for r in rates]}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), load average "
          f"{load_before:.1f} before / {load_after:.1f} after; batch_size {BATCH}, {args.repeats} timed "
          f"windows of {args.queries} queries per row, 1 read thread per worker.\n")
    print("| image | grid_thw | workers | start-up to first batch (s) | queries/s best | queries/s median |")
    print("|---|---|---|---|---|---|")
    for size, grid, name, startup, best, median in rows:
        start = "-" if name == "serial" else f"{startup:.1f}"
        print(f"| {size}x{size} | {grid} | {name} | {start} | {best:.1f} | {median:.1f} |")


if __name__ == "__main__":  # worker processes are spawned: they re-import this file
    main()
