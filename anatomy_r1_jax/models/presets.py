"""Hugging Face `config.json` dicts for Qwen2-VL / Qwen2.5-VL: tiny test models and real-size shapes.

`hf_config(family, ...)` writes the transformers-5 layout (nested `text_config` / `vision_config`,
`rope_theta` and `mrope_section` inside `text_config.rope_parameters`). `tiny_hf_config` gives a
model small enough for CPU parity tests; `PRESETS` holds the published shapes (no weights) for
abstract evaluation and sharding studies:

    QwenVLConfig.from_hf(preset_hf_config("qwen2_5_vl_7b"))
"""

from __future__ import annotations

import copy

FAMILIES = ("qwen2_vl", "qwen2_5_vl")

# Offsets of the special tokens from <|endoftext|> in the Qwen2 tokenizer (151643 in the real one):
# <|endoftext|> +0, <|im_start|> +1, <|im_end|> +2, <|vision_start|> +9, <|vision_end|> +10,
# <|image_pad|> +12, <|video_pad|> +13. Tiny models keep the same layout at the top of their vocab.
_SPECIAL_OFFSETS = {"bos_token_id": 0, "eos_token_id": 2, "vision_start_token_id": 9,
                    "vision_end_token_id": 10, "image_token_id": 12, "video_token_id": 13}
QWEN_TOKEN_BASE = 151643


