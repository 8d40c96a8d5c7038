"""Rollout throughput: our jitted `generate` against transformers' `generate` (torch), same weights.

    python scripts/bench_rollout.py [--case tiny,8,8,160,24 --case 100m,2,8,160,64] [--reps 5] [--split]

A case is `size,queries,group,prompt_length,new_tokens` (sizes: anatomy_r1_jax.perf.workloads.SIZES;
the defaults are configs/default.py's rollout on its tiny model, and a ~100M-parameter Qwen2-VL).
For each case a random transformers model is saved and loaded into ours, so the weights are
identical; both sample N = queries * group rows from the same image prompts with the same
temperature / top-k / top-p, exactly `new_tokens` tokens each (EOS forbidden on our side,
`min_new_tokens` on theirs; the image placeholders are forbidden on both). Timings are interleaved
(ours, theirs, ours, ...) after warm-up (our compile); the table gives medians and the p10-p90 spread.
Ours runs two ways: "shared" (one prompt row per group, prefilled once and its KV cache repeated
to the group's G rows, as the trainer runs steps without GDQA variants) and "per row" (N prompt
rows, as transformers' generate gets them).
`--split` also times prefill alone (one new token) to separate prompt processing from decoding;
`--scan-layers` runs our model with its layers stacked under `lax.scan` (the real-model configs' setting);
`--profile N` lists the N source lines where our rollout spends most time (anatomy_r1_jax.perf.profile).
Prints markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import require_torch  # noqa: E402

require_torch()  # one line naming a missing package

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from anatomy_r1_jax.perf import profile, report, workloads  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.rl.rollout import generate  # noqa: E402
from anatomy_r1_jax.rl.sampling import SamplingConfig  # noqa: E402

DEFAULT_CASES = ("tiny,8,8,160,24", "100m,2,8,160,64")
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.9)  # configs/default.py's rl settings


def placeholder_ids(cfg) -> tuple[int, ...]:
    return (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)


def ours_rollout(model, batch, new_tokens: int, group_size: int = 1):
    """(zero-argument callable: jitted generate with the tokens fetched to the host, as torch returns
    them; zero-argument callable giving the compiled HLO text). group_size > 1: batch has one
    prompt row per group."""
    cfg = model.config
    sc = SamplingConfig(max_new_tokens=new_tokens, eos_ids=(), pad_id=0,
                        forbidden_ids=placeholder_ids(cfg) + tuple(cfg.eos_token_ids), **SAMPLING)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, batch, rng: generate(nnx.merge(graphdef, state), batch, rng, sc,
                                                    group_size=group_size).ids)
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    return (lambda: np.asarray(fn(state, batch, next(keys))),
            lambda: fn.lower(state, batch, jax.random.key(0)).compile().as_text())


def reference_rollout(ref, inputs, cfg, new_tokens: int):
    def run():
        with torch.no_grad():
            return ref.generate(**inputs, do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                suppress_tokens=list(placeholder_ids(cfg)), pad_token_id=0, **SAMPLING)
    return run


def prefill_agreement(model, ref, prompts, hf) -> float:
    """Max |difference| of the next-token log-probs after the prompts (same weights and inputs)."""
    ours = jax.nn.log_softmax(model(hf["input_ids"], hf["attention_mask"], hf["pixel_values"],
                                    hf["image_grid_thw"])[:, -1], axis=-1)
    with torch.no_grad():
        theirs = torch.log_softmax(ref(**workloads.torch_inputs(hf), logits_to_keep=1).logits[:, -1], -1)
    return float(np.abs(np.asarray(ours) - theirs.numpy()).max())


OURS = {"ours shared": True, "ours per row": False}


def run_case(case: workloads.Case, reps: int, split: bool, workdir: str, profile_top: int = 0,
             scan_layers: bool = False) -> dict:
    ref, model, config = workloads.reference_pair(case.size, workdir, scan_layers=scan_layers)
    shared, prompts, hf = workloads.case_prompts(model.config, case)
    diff = prefill_agreement(model, ref, prompts, hf)
    inputs = workloads.torch_inputs(hf)
    put = lambda p: jax.device_put(jax.tree.map(jnp.asarray, p))  # noqa: E731
    fns, hlo, compile_s = {}, {}, {}
    for name, share in OURS.items():
        args = (put(shared), case.new_tokens, case.group) if share else (put(prompts), case.new_tokens)
        fns[name], hlo[name] = ours_rollout(model, *args)
        start = time.perf_counter()
        out = fns[name]()  # compile + first run
        compile_s[name] = time.perf_counter() - start
        assert out.shape == (case.rows, case.new_tokens)
        if split:
            fns[f"{name} prefill"] = ours_rollout(model, *args[:1], 1, *args[2:])[0]
    fns["transformers"] = reference_rollout(ref, inputs, model.config, case.new_tokens)
    if split:
        fns["transformers prefill"] = reference_rollout(ref, inputs, model.config, 1)
    timings = time_interleaved(fns, reps=reps, warmup=1)
    top = profile.top_ops(fns["ours shared"], hlo["ours shared"](), top=profile_top) if profile_top else None
    return dict(case=case, params=workloads.parameter_count(config), diff=diff, compile_s=compile_s, timings=timings,
                profile=top)


def tables(results: list[dict], split: bool) -> str:
    rows, split_rows = [], []
    sides = (*OURS, "transformers")
    for r in results:
        c, tm = r["case"], r["timings"]
        tokens = c.rows * c.new_tokens
        theirs = tm["transformers"].median
        rows.append([c.size, f"{r['params'] / 1e6:.1f}M", f"{c.queries}x{c.group}={c.rows}", c.prompt_length,
                     c.new_tokens, *(f"{tm[k].median:.3f} ({tm[k].p10:.3f}-{tm[k].p90:.3f})" for k in sides),
                     *(tokens / tm[k].median for k in sides), *(f"**{theirs / tm[k].median:.2f}x**" for k in OURS),
                     " / ".join(f"{r['compile_s'][k]:.1f}" for k in OURS), f"{r['diff']:.1e}"])
        if split:
            prefill = {k: tm[f"{k} prefill"].median for k in sides}
            decode = {k: max(tm[k].median - prefill[k], 1e-9) for k in sides}
            split_rows.append([c.size, *(f"{prefill[k]:.3f}" for k in sides),
                               *(f"{prefill['transformers'] / prefill[k]:.2f}x" for k in OURS),
                               *(c.rows * (c.new_tokens - 1) / decode[k] for k in sides),
                               *(f"{decode['transformers'] / decode[k]:.2f}x" for k in OURS)])
    out = report.markdown_table(
        ["model", "params", "rows (Q x G)", "prompt len", "new tokens", "ours shared s (p10-p90)",
         "ours per-row s", "transformers s", "ours shared tok/s", "ours per-row tok/s", "transformers tok/s",
         "speed-up shared", "speed-up per-row", "our compile s shared / per-row", "max abs dlogp (prefill)"], rows)
    if split:
        out += "\n\nPrefill (one new token) and decode (the rest) separately:\n\n" + report.markdown_table(
            ["model", "ours shared prefill s", "ours per-row prefill s", "transformers prefill s",
             "prefill speed-up shared", "prefill speed-up per-row", "ours shared decode tok/s",
             "ours per-row decode tok/s", "transformers decode tok/s", "decode speed-up shared",
             "decode speed-up per-row"], split_rows)
    return out


def main(argv=None):
    parser = report.comparison_parser(__doc__, "size,queries,group,prompt_length,new_tokens")
    parser.add_argument("--split", action="store_true", help="also time prefill alone")
    parser.add_argument("--scan-layers", action="store_true", help="our layers stacked and run by lax.scan")
    args = parser.parse_args(argv)
    report.apply_torch_threads(args)
    cases = [workloads.Case.parse(c) for c in (args.case or DEFAULT_CASES)]
    print(f"Machine: {report.machine_line()}; torch threads {torch.get_num_threads()}\n")
    with tempfile.TemporaryDirectory() as workdir:
        results = [run_case(c, args.reps, args.split, workdir, args.profile, args.scan_layers) for c in cases]
    print(f"Command: `{report.command_line()}`\n")
    print(f"Sampling: temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}, top-p {SAMPLING['top_p']}; "
          f"fp32; medians of {args.reps} interleaved runs; tok/s = completion tokens (rows x new tokens) per second "
          f"of a whole rollout (image encoding + prefill + decode).\n")
    print(tables(results, args.split))
    for r in results:
        if r["profile"]:
            print(f"\nWhere our rollout spends its time ({r['case'].size}; one traced run):\n")
            print(profile.markdown(r["profile"]))
    print("\nLoad average at the end: {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
