"""Utilisation on a machine's accelerators as training uses them: update MFU, decode against the
bandwidth bound, a whole GRPO iteration; figures per device.

    python scripts/bench_device.py [--size 3b] [--devices 0 (all) | 1] [--dtype bfloat16] [--queries 8
        --group 8 --prompt-length 512 --new-tokens 256] [--remat] [--peak-tflops X --bandwidth-gbs Y]

The trainer's layout: the update on the real-model mesh of configs/methods.py (fsdp over the
devices) under config.sharding_rules; the rollout one call for the step's rows (--queries per
device), its KV cache in the compute dtype, on config.rollout_sharding_rules with the weights
resharded onto them before every rollout (timed with it).

A randomly initialised model of a named shape (`3b` / `7b`: Qwen2.5-VL-3B / 7B, or a
perf.workloads size: tiny, small, 100m) in `--dtype` (weights and compute), image prompts (one
image of `--grid` patches per query) shared by each group's G rows, as the trainer runs a step
without GDQA variants. Measured, after compilation, medians of `--reps`:

- update: one GRPO `train_step` (policy forward + backward, frozen reference forward, AdamW) on
  sampled-looking completions of `--new-tokens` tokens. MFU = model FLOPs (perf.flops: language-model
  matrix products, no recomputation) / time / peak FLOP/s.
- decode: tokens/s of a rollout's decode (a whole rollout of T tokens minus a one-token rollout,
  per T - 1 steps), against the bound `rows * bandwidth / bytes one step must read` (weights + the
  average KV cache).
- iteration: rollout, the completions fetched to the host, then the update on them.

Peaks come from perf.flops.PEAKS by the device's kind, or from --peak-tflops / --bandwidth-gbs; on
a CPU (no data sheet) from probes: the best of a large matmul in --dtype and of a large sum (read).
The device's name is printed with every figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from anatomy_r1_jax import sharding  # noqa: E402
from anatomy_r1_jax.models import QwenVL, QwenVLConfig  # noqa: E402
from anatomy_r1_jax.models.presets import preset_hf_config  # noqa: E402
from anatomy_r1_jax.perf import flops, report, workloads  # noqa: E402
from anatomy_r1_jax.perf.memory import compiled_memory  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.data.batch import TrainBatch  # noqa: E402
from anatomy_r1_jax.rl.sampling import SamplingConfig  # noqa: E402
from anatomy_r1_jax.runtime.programs import rollout_programs  # noqa: E402
from anatomy_r1_jax.train.compiled import Programs  # noqa: E402
from anatomy_r1_jax.runtime.placement import place_state, put_batch, split_model  # noqa: E402
from anatomy_r1_jax.runtime.precision import Precision  # noqa: E402
from anatomy_r1_jax.train.step import make_optimizer, step_configs  # noqa: E402
from configs.default import get_config  # noqa: E402
from configs.methods import REAL_MODELS, paper_update  # noqa: E402

PRESET_SIZES = {"3b": "qwen2_5_vl_3b", "7b": "qwen2_5_vl_7b"}


def hf_config_of(size: str) -> dict:
    return preset_hf_config(PRESET_SIZES[size]) if size in PRESET_SIZES else workloads.size_config(size)


def probe_peaks(dtype, *, n: int = 2048, read_mib: int = 512, reps: int = 5) -> tuple[float, float]:
    """(FLOP/s of the best n x n x n matmul in dtype, read bytes/s of the best sum over read_mib MiB)."""
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a: a @ a)
    x = jnp.ones((read_mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    t = time_interleaved({"mm": lambda: mm(a), "read": lambda: total(x)}, reps=reps, warmup=1)
    return 2 * n ** 3 / min(t["mm"].times), x.nbytes / min(t["read"].times)


def training_mesh(args):
    """The trainer's mesh for this size (configs/methods.py REAL_MODELS for 3b / 7b: fsdp over the
    devices; other sizes the same layout) over the first --devices devices."""
    axes = REAL_MODELS[PRESET_SIZES[args.size]]["mesh"] if args.size in PRESET_SIZES else [("data", 1), ("fsdp", -1)]
    return sharding.make_mesh(axes, devices=jax.devices()[:args.devices or jax.device_count()])


def build(args, mesh, rules):
    cfg = QwenVLConfig.from_hf(hf_config_of(args.size))
    dtype = jnp.dtype(args.dtype)
    with sharding.use_rules(mesh, rules):
        model = QwenVL(cfg, dtype=dtype, param_dtype=dtype, remat=args.remat, scan_layers=True, rngs=nnx.Rngs(0))
    prompts, _ = workloads.image_prompts(cfg, queries=args.queries * mesh.devices.size, group=1,
                                         prompt_length=args.prompt_length, grid=tuple(args.grid))
    return cfg, model, jax.tree.map(np.asarray, prompts)


def measure(args) -> dict:
    config = get_config()
    mesh, rules = training_mesh(args), [tuple(r) for r in config.sharding_rules]
    cfg, model, host_prompts = build(args, mesh, rules)
    devices = mesh.devices.size
    n, t = args.queries * devices * args.group, args.new_tokens
    graphdef, params, frozen = split_model(model, freeze_vision=False)
    tx = make_optimizer(1e-6, grad_clip=1.0, b2=0.99)
    # The real-model configs' policy for bf16 (fp32 gradients, moments and master copy).
    policy = Precision(weights=args.dtype, compute=args.dtype, master_weights=args.dtype != "float32")
    # Compiled as the trainer compiles them (train/compiled.py): the update on the training mesh and
    # rules, the rollout (one call for the step's rows, its cache in the compute dtype) on its own
    # layout, the weights resharded onto it before each rollout (placement.RolloutWeights).
    programs = Programs.create(graphdef, mesh, rules)
    decoding = rollout_programs(config, graphdef, mesh)
    state = programs.init_state(tx, policy, params, frozen, reference=True)
    params, frozen = state.params, state.frozen
    prompts = put_batch(host_prompts, decoding.mesh, decoding.rules)
    run = paper_update(get_config(), group=args.group, length=t, logp_chunk=args.logp_chunk)
    step_cfg = step_configs(run, precision=policy)["grpo"]
    update = programs.update(tx, step_cfg, state)

    no_eos = tuple(cfg.eos_token_ids) + (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                                         cfg.vision_end_token_id)
    sampling = lambda new: SamplingConfig(max_new_tokens=new, temperature=0.9, top_k=50, top_p=0.9,  # noqa: E731
                                          eos_ids=(), pad_id=0, forbidden_ids=no_eos)
    compiled_rollout = decoding.rollout()

    def rollout(p, f, b, k, sc):
        p, f = place_state(p, decoding.mesh, decoding.rules), place_state(f, decoding.mesh, decoding.rules)
        return compiled_rollout(p, f, b, k, sc, args.group, 1)

    keys = iter(jax.random.split(jax.random.key(0), 100_000))
    rewards = jnp.asarray(np.random.default_rng(0).integers(0, 3, n).astype(np.float32))

    def batch_of(comp):
        b = TrainBatch(prompt=host_prompts, completions=jax.device_get(comp), rewards=np.asarray(rewards),
                       categories=np.zeros((n,), np.int32))
        return put_batch(jax.tree.map(lambda x: np.asarray(x)[None], b), mesh, rules, micro_axis=True)

    holder = {"state": state}

    def do_update(batch):
        holder["state"], metrics = update(holder["state"], batch)
        return metrics

    def iteration():
        return do_update(batch_of(rollout(holder["state"].params, frozen, prompts, next(keys), sampling(t))))

    start = time.perf_counter()
    comp = rollout(params, frozen, prompts, next(keys), sampling(t))
    rollout(params, frozen, prompts, next(keys), sampling(1))
    batch = batch_of(comp)
    compiled = update.lower(holder["state"], batch).compile()
    compile_s = time.perf_counter() - start
    fns = {"update": lambda: do_update(batch),
           "rollout": lambda: rollout(holder["state"].params, frozen, prompts, next(keys), sampling(t)),
           "prefill": lambda: rollout(holder["state"].params, frozen, prompts, next(keys), sampling(1)),
           "iteration": iteration}
    timings = time_interleaved(fns, reps=args.reps, warmup=1)

    device = jax.devices()[0]
    peaks = (args.peak_tflops * 1e12, args.bandwidth_gbs * 1e9) if args.peak_tflops and args.bandwidth_gbs else \
        flops.device_peaks(device.device_kind)
    source = "given" if args.peak_tflops else "data sheet"
    if peaks is None:
        peaks, source = probe_peaks(jnp.dtype(args.dtype)), "measured probes"
    model_flops = flops.update_flops(cfg, queries=args.queries, group=args.group, prompt_length=args.prompt_length,
                                     completion_length=t, shared=True)  # per device
    itemsize = jnp.dtype(args.dtype).itemsize
    bound = flops.decode_bound(cfg, rows=n // devices, prompt_length=args.prompt_length, new_tokens=t,
                               weight_bytes=itemsize, cache_bytes=itemsize)  # a device's rows, weights replicated
    med = {k: v.median for k, v in timings.items()}
    decode_tps = n // devices * (t - 1) / max(med["rollout"] - med["prefill"], 1e-9)  # per device
    return dict(device=f"{device.device_kind} ({device.platform})", cfg=cfg, params=workloads.parameter_count(
        hf_config_of(args.size)), model_flops=model_flops, peaks=peaks, peak_source=source, timings=timings,
        mfu=model_flops / med["update"] / peaks[0], decode_tps=decode_tps,
        bound_tps=bound.tokens_per_second(peaks[1]), bound=bound, memory=compiled_memory(compiled),
        compile_s=compile_s, rows=n, devices=devices, mesh=dict(mesh.shape), rollout_mesh=dict(decoding.mesh.shape))


def render(args, r: dict) -> str:
    tm, n, t = r["timings"], r["rows"], args.new_tokens
    spread = lambda x: f"{x.median:.3f} ({x.p10:.3f}-{x.p90:.3f})"  # noqa: E731
    head = (f"Devices: **{r['device']}**, training mesh {r['mesh']}, rollout mesh {r['rollout_mesh']} (weights "
            f"resharded onto the rollout layout in every timed rollout); figures per device; peaks {r['peaks'][0] / 1e12:.3g} TFLOP/s, {r['peaks'][1] / 1e9:.4g} GB/s "
            f"({r['peak_source']}). Model {args.size} ({r['params'] / 1e6:,.1f}M parameters) in {args.dtype}"
            f"{', remat' if args.remat else ''}; {args.queries} queries x G {args.group} = {n} rows, prompts of "
            f"{args.prompt_length} slots (shared by each group), {t} completion tokens, one rollout call for all rows; "
            f"medians of {args.reps}.\n")
    rows = [["update (GRPO step)", spread(tm["update"]), f"{r['model_flops'] / 1e12:.3g} TFLOP model",
             f"MFU **{100 * r['mfu']:.1f}%**"],
            ["rollout (reshard + prefill + decode)", spread(tm["rollout"]),
             f"{n // r['devices'] * t / tm['rollout'].median:,.0f} tok/s/device", ""],
            ["prefill (one-token rollout)", spread(tm["prefill"]), "", ""],
            ["decode", "", f"{r['decode_tps']:,.0f} tok/s",
             f"**{100 * r['decode_tps'] / r['bound_tps']:.1f}%** of the bound {r['bound_tps']:,.0f} tok/s "
             f"({r['bound'].step_bytes / 1e9:.3g} GB per step)"],
            ["whole iteration (rollout, to host, update)", spread(tm["iteration"]),
             f"{n / r['devices'] / tm['iteration'].median:.3g} samples/s/device", ""]]
    mem = r["memory"]
    tail = (f"\nCompiled update: arguments {mem.argument / 2**30:.2f} GiB, temporaries {mem.temp / 2**30:.2f} GiB, "
            f"peak {mem.peak / 2**30:.2f} GiB; compile {r['compile_s']:.0f} s (update and both rollouts).")
    return head + "\n" + report.markdown_table(["what", "seconds (p10-p90)", "rate", "utilisation"], rows) + "\n" + tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="3b", help="3b, 7b, or a perf.workloads size (tiny, small, 100m)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--queries", type=int, default=8, help="per device")
    parser.add_argument("--devices", type=int, default=0, help="devices of the mesh (0: all)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--grid", type=int, nargs=3, default=(1, 16, 16), help="image patches t h w per query")
    parser.add_argument("--logp-chunk", type=int, default=64)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--bandwidth-gbs", type=float, default=0.0)
    args = parser.parse_args(argv)
    print(f"Machine: {report.machine_line()}\n")
    result = measure(args)
    print(f"Command: `{report.command_line()}`\n")
    print(render(args, result))
    return result


if __name__ == "__main__":
    main()
