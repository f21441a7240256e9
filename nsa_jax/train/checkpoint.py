"""Checkpoints of a run (the only module that imports orbax).

Each checkpoint is one step directory under WORKDIR/checkpoints holding three items: the model
state, the optimizer state and a small JSON of metadata. Orbax writes a step into a temporary
directory and renames it when complete, so a save cut short by SIGKILL never looks like a
checkpoint. A complete-looking step that fails to restore is moved to WORKDIR/corrupt_checkpoints
with a warning and the next older one is tried.
"""
from __future__ import annotations

import pathlib
import shutil
import warnings

import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic / final / on-signal saves and resume-from-latest-good for one workdir."""

    def __init__(self, workdir, max_to_keep: int):
        self.workdir = pathlib.Path(workdir).absolute()
        self._manager = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 cleanup_tmp_directories=True))

    def save(self, step: int, model_state, opt_state, metadata: dict) -> None:
        """Starts an asynchronous save of `step` unless that step is already saved."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(model_state), optimizer=ocp.args.StandardSave(opt_state),
            metadata=ocp.args.JsonSave(metadata)))

    def restore_latest(self, model_target, opt_target=None):
        """-> (step, model_state, opt_state, metadata) of the newest checkpoint that restores into
        the given abstract targets, or None if there is none. With opt_target=None only the model
        is read (evaluation)."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            items = {"model": ocp.args.StandardRestore(model_target),
                     "metadata": ocp.args.JsonRestore()}
            if opt_target is not None:
                items["optimizer"] = ocp.args.StandardRestore(opt_target)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as error:  # any unreadable checkpoint is skipped, never fatal
                self._set_aside(step, error)
                continue
            return step, restored["model"], restored.get("optimizer"), restored["metadata"]
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        corrupt = self.workdir / "corrupt_checkpoints"
        corrupt.mkdir(exist_ok=True)
        target = corrupt / str(step)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(self.workdir / "checkpoints" / str(step)), target)
        self._manager.reload()
        warnings.warn(f"checkpoint at step {step} could not be restored and was moved to {target} "
                      f"({type(error).__name__}: {str(error)[:300]}); trying an older one",
                      stacklevel=2)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
