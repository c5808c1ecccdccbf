"""Training checkpoints with Orbax's CheckpointManager.

One checkpoint holds the whole `TrainState` (params, optimizer state, EMA, step, RNG) and the
data position (JSON). Saves are asynchronous and atomic: Orbax writes into a temporary folder
and renames it when complete, so a run killed mid-save resumes from the last complete one.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class _Manager(ocp.CheckpointManager):
    """Orbax's manager without its own preemption checks. sdjax's training loop asks JAX's
    preemption service at every step, with a counter from the run's first step (the service
    aligns the processes on that counter); Orbax asking as well, with absolute steps at saves and
    on process 0 alone in its finalize thread, would move the counter under it."""

    def reached_preemption(self, step: int) -> bool:
        return False


def _type_handlers():
    """Orbax's handlers, with jax.Array saved without replica-parallel writes: those slice each
    replicated weight between its copies with a small compiled program per shape and device (32 shapes
    x 8 devices = 256 compiles at the first save of the tiny test model: 11.5 s there, 0.5 s without;
    BENCHMARKS.md), and each device-held array is written from its first copy instead."""
    types = ocp.type_handlers
    default = types.get_type_handler(jax.Array)
    arrays = types.ArrayHandler(use_replica_parallel=False,
                                array_metadata_store=getattr(default, "_array_metadata_store", None))
    return types.create_type_handler_registry(
        *[(ty, arrays if ty is jax.Array else types.get_type_handler(ty)) for ty in types.supported_types()])


class Checkpointer:
    """``create=False`` opens ``directory`` without creating it (to look at or restore from the
    checkpoints of a run; nothing is written unless `save` is called)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = _Manager(
            self.directory,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                           "data": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                 create=create))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_position: dict, *, force: bool = False) -> None:
        """Start saving ``state`` and the data position as checkpoint ``step`` (returns at once).

        Raises RuntimeError when Orbax declines to save (it skips, and returns False for, a step
        not above the newest checkpoint in the folder): a run must never silently keep no
        checkpoints of its own.
        """
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_position)), force=force)
        if not saved:
            raise RuntimeError(f"checkpoint {step} was not saved: {self.directory} already has checkpoints "
                               f"up to step {self.latest_step()}")

    def restore(self, abstract_state, step: int | None = None):
        """(state, data position) of checkpoint ``step`` (default: the latest complete one), with
        ``abstract_state`` giving the structure, shapes, dtypes and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint {step} in {self.directory} "
                                    f"(it has {', '.join(map(str, sorted(self.all_steps()))) or 'none'})")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
            data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_steps(directory: str | Path) -> list[int]:
    """The complete checkpoints in ``directory`` (sorted), creating and changing nothing."""
    if not Path(directory).is_dir():
        return []
    checkpoints = Checkpointer(directory, create=False)
    try:
        return sorted(checkpoints.all_steps())
    finally:
        checkpoints.close()
