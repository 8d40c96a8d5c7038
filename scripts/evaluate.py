#!/usr/bin/env python
"""Evaluation sweep: the base model and trained checkpoints on benchmark datasets.

    python scripts/evaluate.py --checkpoints base,runs/default \
        --datasets synthetic:val,synthetic:test --out eval/default [--samples 8 --ks 1,4,8] \
        [--config.data.prompt_length=256 ...]

--checkpoints: "base" (the model the config builds: model.path, or the tiny model of config.seed),
  a run workdir (its latest step), its checkpoints/ folder or one checkpoints/<step> folder;
  NAME=PATH names one.
--config: by default the run's own (its workdir's config.json, saved by train.py; with several runs
  they must agree on model, tokenizer, prompts and sampler), --config.FIELD=VALUE overrides applied on
  top; configs/default.py when no checkpoint belongs to a run. An explicit --config FILE is used
  instead (it must build the run's model).
--datasets: a records file in any supported format (released Anatomy-R1, OmniMedVQA, Med-R1, the
  project's JSONL), or synthetic:val / synthetic:test (generated from the config); NAME=SPEC names one.
Writes DIR/results/<model>__<dataset>.json (one per pair; pairs already done are skipped when the
command is run again), DIR/summary.md and DIR/accuracy_by_{category,checkpoint}.png.
"""

import logging
import os
import sys


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

from absl import flags  # noqa: E402

from anatomy_r1_jax import command_line  # noqa: E402

_CONFIG = command_line.define_config(os.path.join(_ROOT, "configs", "default.py"),
                                     "config file (default: the run's saved config.json)")
_CHECKPOINTS = flags.DEFINE_list("checkpoints", ["base"], "models: base, run workdirs or step folders")
_DATASETS = flags.DEFINE_list("datasets", ["synthetic:val"], "records files or synthetic:val / synthetic:test")
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 8, "questions per compiled call (rounded up to the data-parallel size)")
_SAMPLES = flags.DEFINE_integer("samples", 0, "answers sampled per question for pass@k (0: greedy only)")
_KS = flags.DEFINE_list("ks", ["1", "2", "4", "8", "16"], "k of pass@k (those <= samples)")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "sampling temperature (default: config.rl.temperature)")
_TOP_P = flags.DEFINE_float("top_p", None, "nucleus mass (default: config.rl.top_p)")
_TOP_K = flags.DEFINE_integer("top_k", None, "top-k (default: config.rl.top_k; 0 disables)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_ACCURACY = flags.DEFINE_enum("accuracy", None, ["accuracy", "accuracy_lenient"],
                              "correctness rule (default: the run's, the first accuracy reward with a non-zero "
                              "weight in config.rl.rewards, as training reports it)")
_LIMIT = flags.DEFINE_integer("limit", 0, "evaluate the first N records of each dataset (0: all)")


def _describe(config, settings) -> str:
    """One line saying where and on what the sweep runs (pasted with its results into reports)."""
    import jax

    m = config.model
    model = m.path or (f"tiny {m.family} (hidden {m.tiny.hidden_size}, {m.tiny.num_hidden_layers} layers, "
                       f"vision depth {m.tiny.vision_depth})")
    load = "load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU "
            f"cores, {load}; model {model} {m.dtype}; prompts '{config.data.prompt_variant}' padded to "
            f"{config.data.prompt_length} tokens, {config.data.patches_per_query} patches/image, up to "
            f"{config.rl.max_completion_length} new tokens; batch {settings.batch_size} questions, "
            f"{settings.samples} samples/question")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from anatomy_r1_jax.data.pipeline import ensure_flags_parsed
    from anatomy_r1_jax.evaluation.evaluator import EvalSettings
    from anatomy_r1_jax.evaluation.run_config import config_from_flags
    from anatomy_r1_jax.evaluation.scoring import run_accuracy
    from anatomy_r1_jax.evaluation.sweep import run_sweep
    from anatomy_r1_jax.runtime.programs import collect_garbage_less, use_compilation_cache
    from anatomy_r1_jax.runtime.distributed import maybe_initialize

    ensure_flags_parsed()
    maybe_initialize()
    config = config_from_flags(_CONFIG, _CHECKPOINTS.value)
    use_compilation_cache(_CONFIG.value)  # this machine's cache (--config.compilation_cache=...), not the run's
    collect_garbage_less()
    accuracy = _ACCURACY.value or run_accuracy(config.rl.rewards)
    settings = EvalSettings(batch_size=_BATCH.value, samples=_SAMPLES.value, ks=tuple(int(k) for k in _KS.value),
                            temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value, seed=_SEED.value,
                            accuracy=accuracy)
    print(_describe(config, settings), flush=True)
    results = run_sweep(config, _CHECKPOINTS.value, _DATASETS.value, _OUT.value, settings, limit=_LIMIT.value)
    for r in results:
        t = r["throughput"]
        line = (f"{r['model']:>24s} on {r['dataset']:<20s} n={r['n']:<5d} accuracy {r['accuracy']['value']:.3f} "
                f"[{r['accuracy']['ci95'][0]:.3f}, {r['accuracy']['ci95'][1]:.3f}]  format failures "
                f"{r['format_failure_rate']['value']:.3f}  {t['answers_per_second']:.2f} answers/s greedy")
        if r.get("pass_at_k"):
            line += "  " + " ".join(f"pass@{k} {v:.3f}" for k, v in r["pass_at_k"].items())
            line += f"  {t['sampled_answers_per_second']:.2f} answers/s sampled"
        print(line)
    print(f"summary: {os.path.join(_OUT.value, 'summary.md')}")


if __name__ == "__main__":
    command_line.run(main)
