"""Sharding study: memory, collectives and step time of the GRPO update under several strategies.

    python scripts/sharding_study.py [--devices 8] [--strategy data --strategy fsdp ...]
        [--config configs/default.py] [--measure-size small] [--reps 3]
        [--presets qwen2_5_vl_3b,qwen2_5_vl_7b] [--compile-presets fsdp,...] [--programs update,rollout]
        [--preset-shape paper|old|Q,G,S,M,Lp,T,HxW] [--attention chunked] [--remat full] [--skip-measured]
        [--lora-ranks 16,64] [--grad-dtype float32|bfloat16] [--buffers 20]

A strategy is a (mesh, rules) pair of data (STRATEGIES below); `--config FILE` adds the `mesh` and
`sharding_rules` of a config file's `get_config()` as one more. Two parts:

1. Measured, on `--devices` simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count,
   set here before jax is imported), with a small model: parameter / reference / optimizer bytes
   per device of the placed state, the compiled step's per-device peak (`memory_analysis()`), the
   collectives in its HLO (static count and result bytes per kind) and the step time (median, all
   strategies interleaved). The loss column must agree across strategies.
2. Abstract, for real shapes (no weights): per-device bytes of params (bf16), grads (bf16), AdamW
   moments (fp32) and the GRPO reference copy (bf16) from each parameter's sharding, against one
   80 GB GPU, 8 of them, and a TPU v5e-8 (16 GB per chip). With `--compile-presets STRATEGIES` the
   update and the rollout are compiled on ShapeDtypeStructs (scanned layers, remat, per-frame vision,
   prefix sharing at `--preset-shape`): lowering / compile seconds and memory_analysis() per device.
   LoRA rows (`--lora-ranks`): the same per-device state and compiled update for adapters alone
   trained (models/lora.py), the base frozen, no reference copy. `--buffers N`: the N largest values
   of each program's temporaries at their peak (perf/buffers.py, from XLA's buffer-assignment dump).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

# Weights and activations (their own logical names) on the same mesh axes, as configs/default.py.
DEFAULT_RULES = [("embed", "fsdp"), ("vision_embed", "fsdp"), ("mlp", "tensor"), ("vision_mlp", "tensor"),
                 ("heads", "tensor"), ("vision_heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"),
                 ("activation_batch", ("data", "fsdp")), ("activation_embed", "fsdp"),
                 ("activation_vision_embed", "fsdp"), ("activation_mlp", "tensor"), ("activation_heads", "tensor"),
                 ("activation_kv_heads", "tensor"), ("activation_vocab", "tensor")]
TENSOR_RULES = [r for r in DEFAULT_RULES if r[1] == "tensor"]
FSDP_RULES = [("activation_batch", "fsdp"), ("embed", "fsdp"), ("vision_embed", "fsdp"), ("activation_embed", "fsdp"),
              ("activation_vision_embed", "fsdp")]

# name -> (mesh, logical rules); -1 takes the remaining devices.
STRATEGIES = {
    "single": ([("data", 1)], DEFAULT_RULES),
    "data": ([("data", -1)], [("activation_batch", "data")]),
    "fsdp": ([("fsdp", -1)], FSDP_RULES),
    "tensor": ([("tensor", -1)], TENSOR_RULES),
    "mixed": ([("data", -1), ("fsdp", 2), ("tensor", 2)], DEFAULT_RULES),
    "fsdp_tensor": ([("fsdp", -1), ("tensor", 2)], FSDP_RULES + TENSOR_RULES),
    "data_fsdp": ([("data", 2), ("fsdp", -1)], [("activation_batch", ("data", "fsdp"))] + FSDP_RULES[1:]),
}
DEFAULT_STRATEGIES = ("single", "data", "fsdp", "tensor", "mixed")
# old: the first study's batch (8 micro-batches of one query's 8 rows, a prompt row per completion;
# its "2048 patches" made a 44 x 46 = 2024-patch grid). paper: configs/ssg_vqa.py (480x854 frames ->
# 34 x 60 = 2040 patches, prompt_length 1024, micro_batches 4), prefix sharing as the trainer runs it.
PRESET_SHAPES = {"old": "8,8,8,8,768,512,44x46", "paper": "8,8,1,4,1024,512,34x60"}
PROGRAMS = ("update", "rollout")
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
                        help="comma-separated strategies whose real-size programs are compiled abstractly (slow)")
    parser.add_argument("--programs", default="update,rollout", help=f"programs to compile, of {PROGRAMS}")
    parser.add_argument("--preset-shape", default="paper",
                        help=f"`Q,G,S,M,Lp,T,HxW` (PresetShape) or a name of {sorted(PRESET_SHAPES)}")
    parser.add_argument("--attention", default="chunked",
                        help="model.attention of the compiled models (the study's CPU default: chunked, what "
                             "`auto` does not pick on CPU; use `auto` on an accelerator)")
    parser.add_argument("--remat", default="full", help="model.remat of the compiled models")
    parser.add_argument("--no-scan", dest="scan_layers", action="store_false", help="layers as a Python loop")
    parser.add_argument("--lora-ranks", default="16,64",
                        help="LoRA ranks of the real-size rows beside full fine-tuning (\"\" = none); with "
                             "--compile-presets their updates are compiled too")
    parser.add_argument("--grad-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="optim.grad_dtype of the compiled updates (the micro-batch gradient accumulator): "
                             "float32 as the real configs; bfloat16 as the first study's code accumulated")
    parser.add_argument("--buffers", type=int, default=0,
                        help="list the N largest buffers of each compiled program's temporaries at their peak")
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
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from anatomy_r1_jax import sharding  # noqa: E402
from anatomy_r1_jax.models import QwenVL, QwenVLConfig  # noqa: E402
from anatomy_r1_jax.models.lora import LoraConfig  # noqa: E402
from anatomy_r1_jax.models.presets import preset_hf_config  # noqa: E402
from anatomy_r1_jax.perf import abstract, buffers, hlo, report, workloads  # noqa: E402
from anatomy_r1_jax.perf.memory import bytes_per_device, compiled_memory  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.rl.sampling import SamplingConfig  # noqa: E402
from anatomy_r1_jax.train.compiled import Programs  # noqa: E402
from anatomy_r1_jax.runtime.placement import put_batch, split_model  # noqa: E402
from anatomy_r1_jax.runtime.precision import BF16  # noqa: E402
from anatomy_r1_jax.train.step import make_optimizer, step_configs  # noqa: E402
from configs.default import get_config  # noqa: E402
from configs.methods import paper_update  # noqa: E402

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
    model = QwenVL(cfg, rngs=nnx.Rngs(0))
    prompts, _ = workloads.image_prompts(cfg, queries=queries, group=group, prompt_length=lp)
    batch_np = workloads.train_batch(prompts, workloads.random_completions(cfg, queries * group, t))
    tx = make_optimizer(1e-5, grad_clip=1.0, b2=0.99)
    step_cfg = step_configs(paper_update(get_config(), group=group, length=t, logp_chunk=32))["grpo"]
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
@dataclasses.dataclass(frozen=True)
class PresetShape:
    """A step's shape for the compiled study: Q queries x G completions, S prompt rows per group
    (prefix sharing: 1; G = one prompt row per completion), M micro-batches of Q / M queries, prompt
    length Lp, T completion tokens, one image of grid h x w patches per query."""

    queries: int
    group: int
    prompts_per_group: int
    micro_batches: int
    prompt_length: int
    completion_length: int
    grid: tuple[int, int]

    @classmethod
    def parse(cls, text: str) -> "PresetShape":
        """`old`, `paper`, or `Q,G,S,M,Lp,T,HxW`."""
        text = PRESET_SHAPES.get(text, text)
        *numbers, grid = text.split(",")
        return cls(*map(int, numbers), tuple(map(int, grid.split("x"))))

    def __str__(self) -> str:
        return (f"{self.queries} queries x G {self.group}, S={self.prompts_per_group}, {self.micro_batches} "
                f"micro-batches, prompt {self.prompt_length}, completion {self.completion_length}, image "
                f"{self.grid[0]}x{self.grid[1]} patches")




def preset_batch(cfg: QwenVLConfig, shape: PresetShape):
    """NumPy TrainBatch [M, ...] of one micro-batch broadcast M times: Q / M queries, S prompt rows
    per group (frame budget = the image's patches, as the collator gives it), Q / M * G completions."""
    q = shape.queries // shape.micro_batches
    prompts, _ = workloads.image_prompts(cfg, queries=q, group=shape.prompts_per_group,
                                         prompt_length=shape.prompt_length, grid=(1, *shape.grid))
    batch = workloads.train_batch(prompts, workloads.random_completions(cfg, q * shape.group,
                                                                         shape.completion_length))
    return jax.tree.map(lambda x: np.broadcast_to(x, (shape.micro_batches,) + x.shape[1:]), batch)


def analytic_rows(name: str, strategies: dict, devices: int):
    cfg = QwenVLConfig.from_hf(preset_hf_config(name))
    rows = []
    for sname, (axes, rules) in strategies.items():
        mesh = build_mesh(axes, devices)
        _, params, frozen = abstract.abstract_params(cfg, mesh, rules)
        fp = abstract.state_footprint(params)
        frozen_bytes = bytes_per_device(frozen)
        row = [name, sname, mesh_text(mesh), fp.params / GB, fp.grads / GB, fp.moments / GB, fp.reference / GB,
               fp.total / GB]
        rows.append(row + ["yes" if fp.total + frozen_bytes < cap else "no" for cap in CAPACITIES.values()])
    return rows


def lower_update(cfg, mesh, rules, shape: PresetShape, model_kw: dict, grads: str = "float32"):
    """The GRPO update (train/step.py) lowered on ShapeDtypeStructs: bf16 params and compute, `grads`
    gradients, fp32 AdamW moments, the reference copy, the vision tower trainable; with model_kw
    `lora` the adapters alone trainable, the base frozen and no reference copy (adapters off)."""
    tx = make_optimizer(1e-5, grad_clip=1.0, b2=0.99)
    reference = model_kw.get("lora") is None
    with sharding.use_rules(mesh, rules):
        graphdef, state = abstract.abstract_train_state(cfg, mesh, rules, tx, moment_dtype=jnp.float32,
                                                        reference=reference, **model_kw)
        batch = abstract.abstract_batch(preset_batch(cfg, shape), mesh, rules)
        run = paper_update(get_config(), group=shape.group, length=shape.completion_length, logp_chunk=128)
        step_cfg = step_configs(run, precision=dataclasses.replace(BF16, grads=grads))["grpo"]
    return Programs.create(graphdef, mesh, rules).update(tx, step_cfg, state).lower(state, batch)


def lora_rows(name: str, strategies: dict, devices: int, ranks) -> list:
    """Per-device state of LoRA GRPO (adapters on q, k, v, o, gate, up, down of every decoder layer)
    beside full fine-tuning's: the frozen base (bf16) plus the adapters' params, grads (bf16) and
    AdamW moments (fp32); no reference copy (the reference is the base, adapters off)."""
    cfg = QwenVLConfig.from_hf(preset_hf_config(name))
    rows = []
    for sname, (axes, rules) in strategies.items():
        mesh = build_mesh(axes, devices)
        _, full, _ = abstract.abstract_params(cfg, mesh, rules)
        full_total = abstract.state_footprint(full).total
        for rank in ranks:
            _, adapters, base = abstract.abstract_params(cfg, mesh, rules, lora=LoraConfig(rank=rank))
            fp = abstract.state_footprint(adapters, reference=False)
            total = bytes_per_device(base) + fp.total
            count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
            rows.append([name, sname, mesh_text(mesh), rank, f"{count / 1e6:.1f}", bytes_per_device(base) / GB,
                         fp.total / GB, total / GB, full_total / GB, f"{full_total / total:.1f}x",
                         *("yes" if total < cap else "no" for cap in CAPACITIES.values())])
    return rows


def lower_rollout(cfg, mesh, rules, shape: PresetShape, model_kw: dict):
    """One micro-batch's rollout as the trainer jits it (rl/rollout.generate: shared prefill of the
    S prompt rows per group, KV cache expanded to G rows, T decode steps), on ShapeDtypeStructs."""
    with sharding.use_rules(mesh, rules):
        graphdef, params, frozen = abstract.abstract_params(cfg, mesh, rules, **model_kw)
        prompt = jax.tree.map(lambda x: x[0], preset_batch(cfg, shape).prompt)
        prompt = abstract.abstract_batch(prompt, mesh, rules, micro_axis=False)
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
        sampling = SamplingConfig(max_new_tokens=shape.completion_length, eos_ids=(cfg.vocab_size - 1,))
    return Programs.create(graphdef, mesh, rules).rollout().lower(params, frozen, prompt, key, sampling, shape.group,
                                                                  shape.prompts_per_group)


LOWER = {"update": lower_update, "rollout": lower_rollout}


def compile_with_buffers(lowered, top: int, title: str):
    """(compiled, None or a markdown table of the `top` largest buffers of its temporaries at their peak)."""
    if not top:
        return lowered.compile(), None
    with tempfile.TemporaryDirectory() as directory:
        compiled = lowered.compile(compiler_options=buffers.dump_options(directory))
        peak = buffers.peak_buffers(directory)
    rows = [[f"{b.bytes / GB:.3f}", f"`{b.shape}`", f"`{b.name}`", b.source] for b in peak.buffers[:top]]
    return compiled, (f"\nBuffers of {title}: temporaries at their peak {peak.bytes / GB:.2f} GB (allocation "
                      f"{peak.allocation / GB:.2f} GB)\n\n" +
                      report.markdown_table(["GB", "shape", "value", "op / source"], rows))


def compiled_rows(names, strategies, devices, shape: PresetShape, programs, model_kw: dict, lora_ranks=(),
                  grads: str = "float32", top_buffers: int = 0):
    """One row per (model, strategy, program): lowering and compile seconds, per-device compiled
    memory; the update (its gradients in `grads`) also with LoRA adapters of each of `lora_ranks`.
    Printed as each compile ends (a long study keeps what it finished); with `top_buffers` the
    largest buffers of each program's temporaries after the table."""
    lower = {**LOWER, "update": functools.partial(lower_update, grads=grads)}
    breakdowns = []
    variants = [(p, None) for p in programs] + [("update", r) for r in lora_ranks if "update" in programs]
    for name in names:
        cfg = QwenVLConfig.from_hf(preset_hf_config(name))
        for sname, (axes, rules) in strategies.items():
            mesh = build_mesh(axes, devices)
            for program, rank in variants:
                t0 = time.perf_counter()
                kw = model_kw if rank is None else {**model_kw, "lora": LoraConfig(rank=rank)}
                lowered = lower[program](cfg, mesh, rules, shape, kw)
                t1 = time.perf_counter()
                label = program if rank is None else f"{program} LoRA r{rank}"
                compiled, breakdown = compile_with_buffers(lowered, top_buffers, f"{name} {sname} {label}")
                mem = compiled_memory(compiled)
                t2 = time.perf_counter()
                breakdowns += [breakdown] if breakdown else []
                row = [name, sname, mesh_text(mesh), label,
                       f"{t1 - t0:.0f}", f"{t2 - t1:.0f}",
                       f"{mem.argument / GB:.1f}", f"{mem.temp / GB:.1f}", f"{mem.peak / GB:.1f}"]
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
    for text in breakdowns:
        print(text)


COMPILED_HEADER = ["model", "strategy", "mesh", "program", "lower s", "compile s", "arguments GB/dev",
                   "temporaries GB/dev", "peak GB/dev"]


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
              "trainable. `fits` compares the state total (+ any frozen part) with one device's memory.\n")
        header = ["model", "strategy", "mesh", "params GB/dev (bf16)", "grads GB/dev (bf16)",
                  "AdamW moments GB/dev (fp32)", "reference GB/dev (bf16)", "state total GB/dev",
                  *(f"fits {k}" for k in CAPACITIES)]
        print(report.markdown_table(header, [r for n in names for r in analytic_rows(n, strategies, args.devices)]))
    ranks = [int(r) for r in args.lora_ranks.split(",") if r]
    if names and ranks:
        print("\nLoRA GRPO (adapters on q, k, v, o, gate, up, down of every decoder layer, bf16; grads bf16, AdamW "
              "moments fp32) beside full fine-tuning (the table above): the base weights frozen in bf16, no "
              "reference copy (the reference is the base model, adapters off).\n")
        header = ["model", "strategy", "mesh", "rank", "adapters (M)", "frozen base GB/dev (bf16)",
                  "adapters + grads + moments GB/dev", "LoRA state total GB/dev", "full FT state total GB/dev",
                  "saving", *(f"fits {k}" for k in CAPACITIES)]
        print(report.markdown_table(header, [r for n in names for r in lora_rows(n, strategies, args.devices, ranks)]))
    compiled = [n for n in args.compile_presets.split(",") if n]
    if names and compiled:
        shape = PresetShape.parse(args.preset_shape)
        model_kw = dict(remat=args.remat, attention=args.attention, scan_layers=args.scan_layers)
        print(f"\nCompiled on ShapeDtypeStructs (bf16 params and compute, {args.grad_dtype} grads, fp32 AdamW moments, "
              f"reference copy, vision trainable; model {model_kw}): {shape}. Update: the whole step (M "
              "micro-batches); rollout: one micro-batch's generate. Memory per device from XLA:CPU's buffer "
              "assignment; peak = arguments + outputs + temporaries - aliased.\n")
        print("| " + " | ".join(COMPILED_HEADER) + " |\n|" + "---|" * len(COMPILED_HEADER), flush=True)
        compiled_rows(names, {k: strategies.get(k) or STRATEGIES[k] for k in compiled}, args.devices, shape,
                      [p for p in args.programs.split(",") if p], model_kw, ranks, args.grad_dtype, args.buffers)
    print("\nLoad average at the end: {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main(ARGS)
