"""The GRPO update's time when completions end early: the length-aware update against the padded one.

    python scripts/bench_update_lengths.py [--case tiny,8,8,160,256] [--micro-batches 2] [--buckets 4] [--reps 5]

A case is `size,queries,group,prompt_length,completion_length` (perf/workloads.py sizes; one prompt
row per group, prefix sharing, as the trainer runs steps without GDQA variants). One step's rows two
ways: every completion at the budget T ("all at T"), and every completion ending by T/4 (lengths
drawn in [T/8, T/4], one row exactly at T/4: "end by T/4"). Each is updated two ways, all four timed
interleaved (perf/timing.py) in one run:

- padded: `Programs.update` (train/step.py train_step) over the stacked [M, n, T] batch, groups in
  their order: what the trainer ran before the length-aware update (and runs with
  train.length_buckets=0); its cost does not depend on where completions end;
- length-aware: `Programs.length_aware_update` over the micro-batches train/micro_batches.py plans
  (groups sorted by their longest row, each micro-batch trimmed to its bucket length).

Both start from the same weights and optimizer state; the first update's losses of the two ways are
printed for each ending (the same update: the tests hold it to fp32 tolerance). The figure the issue
asks for is "length-aware, end by T/4" / "padded, all at T" (target <= 0.4).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from anatomy_r1_jax import sharding  # noqa: E402
from anatomy_r1_jax.models import QwenVL, QwenVLConfig  # noqa: E402
from anatomy_r1_jax.perf import report, workloads  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.data.batch import Completions, TrainBatch  # noqa: E402
from anatomy_r1_jax.train.compiled import Programs  # noqa: E402
from anatomy_r1_jax.train.micro_batches import bucket_lengths, plan_micro_batches, trimmed_completions  # noqa: E402
from anatomy_r1_jax.runtime.placement import put_batch, split_model  # noqa: E402
from anatomy_r1_jax.train.step import make_optimizer, step_configs  # noqa: E402
from configs.default import get_config  # noqa: E402
from configs.methods import paper_update  # noqa: E402

DEFAULT_CASE = "tiny,8,8,160,256"
RULES = [tuple(r) for r in get_config().sharding_rules]


def step_rows(cfg: QwenVLConfig, case: workloads.Case, shortest: int, last: int, seed: int = 0):
    """(prompts [Q rows], Completions [Q * G, T], rewards, categories): completion lengths in
    [shortest, last], the first row of every group exactly `last` long (so every micro-batch's
    bucket is that of `last`)."""
    rng = np.random.default_rng(seed)
    prompts, _ = workloads.image_prompts(cfg, queries=case.queries, group=1, prompt_length=case.prompt_length)
    n, t = case.rows, case.new_tokens
    lengths = rng.integers(shortest, last + 1, n)
    lengths[::case.group] = last
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(0, cfg.vocab_size - 16, (n, t)).astype(np.int32) * mask
    comp = Completions(ids=ids, mask=mask, logps=np.zeros((n, t), np.float32), lengths=lengths.astype(np.int32))
    return prompts, comp, rng.integers(0, 3, n).astype(np.float32), np.zeros(n, np.int32)


def micro_batch(cfg, rows, groups, length: int, group: int) -> TrainBatch:
    prompts, comp, rewards, cats = rows
    r = np.array([q * group + j for q in groups for j in range(group)])
    return TrainBatch(prompt=workloads.select_groups(cfg, prompts, groups), completions=trimmed_completions(comp, r, length),
                      rewards=rewards[r], categories=cats[r])


class Stepper:
    """One side: an update, its (donated) state and its placed batch; `__call__` runs one update."""

    def __init__(self, update, state, batch):
        self.update, self.state, self.batch = update, state, batch

    def __call__(self):
        self.state, metrics = self.update(self.state, self.batch)
        return metrics


def run_case(case: workloads.Case, micro_batches: int, buckets: int, reps: int):
    model_cfg = QwenVLConfig.from_hf(workloads.size_config(case.size))
    graphdef, params, frozen = split_model(QwenVL(model_cfg, rngs=nnx.Rngs(0)), freeze_vision=False)
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    programs = Programs.create(graphdef, mesh, RULES)
    tx = make_optimizer(1e-5, grad_clip=1.0, b2=0.99)
    t = case.new_tokens
    cfg = step_configs(paper_update(get_config(), group=case.group, length=t, logp_chunk=32))["grpo"]
    lengths = bucket_lengths(t, buckets)
    per = case.queries // micro_batches
    sides, plans = {}, {}
    for ending, shortest, last in (("all at T", t, t), ("end by T/4", max(1, t // 8), t // 4)):
        rows = step_rows(model_cfg, case, shortest, last)
        padded = jax.tree.map(lambda *xs: np.stack(xs), *[
            micro_batch(model_cfg, rows, range(m * per, (m + 1) * per), t, case.group) for m in range(micro_batches)])
        plan = plan_micro_batches(rows[1].lengths, case.group, micro_batches, lengths)
        trimmed = tuple(micro_batch(model_cfg, rows, g, n, case.group) for g, n in zip(plan.groups, plan.lengths))
        plans[ending] = plan
        for way in ("padded", "length-aware"):
            state = programs.init_state(tx, cfg.precision, jax.tree.map(jnp.copy, params), frozen, reference=True)
            if way == "padded":
                update, batch = programs.update(tx, cfg, state), put_batch(padded, mesh, RULES, micro_axis=True)
            else:
                update = programs.length_aware_update(tx, cfg, state, lengths)
                batch = tuple(put_batch(mb, mesh, RULES) for mb in trimmed)
            sides[f"{way}, {ending}"] = Stepper(update, state, batch)
    first = {name: float(side()["loss"]) for name, side in sides.items()}  # compiles; the first update's loss
    timings = time_interleaved(sides, reps=reps, warmup=0)
    base = timings["padded, all at T"].median
    table = report.markdown_table(
        ["update", "completion slots per micro-batch", "s per update (p10-p90)", "x padded all at T", "first loss"],
        [[name, ", ".join(str(n) for n in (plans[name.split(", ", 1)[1]].lengths if name.startswith("length")
                                           else (t,) * micro_batches)),
          f"{timings[name].median:.3f} ({timings[name].p10:.3f}-{timings[name].p90:.3f})",
          f"**{timings[name].median / base:.2f}x**", f"{first[name]:.6f}"] for name in sides])
    ratio = timings["length-aware, end by T/4"].median / base
    return table, ratio


def main(argv=None):
    parser = report.comparison_parser(__doc__, "size,queries,group,prompt_length,completion_length")
    parser.add_argument("--micro-batches", type=int, default=2, help="M micro-batches of whole groups")
    parser.add_argument("--buckets", type=int, default=4, help="train.length_buckets (K trim lengths)")
    args = parser.parse_args(argv)
    print(f"Machine: {report.machine_line()}\n")
    print(f"Command: `{report.command_line()}`\n")
    for text in args.case or [DEFAULT_CASE]:
        case = workloads.Case.parse(text)
        table, ratio = run_case(case, args.micro_batches, args.buckets, args.reps)
        print(f"{case.size}: {case.queries} queries x G {case.group} = {case.rows} rows, prompt {case.prompt_length} "
              f"(one row per group), T = {case.new_tokens}, {args.micro_batches} micro-batches, buckets "
              f"{bucket_lengths(case.new_tokens, args.buckets)}; fp32, KL reference (beta 0.04); medians of "
              f"{args.reps} interleaved updates\n")
        print(table)
        print(f"\nlength-aware update with completions ending by T/4 / padded update at T: {ratio:.2f}x\n")
    print("Load average at the end: {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
