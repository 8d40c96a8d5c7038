"""A GRPO step at the paper's scale, analytically: rollout, KL reference, update; per device.

The rollout's decode is bound by memory and interconnect, the reference and the update by compute.
Every term below is a consequence of how the code lays the work out (`Design`), so the same model
gives the step before and after a change of layout:

    decode step   = weight bytes read / (HBM x eff) + KV-cache bytes read / (HBM x eff)
                    + per-token collectives: fsdp weight all-gathers ((n - 1) / n x W / link), the
                      [rows, vocab] logits all-gather, or tensor-parallel activation all-reduces
                      (2 per layer), each with its latency
    rollout       = calls x (prefill FLOPs / (peak x mfu) + T_max x decode step) + one reshard
    reference     = forward FLOPs of the step's completions (padded or trimmed) / (peak x mfu)
    update        = (3 + recompute) x forward FLOPs / (peak x mfu), at least its fsdp traffic
                    (weights gathered forward and backward, gradients reduce-scattered) per micro-batch
    MFU           = model FLOPs (perf/flops.py: rollout + reference + update, no recomputation)
                    / (step seconds x peak)
    tokens/s/GPU  = generated tokens of the device's rows / rollout seconds

Completions: `rows` lengths spread evenly over (0, T_max] (mean T_max / 2, the longest T_max, so the
decode loop runs T_max steps). The KV cache holds the prompt budget Lp (a real prompt fills `filled`
of it; the rest is left padding, which decode still reads) and T_max completion slots. Figures are per device of a data-parallel
step of `queries` prompts x G rollouts per device; efficiencies are assumptions, stated in the table.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from anatomy_r1_jax.models.config import QwenVLConfig
from anatomy_r1_jax.perf import flops, workloads


@dataclasses.dataclass(frozen=True)
class Hardware:
    """peak bf16 FLOP/s, HBM bytes/s and bytes, interconnect bytes/s per device and direction (ring
    collectives), a collective's latency (s)."""

    name: str
    devices: int
    peak: float
    hbm: float
    memory: float
    link: float
    latency: float = 10e-6


