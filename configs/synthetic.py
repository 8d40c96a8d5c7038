"""The synthetic benchmark with one of the four ablation arms:

    python train.py --config configs/synthetic.py:method=asc --workdir runs/asc

method: grpo | asc | gdqa | anatomy_r1 (default), the arms of configs/methods.py. Everything else
is configs/default.py.
"""

from configs import default, methods


def get_config(arg=None):
    args = methods.parse_arg(arg, method=("anatomy_r1", methods.ARMS))
    return methods.override(default.get_config(), args["method"])
