"""Model FLOPs and bytes of the GRPO workloads, analytically, for utilisation figures.

Counted are the matrix products of the language model (the vision tower, norms, rotary and
softmax are left out, so utilisation is slightly understated). One multiply-add is 2 FLOPs.

Forward FLOPs of `n` sequences of `new` tokens attending to `keys` key slots each, per layer:

    projections  2 * new * E * (H*D + 2*KVH*D + H*D) + 2 * new * 3 * E * F     (q, k, v, o; SwiGLU)
    attention    4 * new * keys * H * D                                       (QK^T and PV, every slot
                                                                               the dense kernel touches)
plus the LM head 2 * E * V per position whose logits are taken.

The GRPO update (token-mean loss over completions of T tokens after prompts of Lp slots):
    policy forward + backward = 3 x forward, the reference forward = 1 x (when beta != 0);
    prompts are run once per group with prefix sharing (Q rows of Lp) or once per row (N rows).
Recomputation (remat) is not model work and is not counted (MFU, not hardware utilisation).

Decode reads every weight of the language model and the KV cache once per new token:
    bytes(step) = weight bytes + rows * filled slots * layers * 2 * KVH * D * cache bytes.
"""

from __future__ import annotations

import dataclasses

from anatomy_r1_jax.models.config import QwenVLConfig


def forward_flops(cfg: QwenVLConfig, *, rows: int, new: int, keys: int, logits: int = 0) -> float:
    """FLOPs of a language-model forward of `rows` x `new` tokens over `keys` slots, with the LM head
    applied at `logits` positions per row."""
    e, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    h, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    tokens = rows * new
    per_layer = 2 * tokens * e * (2 * h * d + 2 * kvh * d) + 2 * tokens * 3 * e * f + 4 * tokens * keys * h * d
    return float(cfg.num_hidden_layers * per_layer + 2 * rows * logits * e * cfg.vocab_size)


def sequence_flops(cfg: QwenVLConfig, *, queries: int, group: int, prompt_length: int, completion_length: int,
                   shared: bool) -> float:
    """Forward FLOPs of the completion log-probs of queries x group rows (sequence_hidden + LM head)."""
    lp, t, n = prompt_length, completion_length, queries * group
    if not shared:
        return forward_flops(cfg, rows=n, new=lp + t, keys=lp + t, logits=t)
    return (forward_flops(cfg, rows=queries, new=lp, keys=lp + t)
            + forward_flops(cfg, rows=n, new=t, keys=lp + t, logits=t))


def update_flops(cfg: QwenVLConfig, *, queries: int, group: int, prompt_length: int, completion_length: int,
                 shared: bool = True, reference: bool = True) -> float:
    """Model FLOPs of one GRPO update: 3 x forward for the policy, + 1 x for the reference."""
    fwd = sequence_flops(cfg, queries=queries, group=group, prompt_length=prompt_length,
                         completion_length=completion_length, shared=shared)
    return (3 + int(reference)) * fwd


def language_weight_count(cfg: QwenVLConfig) -> int:
    """Weights a decode step reads: every decoder matrix, norms, and the output projection."""
    e, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    h, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    attn = e * h * d + 2 * e * kvh * d + (h + 2 * kvh) * d + h * d * e  # q, k, v (+ biases), o
    layer = attn + 3 * e * f + 2 * e
    return cfg.num_hidden_layers * layer + e + e * cfg.vocab_size


@dataclasses.dataclass(frozen=True)
class DecodeBound:
    """Bytes one decode step must read and the tokens/s that memory bandwidth allows."""

    weight_bytes: float
    cache_bytes: float
    rows: int

    @property
    def step_bytes(self) -> float:
        return self.weight_bytes + self.cache_bytes

    def tokens_per_second(self, bandwidth: float) -> float:
        """rows new tokens per step, a step no faster than step_bytes / bandwidth (bytes/s)."""
        return self.rows * bandwidth / self.step_bytes


def decode_bound(cfg: QwenVLConfig, *, rows: int, prompt_length: int, new_tokens: int, weight_bytes: int = 2,
                 cache_bytes: int = 2) -> DecodeBound:
    """The average decode step of a rollout: the cache holds prompt_length + new_tokens / 2 slots."""
    slots = prompt_length + new_tokens / 2
    cache = rows * slots * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * cache_bytes
    return DecodeBound(weight_bytes=language_weight_count(cfg) * weight_bytes, cache_bytes=cache, rows=rows)


# Dense bf16 peak FLOP/s and memory bandwidth (bytes/s) from vendor data sheets, by jax device_kind prefix.
PEAKS: dict[str, tuple[float, float]] = {
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),  # SXM
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H100 NVL": (835e12, 3.9e12),
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.04e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 1.56e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 0.819e12),
    "TPU v5": (459e12, 2.765e12),
    "TPU v6 lite": (918e12, 1.64e12),
}


def device_peaks(device_kind: str) -> tuple[float, float] | None:
    """(bf16 FLOP/s, bytes/s) of a device kind, longest matching prefix of PEAKS; None if unknown."""
    hits = [k for k in PEAKS if device_kind.startswith(k)]
    return PEAKS[max(hits, key=len)] if hits else None
