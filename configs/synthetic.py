"""The synthetic benchmark with one of the ablation arms:

    python train.py --config configs/synthetic.py:method=asc --workdir runs/asc

method: an arm of configs/methods.py ARMS (grpo, grpo_dynamic, asc, asc_staged, gdqa, gdqa_online,
gdqa_accuracy, gdqa_accuracy_original, anatomy_r1, anatomy_r1_staged);
grpo (the default run) when not named. Everything else is configs/default.py.
"""

from configs import default, methods


def get_config(arg=None):
    args = methods.parse_arg(arg, method=("grpo", methods.ARMS))
    return methods.override(default.get_config(), args["method"])
