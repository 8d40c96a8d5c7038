#!/usr/bin/env python
"""Export a trained checkpoint as a Hugging Face model directory.

    python scripts/export_hf.py --checkpoint runs/default --out hf/default [--dtype bfloat16]

--checkpoint: a run workdir (its latest step), its checkpoints/ folder, one checkpoints/<step>
folder, or "base". The config is the run's saved config.json (--config.FIELD=VALUE overrides apply
on top; an explicit --config FILE replaces it; configs/default.py for "base"). The weights keep the
run's dtype (model.param_dtype) unless --dtype says otherwise. The directory holds config.json,
generation_config.json, model.safetensors (or shards + index), the tokenizer files (with the chat
template), preprocessor_config.json and processor_config.json; `Qwen2VLForConditionalGeneration.
from_pretrained(DIR)` (Qwen2_5_VL... for that family), `AutoTokenizer.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR, trust_remote_code=True)` (no torchvision needed; without
trust_remote_code transformers' processor wants torchvision for videos) load it.
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
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "run workdir or step folder", required=True)
_OUT = flags.DEFINE_string("out", None, "Hugging Face output directory", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "store the weights in this dtype "
                           "(default: as trained, the run's model.param_dtype)")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from anatomy_r1_jax.evaluation.export import export_checkpoint
    from anatomy_r1_jax.evaluation.run_config import config_from_flags
    from anatomy_r1_jax.runtime.distributed import maybe_initialize

    maybe_initialize()
    config = config_from_flags(_CONFIG, [_CHECKPOINT.value])
    out = export_checkpoint(config, _CHECKPOINT.value, _OUT.value, dtype=_DTYPE.value)
    print(f"exported to {out}: {sorted(os.listdir(out))}")


if __name__ == "__main__":
    command_line.run(main)
