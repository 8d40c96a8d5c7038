"""Time of the start-up validation pass (data/validation.py `find_problems`) on 100k records.

    .venv/bin/python scripts/bench_validation.py [--records 100000] [--files 200 5000] [--repeats 2]

Cases, each over --records records with GDQA variants of all kinds ("rephrase", "permute",
"template", as configs/ssg_vqa.py), the project's tiny tokenizer, and
`Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=1296*14*14)` (a real checkpoint's minimum,
the maximum sized to a 1296-patch budget, so 854x480 frames are resized to fit):
- "released": the paper's three released files (3000 records, their own templates and SSG-VQA
  questions) replicated with fresh ids, images spread round-robin over --files distinct 854x480 PNGs.
- "distinct questions": the same, each question made unique (a number appended), so that no piece
  is shared and every question takes the generic rewordings: the worst case for tokenization.
Also timed alone: reading the headers of --files distinct files (what a cold image cache costs).
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
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

from anatomy_r1_jax.data.readers import read_records  # noqa: E402
from anatomy_r1_jax.data.tokenizer import build_tiny_tokenizer  # noqa: E402
from anatomy_r1_jax.data.validation import find_problems, image_info  # noqa: E402
from anatomy_r1_jax.methods.augmentation import KINDS  # noqa: E402

RELEASED = Path(__file__).resolve().parents[2] / "shared" / "data" / "anatomy_r1"
FRAME = (480, 854)  # CholecT45 frames: height, width


def write_frames(folder: Path, count: int) -> list[str]:
    """count distinct files holding one 854x480 PNG (a smooth frame: small files, same header reads)."""
    rows, cols = np.mgrid[0:FRAME[0], 0:FRAME[1]]
    pixels = np.stack([rows % 256, cols % 256, (rows + cols) % 256], axis=-1).astype(np.uint8)
    first = folder / "000000.png"
    Image.fromarray(pixels).save(first)
    paths = [str(first)]
    for i in range(1, count):
        paths.append(str(folder / f"{i:06d}.png"))
        shutil.copyfile(first, paths[-1])
    return paths


def replicate(records, n: int, images: list[str], distinct_questions: bool):
    out = []
    for i in range(n):
        r = records[i % len(records)]
        question = f"{r.question} {i}" if distinct_questions else r.question
        out.append(dataclasses.replace(r, id=f"bench-{i}", images=(images[i % len(images)],), question=question))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--files", type=int, nargs="+", default=[200, 5000], help="distinct image files per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row (best shown)")
    args = parser.parse_args()
    released = [r for name in ("GRPO.json", "GRPO-ASC-Learning.json", "GRPO-GDQA.json")
                for r in read_records(RELEASED / name)]
    processor = transformers.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=1296 * 14 * 14)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = transformers.AutoTokenizer.from_pretrained(build_tiny_tokenizer(Path(tmp) / "tok"))
        frames = write_frames(Path(tmp), max(args.files))
        patches = image_info(frames[0], processor).patches
        for files in args.files:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for path in frames[:files]:
                    image_info(path, processor)
                times.append(time.perf_counter() - start)
            rows.append((f"headers only, {files} files", files, min(times), 0))
            for name, distinct in (("released", False), ("distinct questions", True)):
                records = replicate(released, args.records, frames[:files], distinct)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    problems = find_problems(records, tokenizer=tokenizer, image_processor=processor,
                                             prompt_length=1024, patches_per_query=1296, gdqa_kinds=KINDS)
                    times.append(time.perf_counter() - start)
                rows.append((f"{name}, {len(records)} records", files, min(times), len(problems)))
                print(f"# {rows[-1]}: {[round(t, 1) for t in times]}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), load average "
          f"{load_before:.1f} before / {load_after:.1f} after; {FRAME[1]}x{FRAME[0]} PNG frames ({patches} patches "
          f"each after the resize); GDQA kinds {list(KINDS)}; best of {args.repeats}.\n")
    print("| case | distinct image files | seconds | problems found |")
    print("|---|---|---|---|")
    for name, files, seconds, found in rows:
        print(f"| {name} | {files} | {seconds:.1f} | {found} |")


if __name__ == "__main__":
    main()