# Data sheets: H100 SXM 989 TFLOP/s bf16 dense, 3.35 TB/s, 80 GB, NVLink 4 900 GB/s (450 per direction);
# TPU v5e 197 TFLOP/s, 819 GB/s, 16 GB, ICI 1600 Gbit/s per chip (taken as 100 GB/s per direction).
HARDWARE = {
    "8x H100": Hardware("8x H100 SXM", 8, 989e12, 3.35e12, 80e9, 450e9),
    "v5e-8": Hardware("TPU v5e-8", 8, 197e12, 0.819e12, 16e9, 100e9),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """Per device: `queries` prompts x `group` rollouts; prompt budget Lp (`filled` real tokens),
    T_max new tokens; M update micro-batches; KL reference on; full recomputation in the update."""

    queries: int = 4
    group: int = 8
    prompt_length: int = 1024
    filled: int = 660  # an 854x480 frame is 510 image tokens, plus the question and options
    max_new_tokens: int = 512
    micro_batches: int = 4
    reference: bool = True
    recompute: float = 1.0  # extra forwards of the update's remat ("full": 1)

    @property
    def rows(self) -> int:
        return self.queries * self.group

    def lengths(self) -> np.ndarray:
        """Completion lengths [rows], evenly spread over (0, T_max]."""
        return np.ceil(np.arange(1, self.rows + 1) / self.rows * self.max_new_tokens).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Design:
    """How the code lays a step out (issue 22: `BEFORE` the rollout work, `AFTER` it)."""

    rollout_weights: str  # "fsdp": gathered per token; "local": resharded once per step (replicated / TP)
    rollout_calls: str  # "micro": one per update micro-batch; "step": one per step
    cache_bytes: int  # KV cache element size
    cache_reads: str  # "padded": every slot of every row; "filled": each prompt (its whole budget, left
    # padding included) once per group, the completion cache to its filled length rounded up to a bucket
    logits_gather: bool  # the sampler gathers [rows, vocab] logits every token
    update_lengths: str  # "padded": T_max; "trimmed": micro-batches of length-sorted groups, bucketed
    buckets: int = 4  # completion read / trim lengths: multiples of T_max / buckets


BEFORE = Design("fsdp", "micro", 4, "padded", True, "padded")
AFTER = Design("local", "step", 2, "filled", False, "trimmed")


def _bucket(length: float, t_max: int, buckets: int) -> int:
    step = t_max / buckets
    return int(min(t_max, math.ceil(max(length, 1) / step) * step))


def trimmed_lengths(lengths: np.ndarray, group: int, micro_batches: int, t_max: int, buckets: int) -> list[int]:
    """The update's T per micro-batch: whole groups sorted by their longest row, cut into
    `micro_batches` micro-batches, each trimmed to its longest row rounded up to a bucket."""
    longest = np.sort(lengths.reshape(-1, group).max(axis=1))
    return [_bucket(part.max(), t_max, buckets) for part in np.array_split(longest, micro_batches)]


def rollout_bytes(cfg: QwenVLConfig, hw: Hardware, load: Workload, tensor: int) -> float:
    """A device's memory during the rollout at tensor degree `tensor` (0: the fsdp layout, weights
    sharded): the sharded train state, the rollout's bf16 weights and KV cache (0: one micro-batch's,
    fp32)."""
    if tensor == 0:
        cache = load.rows // load.micro_batches * (load.prompt_length + load.max_new_tokens) * _kv_bytes_per_slot(cfg, 4)
        return train_state_bytes(cfg, hw) + cache
    cache = load.rows * (load.prompt_length + load.max_new_tokens) * _kv_bytes_per_slot(cfg, 2)
    return train_state_bytes(cfg, hw) + (workloads.model_parameter_count(cfg) * 2 + cache) / tensor


def tensor_degree(cfg: QwenVLConfig, hw: Hardware, load: Workload) -> int:
    """The smallest tensor-parallel degree (1 = replicated) at which the rollout fits 90% of a
    device's memory (`rollout_bytes`); the largest when none does."""
    fitting = [t for t in (1, 2, 4, 8) if t <= hw.devices and rollout_bytes(cfg, hw, load, t) < 0.9 * hw.memory]
    return fitting[0] if fitting else min(8, hw.devices)


def _kv_bytes_per_slot(cfg: QwenVLConfig, element: int) -> float:
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * element


def train_state_bytes(cfg: QwenVLConfig, hw: Hardware) -> float:
    """The fsdp-sharded train state outside the update: bf16 weights, fp32 master and AdamW moments,
    bf16 reference copy (16 B per parameter; gradients live only in the update)."""
    return workloads.model_parameter_count(cfg) * 16 / hw.devices


def step(cfg: QwenVLConfig, hw: Hardware, load: Workload, design: Design, *, hbm_eff: float = 0.7,
         mfu: float = 0.45, tensor: int | None = None) -> dict:
    """Seconds of each part of one GRPO step, per device, and the derived rates (module docstring).
    tensor: the rollout's tensor-parallel degree t (a group of t devices decodes their t x rows rows
    together, each reading 1/t of the weights, and of the KV heads when they divide); None: the
    smallest that fits memory (`tensor_degree`)."""
    n, t_max, lengths = hw.devices, load.max_new_tokens, load.lengths()
    weight_bytes = flops.language_weight_count(cfg) * 2
    calls = load.micro_batches if design.rollout_calls == "micro" else 1
    local = design.rollout_weights == "local"
    tp = (tensor or tensor_degree(cfg, hw, load)) if local else 1
    rows = load.rows // calls * tp  # decoded together by the tp devices of a group
    kv_split = tp if cfg.num_key_value_heads % tp == 0 else 1  # else the KV heads are replicated (_fit)

    # decode: one token step of one call, averaged over the T_max steps
    collectives, link_bytes = 0, 0.0
    if not local:
        collectives += 9 * cfg.num_hidden_layers + 2
        link_bytes += (n - 1) / n * weight_bytes
    elif tp > 1:
        collectives += 2 * cfg.num_hidden_layers
        link_bytes += 2 * cfg.num_hidden_layers * 2 * (tp - 1) / tp * rows * cfg.hidden_size * 2
    if design.logits_gather:
        link_bytes += (n - 1) / n * rows * n * cfg.vocab_size * 4
    steps = np.arange(t_max)
    if design.cache_reads == "padded":
        slots = rows * (load.prompt_length + t_max) * np.ones(t_max)
    else:
        completion = np.array([_bucket(s + 1, t_max, design.buckets) for s in steps])
        slots = (load.queries // calls * tp) * load.prompt_length + rows * completion  # left padding read too
    cache_bytes = slots.mean() * _kv_bytes_per_slot(cfg, design.cache_bytes) / kv_split
    decode_step = ((weight_bytes / tp + cache_bytes) / (hw.hbm * hbm_eff) + link_bytes / hw.link
                   + collectives * hw.latency)
    prefill_flops = flops.forward_flops(cfg, rows=load.queries // calls, new=load.prompt_length,
                                        keys=load.prompt_length)
    reshard = (n - 1) / n * weight_bytes / hw.link if local else 0.0
    rollout = calls * (prefill_flops / (hw.peak * mfu) + t_max * decode_step) + reshard
    decode_flops = t_max * flops.forward_flops(cfg, rows=load.rows, new=1, keys=load.filled + t_max // 2, logits=1)

    # update and reference: forward FLOPs of each micro-batch at its completion length
    per_micro = load.queries // load.micro_batches
    lengths_t = ([t_max] * load.micro_batches if design.update_lengths == "padded" else
                 trimmed_lengths(lengths, load.group, load.micro_batches, t_max, design.buckets))
    fwd = sum(flops.sequence_flops(cfg, queries=per_micro, group=load.group, prompt_length=load.prompt_length,
                                   completion_length=t, shared=True) for t in lengths_t)
    gather = (n - 1) / n * weight_bytes / hw.link  # one fsdp pass over the weights
    reference = max(fwd / (hw.peak * mfu), load.micro_batches * gather) if load.reference else 0.0
    update = max((3 + load.recompute) * fwd / (hw.peak * mfu), load.micro_batches * 3 * gather)
    total = rollout + reference + update
    model_flops = decode_flops + calls * prefill_flops + (3 + int(load.reference)) * fwd
    generated = float(lengths.sum())
    return {"rollout_s": rollout, "reference_s": reference, "update_s": update, "step_s": total,
            "decode_step_ms": decode_step * 1e3, "rollout_tensor_parallel": tp,
            "tokens_per_s_per_gpu": generated / rollout, "step_tokens_per_s_per_gpu": generated / total,
            "mfu": model_flops / (total * hw.peak), "update_lengths": lengths_t,
            "rollout_gb": rollout_bytes(cfg, hw, load, tp if local else 0) / 1e9}
