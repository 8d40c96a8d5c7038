"""Rollout throughput: our jitted `generate` against transformers' `generate` (torch), same weights.

    python scripts/bench_rollout.py [--case tiny,8,8,160,24 --case 100m,2,8,160,64] [--reps 5] [--split]

A case is `size,queries,group,prompt_length,new_tokens` (sizes: anatomy_r1_jax.perf.workloads.SIZES;
the defaults are configs/default.py's rollout on its tiny model, and a ~100M-parameter Qwen2-VL).
For each case a random transformers model is saved and loaded into ours, so the weights are
identical; both sample N = queries * group rows from the same image prompts with the same
temperature / top-k / top-p, exactly `new_tokens` tokens each (EOS forbidden on our side,
`min_new_tokens` on theirs; the image placeholders are forbidden on both). Timings are interleaved
(ours, theirs, ours, ...) after warm-up (our compile); the table gives medians and the p10-p90 spread.
`--split` also times prefill alone (one new token) to separate prompt processing from decoding;
`--profile N` lists the N source lines where our rollout spends most time (anatomy_r1_jax.perf.profile).
Prints markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

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


def ours_rollout(model, batch, new_tokens: int):
    """(zero-argument callable: jitted generate with the tokens fetched to the host, as torch returns
    them; zero-argument callable giving the compiled HLO text)."""
    cfg = model.config
    sc = SamplingConfig(max_new_tokens=new_tokens, eos_ids=(), pad_id=0,
                        forbidden_ids=placeholder_ids(cfg) + tuple(cfg.eos_token_ids), **SAMPLING)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, batch, rng: generate(nnx.merge(graphdef, state), batch, rng, sc).ids)
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


def run_case(case: workloads.Case, reps: int, split: bool, workdir: str, profile_top: int = 0) -> dict:
    ref, model, config = workloads.reference_pair(case.size, workdir)
    prompts, hf = workloads.image_prompts(model.config, queries=case.queries, group=case.group,
                                          prompt_length=case.prompt_length)
    diff = prefill_agreement(model, ref, prompts, hf)
    batch = jax.device_put(jax.tree.map(jnp.asarray, prompts))
    inputs = workloads.torch_inputs(hf)
    t = case.new_tokens
    ours, hlo_text = ours_rollout(model, batch, t)
    fns = {"ours": ours, "transformers": reference_rollout(ref, inputs, model.config, t)}
    start = time.perf_counter()
    out = fns["ours"]()  # compile + first run
    compile_s = time.perf_counter() - start
    assert out.shape == (prompts.input_ids.shape[0], t)
    if split:
        fns["ours prefill"] = ours_rollout(model, batch, 1)[0]
        fns["transformers prefill"] = reference_rollout(ref, inputs, model.config, 1)
    timings = time_interleaved(fns, reps=reps, warmup=1)
    top = profile.top_ops(ours, hlo_text(), top=profile_top) if profile_top else None
    return dict(case=case, params=workloads.parameter_count(config), diff=diff, compile_s=compile_s, timings=timings,
                profile=top)


def tables(results: list[dict], split: bool) -> str:
    rows, split_rows = [], []
    for r in results:
        c, tm = r["case"], r["timings"]
        n = c.rows
        tokens = n * c.new_tokens
        ours, theirs = tm["ours"], tm["transformers"]
        rows.append([c.size, f"{r['params'] / 1e6:.1f}M", f"{c.queries}x{c.group}={n}", c.prompt_length,
                     c.new_tokens, f"{ours.median:.3f} ({ours.p10:.3f}-{ours.p90:.3f})",
                     f"{theirs.median:.3f} ({theirs.p10:.3f}-{theirs.p90:.3f})", tokens / ours.median,
                     tokens / theirs.median, f"**{theirs.median / ours.median:.2f}x**", f"{r['compile_s']:.1f}",
                     f"{r['diff']:.1e}"])
        if split:
            decode = {k: max(tm[k].median - tm[f"{k} prefill"].median, 1e-9) for k in ("ours", "transformers")}
            split_rows.append([c.size, f"{tm['ours prefill'].median:.3f}", f"{tm['transformers prefill'].median:.3f}",
                               f"{tm['transformers prefill'].median / tm['ours prefill'].median:.2f}x",
                               n * (c.new_tokens - 1) / decode["ours"],
                               n * (c.new_tokens - 1) / decode["transformers"],
                               f"{decode['transformers'] / decode['ours']:.2f}x"])
    out = report.markdown_table(
        ["model", "params", "rows (Q x G)", "prompt len", "new tokens", "ours s (p10-p90)",
         "transformers s (p10-p90)", "ours tok/s", "transformers tok/s", "speed-up", "our compile s",
         "max abs dlogp (prefill)"], rows)
    if split:
        out += "\n\nPrefill (one new token) and decode (the rest) separately:\n\n" + report.markdown_table(
            ["model", "ours prefill s", "transformers prefill s", "prefill speed-up", "ours decode tok/s",
             "transformers decode tok/s", "decode speed-up"], split_rows)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="size,queries,group,prompt_length,new_tokens (repeatable)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--split", action="store_true", help="also time prefill alone")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N source lines where our rollout spends most time")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cases = [workloads.Case.parse(c) for c in (args.case or DEFAULT_CASES)]
    print(f"Machine: {report.machine_line()}; torch threads {torch.get_num_threads()}\n")
    with tempfile.TemporaryDirectory() as workdir:
        results = [run_case(c, args.reps, args.split, workdir, args.profile) for c in cases]
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
