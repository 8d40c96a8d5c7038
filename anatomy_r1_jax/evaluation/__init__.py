"""Evaluation: batched, mesh-sharded answering (greedy accuracy, pass@k), statistics with Wilson
intervals, resumable sweeps over checkpoints x datasets with reports, and Hugging Face export."""

from anatomy_r1_jax.evaluation.checkpoints import (CheckpointRef, ModelSetup, base_state, build_setup,
                                                   load_model_state, resolve_checkpoint, restore_model_state)
from anatomy_r1_jax.evaluation.evaluator import EvalSettings, Evaluator, decode_completions, sampling_config
from anatomy_r1_jax.evaluation.metrics import pass_at_k, wilson_interval
from anatomy_r1_jax.evaluation.scoring import Outcome, score, summarize

__all__ = ["base_state", "build_setup", "CheckpointRef", "decode_completions", "EvalSettings", "Evaluator",
           "load_model_state", "ModelSetup", "Outcome", "pass_at_k", "resolve_checkpoint", "restore_model_state",
           "sampling_config", "score", "summarize", "wilson_interval"]
