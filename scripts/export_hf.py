#!/usr/bin/env python
"""Export a trained checkpoint as a Hugging Face model directory.

    python scripts/export_hf.py --checkpoint runs/default [--config configs/default.py] --out hf/default

--checkpoint: a run workdir (its latest step), its checkpoints/ folder, one checkpoints/<step>
folder, or "base". The config must be the run's. The directory holds config.json,
generation_config.json, model.safetensors (or shards + index), the tokenizer files (with the chat
template) and preprocessor_config.json; `Qwen2VLForConditionalGeneration.from_pretrained(DIR)`
(Qwen2_5_VL... for that family) and `AutoTokenizer.from_pretrained(DIR)` load it.
"""

import logging
import os
import sys


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from anatomy_r1_jax.requirements import check_installed  # noqa: E402

check_installed()  # one line naming a missing package

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "default.py"),
                                          "the run's ml_collections config file", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "run workdir or step folder", required=True)
_OUT = flags.DEFINE_string("out", None, "Hugging Face output directory", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "store the weights in this dtype "
                           "(default: as trained)")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from anatomy_r1_jax.evaluation.export import export_checkpoint
    from anatomy_r1_jax.train.distributed import maybe_initialize

    maybe_initialize()
    out = export_checkpoint(_CONFIG.value, _CHECKPOINT.value, _OUT.value, dtype=_DTYPE.value)
    print(f"exported to {out}: {sorted(os.listdir(out))}")


if __name__ == "__main__":
    app.run(main)
