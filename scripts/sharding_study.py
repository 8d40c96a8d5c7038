"""Sharding study: memory, collectives and step time of the GRPO update under several strategies.

    python scripts/sharding_study.py [--devices 8] [--strategy data --strategy fsdp ...]
        [--config configs/default.py] [--measure-size small] [--reps 3]
        [--presets qwen2_5_vl_3b,qwen2_5_vl_7b] [--compile-presets] [--skip-measured]

A strategy is a (mesh, rules) pair of data (STRATEGIES below); `--config FILE` adds the `mesh` and
`sharding_rules` of a config file's `get_config()` as one more. Two parts:

1. Measured, on `--devices` simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count,
   set here before jax is imported), with a small model: parameter / reference / optimizer bytes
   per device of the placed state, the compiled step's per-device peak (`memory_analysis()`), the
   collectives in its HLO (static count and result bytes per kind) and the step time (median, all
   strategies interleaved). The loss column must agree across strategies.
2. Abstract, for real shapes (no weights): per-device bytes of params (bf16), grads (bf16), AdamW
   moments (fp32) and the GRPO reference copy (bf16) from each parameter's sharding, against one
   80 GB GPU, 8 of them, and a TPU v5e-8 (16 GB per chip). With `--compile-presets` the update is
   also compiled on ShapeDtypeStructs (remat, bf16 compute) and its memory_analysis() reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

DEFAULT_RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vision_embed", "fsdp"), ("mlp", "tensor"),
                 ("vision_mlp", "tensor"), ("heads", "tensor"), ("vision_heads", "tensor"), ("kv_heads", "tensor"),
                 ("vocab", "tensor")]
TENSOR_RULES = [r for r in DEFAULT_RULES if r[1] == "tensor"]

# name -> (mesh, logical rules); -1 takes the remaining devices.
STRATEGIES = {
    "single": ([("data", 1)], DEFAULT_RULES),
    "data": ([("data", -1)], [("batch", "data")]),
    "fsdp": ([("fsdp", -1)], [("batch", "fsdp"), ("embed", "fsdp"), ("vision_embed", "fsdp")]),
    "tensor": ([("tensor", -1)], TENSOR_RULES),
    "mixed": ([("data", -1), ("fsdp", 2), ("tensor", 2)], DEFAULT_RULES),
}
DEFAULT_STRATEGIES = ("single", "data", "fsdp", "tensor", "mixed")
GB = 1e9  # accelerator capacities are quoted in decimal gigabytes
CAPACITIES = {"80 GB GPU": 80 * GB, "v5e chip (16 GB)": 16 * GB}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--strategy", action="append", choices=sorted(STRATEGIES))
    parser.add_argument("--config", action="append", default=[], help="a config file with mesh / sharding_rules")
    parser.add_argument("--measure-size", default="small", help="model size of the measured part (perf.workloads)")
    parser.add_argument("--measure-case", default="4,4,96,32", help="queries,group,prompt_length,completion_length")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--presets", default="qwen2_5_vl_3b,qwen2_5_vl_7b")
    parser.add_argument("--compile-presets", default="",
                        help="comma-separated strategies whose real-size update is compiled abstractly (slow)")
    parser.add_argument("--preset-batch", default="8,8,768,512,2048",
                        help="rows per micro-batch, micro-batches, prompt length, completion length, patches/query")
    parser.add_argument("--skip-measured", action="store_true")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from anatomy_r1_jax import sharding  # noqa: E402
from anatomy_r1_jax.models import QwenVL, QwenVLConfig  # noqa: E402
from anatomy_r1_jax.models.presets import preset_hf_config  # noqa: E402
from anatomy_r1_jax.perf import abstract, hlo, report, workloads  # noqa: E402
from anatomy_r1_jax.perf.memory import bytes_per_device, compiled_memory  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.train.compiled import Programs  # noqa: E402
from anatomy_r1_jax.train.partitioning import put_batch, split_model  # noqa: E402
from anatomy_r1_jax.train.precision import BF16  # noqa: E402
from anatomy_r1_jax.train.step import StepConfig, make_optimizer  # noqa: E402

MIB = 2**20


def load_config_strategy(path: str) -> tuple[str, tuple]:
    """(file stem, (mesh, rules)) from a config file's get_config()."""
    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    return os.path.splitext(os.path.basename(path))[0], ([tuple(a) for a in c.mesh],
                                                          [tuple(r) for r in c.sharding_rules])


