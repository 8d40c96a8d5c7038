"""Decode tokens/s of the trainer's rollout on the training layout against the rollout's own layout.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_rollout_layout.py \
        [--size small] [--model qwen2_5_vl_3b] [--queries 8 --group 8 --prompt-length 96 --new-tokens 64]

A random model of a perf.workloads size (Qwen2.5-VL family, fp32 on CPU, scanned layers) on the
real-model mesh of configs/methods.py REAL_MODELS[--model] (fsdp over every device), the rollout
compiled as the trainer compiles it (train/compiled.py), prefix sharing S = 1, no EOS (every row
decodes all its tokens):

- "training layout": the weights as training holds them (fsdp shards), the rollout under
  config.sharding_rules: what the trainer ran before the rollout had a layout of its own;
- "rollout layout": the weights resharded once (timed with it) onto config.rollout_sharding_rules
  and the rollout compiled there (the trainer's `placement.RolloutWeights` + `rollout_programs`).

Decode tok/s = rows x (T - 1) / (time of a T-token rollout - time of a 1-token rollout), medians of
interleaved runs (perf/timing.py). Also printed: the token loop's collectives in each program.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from anatomy_r1_jax import sharding  # noqa: E402
from anatomy_r1_jax.models import QwenVL, QwenVLConfig  # noqa: E402
from anatomy_r1_jax.perf import hlo, report, workloads  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.rl.sampling import SamplingConfig  # noqa: E402
from anatomy_r1_jax.runtime.programs import rollout_programs  # noqa: E402
from anatomy_r1_jax.train.compiled import Programs  # noqa: E402
from anatomy_r1_jax.runtime.placement import place_state, put_batch, split_model  # noqa: E402
from configs import default  # noqa: E402
from configs.methods import REAL_MODEL, REAL_MODELS  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(workloads.SIZES))
    parser.add_argument("--model", default="qwen2_5_vl_3b", choices=sorted(REAL_MODELS), help="whose mesh")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)

    c = default.get_config()
    mesh = sharding.make_mesh(REAL_MODELS[args.model]["mesh"])
    cfg = QwenVLConfig.from_hf(workloads.size_config(args.size, "qwen2_5_vl"))
    train_rules = [tuple(r) for r in c.sharding_rules]
    with sharding.use_rules(mesh, train_rules):
        model = QwenVL(cfg, scan_layers=True, rngs=nnx.Rngs(0))
    graphdef, params, frozen = split_model(model, freeze_vision=True)
    params, frozen = place_state(params, mesh, train_rules), place_state(frozen, mesh, train_rules)
    prompts, _ = workloads.image_prompts(cfg, queries=args.queries, group=1, prompt_length=args.prompt_length)
    key = jax.random.key(0)
    rows = args.queries * args.group

    def sampler(tokens):
        return SamplingConfig(max_new_tokens=tokens, temperature=REAL_MODEL["rl.temperature"],
                              top_k=REAL_MODEL["rl.top_k"], top_p=REAL_MODEL["rl.top_p"])

    layouts = {"training layout": Programs.create(graphdef, mesh, train_rules),
               "rollout layout": rollout_programs(c, graphdef, mesh)}
    calls, loops = {}, {}
    for name, programs in layouts.items():
        rollout = programs.rollout()
        batch = put_batch(prompts, programs.mesh, programs.rules)

        def weights(programs=programs, name=name):  # the rollout layout reshards once per step (timed)
            if name == "training layout":
                return params, frozen
            return place_state(params, programs.mesh, programs.rules), place_state(frozen, programs.mesh, programs.rules)

        for tokens in (1, args.new_tokens):
            calls[name, tokens] = (lambda rollout=rollout, batch=batch, weights=weights, tokens=tokens:
                                   rollout(*weights(), batch, key, sampler(tokens), args.group, 1))
        text = rollout.lower(*weights(), batch, key, sampler(args.new_tokens), args.group, 1).compile().as_text()
        loops[name] = hlo.collective_stats(hlo.loop_body_text(text, dynamic_only=True))
    times = time_interleaved({f"{n} {t}": fn for (n, t), fn in calls.items()}, reps=args.reps)
    out = []
    for name in layouts:
        whole, one = times[f"{name} {args.new_tokens}"], times[f"{name} 1"]
        decode = whole.median - one.median
        count, nbytes = hlo.total(loops[name])
        out.append([name, f"{whole.median:.3f} ({whole.p10:.3f}-{whole.p90:.3f})", f"{one.median:.3f}",
                    f"{rows * (args.new_tokens - 1) / decode:.0f}", loops[name]["all-gather"]["count"], count,
                    f"{nbytes / 2**10:.1f}"])
    base = float(out[0][3])
    for row in out:
        row.append(f"{float(row[3]) / base:.2f}x")
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}; size {args.size} "
          f"(Qwen2.5-VL family, fp32, scanned), {args.queries} queries x G {args.group} = {rows} rows, prompt "
          f"{args.prompt_length}, {args.new_tokens} new tokens; medians of {args.reps} interleaved runs; load "
          f"average {os.getloadavg()[0]:.1f}\n")
    print(report.markdown_table(["layout", f"rollout of {args.new_tokens} tokens s (p10-p90)", "1-token rollout s",
                                 "decode tok/s", "all-gathers in token loop", "collectives in token loop",
                                 "their KiB", "decode speed-up"], out))


if __name__ == "__main__":
    main()
