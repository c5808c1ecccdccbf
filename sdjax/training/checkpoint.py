"""Training checkpoints with Orbax's CheckpointManager.

One checkpoint holds the whole `TrainState` (params, optimizer state, EMA, step, RNG) and the
data position (JSON). Saves are asynchronous and atomic: Orbax writes into a temporary folder
and renames it when complete, so a run killed mid-save resumes from the last complete one.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
try:   # a private module (its place in Orbax 0.12.8): a later Orbax that moves it loses only the clean-up below
    from orbax.checkpoint._src import asyncio_utils as _orbax_asyncio
except ImportError:
    _orbax_asyncio = None


class _NoSaveFailureTracebacks(logging.Filter):
    """Drops the ERROR records with a traceback that a save cut short leaves: Orbax's (absl) for a
    Ctrl-C (or train.py's SIGTERM, raised as a KeyboardInterrupt) that lands while it waits, and,
    for a write that fails (a full disk), Orbax's and one asyncio "Task exception was never
    retrieved" per array being written (hundreds; `_run_sync_draining` now lets those writes end first).
    The run then stops with one line naming the error and the newest complete checkpoint; a save cut
    short is left out, not half-kept. Also the asyncio records of the other reads of a restore that a
    damaged file stopped (its error is raised once, as `CheckpointUnreadable`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, KeyboardInterrupt):
            return record.name != "absl"
        return not ((_is_write_failure(error) or _read_failure(error)) and _raised_in_orbax(error))


def _is_write_failure(error: BaseException | None) -> bool:
    """A failed write as TensorStore reports it (a ValueError), or as Python's file calls do (an
    OSError such as ENOSPC, from Orbax's JSON and metadata writes)."""
    if isinstance(error, ValueError):
        return bool(_WRITE_FAILURE.search(str(error)))
    return type(error) is OSError and error.errno in _WRITE_ERRNOS


def _raised_in_orbax(error: BaseException) -> bool:
    """Whether Orbax's code is on the error's traceback (so other code's asyncio errors still show)."""
    tb = error.__traceback__
    while tb is not None:
        if "/orbax/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


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
    x 8 devices = 256 compiles at the first save of the tiny test model: 10.6 s blocking there, 0.75 s
    without; BENCHMARKS.md), and each device-held array is written from its first copy instead."""
    types = ocp.type_handlers
    default = types.get_type_handler(jax.Array)
    arrays = types.ArrayHandler(use_replica_parallel=False,
                                array_metadata_store=getattr(default, "_array_metadata_store", None))
    return types.create_type_handler_registry(
        *[(ty, arrays if ty is jax.Array else types.get_type_handler(ty)) for ty in types.supported_types()])


# How Orbax / TensorStore report a failed write (a full disk, a folder made read-only): as ValueError.
_WRITE_FAILURE = re.compile(r"os_error_code|No space left|RESOURCE_EXHAUSTED|PERMISSION_DENIED|Read-only file system")
# ... and Python's file calls (Orbax's JSON and metadata files): a full disk or quota, a read-only disk.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
for _logger in ("absl", "asyncio"):   # Orbax's logger, and the one of the event loop its writes run in
    logging.getLogger(_logger).addFilter(_NoSaveFailureTracebacks())


# TensorStore's status codes for a file it could not read or decode (a truncated, damaged or missing
# file); a checkpoint that does not fit the state restored into it is another ValueError, without one.
_READ_FAILURE = re.compile(r"^(OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|NOT_FOUND|UNKNOWN|INTERNAL): ")


def _read_failure(error: BaseException | None) -> str | None:
    """The first line of what made a checkpoint unreadable (a file that is not JSON, missing, or that
    TensorStore cannot read: Orbax raises its error from one that names no file), or None when
    ``error`` and its causes are not that."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error.args[0] if isinstance(error, KeyError) and error.args else error).strip()
        if (isinstance(error, (json.JSONDecodeError, OSError)) or _READ_FAILURE.match(text)
                or (isinstance(error, KeyError) and "was not found in the checkpoint" in text)):   # a folder gone
            return text.splitlines()[0] if text else type(error).__name__
        error = error.__cause__
    return None


class CheckpointUnreadable(Exception):
    """Checkpoint ``step`` in ``directory`` has a file that cannot be read (truncated, damaged or missing)."""

    def __init__(self, step: int, directory: Path, reason: str):
        super().__init__(f"cannot read checkpoint {step} ({directory / str(step)}): {reason}; one of its files is "
                         "damaged, missing or unreadable")
        self.step, self.directory = step, directory


