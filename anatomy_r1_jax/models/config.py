"""`QwenVLConfig`: one frozen description of a Qwen2-VL / Qwen2.5-VL checkpoint (its vision tower's
shape: `VisionConfig`).

Read from a Hugging Face `config.json`: the transformers-5 layout (nested `text_config`, rope in
`text_config.rope_parameters`) and the flat pre-v5 hub layout (text fields at top level,
`rope_theta` and `rope_scaling = {"type": "mrope", "mrope_section": ...}`) are both accepted;
`to_hf()` writes the transformers-5 layout.
"""

from __future__ import annotations

import dataclasses
import json
import os

from anatomy_r1_jax.models import presets
from anatomy_r1_jax.models.layers import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Vision tower shape. `width` is the ViT width (HF Qwen2-VL `embed_dim`, Qwen2.5-VL
    `hidden_size`); `out_hidden_size` the merger output = the language model width (HF Qwen2-VL
    `hidden_size`, Qwen2.5-VL `out_hidden_size`)."""

    family: str
    depth: int
    width: int
    out_hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    window_size: int = 0  # Qwen2.5-VL only (pixels)
    fullatt_block_indexes: tuple[int, ...] = ()  # Qwen2.5-VL only
    tokens_per_second: int = 2  # Qwen2.5-VL only (used by the language model's video rope)
    mlp_ratio: int = 4  # Qwen2-VL only (intermediate_size = width * mlp_ratio)

    def __post_init__(self):
        if self.family not in presets.FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {presets.FAMILIES}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ValueError(f"width {self.width} / heads {self.num_heads} must give a head_dim divisible by 4")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * p * p (the processor's flattening order)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def uses_windows(self) -> bool:
        return self.family == "qwen2_5_vl"

    @classmethod
    def from_hf(cls, family: str, vision_config: dict) -> "VisionConfig":
        """From a transformers-5 `vision_config` dict (older hub files' `in_chans` is accepted too)."""
        c = vision_config
        common = dict(
            family=family, depth=c["depth"], num_heads=c["num_heads"],
            in_channels=c.get("in_channels", c.get("in_chans", 3)), patch_size=c.get("patch_size", 14),
            temporal_patch_size=c.get("temporal_patch_size", 2), spatial_merge_size=c.get("spatial_merge_size", 2),
            rope_theta=float((c.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
        if family == "qwen2_vl":
            ratio = c.get("mlp_ratio", 4)
            return cls(**common, width=c["embed_dim"], out_hidden_size=c["hidden_size"],
                       intermediate_size=int(c["embed_dim"] * ratio), mlp_ratio=ratio,
                       hidden_act=c.get("hidden_act", "quick_gelu"))
        if family == "qwen2_5_vl":
            return cls(**common, width=c["hidden_size"], out_hidden_size=c["out_hidden_size"],
                       intermediate_size=c["intermediate_size"], hidden_act=c.get("hidden_act", "silu"),
                       window_size=c.get("window_size", 112),
                       fullatt_block_indexes=tuple(c.get("fullatt_block_indexes", (7, 15, 23, 31))),
                       tokens_per_second=c.get("tokens_per_second", 2))
        raise ValueError(f"unknown family {family!r}; expected one of {presets.FAMILIES}")

    def to_hf(self) -> dict:
        """The transformers-5 `vision_config` dict (inverse of `from_hf`)."""
        common = {"depth": self.depth, "num_heads": self.num_heads, "in_channels": self.in_channels,
                  "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                  "spatial_merge_size": self.spatial_merge_size, "hidden_act": self.hidden_act,
                  "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta}}
        if self.family == "qwen2_vl":
            return {"model_type": "qwen2_vl_vision", **common, "embed_dim": self.width,
                    "hidden_size": self.out_hidden_size, "mlp_ratio": self.mlp_ratio}
        return {"model_type": "qwen2_5_vl_vision", **common, "hidden_size": self.width,
                "out_hidden_size": self.out_hidden_size, "intermediate_size": self.intermediate_size,
                "window_size": self.window_size, "fullatt_block_indexes": list(self.fullatt_block_indexes),
                "tokens_per_second": self.tokens_per_second}


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """Language-model shape, special tokens, and the vision tower's `VisionConfig`."""

    family: str  # "qwen2_vl" or "qwen2_5_vl"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    vision: VisionConfig

    def __post_init__(self):
        if self.family not in presets.FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {presets.FAMILIES}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, heads {self.num_attention_heads} and kv heads "
                             f"{self.num_key_value_heads} must divide evenly")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(f"vision output width {self.vision.out_hidden_size} != hidden_size {self.hidden_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict) -> "QwenVLConfig":
        """From a config.json dict (transformers-5 nested or pre-v5 flat layout)."""
        family = config.get("model_type")
        if family not in presets.FAMILIES:
            raise ValueError(f"config.json model_type {family!r} is not one of {presets.FAMILIES}")
        text = config.get("text_config") or config  # pre-v5 hub files keep text fields at top level

        def get(key, default=None):
            return text.get(key, config.get(key, default))

        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported language hidden_act {get('hidden_act')!r} (Qwen2 uses silu)")
        if get("use_sliding_window", False):
            raise ValueError("use_sliding_window=True is not supported (no released Qwen2-VL model uses it)")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"unsupported rope_type {rope_type!r}; only plain M-RoPE is implemented")
        theta = rope.get("rope_theta", get("rope_theta", 1_000_000.0))
        eos = get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        return cls(
            family=family, vocab_size=get("vocab_size"), hidden_size=hidden,
            intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads") or heads,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            # transformers' default when absent; assumes head_dim 128
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            max_position_embeddings=get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)),
            image_token_id=config.get("image_token_id", 151655), video_token_id=config.get("video_token_id", 151656),
            vision_start_token_id=config.get("vision_start_token_id", 151652),
            vision_end_token_id=config.get("vision_end_token_id", 151653),
            bos_token_id=get("bos_token_id"), eos_token_ids=eos, pad_token_id=get("pad_token_id"),
            vision=VisionConfig.from_hf(family, config["vision_config"]))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "QwenVLConfig":
        """From `path/config.json`; eos ids from `generation_config.json` win when that file exists
        (they are what generation stops on, e.g. both <|im_end|> and <|endoftext|>)."""
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
        with open(file) as f:
            try:
                cfg = cls.from_hf(json.load(f))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{file}: {error}") from None
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                cfg = dataclasses.replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
        return cfg

    def to_hf(self, dtype: str = "float32") -> dict:
        """The transformers-5 config.json dict (`dtype` is the checkpoint's torch dtype name)."""
        eos = None if not self.eos_token_ids else (
            self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids))
        text = presets.hf_text_config(
            self.family, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, mrope_section=list(self.mrope_section),
            max_position_embeddings=self.max_position_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=eos, pad_token_id=self.pad_token_id, dtype=dtype)
        tokens = {"image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                  "vision_start_token_id": self.vision_start_token_id,
                  "vision_end_token_id": self.vision_end_token_id, "bos_token_id": self.bos_token_id,
                  "eos_token_id": eos}
        return presets.hf_layout(self.family, text, self.vision.to_hf(), tokens,
                                 tie_word_embeddings=self.tie_word_embeddings, dtype=dtype)
