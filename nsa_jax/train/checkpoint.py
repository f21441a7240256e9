"""Checkpoints of a run (the only module that imports orbax).

Each checkpoint is one step directory under WORKDIR/checkpoints holding three items: the model
state, the optimizer state and a small JSON of metadata. Orbax writes a step into a temporary
directory and renames it when complete, so a save cut short by SIGKILL never looks like a
checkpoint. A complete-looking step that fails to restore is skipped with a warning (and, unless
read-only, moved to WORKDIR/corrupt_checkpoints so the run can save that step again) and the
next older one is tried.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil
import warnings

import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic / final / on-signal saves and resume-from-latest-good for one workdir.
    read_only (evaluation) touches nothing, not even the unfinished saves of a running trainer."""

    def __init__(self, workdir, max_to_keep: int, *, read_only: bool = False):
        self.workdir, self.read_only = pathlib.Path(workdir).absolute(), read_only
        # Read-only options are given as Orbax would force them (no saving, no pruning), so it
        # has nothing to warn about; its unconditional "directory is read only" note is dropped.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1, create=not read_only,
            cleanup_tmp_directories=not read_only, read_only=read_only)
        with _without_absl_warning("Given directory is read only"):
            self._manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options)

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
                self._skip(step, error)
                continue
            return step, restored["model"], restored.get("optimizer"), restored["metadata"]
        return None

    def _skip(self, step: int, error: Exception) -> None:
        source = self.workdir / "checkpoints" / str(step)
        where = f"left in {source}"
        if not self.read_only:
            target = self.workdir / "corrupt_checkpoints" / str(step)
            target.parent.mkdir(exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(source), target)
            self._manager.reload()
            where = f"moved to {target}"
        warnings.warn(f"checkpoint at step {step} could not be restored ({type(error).__name__}: "
                      f"{str(error)[:300]}); {where}; trying an older one", stacklevel=3)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


@contextlib.contextmanager
def _without_absl_warning(prefix: str):
    """Drop absl log records starting with `prefix` (Orbax logs through absl) while inside."""
    drop = logging.Filter()
    drop.filter = lambda record: not str(record.msg).startswith(prefix)
    logger = logging.getLogger("absl")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)

