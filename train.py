"""Anatomy-R1 GRPO training.

    python train.py [--config configs/NAME.py] --workdir DIR [--config.field=value ...]

With no --config the embedded default runs (configs/default.py): synthetic surgical-anatomy data
and a tiny Qwen2-VL made on the spot, a short supervised warm-up, then GRPO with ASC and GDQA.
Running the same command again resumes from the last checkpoint in DIR. SIGTERM / SIGINT stop it
after the step in flight with a checkpoint of that step (exit code 75); README "Stopping and
resuming" lists every exit code.
"""

import logging
import os
import sys

from anatomy_r1_jax.requirements import check_installed

check_installed()  # one line naming a missing package, before any library needs it

from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from anatomy_r1_jax import command_line  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = command_line.define_config(os.path.join(_HERE, "configs", "default.py"))
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "where checkpoints, metrics and plots go")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / grain chatter
    logging.getLogger("anatomy_r1_jax").setLevel(logging.INFO)
    from anatomy_r1_jax.runtime.programs import collect_garbage_less, use_compilation_cache
    from anatomy_r1_jax.runtime.distributed import maybe_initialize
    from anatomy_r1_jax.train.preemption import RunStopped
    from anatomy_r1_jax.train.trainer import Trainer

    maybe_initialize()
    use_compilation_cache(_CONFIG.value)
    collect_garbage_less()  # after the imports: tracing the programs runs quicker
    try:
        Trainer(_CONFIG.value, _WORKDIR.value).run()  # its last log line: the held-out accuracy (and gain)
    except RunStopped as stop:  # a deliberate stop: one line, the exit code README "Stopping and resuming" lists
        logging.getLogger("anatomy_r1_jax").error("%s", stop)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    command_line.run(main)