def mrope_section(head_dim: int) -> list[int]:
    """Splits the head_dim/2 rotary frequencies into (temporal, height, width) like Qwen's [16, 24, 24]."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def hf_text_config(family: str, *, vocab_size: int, hidden_size: int, intermediate_size: int,
                   num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
                   rms_norm_eps: float, rope_theta: float, mrope_section: list[int],
                   max_position_embeddings: int, bos_token_id: int | None, eos_token_id: int | list[int] | None,
                   pad_token_id: int | None, dtype: str = "float32") -> dict:
    """The transformers-5 `text_config` dict (full attention everywhere, SiLU MLP, M-RoPE)."""
    return {
        "model_type": f"{family}_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": rms_norm_eps,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": num_hidden_layers,
        "layer_types": ["full_attention"] * num_hidden_layers,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(mrope_section)},
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
    }


def hf_layout(family: str, text: dict, vision: dict, tokens: dict, *, tie_word_embeddings: bool,
              dtype: str = "float32") -> dict:
    """Assembles the top-level config.json dict; `tokens` holds image/video/vision_start/vision_end
    token ids and bos/eos (repeated at top level, where pre-v5 hub files keep them)."""
    _check_family(family)
    out = {"architectures": [ARCHITECTURES[family]], "model_type": family, "text_config": text,
           "vision_config": vision}
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "bos_token_id", "eos_token_id"):
        out[key] = tokens[key]
    out["tie_word_embeddings"] = tie_word_embeddings
    out["dtype"] = dtype
    return out


def hf_config(family: str, *, vocab_size: int, hidden_size: int, intermediate_size: int,
              num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
              vision_depth: int, vision_hidden_size: int, vision_num_heads: int,
              vision_intermediate_size: int | None = None, patch_size: int = 14,
              temporal_patch_size: int = 2, spatial_merge_size: int = 2, window_size: int = 112,
              fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31), tokens_per_second: int = 2,
              tie_word_embeddings: bool = False, rope_theta: float = 1_000_000.0,
              rms_norm_eps: float = 1e-6, max_position_embeddings: int = 32768,
              token_base: int | None = None) -> dict:
    """A complete transformers-5 `config.json` dict for one family.

    vision_hidden_size is the ViT width (Qwen2-VL `embed_dim`, Qwen2.5-VL `hidden_size`); the merger
    always projects to the language `hidden_size`. Qwen2-VL's ViT MLP is 4x wide (`mlp_ratio`) and
    ignores `vision_intermediate_size`. Special tokens sit at `token_base + offset` (default: the top
    16 ids of the vocabulary).
    """
    _check_family(family)
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError("hidden_size must divide into heads, and heads into kv heads")
    base = vocab_size - 16 if token_base is None else token_base
    tokens = {k: base + off for k, off in _SPECIAL_OFFSETS.items()}
    if max(tokens.values()) >= vocab_size:
        raise ValueError(f"special tokens {tokens} do not fit in vocab_size {vocab_size}")
    text = hf_text_config(
        family, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, rms_norm_eps=rms_norm_eps, rope_theta=rope_theta,
        mrope_section=mrope_section(hidden_size // num_attention_heads),
        max_position_embeddings=max_position_embeddings, bos_token_id=tokens["bos_token_id"],
        eos_token_id=tokens["eos_token_id"], pad_token_id=None)
    common = {"depth": vision_depth, "num_heads": vision_num_heads, "in_channels": 3,
              "patch_size": patch_size, "spatial_merge_size": spatial_merge_size,
              "temporal_patch_size": temporal_patch_size, "initializer_range": 0.02}
    if family == "qwen2_vl":
        vision = {"model_type": "qwen2_vl_vision", **common, "embed_dim": vision_hidden_size,
                  "hidden_size": hidden_size, "hidden_act": "quick_gelu", "mlp_ratio": 4}
    else:
        vision = {"model_type": "qwen2_5_vl_vision", **common, "hidden_size": vision_hidden_size,
                  "intermediate_size": vision_intermediate_size or 4 * vision_hidden_size,
                  "out_hidden_size": hidden_size, "hidden_act": "silu", "window_size": window_size,
                  "fullatt_block_indexes": list(fullatt_block_indexes), "tokens_per_second": tokens_per_second}
    return hf_layout(family, text, vision, tokens, tie_word_embeddings=tie_word_embeddings)


def tiny_hf_config(family: str, *, vocab_size: int = 256, hidden_size: int = 64, intermediate_size: int = 128,
                   num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                   vision_depth: int = 2, vision_hidden_size: int = 32, vision_num_heads: int = 2,
                   vision_intermediate_size: int = 64, window_size: int = 56,
                   fullatt_block_indexes: tuple[int, ...] = (1,), tie_word_embeddings: bool = False,
                   rope_theta: float = 10_000.0, rms_norm_eps: float = 1e-6) -> dict:
    """A CPU-test-sized config: head_dim 16 (mrope_section [2, 3, 3]), 2 + 2 layers, 256 tokens.

    Patch geometry is the real one (14 px patches, temporal 2, merge 2) so the processor's
    `pixel_values [patches, 3*2*14*14]` layout applies; window_size 56 px = 2 merged patches so
    Qwen2.5-VL window attention really partitions small images.
    """
    return hf_config(family, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                     num_key_value_heads=num_key_value_heads, vision_depth=vision_depth,
                     vision_hidden_size=vision_hidden_size, vision_num_heads=vision_num_heads,
                     vision_intermediate_size=vision_intermediate_size, window_size=window_size,
                     fullatt_block_indexes=fullatt_block_indexes, tie_word_embeddings=tie_word_embeddings,
                     rope_theta=rope_theta, rms_norm_eps=rms_norm_eps, max_position_embeddings=4096)


PRESETS: dict[str, dict] = {
    "qwen2_vl_2b": hf_config(
        "qwen2_vl", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vision_depth=32, vision_hidden_size=1280,
        vision_num_heads=16, tie_word_embeddings=True, token_base=QWEN_TOKEN_BASE),
    "qwen2_5_vl_3b": hf_config(
        "qwen2_5_vl", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, vision_depth=32, vision_hidden_size=1280,
        vision_num_heads=16, vision_intermediate_size=3420, tie_word_embeddings=True,
        max_position_embeddings=128000, token_base=QWEN_TOKEN_BASE),
    "qwen2_5_vl_7b": hf_config(
        "qwen2_5_vl", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vision_depth=32, vision_hidden_size=1280,
        vision_num_heads=16, vision_intermediate_size=3420, tie_word_embeddings=False,
        max_position_embeddings=128000, token_base=QWEN_TOKEN_BASE),
}


def matching_preset(config: dict) -> str:
    """The name of the preset whose language and vision shapes a config.json dict has ("" if none):
    what a checkpoint folder is, whatever a run's config called it."""

    def shape(hf: dict) -> tuple:
        text, vision = hf.get("text_config") or hf, hf.get("vision_config") or {}
        return (hf.get("model_type"), *(text.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                              "num_attention_heads", "num_key_value_heads")),
                vision.get("depth"))

    return next((name for name, hf in PRESETS.items() if shape(hf) == shape(config)), "")


def preset_hf_config(name: str) -> dict:
    """A fresh copy of a named real-size config (`qwen2_vl_2b`, `qwen2_5_vl_3b`, `qwen2_5_vl_7b`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
