"""GRPO update throughput: our `train_step` against the same update written plainly in PyTorch.

    python scripts/bench_step.py [--case tiny,8,8,160,24 --case 100m,2,4,128,32] [--reps 5] [--scaling]

A case is `size,queries,group,prompt_length,completion_length` (see bench_rollout.py). Both sides
start from identical weights (a saved random transformers model loaded into ours) and run one
update on the same batch: policy forward with images, per-token log-probs of the completions at
temperature 0.9, a frozen reference copy's log-probs, GRPO advantages (group mean / unbiased std),
token-mean clipped surrogate + 0.04 * k3 KL, backward, global-norm clip 1.0, AdamW (b2 0.99).
The torch side is the model's forward with `logits_to_keep = T + 1` (as TRL), the loss as a dozen
lines of tensor code, `clip_grad_norm_` and `torch.optim.AdamW`. The first update's losses are
compared. Ours runs two ways: "shared" (one prompt row per group: each prompt goes through the
model once and its KV cache serves the group's G completions, as the trainer runs steps without
GDQA variants) and "per row" (G prompt rows per group, the same arithmetic as the torch side).
Timings are interleaved medians; FLOP/s divides XLA's `cost_analysis()` FLOP count of each compiled
step by its time (torch's time by the per-row count).

`--profile N` lists the N source lines where our update spends most time (perf.profile).
`--scaling` adds ours alone as the group size G and the completion length T grow: step time and
the compiled step's `memory_analysis()` (per device: arguments, temporaries, peak).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from anatomy_r1_jax.requirements import require_torch  # noqa: E402

require_torch()  # one line naming a missing package

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from anatomy_r1_jax.perf import profile, report, workloads  # noqa: E402
from anatomy_r1_jax.perf.memory import compiled_memory  # noqa: E402
from anatomy_r1_jax.perf.timing import time_interleaved  # noqa: E402
from anatomy_r1_jax.train.step import step_configs  # noqa: E402
from configs.default import get_config  # noqa: E402
from configs.methods import paper_update  # noqa: E402

DEFAULT_CASES = ("tiny,8,8,160,24", "100m,2,4,128,32")
RULES = [tuple(r) for r in get_config().sharding_rules]
HP = dict(lr=1e-5, b1=0.9, b2=0.99, grad_clip=1.0)


def step_config(group: int, length: int):
    """The update both sides run: the GRPO StepConfig of the paper's settings (configs/methods.py
    paper_update: temperature 0.9, beta 0.04, clip 0.2, token-mean) at G = group, T = length, fp32."""
    return step_configs(paper_update(get_config(), group=group, length=length, logp_chunk=32))["grpo"]



# ---- ours ----------------------------------------------------------------------------------------
def our_batch(prompts, comp):
    """The benchmark's TrainBatch [M = 1, N, ...] on the default device."""
    return jax.device_put(jax.tree.map(jnp.asarray, workloads.train_batch(prompts, comp)))


def our_update(model, group: int, length: int):
    """(jitted step, initial TrainState) for the GRPO update of the benchmark (completions of `length`)."""
    return workloads.one_device_update(model, step_config(group, length), RULES, **HP)


class OurStepper:
    """Holds the (donated) state between calls; `__call__` runs one update and returns its metrics."""

    def __init__(self, model, group: int, batch):
        self.step, self.state = our_update(model, group, batch.completions.ids.shape[-1])
        self.batch = batch

    def compile(self):
        return self.step.lower(self.state, self.batch).compile()

    def __call__(self):
        self.state, metrics = self.step(self.state, self.batch)
        return metrics


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


# ---- the plain PyTorch reference -----------------------------------------------------------------
def torch_token_logps(model, inputs, ids, mask, temperature):
    """[N, T] log-probs of the completion ids at `temperature` (logits of the last T + 1 positions)."""
    t = ids.shape[1]
    out = model(input_ids=torch.cat([inputs["input_ids"], ids], 1),
                attention_mask=torch.cat([inputs["attention_mask"], mask], 1),
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1),
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], logits_to_keep=t + 1)
    logits = out.logits[:, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]


