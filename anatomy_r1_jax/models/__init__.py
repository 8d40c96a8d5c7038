"""Qwen2-VL / Qwen2.5-VL in Flax NNX: config, vision tower, language model, rope index, weights."""

from anatomy_r1_jax.models.config import QwenVLConfig
from anatomy_r1_jax.models.language import KVCache
from anatomy_r1_jax.models.qwen_vl import QwenVL, model_options
from anatomy_r1_jax.models.rope_index import decode_position_ids, get_rope_index
from anatomy_r1_jax.models.weights import load_pretrained, save_pretrained

__all__ = ["QwenVL", "model_options", "QwenVLConfig", "KVCache", "get_rope_index", "decode_position_ids",
           "load_pretrained",
           "save_pretrained"]
