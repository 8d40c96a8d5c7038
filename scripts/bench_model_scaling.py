"""How the model code scales with the batch's images and the model's depth (no weights, no data).

    python scripts/bench_model_scaling.py vision [--preset qwen2_5_vl_3b] [--grid 32,32] [--images 2,8]
    python scripts/bench_model_scaling.py compile [--preset qwen2_5_vl_3b] [--layers 4,48] [--remat full]

vision: XLA's FLOP count (`cost_analysis()`) of the jitted vision tower (the preset's widths,
`--depth` blocks, the last one full attention, the rest windowed for Qwen2.5-VL) for n images of
one grid, with attention dense over all patches (one row: frame_budget None) and per frame
(frame_budget = one image's patches). Per-frame cost should grow linearly in n.
compile: seconds to compile jit(grad) of a mean-of-hidden loss through the decoder at several
depths (the preset's widths, 2 x 256 tokens, fp32), with the layers unrolled and scanned.
Everything is built abstractly (ShapeDtypeStructs), so real widths fit on a laptop.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from anatomy_r1_jax.models import QwenVL, QwenVLConfig  # noqa: E402
from anatomy_r1_jax.models.presets import preset_hf_config, tiny_hf_config  # noqa: E402
from anatomy_r1_jax.models.vision import VisionTower, vision_inputs  # noqa: E402
from anatomy_r1_jax.perf import report  # noqa: E402


def vision_flops(cfg, grid, n_images: int, frame_budget) -> float:
    inputs = vision_inputs(np.array([grid] * n_images), cfg, frame_budget=frame_budget)
    pixels = jax.ShapeDtypeStruct((inputs.num_patches, cfg.patch_dim), jnp.float32)
    tower = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(tower)
    run = jax.jit(lambda state, x, i: nnx.merge(graphdef, state)(x, i))
    return run.lower(state, pixels, inputs).compile().cost_analysis()["flops"]


def vision(args, model_cfg: QwenVLConfig) -> None:
    cfg = dataclasses.replace(model_cfg.vision, depth=args.depth, fullatt_block_indexes=(args.depth - 1,))
    grid = (1, *args.grid)
    counts = args.images
    rows = []
    for name, budget in (("dense (one row)", None), ("per frame", int(np.prod(grid)))):
        flops = [vision_flops(cfg, grid, n, budget) for n in counts]
        rows.append([name] + [f"{f / 1e12:.2f}" for f in flops] + [f"{flops[-1] / flops[0]:.2f}x"])
    print(f"Vision tower FLOPs (TFLOP), {args.preset} widths, {args.depth} blocks, "
          f"images of {grid[1]}x{grid[2]} patches")
    header = ["attention"] + [f"{n} images" for n in counts] + [f"{counts[-1]} / {counts[0]}"]
    print(report.markdown_table(header, rows))


def compile_seconds(cfg: QwenVLConfig, layers: int, scan_layers: bool, remat: str) -> float:
    cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    model = nnx.eval_shape(lambda: QwenVL(cfg, scan_layers=scan_layers, remat=remat, attention="xla",
                                          rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    batch, length = 2, 256
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    positions = jax.ShapeDtypeStruct((3, batch, length), jnp.int32)

    def loss(state, ids, positions):
        hidden, _ = nnx.merge(graphdef, state).forward(ids, positions, jnp.ones_like(ids))
        return jnp.mean(hidden.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss)).lower(state, ids, positions)
    start = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - start


def compile_(args, model_cfg: QwenVLConfig) -> None:
    rows = []
    for scan in (False, True):
        seconds = [compile_seconds(model_cfg, n, scan, args.remat) for n in args.layers]
        rows.append(["scanned" if scan else "unrolled"] + [f"{t:.1f}" for t in seconds]
                    + [f"{seconds[-1] / seconds[0]:.2f}x"])
    print(f"Compile seconds of jit(grad) through the decoder, {args.preset} widths, remat {args.remat}, 2 x 256 tokens")
    print(report.markdown_table(["layers"] + [str(n) for n in args.layers] + [f"{args.layers[-1]} / {args.layers[0]}"],
                                rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["vision", "compile"])
    parser.add_argument("--preset", default="qwen2_5_vl_3b", help="a real-size preset, or tiny (configs/default.py)")
    parser.add_argument("--grid", type=lambda s: tuple(int(x) for x in s.split(",")), default=(32, 32))
    parser.add_argument("--images", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8])
    parser.add_argument("--depth", type=int, default=4, help="vision blocks (vision)")
    parser.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[4, 48],
                        help="decoder depths (compile)")
    parser.add_argument("--remat", default="full", help="remat policy (compile)")
    args = parser.parse_args()
    if args.preset == "tiny":  # the default config's model (configs/default.py)
        from configs import default

        model_cfg = QwenVLConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=1024, **default.get_config().model.tiny))
    else:
        model_cfg = QwenVLConfig.from_hf(preset_hf_config(args.preset))
    print(report.machine_line())
    print(report.command_line())
    (vision if args.what == "vision" else compile_)(args, model_cfg)


if __name__ == "__main__":
    main()
