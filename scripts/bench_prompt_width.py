"""The rollout at the cut prompt width (rl.prompt_buckets) against the full data.prompt_length, side
by side in one process.

    python scripts/bench_prompt_width.py [--case small,4,8,256,64 ...] [--fill 0.65] [--buckets 4] [--reps 5]

A case is `size,queries,group,prompt_length,new_tokens` (sizes: anatomy_r1_jax.perf.workloads.SIZES);
its prompts (text + one image) take about `fill` of prompt_length and are left-padded to it, as a
real config's are (configs/ssg_vqa.py: ~710 of 1024 tokens). "full" decodes them at prompt_length,
"cut" at the smallest of `buckets` widths that holds the longest (what the trainer's rollout does);
both sample the same rows with the same key from one prompt row per group, exactly `new_tokens`
tokens each (EOS forbidden), and their greedy tokens are checked to agree. Timings are interleaved
(anatomy_r1_jax.perf.timing) after a warm-up call (the compile). Prints markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from anatomy_r1_jax.data.batch import prompt_width, trim_prompts  # noqa: E402
from anatomy_r1_jax.models import QwenVL, QwenVLConfig  # noqa: E402
from anatomy_r1_jax.perf import report, workloads  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.rl.rollout import generate  # noqa: E402
from anatomy_r1_jax.rl.sampling import SamplingConfig  # noqa: E402
from anatomy_r1_jax.train.micro_batches import bucket_lengths  # noqa: E402

DEFAULT_CASES = ["small,4,8,256,64"]


def padded_prompts(cfg: QwenVLConfig, case: workloads.Case, fill: float):
    """One prompt row per group, about `fill` of case.prompt_length long, left-padded to it."""
    real = int(case.prompt_length * fill)
    batch, _ = workloads.image_prompts(cfg, queries=case.queries, group=1, prompt_length=real)
    pad = case.prompt_length - real
    left = lambda x, axis: np.pad(x, [(pad, 0) if a == axis else (0, 0) for a in range(x.ndim)])  # noqa: E731
    return batch.replace(input_ids=left(batch.input_ids, 1), attention_mask=left(batch.attention_mask, 1),
                         position_ids=left(batch.position_ids, 2))


def run_case(case: workloads.Case, fill: float, buckets: int, reps: int) -> dict:
    cfg = QwenVLConfig.from_hf(workloads.size_config(case.size))
    graphdef, state = nnx.split(QwenVL(cfg, rngs=nnx.Rngs(0)))
    full = padded_prompts(cfg, case, fill)
    width = prompt_width(full.attention_mask, bucket_lengths(case.prompt_length, buckets))
    batches = {"full": full, "cut": trim_prompts(full, width)}
    placeholders = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)

    def program(new_tokens: int, greedy: bool = False):
        sc = SamplingConfig(max_new_tokens=new_tokens, temperature=0.9, top_k=50, top_p=0.9, greedy=greedy, eos_ids=(),
                            pad_id=0, forbidden_ids=placeholders + tuple(cfg.eos_token_ids))
        return jax.jit(lambda state, batch, rng: generate(nnx.merge(graphdef, state), batch, rng, sc,
                                                          group_size=case.group).ids)

    greedy = program(min(case.new_tokens, 16), greedy=True)
    agree = bool((np.asarray(greedy(state, jnp_tree(batches["full"]), jax.random.key(0)))
                  == np.asarray(greedy(state, jnp_tree(batches["cut"]), jax.random.key(0)))).all())
    fns = {}
    for name, batch in batches.items():
        placed = jnp_tree(batch)
        for label, fn in ((name, program(case.new_tokens)), (f"{name} prefill", program(1))):
            fns[label] = lambda fn=fn, placed=placed: np.asarray(fn(state, placed, jax.random.key(1)))
    timings = time_interleaved(fns, reps=reps, warmup=1)
    longest = int(full.attention_mask.sum(1).max())
    return dict(case=case, longest=longest, width=width, agree=agree, timings=timings)


def jnp_tree(batch):
    return jax.device_put(jax.tree.map(jnp.asarray, batch))


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        c, tm = r["case"], r["timings"]
        decode = {k: max(tm[k].median - tm[f"{k} prefill"].median, 1e-9) for k in ("full", "cut")}
        rows.append([c.size, f"{c.queries}x{c.group}={c.rows}", f"{r['longest']} / {c.prompt_length}", r["width"],
                     c.new_tokens, *(f"{tm[k].median:.3f} ({tm[k].p10:.3f}-{tm[k].p90:.3f})" for k in ("full", "cut")),
                     *(f"{tm[f'{k} prefill'].median:.3f}" for k in ("full", "cut")),
                     f"**{tm['full'].median / tm['cut'].median:.2f}x**", f"{decode['full'] / decode['cut']:.2f}x",
                     "yes" if r["agree"] else "NO"])
    return report.markdown_table(
        ["model", "rows (Q x G)", "longest prompt / budget", "cut width", "new tokens", "full s (p10-p90)",
         "cut s (p10-p90)", "full prefill s", "cut prefill s", "rollout speed-up", "decode speed-up",
         "greedy tokens agree"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="size,queries,group,prompt_length,new_tokens")
    parser.add_argument("--fill", type=float, default=0.65, help="prompt length / prompt_length")
    parser.add_argument("--buckets", type=int, default=4, help="rl.prompt_buckets")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    cases = [workloads.Case.parse(c) for c in (args.case or DEFAULT_CASES)]
    print(f"Machine: {report.machine_line()}\n")
    results = [run_case(c, args.fill, args.buckets, args.reps) for c in cases]
    print(f"Command: `{report.command_line()}`\n")
    print(f"fp32; sampling temperature 0.9, top-k 50, top-p 0.9; medians of {args.reps} interleaved runs; decode "
          f"speed-up: (whole rollout - 1-token rollout) full / cut.\n")
    print(table(results))
    print("\nLoad average at the end: {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
