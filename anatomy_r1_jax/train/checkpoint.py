"""Orbax checkpoints of the train state plus JSON metadata (data-iterator and GDQA state).

Orbax writes each step to a temporary directory (`<step>.orbax-checkpoint-tmp...`) and renames it
when complete, so a crash in the middle of a save leaves the previous checkpoints intact;
`latest_step` only sees finished ones, and the temporary directories a crash left behind are
removed when the directory is opened again. Saves are asynchronous: the loop continues while
arrays are written; `close` (the trainer calls it on every way out) waits for them.

A finished step can still become unreadable (a file truncated or deleted, metadata missing, a folder
emptied by hand): `restore` / `restore_meta` then raise `UnreadableCheckpoint` naming the step and
the file, and `set_aside` moves that step to `<checkpoints>.unreadable/` (kept, never deleted) so
the manager no longer lists it. A save that would not fit on the disk is refused before anything
is written (`DiskFull`, naming the folder and the bytes needed), and a write that fails with ENOSPC
anyway leaves no temporary step behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

from anatomy_r1_jax import faults
from anatomy_r1_jax.train.preemption import RunStopped

log = logging.getLogger(__name__)
TMP_MARK = ".orbax-checkpoint-tmp"
# What every finished step holds (relative to its folder): a missing or empty one is named first.
STEP_FILES = ("_CHECKPOINT_METADATA", os.path.join("meta", "metadata"), os.path.join("state", "_METADATA"),
              os.path.join("state", "manifest.ocdbt"))


class UnreadableCheckpoint(Exception):
    """Checkpoint `step` cannot be restored; the message names the step and the file."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class DiskFull(RunStopped):
    """A checkpoint does not fit in the space left on its file system."""


def step_problem(step_dir: str, error: BaseException) -> str:
    """What makes the finished step folder `step_dir` unreadable, naming the file: a missing or
    empty file every step holds, an empty array file, else the first line of the innermost error
    (tensorstore's: 'Error reading "params/.../0" in OCDBT database at local file ".../state/": ...')."""
    if not os.path.isdir(step_dir) or not os.listdir(step_dir):
        return f"its folder is empty or gone: {step_dir}"
    for name in STEP_FILES:
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return f"missing file {path}"
        if os.path.getsize(path) == 0:
            return f"empty file {path}"
    for root, _, names in os.walk(step_dir):
        for name in sorted(names):
            if os.path.getsize(os.path.join(root, name)) == 0:
                return f"empty file {os.path.join(root, name)}"
    while error.__cause__ is not None or error.__context__ is not None:  # tensorstore's own error names the array
        error = error.__cause__ or error.__context__
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{first[:400]} (in {step_dir})"


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC, raised as an OSError or wrapped in tensorstore's / orbax's errors."""
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


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
        self._needed = 0  # bytes of the latest save (named when a write runs out of space)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The finished steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state, meta: dict) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON-serialisable) as step `step`, once
        the file system has room for it (else `DiskFull`, before anything is written)."""
        needed = sum(x.nbytes for x in jax.tree.leaves(state)) + len(json.dumps(meta))
        free = 0 if faults.active("nospace", "save", step) else shutil.disk_usage(self.directory).free
        if free < needed:
            raise DiskFull(f"no space left for checkpoint {step} in {self.directory}: it needs {needed} bytes, "
                           f"{free} are free (the checkpoints before it are intact)")
        self._needed = needed
        with self._disk_full_as_stop(step):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, like):
        """Restores step `step` onto the shapes, dtypes and shardings of `like` (a live state)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        with self._unreadable(step):
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_meta(self, step: int) -> dict:
        """The JSON metadata of step `step` alone."""
        with self._unreadable(step):
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def set_aside(self, step: int) -> str:
        """Moves the unreadable step `step` to `<checkpoints>.unreadable/<step>[.k]` (process 0; the
        others wait for it), out of the manager's sight; returns where it went."""
        aside = f"{self.directory}.unreadable"
        target = os.path.join(aside, str(step))
        k = 0
        while os.path.exists(target):
            k += 1
            target = os.path.join(aside, f"{step}.{k}")
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
        from anatomy_r1_jax.runtime import distributed

        distributed.barrier(f"checkpoint {step} set aside")
        self.manager.reload()
        return target

    def wait(self) -> None:
        with self._disk_full_as_stop(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def _unreadable(self, step: int):
        return _Translate(lambda e: UnreadableCheckpoint(
            step, f"checkpoint {step} cannot be restored: {step_problem(os.path.join(self.directory, str(step)), e)}"))

    def _disk_full_as_stop(self, step: int | None):
        def translate(error):
            if not _is_disk_full(error):
                return None
            remove_unfinished(self.directory)
            what = f"checkpoint {step}" if step is not None else "a checkpoint"
            return DiskFull(f"no space left on device while writing {what} in {self.directory} (it needs "
                            f"{self._needed} bytes); its temporary folder was removed (the checkpoints before it are "
                            f"intact)")
        return _Translate(translate)


class _Translate:
    """A context manager raising translate(error) from `error` (unless translate gives None)."""

    def __init__(self, translate):
        self.translate = translate

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, (KeyboardInterrupt, SystemExit, RunStopped)):
            return False
        replacement = self.translate(error)
        if replacement is None:
            return False
        raise replacement from error