def _run_sync_draining(coro):
    """Orbax's `asyncio_utils._run_sync_via_new_loop`, which closes its event loop as soon as the
    coroutine raises. A save writes its arrays as sibling tasks: when one write fails (a full disk),
    the others are still in flight, and each then printed "RuntimeError: Event loop is closed" as
    TensorStore finished it, or asyncio logged "exception was never retrieved" (thousands of
    tracebacks for one error). A restore that a damaged file stops does the same with its other
    reads. After an error, the loop first lets them finish (theirs are the same error), as
    asyncio.run would, without cancelling them (TensorStore's reads and writes go on anyway)."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    except Exception:
        try:
            while pending := asyncio.all_tasks(loop):
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except Exception:   # noqa: BLE001  (the coroutine's error is the one to raise)
            pass
        raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


if hasattr(_orbax_asyncio, "_run_sync_via_new_loop"):   # (its name in Orbax 0.12.8; not there: left alone)
    _orbax_asyncio._run_sync_via_new_loop = _run_sync_draining


def _as_os_error(error: BaseException, directory: Path) -> BaseException:
    """A failed checkpoint write as the OSError it is (one line naming the folder), so callers catch
    it with the other disk errors; any other error as it is."""
    text = str(error)
    if type(error) is OSError and error.errno in _WRITE_ERRNOS and str(directory) not in text:
        # Orbax's JSON and metadata writes: "[Errno 28] No space left on device", naming no file
        wrapped = OSError(f"saving a checkpoint in {directory} failed: {error.strerror or text}")
        wrapped.errno = error.errno
        return wrapped
    if isinstance(error, OSError) or not _WRITE_FAILURE.search(text):
        return error
    first = next((line.strip() for line in text.splitlines() if _WRITE_FAILURE.search(line)), text.splitlines()[0])
    return OSError(f"saving a checkpoint in {directory} failed: {first}")


def _unreadable(error: Exception, step: int, directory: Path) -> CheckpointUnreadable | None:
    """A failed restore of checkpoint ``step`` as `CheckpointUnreadable` when a file could not be
    read; None for any other error (a checkpoint that does not fit the state)."""
    reason = _read_failure(error)
    return None if reason is None else CheckpointUnreadable(step, directory, reason)


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
            # cleanup_tmp_directories: a save that failed (a full disk) leaves a partial folder, removed
            # when a resume opens the folder again
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                 create=create, cleanup_tmp_directories=create))

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, or None (one being saved counts: see `all_steps`)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the checkpoints: the complete ones in the folder, and one this Checkpointer
        is still saving in the background (Orbax lists it from the start of its save; `wait` first
        to count complete ones only, or use `checkpoint_steps`)."""
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_position: dict, *, force: bool = False) -> None:
        """Start saving ``state`` and the data position as checkpoint ``step`` (returns at once).

        Raises RuntimeError when Orbax declines to save (it skips, and returns False for, a step
        not above the newest checkpoint in the folder): a run must never silently keep no
        checkpoints of its own.
        """
        self._check_free_space(state)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_position)), force=force)
        except Exception as e:
            raise _as_os_error(e, self.directory) from e
        if not saved:
            raise RuntimeError(f"checkpoint {step} was not saved: {self.directory} already has checkpoints "
                               f"up to step {self.latest_step()}")

    def _check_free_space(self, state) -> None:
        """Refuse a save that cannot fit (an OSError, ENOSPC) before it starts, rather than writing a
        partial one until the disk is full (and the run's own files cannot be written). A checkpoint
        takes its arrays' bytes on disk (OCDBT, uncompressed: +0.7% for the tiny test model).
        Single-process only: on several hosts each writes its own part, maybe to its own disk, and
        all must decide alike."""
        if jax.process_count() > 1:
            return
        self.wait()   # the previous save's bytes are on the disk now (or its error is raised)
        needed = int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state)) * 1.02) + (1 << 20)
        folder = next((p for p in (self.directory, *self.directory.parents) if p.exists()), self.directory)
        free = shutil.disk_usage(folder).free
        if free < needed:
            def size(n):
                return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
            advice = ("keep fewer: --keep-checkpoints" if self.manager.all_steps()   # none to keep fewer of
                      else "choose an --output-dir on a disk with more")
            error = OSError(f"saving a checkpoint in {self.directory} failed: it needs about {size(needed)} and the "
                            f"disk has {size(free)} free (free some space, or {advice})")
            error.errno = errno.ENOSPC
            raise error

    def restore(self, abstract_state, step: int | None = None):
        """(state, data position) of checkpoint ``step`` (default: the latest complete one), with
        ``abstract_state`` giving the structure, shapes, dtypes and shardings. Raises
        `CheckpointUnreadable` when a file of it cannot be read, and Orbax's ValueError when it does
        not fit ``abstract_state``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint {step} in {self.directory} "
                                    f"(it has {', '.join(map(str, sorted(self.all_steps()))) or 'none'})")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(abstract,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
                data=ocp.args.JsonRestore()))
        except Exception as e:
            if (unreadable := _unreadable(e, step, self.directory)) is None:
                raise
            raise unreadable from e
        return restored.state, restored.data

    def check(self) -> None:
        """Raise the error of a background save that failed since the last look (an OSError for a
        full disk), at once rather than at the next save."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise _as_os_error(e, self.directory) from e

    def wait(self) -> None:
        """Block until the background save is complete; raise its error (as `check`)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise _as_os_error(e, self.directory) from e

    def close(self) -> None:
        """`wait` for the background save (raising its error), then close Orbax's manager."""
        try:
            self.wait()
        finally:
            self.manager.close()


def read_data_position(directory: str | Path, step: int) -> dict:
    """The data position saved in checkpoint ``step`` of ``directory`` (a few hundred bytes of
    JSON), without reading the training state; creates and changes nothing. Raises
    `CheckpointUnreadable` when it cannot be read."""
    checkpoints = Checkpointer(directory, create=False)
    try:
        return checkpoints.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    except Exception as e:
        if (unreadable := _unreadable(e, step, checkpoints.directory)) is None:
            raise
        raise unreadable from e
    finally:
        checkpoints.close()


def checkpoint_steps(directory: str | Path) -> list[int]:
    """The complete checkpoints in ``directory`` (sorted), creating and changing nothing."""
    if not Path(directory).is_dir():
        return []
    checkpoints = Checkpointer(directory, create=False)
    try:
        return sorted(checkpoints.all_steps())
    finally:
        checkpoints.close()