def build_mesh(axes, devices: int):
    """The strategy's mesh over the first `devices` devices (a 1-device axis list uses one device)."""
    sizes = [s for _, s in axes]
    n = devices if -1 in sizes else int(np.prod(sizes))
    return sharding.make_mesh(axes, jax.devices()[:n])


def mesh_text(mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items())


def collective_cells(text: str) -> list:
    stats = hlo.collective_stats(text)
    count, nbytes = hlo.total(stats)
    return [f"{stats[k]['count']} / {stats[k]['bytes'] / MIB:.2f}" for k in hlo.KINDS] + [count, nbytes / MIB]


# ---- 1. measured on simulated devices --------------------------------------------------------------
def measured(strategies: dict, devices: int, size: str, case: str, reps: int) -> str:
    queries, group, lp, t = map(int, case.split(","))
    config = workloads.size_config(size)
    cfg = QwenVLConfig.from_hf(config)
    model = QwenVL(cfg, rngs=__import__("flax").nnx.Rngs(0))
    prompts, _ = workloads.image_prompts(cfg, queries=queries, group=group, prompt_length=lp)
    batch_np = workloads.train_batch(prompts, workloads.random_completions(cfg, queries * group, t))
    tx = make_optimizer(1e-5, grad_clip=1.0, b2=0.99)
    step_cfg = StepConfig(group_size=group, beta=0.04, temperature=0.9, logp_chunk=32)
    graphdef, params0, frozen0 = split_model(model, freeze_vision=False)
    # Host copies: every strategy places its own (the donated step deletes device buffers).
    params0, frozen0 = jax.tree.map(np.asarray, params0), jax.tree.map(np.asarray, frozen0)
    runs, rows = {}, {}
    for name, (axes, rules) in strategies.items():
        mesh = build_mesh(axes, devices)
        # The state and the update as the trainer builds them (train/compiled.py: traced under the rules).
        programs = Programs.create(graphdef, mesh, rules)
        state = programs.init_state(tx, step_cfg.precision, params0, frozen0, reference=True)
        params, frozen, opt_state = state.params, state.frozen, state.opt_state
        batch = put_batch(batch_np, mesh, rules, micro_axis=True)
        step = programs.update(tx, step_cfg, state)
        compiled = step.lower(state, batch).compile()
        mem = compiled_memory(compiled)
        holder = {"state": state}

        def run(step=step, holder=holder, batch=batch):
            holder["state"], metrics = step(holder["state"], batch)
            return metrics

        loss = float(run()["loss"])
        runs[name] = run
        rows[name] = [name, mesh_text(mesh), (bytes_per_device(params) + bytes_per_device(frozen)) / MIB,
                      bytes_per_device(state.ref_params) / MIB, bytes_per_device(opt_state) / MIB,
                      mem.peak / MIB, mem.temp / MIB, *collective_cells(compiled.as_text())]
        rows[name].append(loss)
    timings = time_interleaved(runs, reps=reps, warmup=0)
    for name, tm in timings.items():
        rows[name].insert(-1, f"{tm.median:.3f} ({tm.p10:.3f}-{tm.p90:.3f})")
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params0))
    head = (f"Model `{size}` ({params / 1e6:.1f}M parameters, fp32), {queries} queries x G={group} rows, prompt "
            f"{lp} + completion {t} tokens, one micro-batch; collectives as `count / MiB` (static count in the "
            f"compiled HLO, result bytes per device).\n\n")
    header = ["strategy", "mesh", "params MiB/dev", "reference MiB/dev", "AdamW MiB/dev", "compiled peak MiB/dev",
              "temporaries MiB/dev", *hlo.KINDS, "collectives", "collective MiB", "step s (p10-p90)", "loss"]
    return head + report.markdown_table(header, list(rows.values()))


