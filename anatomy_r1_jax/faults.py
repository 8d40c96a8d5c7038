"""Test-only fault injection, read from one environment variable (never set in a real run):

    ANATOMY_R1_FAULT="ACTION@POINT:N[,ACTION@POINT:N...]"

ACTION at POINT when its number is N (a step, or a record index for `vanish`):
  sigkill@P:N / sigterm@P:N  the process signals itself at point P of step N (points: "start",
                             after the restore; "step", the end of step N's work, before its
                             checkpoint; "save", just after checkpoint N's write began; "eval",
                             inside the evaluation of step N; "grpo", where GRPO begins at step N)
  nan@update:N               the rewards of step N's update are NaN (so its loss and gradient are)
  nospace@save:N             the file system reports 0 bytes free when checkpoint N is saved
  vanish@record:K            record K's image files are deleted just before the pipeline loads
                             them (after the start-up validation)
The trainer calls `reached` / `active`; with the variable unset both do nothing.
"""

from __future__ import annotations

import functools
import os
import signal

ENV = "ANATOMY_R1_FAULT"


@functools.cache
def _plan() -> frozenset[tuple[str, str, int]]:
    plan = set()
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        action, rest = item.split("@")
        point, number = rest.split(":")
        plan.add((action, point, int(number)))
    return frozenset(plan)


def active(action: str, point: str, number: int) -> bool:
    return (action, point, number) in _plan()


def reached(point: str, step: int) -> None:
    """Sends this process the signals planned for `point` of `step`."""
    for action, sig in (("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM)):
        if active(action, point, step):
            os.kill(os.getpid(), sig)


def planned(action: str) -> bool:
    return any(a == action for a, _, _ in _plan())