class TorchStepper:
    """GRPO (token-mean, clipped surrogate, k3 KL to a frozen copy) + AdamW on a transformers model."""

    def __init__(self, model, inputs, comp, group: int):
        self.policy = model.train()
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=HP["lr"], betas=(HP["b1"], HP["b2"]),
                                     weight_decay=0.0, eps=1e-8)
        self.inputs, self.group = inputs, group
        self.cfg = step_config(group, comp["ids"].shape[1])
        self.ids = torch.from_numpy(comp["ids"]).long()
        self.mask = torch.from_numpy(comp["mask"]).long()
        self.rewards = torch.from_numpy(comp["rewards"])

    def __call__(self):
        r = self.rewards.view(-1, self.group)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        cfg, loss = self.cfg, self.cfg.loss
        logp = torch_token_logps(self.policy, self.inputs, self.ids, self.mask, cfg.temperature)
        with torch.no_grad():
            ref_logp = torch_token_logps(self.ref, self.inputs, self.ids, self.mask, cfg.temperature)
        ratio = torch.exp(logp - logp.detach())
        surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - loss.eps_low, 1 + loss.eps_high) * adv)
        d = ref_logp - logp
        per_token = -surrogate + loss.beta * (torch.exp(d) - d - 1)
        m = self.mask.float()
        loss = (per_token * m).sum() / m.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), HP["grad_clip"])
        self.opt.step()
        return loss.item()


# ---- runs ----------------------------------------------------------------------------------------
OURS = ("ours shared", "ours per row")  # one prompt row per group (as the trainer runs it) / G rows per group


def our_steppers(model, case: workloads.Case, comp) -> dict[str, OurStepper]:
    """Our update on the same rows two ways: prompts shared by each group's rows (prefix sharing,
    what the trainer does when a step has no GDQA variants) and one prompt row per completion."""
    shared, per_row, _ = workloads.case_prompts(model.config, case)
    return {name: OurStepper(model, case.group, our_batch(p, comp)) for name, p in zip(OURS, (shared, per_row))}


def run_case(case: workloads.Case, reps: int, workdir: str, profile_top: int = 0) -> dict:
    ref, model, config = workloads.reference_pair(case.size, workdir)
    _, _, hf = workloads.case_prompts(model.config, case)
    comp = workloads.random_completions(model.config, case.rows, case.new_tokens)
    sides = {**our_steppers(model, case, comp), "torch": TorchStepper(ref, workloads.torch_inputs(hf), comp, case.group)}
    compiled, compile_s = {}, {}
    for name in OURS:
        start = time.perf_counter()
        compiled[name] = sides[name].compile()
        compile_s[name] = time.perf_counter() - start
    losses = {name: float(sides[name]()["loss"]) if name in OURS else sides[name]() for name in sides}  # first update
    timings = time_interleaved(sides, reps=reps, warmup=0)
    top = profile.top_ops(sides[OURS[0]], compiled[OURS[0]].as_text(), top=profile_top) if profile_top else None
    return dict(case=case, params=workloads.parameter_count(config), losses=losses, timings=timings,
                flops={k: flops_of(c) for k, c in compiled.items()}, compile_s=compile_s,
                memory={k: compiled_memory(c) for k, c in compiled.items()}, profile=top)


def scaling(size: str, queries: int, prompt_length: int, grid: list[tuple[int, int]], reps: int, workdir: str):
    """Ours alone (shared prompts, as the trainer runs it) as G and T grow."""
    _, model, _ = workloads.reference_pair(size, workdir)
    rows = []
    for group, length in grid:
        case = workloads.Case(size, queries, group, prompt_length, length)
        comp = workloads.random_completions(model.config, case.rows, length)
        ours = our_steppers(model, case, comp)[OURS[0]]
        compiled = ours.compile()
        mem = compiled_memory(compiled)
        t = time_interleaved({"ours": ours}, reps=reps, warmup=1)["ours"]
        rows.append([group, length, case.rows, queries * prompt_length + case.rows * length, f"{t.median:.3f}",
                     case.rows / t.median, flops_of(compiled) / t.median / 1e9, mem.argument / 2**20,
                     mem.temp / 2**20, mem.peak / 2**20])
    return report.markdown_table(["G", "T", "rows", "tokens", "step s", "samples/s", "GFLOP/s", "arguments MiB",
                                  "temporaries MiB", "peak MiB"], rows)


