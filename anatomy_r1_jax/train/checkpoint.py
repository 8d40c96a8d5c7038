"""Orbax checkpoints of the train state plus JSON metadata (data-iterator and GDQA state).

Orbax writes each step to a temporary directory (`<step>.orbax-checkpoint-tmp...`) and renames it
when complete, so a crash in the middle of a save leaves the previous checkpoints intact;
`latest_step` only sees finished ones, and the temporary directories a crash left behind are
removed when the directory is opened again. Saves are asynchronous: the loop continues while
arrays are written; `close` (the trainer calls it on every way out) waits for them.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
TMP_MARK = ".orbax-checkpoint-tmp"


def remove_unfinished(directory: str) -> list[str]:
    """Deletes the temporary step directories of saves that never completed (process 0 only);
    returns their names."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if TMP_MARK in n)
    for name in names:
        log.warning("removing the unfinished checkpoint %s (a save interrupted by a crash)",
                    os.path.join(directory, name))
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return names


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, preserve: tuple[int, ...] = (), async_save: bool = True):
        """keep: the latest `keep` steps are kept; `preserve`: steps kept besides them (e.g. the
        checkpoint a LoRA run's later ones name as their base)."""
        self.directory, self.preserve = os.path.abspath(directory), tuple(preserve)
        remove_unfinished(self.directory)
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(keep),
                                                                 ocp.checkpoint_managers.CustomSteps(preserve)])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON-serialisable) as step `step`."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, like):
        """Restores step `step` onto the shapes, dtypes and shardings of `like` (a live state)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_meta(self, step: int) -> dict:
        """The JSON metadata of step `step` alone."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
