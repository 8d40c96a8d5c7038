"""anatomy_r1_jax: Anatomy-R1 (GRPO + ASC + GDQA) for Qwen2-VL / Qwen2.5-VL in JAX/Flax NNX."""

__version__ = "0.1.0"
