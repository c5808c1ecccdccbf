"""Training checkpoints with Orbax's CheckpointManager.

One checkpoint holds the whole `TrainState` (params, optimizer state, EMA, step, RNG) and the
data position (JSON). Saves are asynchronous and atomic: Orbax writes into a temporary folder
and renames it when complete, so a run killed mid-save resumes from the last complete one.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_position: dict, *, force: bool = False) -> bool:
        """Start saving ``state`` and the data position as checkpoint ``step`` (returns at once)."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)), force=force)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data position) of checkpoint ``step`` (default: the latest complete one), with
        ``abstract_state`` giving the structure, shapes, dtypes and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
