"""Tracing and lowering the GRPO update under Python's default garbage collector against
`runtime.programs.collect_garbage_less` (what train.py and evaluate.py call after their imports).

    python scripts/bench_tracing.py [--size tiny] [--reps 5]

Every start of a run pays jax's tracing and lowering of its programs (a warm restart loads the
compiled programs from the persistent cache, but still traces and lowers each). This times that
work alone for the trainer's GRPO update (train/compiled.py `Programs.update`, the paper's
settings, 8 queries x G 8, one image per prompt; no torch in the process, as in a user's run):
`jax.clear_caches()`, then `update.lower(...)`
(trace + lower to StableHLO, no XLA compile), the two collector settings interleaved in one
process (`gc.unfreeze()` and Python's default thresholds (700, 10, 10) restore the default).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from anatomy_r1_jax.models import QwenVL, QwenVLConfig  # noqa: E402
from anatomy_r1_jax.perf import report, workloads  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.runtime.programs import collect_garbage_less  # noqa: E402
from anatomy_r1_jax.train.step import step_configs  # noqa: E402
from configs.default import get_config  # noqa: E402
from configs.methods import paper_update  # noqa: E402

PYTHON_DEFAULT = (700, 10, 10)


def default_collector() -> None:
    gc.unfreeze()
    gc.set_threshold(*PYTHON_DEFAULT)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="perf/workloads.py size")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=160)
    p.add_argument("--completion-length", type=int, default=24)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    cfg = QwenVLConfig.from_hf(workloads.size_config(a.size))
    prompts, _ = workloads.image_prompts(cfg, queries=a.queries, group=a.group, prompt_length=a.prompt_length)
    comp = workloads.random_completions(cfg, a.queries * a.group, a.completion_length)
    run_config = paper_update(get_config(), group=a.group, length=a.completion_length, logp_chunk=32)
    update, state = workloads.one_device_update(QwenVL(cfg, rngs=nnx.Rngs(0)), step_configs(run_config)["grpo"],
                                                [tuple(r) for r in run_config.sharding_rules],
                                                lr=1e-5, grad_clip=1.0, b1=0.9, b2=0.99)
    batch = workloads.train_batch(prompts, comp)  # NumPy: lowering needs its shapes only

    def lower(collector):
        def run():
            collector()
            jax.clear_caches()  # trace again: jit keeps what it traced per function and shapes
            return update.lower(state, batch)
        return run

    settings = {"default": lower(default_collector), "collect_garbage_less": lower(collect_garbage_less)}
    times = time_interleaved(settings, reps=a.reps)
    default_collector()
    base = times["default"].median
    rows = [[name, f"{t.median:.2f}", f"{t.p10:.2f}-{t.p90:.2f}", f"{t.median / base:.2f}x"] for name, t in times.items()]
    print(f"{a.size}: trace + lower of the GRPO update ({a.queries} queries x G {a.group}, prompts {a.prompt_length}, "
          f"completions {a.completion_length}; {a.reps} interleaved reps; {report.cpu_model()}, jax {jax.__version__})")
    print(report.markdown_table(["garbage collector", "median s", "p10-p90 s", "vs default"], rows))
    return {name: t.median for name, t in times.items()}


if __name__ == "__main__":
    main()
