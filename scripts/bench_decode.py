"""Decode throughput of our jitted `generate`, before and after a change, side by side in one process.

    python scripts/bench_decode.py [--before f26debc] [--case small,2,8,256,128 ...] [--reps 5]

"Before" is the package at git revision `--before` (default: the commit this work started from),
extracted to a temporary folder and imported under another name; "after" is this checkout. Both
models come from the same config and seed (identical weights; the greedy tokens of both are
checked to agree), both sample N = queries * group rows from one prompt row per group (prefix
sharing, as the trainer runs steps without GDQA variants), exactly `new_tokens` tokens each (EOS
forbidden), each with its defaults as the trainer calls it (before: `Programs.rollout`'s float32
cache; after: the model's compute dtype, 4 read segments).

A case is `size,queries,group,prompt_length,new_tokens` (sizes: anatomy_r1_jax.perf.workloads.SIZES).
Decode tok/s = N * (T - 1) / (time of T new tokens - time of 1 new token): the prefill and image
encoding, the same in both, cancel. Timings are interleaved (anatomy_r1_jax.perf.timing) after a
warm-up call (the compile). Prints markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from anatomy_r1_jax.models import QwenVL, QwenVLConfig  # noqa: E402
from anatomy_r1_jax.perf import report, workloads  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.rl import rollout  # noqa: E402
from anatomy_r1_jax.rl.sampling import SamplingConfig  # noqa: E402

DEFAULT_BEFORE = "f26debc"
DEFAULT_CASES = ("small,2,8,256,128", "100m,2,8,256,128")
BEFORE = "anatomy_r1_jax_before"


def import_before(rev: str, workdir: str):
    """(QwenVL, generate) of the package at git revision `rev`, imported as `anatomy_r1_jax_before`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "anatomy_r1_jax"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", workdir], input=archive, check=True)
    package = pathlib.Path(workdir) / BEFORE
    (pathlib.Path(workdir) / "anatomy_r1_jax").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\banatomy_r1_jax\b", BEFORE, path.read_text()))
    sys.path.insert(0, workdir)
    return importlib.import_module(f"{BEFORE}.models").QwenVL, importlib.import_module(f"{BEFORE}.rl.rollout").generate


def sampler(cfg: QwenVLConfig, new_tokens: int, greedy: bool = False) -> SamplingConfig:
    placeholders = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    return SamplingConfig(max_new_tokens=new_tokens, temperature=0.9, top_k=50, top_p=0.9, greedy=greedy, eos_ids=(),
                          pad_id=0, forbidden_ids=placeholders + tuple(cfg.eos_token_ids))


def compiled(model, generate, batch, group: int, new_tokens: int, greedy: bool = False):
    """A zero-argument callable: the jitted generate of `model`, its token ids fetched to the host."""
    sc = sampler(model.config, new_tokens, greedy)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, batch, rng: generate(nnx.merge(graphdef, state), batch, rng, sc, group_size=group).ids)
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    return lambda: np.asarray(fn(state, batch, next(keys)))


def run_case(case: workloads.Case, before_cls, before_generate, reps: int) -> dict:
    cfg = QwenVLConfig.from_hf(workloads.size_config(case.size))
    models = {"before": before_cls(cfg, rngs=nnx.Rngs(0)), "after": QwenVL(cfg, rngs=nnx.Rngs(0))}
    generates = {"before": before_generate, "after": rollout.generate}
    shared, _, _ = workloads.case_prompts(cfg, case)
    batch = jax.device_put(jax.tree.map(jnp.asarray, shared))
    greedy = {k: compiled(models[k], generates[k], batch, case.group, min(case.new_tokens, 16), greedy=True)()
              for k in models}
    agree = bool((greedy["before"] == greedy["after"]).all())
    fns = {}
    for k in models:
        fns[k] = compiled(models[k], generates[k], batch, case.group, case.new_tokens)
        fns[f"{k} prefill"] = compiled(models[k], generates[k], batch, case.group, 1)
    timings = time_interleaved(fns, reps=reps, warmup=1)
    return dict(case=case, params=workloads.parameter_count(workloads.size_config(case.size)), agree=agree,
                timings=timings)


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        c, tm = r["case"], r["timings"]
        decode = {k: max(tm[k].median - tm[f"{k} prefill"].median, 1e-9) for k in ("before", "after")}
        tok_s = {k: c.rows * (c.new_tokens - 1) / decode[k] for k in decode}
        rows.append([c.size, f"{r['params'] / 1e6:.1f}M", f"{c.queries}x{c.group}={c.rows}", c.prompt_length,
                     c.new_tokens, *(f"{tm[k].median:.3f} ({tm[k].p10:.3f}-{tm[k].p90:.3f})" for k in ("before", "after")),
                     *(f"{tm[f'{k} prefill'].median:.3f}" for k in ("before", "after")),
                     f"{tok_s['before']:.0f}", f"{tok_s['after']:.0f}", f"**{tok_s['after'] / tok_s['before']:.2f}x**",
                     "yes" if r["agree"] else "NO"])
    return report.markdown_table(
        ["model", "params", "rows (Q x G)", "prompt len", "new tokens", "before s (p10-p90)", "after s (p10-p90)",
         "before prefill s", "after prefill s", "before decode tok/s", "after decode tok/s", "speed-up",
         "greedy tokens agree"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' package")
    parser.add_argument("--case", action="append", help="size,queries,group,prompt_length,new_tokens")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    cases = [workloads.Case.parse(c) for c in (args.case or DEFAULT_CASES)]
    print(f"Machine: {report.machine_line()}\n")
    with tempfile.TemporaryDirectory() as workdir:
        before_cls, before_generate = import_before(args.before, workdir)
        results = [run_case(c, before_cls, before_generate, args.reps) for c in cases]
    print(f"Command: `{report.command_line()}`\n")
    print(f"Before: {args.before}; after: this checkout. fp32; sampling temperature 0.9, top-k 50, top-p 0.9; medians "
          f"of {args.reps} interleaved runs; decode tok/s = rows x (new tokens - 1) / (whole rollout - 1-token "
          f"rollout).\n")
    print(table(results))
    print("\nLoad average at the end: {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
