"""A GRPO step at the paper's scale by the analytic model (anatomy_r1_jax/perf/step_model.py).

    python scripts/bench_step_model.py [--new-tokens 512] [--queries 4 --group 8] [--hbm-eff 0.7 --mfu 0.45]

For Qwen2.5-VL-3B and -7B on 8 x H100 and a TPU v5e-8: seconds of the rollout, the KL reference and
the update per step, generated tokens/s/GPU of the rollout and the step's MFU, with the layout the
code had before issue 22 (weights gathered over fsdp on every token, one rollout per micro-batch,
fp32 cache read whole, padded update) and after it (weights resharded once per step, one rollout per
step, bf16 cache read to its filled length, length-trimmed update), and after it at each tensor
degree of the rollout. Printed as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

from anatomy_r1_jax.models import QwenVLConfig  # noqa: E402
from anatomy_r1_jax.models.presets import preset_hf_config  # noqa: E402
from anatomy_r1_jax.perf import report, step_model  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=4, help="prompts per device")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=1024)
    parser.add_argument("--filled", type=int, default=660, help="real prompt tokens of the budget")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--hbm-eff", type=float, default=0.7, help="achieved fraction of HBM bandwidth")
    parser.add_argument("--mfu", type=float, default=0.45, help="achieved MFU of prefill / reference / update")
    args = parser.parse_args(argv)
    load = step_model.Workload(queries=args.queries, group=args.group, prompt_length=args.prompt_length,
                               filled=args.filled, max_new_tokens=args.new_tokens, micro_batches=args.micro_batches)
    rows = []
    for name in ("qwen2_5_vl_3b", "qwen2_5_vl_7b"):
        cfg = QwenVLConfig.from_hf(preset_hf_config(name))
        for hw in step_model.HARDWARE.values():
            cases = [("before", step_model.BEFORE, None), ("after, smallest fitting tensor degree", step_model.AFTER, None)]
            cases += [(f"after, rollout tensor {t}", step_model.AFTER, t) for t in (1, 2, 4, 8)]
            for label, design, tensor in cases:
                r = step_model.step(cfg, hw, load, design, hbm_eff=args.hbm_eff, mfu=args.mfu, tensor=tensor)
                rows.append([name, hw.name, label, r["rollout_tensor_parallel"],
                             f"{r['rollout_gb']:.1f} / {hw.memory / 1e9:.0f}",
                             r["decode_step_ms"], r["rollout_s"], r["reference_s"], r["update_s"], r["step_s"],
                             f"{r['tokens_per_s_per_gpu']:.0f}", f"{r['mfu']:.1%}",
                             f"{r['rollout_s'] / r['update_s']:.2f}"])
    print(f"Per device: {load.queries} prompts x G {load.group} rows, prompt budget {load.prompt_length} "
          f"({load.filled} real tokens), {load.max_new_tokens} new tokens at most (lengths spread evenly, mean "
          f"{load.lengths().mean():.0f}), {load.micro_batches} update micro-batches, KL reference, full remat; "
          f"HBM at {args.hbm_eff:.0%} of its peak, prefill / reference / update at {args.mfu:.0%} MFU.\n")
    print(report.markdown_table(["model", "hardware", "layout", "rollout tensor", "rollout GB / device", "decode step ms",
                                 "rollout s", "reference s", "update s", "step s", "generated tok/s/GPU", "MFU",
                                 "rollout / update"], rows))


if __name__ == "__main__":
    main()