# ---- 2. abstract, real shapes ----------------------------------------------------------------------
def preset_batch(cfg: QwenVLConfig, spec: str):
    """(NumPy TrainBatch for one micro-batch, micro-batch count) of the preset study's shape."""
    rows, micro, lp, t, patches = map(int, spec.split(","))
    side = int(np.sqrt(patches))
    side -= side % 2
    grid = (1, side, patches // side - (patches // side) % 2)
    prompts, _ = workloads.image_prompts(cfg, queries=1, group=rows, prompt_length=lp, grid=grid)
    return workloads.train_batch(prompts, workloads.random_completions(cfg, rows, t)), micro


def stacked(batch, micro: int):
    return jax.tree.map(lambda x: np.broadcast_to(x, (micro,) + x.shape[1:]), batch)


def preset_rows(name: str, strategies: dict, devices: int, compile_step: tuple, batch_spec: str):
    cfg = QwenVLConfig.from_hf(preset_hf_config(name))
    tx = make_optimizer(1e-5, grad_clip=1.0, b2=0.99)
    batch_np, micro = preset_batch(cfg, batch_spec) if compile_step else (None, 0)
    rows = []
    for sname, (axes, rules) in strategies.items():
        mesh = build_mesh(axes, devices)
        graphdef, params, frozen = abstract.abstract_params(cfg, mesh, rules)
        fp = abstract.state_footprint(params)
        frozen_bytes = bytes_per_device(frozen)
        row = [name, sname, mesh_text(mesh), fp.params / GB, fp.grads / GB, fp.moments / GB, fp.reference / GB,
               fp.total / GB]
        row += ["yes" if fp.total + frozen_bytes < cap else "no" for cap in CAPACITIES.values()]
        if compile_step and sname in compile_step:
            mem = compile_preset(cfg, mesh, rules, tx, batch_np, micro)
            row += [f"{mem.argument / GB:.1f}", f"{mem.temp / GB:.1f}", f"{mem.peak / GB:.1f}"]
        elif compile_step:
            row += ["-"] * 3
        rows.append(row)
    return rows


def compile_preset(cfg, mesh, rules, tx, batch_np, micro):
    """CompiledMemory (per device) of the update compiled on ShapeDtypeStructs (bf16 params, fp32 moments)."""
    with sharding.use_rules(mesh, rules):
        graphdef, state = abstract.abstract_train_state(cfg, mesh, rules, tx, moment_dtype=jnp.float32)
        batch = abstract.abstract_batch(stacked(batch_np, micro), mesh, rules)
        step_cfg = StepConfig(group_size=batch_np.rewards.shape[1], beta=0.04, temperature=0.9, logp_chunk=128,
                              precision=BF16)
    step = Programs.create(graphdef, mesh, rules).update(tx, step_cfg, state)
    return compiled_memory(step.lower(state, batch).compile())


def presets_table(names, strategies, devices, compile_step, batch_spec) -> str:
    header = ["model", "strategy", "mesh", "params GB/dev (bf16)", "grads GB/dev (bf16)",
              "AdamW moments GB/dev (fp32)", "reference GB/dev (bf16)", "state total GB/dev",
              *(f"fits {k}" for k in CAPACITIES)]
    if compile_step:
        header += ["compiled arguments GB/dev", "compiled temporaries GB/dev", "compiled peak GB/dev"]
    rows = [r for name in names for r in preset_rows(name, strategies, devices, compile_step, batch_spec)]
    return report.markdown_table(header, rows)


def main(args):
    strategies = {name: STRATEGIES[name] for name in (args.strategy or DEFAULT_STRATEGIES)}
    for path in args.config:
        name, strategy = load_config_strategy(path)
        strategies[name] = strategy
    print(f"Machine: {report.machine_line()}\n")
    print(f"Command: `{report.command_line()}`\n")
    print("Strategies (mesh; logical rules):\n")
    for name, (axes, rules) in strategies.items():
        print(f"- `{name}`: `{axes}`; `{rules}`")
    print()
    if not args.skip_measured:
        print(measured(strategies, args.devices, args.measure_size, args.measure_case, args.reps))
        print()
    names = [n for n in args.presets.split(",") if n]
    if names:
        print("Analytic per-device state (no activations): params and grads bf16, AdamW moments fp32, reference "
              "copy bf16 (GRPO beta > 0), from each parameter's sharding under the strategy; the vision tower "
              "trainable. `fits` compares the state total (+ any frozen part) with one device's memory.")
        if args.compile_presets:
            print(f"Compiled: the update lowered on ShapeDtypeStructs (remat, bf16 compute, fp32 moments) for "
                  f"micro-batch rows, micro-batches, prompt, completion, patches = {args.preset_batch}; peak = "
                  "arguments + outputs + temporaries - aliased, from XLA:CPU's buffer assignment.")
        print()
        compiled = tuple(n for n in args.compile_presets.split(",") if n)
        print(presets_table(names, strategies, args.devices, compiled, args.preset_batch))
    print("\nLoad average at the end: {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main(ARGS)