def table(results) -> str:
    rows = []
    for r in results:
        c, t = r["case"], r["timings"]
        spread = lambda x: f"{x.median:.3f} ({x.p10:.3f}-{x.p90:.3f})"  # noqa: E731
        torch_s = t["torch"].median
        rows.append([c.size, f"{r['params'] / 1e6:.1f}M", f"{c.queries}x{c.group}={c.rows}", c.prompt_length,
                     c.new_tokens, *(spread(t[k]) for k in (*OURS, "torch")),
                     *(c.rows / t[k].median for k in (*OURS, "torch")),
                     *(f"**{torch_s / t[k].median:.2f}x**" for k in OURS),
                     *(r["flops"][k] / 1e9 for k in OURS),
                     *(r["flops"][k] / t[k].median / 1e9 for k in OURS), r["flops"][OURS[1]] / torch_s / 1e9,
                     *(r["memory"][k].peak / 2**20 for k in OURS),
                     " / ".join(f"{r['compile_s'][k]:.1f}" for k in OURS),
                     " / ".join(f"{r['losses'][k]:.5f}" for k in (*OURS, "torch"))])
    return report.markdown_table(
        ["model", "params", "rows (Q x G)", "prompt len", "completion len", "ours shared s (p10-p90)",
         "ours per-row s", "torch s", "ours shared samples/s", "ours per-row samples/s", "torch samples/s",
         "speed-up shared", "speed-up per-row", "GFLOP / step shared (XLA)", "GFLOP / step per-row",
         "ours shared GFLOP/s", "ours per-row GFLOP/s", "torch GFLOP/s (per-row count)", "peak MiB shared",
         "peak MiB per-row", "compile s shared / per-row", "first loss shared / per-row / torch"], rows)


def main(argv=None):
    parser = report.comparison_parser(__doc__, "size,queries,group,prompt_length,completion_length")
    parser.add_argument("--scaling", action="store_true", help="also scale G and T (ours alone)")
    parser.add_argument("--scaling-size", default="tiny")
    parser.add_argument("--only-scaling", action="store_true")
    args = parser.parse_args(argv)
    report.apply_torch_threads(args)
    print(f"Machine: {report.machine_line()}; torch threads {torch.get_num_threads()}\n")
    with tempfile.TemporaryDirectory() as workdir:
        results = [] if args.only_scaling else [
            run_case(workloads.Case.parse(c), args.reps, workdir, args.profile) for c in (args.case or DEFAULT_CASES)]
        grid = [(g, 24) for g in (4, 8, 16)] + [(8, t) for t in (64, 128, 256)]
        scaled = scaling(args.scaling_size, 8, 160, grid, args.reps, workdir) if (
            args.scaling or args.only_scaling) else None
    print(f"Command: `{report.command_line()}`\n")
    if results:
        paper = step_config(8, 24)
        print(f"fp32, one micro-batch, lr {HP['lr']}, beta {paper.loss.beta}, eps {paper.loss.eps_low} / "
              f"{paper.loss.eps_high}, temperature {paper.temperature}; medians of {args.reps} interleaved "
              "updates; samples = rows per second; "
              "FLOP/s = XLA's FLOP count of the compiled step / its time (torch's: the per-row count, the "
              "same arithmetic); 'shared': one prompt row per group (prefix sharing), 'per row': G.\n")
        print(table(results))
        for r in results:
            if r["profile"]:
                print(f"\nWhere our update spends its time ({r['case'].size}; one traced step):\n")
                print(profile.markdown(r["profile"]))
    if scaled:
        print(f"\nScaling (ours with shared prompts, {args.scaling_size} model, 8 queries, prompt length 160; "
              "tokens = prompt + completion tokens processed; memory from the compiled step's memory_analysis(), "
              "per device):\n")
        print(scaled)
    print("\nLoad average at the end: {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
