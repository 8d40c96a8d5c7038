"""How the model code scales with the batch's images and the model's depth (no weights, no data).

    python scripts/bench_model_scaling.py vision [--preset qwen2_5_vl_3b] [--grid 32,32] [--images 2,8]
    python scripts/bench_model_scaling.py compile [--preset qwen2_5_vl_3b] [--layers 4,48]

vision: XLA's FLOP count (`cost_analysis()`) of the jitted vision tower (the preset's widths,
`--depth` blocks, the last one full attention, the rest windowed for Qwen2.5-VL) for n images of
one grid, with attention dense over all patches (one row: frame_budget None) and per frame
(frame_budget = one image's patches). Per-frame cost should grow linearly in n.
compile: seconds to compile jit(grad) of a mean-of-hidden loss through the decoder at several
depths (the preset's widths, 2 x 256 tokens), with the layers unrolled and scanned.
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

from anatomy_r1_jax.models import QwenVLConfig  # noqa: E402
from anatomy_r1_jax.models.presets import preset_hf_config  # noqa: E402
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
    print(f"Vision tower FLOPs (TFLOP), {args.preset} widths, {args.depth} blocks, images of {grid[1]}x{grid[2]} patches")
    print(report.markdown_table(["attention"] + [f"{n} images" for n in counts] + [f"{counts[-1]} / {counts[0]}"], rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["vision"])
    parser.add_argument("--preset", default="qwen2_5_vl_3b")
    parser.add_argument("--grid", type=lambda s: tuple(int(x) for x in s.split(",")), default=(32, 32))
    parser.add_argument("--images", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8])
    parser.add_argument("--depth", type=int, default=4, help="vision blocks (vision)")
    args = parser.parse_args()
    model_cfg = QwenVLConfig.from_hf(preset_hf_config(args.preset))
    print(report.machine_line())
    print(report.command_line())
    vision(args, model_cfg)


if __name__ == "__main__":
    main()
