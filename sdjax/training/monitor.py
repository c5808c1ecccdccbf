"""Training metrics: metrics.jsonl, TensorBoard event files, a loss-curve PNG, spike warnings."""
from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path

from sdjax.images import atomic_write, error_naming


def _json_line(row: dict) -> str:
    """One strict-JSON line: a non-finite number (a NaN or infinite loss) is written as null, not
    as the NaN / Infinity literals that JSON parsers other than Python's reject."""
    clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, skipping lines that are not a JSON object with a ``step``
    (a torn last line, left by a run killed while it wrote it)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (null for a NaN or infinite
    value) and mirrors it to TensorBoard.

    Only the main process writes (``enabled=False`` elsewhere). ``spike_factor``: a loss above
    that multiple of the recent median is reported by `record` as a spike.
    """

    def __init__(self, output_dir: Path, *, enabled: bool = True, spike_factor: float = 3.0, window: int = 50,
                 resume_from_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled, self.spike_factor = enabled, spike_factor
        self.recent = deque(maxlen=window)
        self.writer = None
        if enabled:
            if resume_from_step is not None and self.path.exists():
                # Resumed run: drop lines past the checkpoint (they will be recomputed identically)
                # and any torn line.
                rows = [row for row in read_rows(self.path) if row["step"] <= resume_from_step]
                atomic_write(self.path, lambda tmp: tmp.write_text("".join(map(_json_line, rows))))
                # The spike check goes on from the losses before the checkpoint, as without the stop.
                self.recent.extend(row["loss"] for row in rows
                                   if isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"]))
            elif resume_from_step is None and self.path.exists():
                self.path.unlink()
            tensorboard = Path(output_dir) / "tensorboard"
            if resume_from_step is None:   # a fresh run: an earlier run's curves would mix with its own
                for old in tensorboard.glob("events.out.tfevents.*"):
                    old.unlink()
            # On resume, TensorBoard drops the points after the checkpoint, as metrics.jsonl does.
            self.writer = _EventFile(tensorboard, purge_step=None if resume_from_step is None
                                     else resume_from_step + 1)

    def record(self, step: int, metrics: dict) -> bool:
        """Log ``metrics`` at ``step``; returns True when the loss is a spike."""
        loss = float(metrics["loss"])
        spike = (len(self.recent) >= 10 and math.isfinite(loss)
                 and loss > self.spike_factor * sorted(self.recent)[len(self.recent) // 2])
        if math.isfinite(loss):
            self.recent.append(loss)
        if self.enabled:
            row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            try:
                with self.path.open("a") as f:
                    f.write(_json_line(row))
            except OSError as e:   # a full disk: Python's message names no file
                raise error_naming(e, self.path) from e
            for k, v in row.items():
                if k != "step" and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush(every=_FLUSH_SECONDS)
        return spike

    def plot_loss(self, path: Path | None = None) -> Path | None:
        """Write ``loss_curve.png`` from metrics.jsonl (raw loss and a moving average)."""
        if not self.enabled or not self.path.exists():
            return None
        from matplotlib.figure import Figure   # not pyplot: its global backend belongs to the caller
        rows = [r for r in read_rows(self.path)   # a NaN loss (null) is not plotted
                if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        if not rows:
            return None
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        ax.plot(steps, losses, alpha=0.35, label="loss")
        ax.plot(steps, smooth, label=f"moving average ({k})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if min(losses) > 0 and max(losses) > 10 * min(losses):   # a log axis only where it spans decades:
            ax.set_yscale("log")                                   # over a narrow range it labels 1.21x10^0
        ax.legend()
        fig.tight_layout()
        path = path or self.path.with_name("loss_curve.png")
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        return path

    def close(self) -> None:
        """Flush and close the TensorBoard file (metrics.jsonl is opened per row)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


_FLUSH_SECONDS = 120   # how often TensorBoard's file is written out during a run (tensorboardX's default)


class _EventFile:
    """A TensorBoard event file written in the caller's thread, with tensorboardX's record format.
    Its SummaryWriter writes from a thread of its own: on a full disk that thread died with a
    traceback, its bounded queue then filled and the run hung at a later log, and its atexit hook
    failed again at exit. Here a write error is the caller's, as metrics.jsonl's is."""

    def __init__(self, directory: Path, *, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        directory.mkdir(parents=True, exist_ok=True)
        self.events = EventsWriter(str(directory / "events"))   # events.out.tfevents.TIME.HOST; its header event
        self.path = Path(self.events._file_name)
        self.flushed = time.monotonic()
        if purge_step is not None:   # as SummaryWriter(purge_step=...) marks a restart
            self._write(Event(step=purge_step, file_version="brain.Event:2"))
            self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _write(self, event) -> None:
        try:
            self.events.write_event(event)
        except OSError as e:
            raise error_naming(e, self.path) from e

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar
        self._write(Event(summary=scalar(tag, value), step=int(step), wall_time=time.time()))

    def flush(self, every: float = 0.0) -> None:
        """Write the buffered events out, or only when ``every`` seconds have passed since the last time."""
        if time.monotonic() - self.flushed < every:
            return
        try:
            self.events.flush()
        except OSError as e:
            raise error_naming(e, self.path) from e
        self.flushed = time.monotonic()

    def close(self) -> None:
        """Flush and close the file; it is closed even when the flush fails (then raised, naming it)."""
        try:
            self.flush()
        finally:
            try:
                self.events._py_recordio_writer.close()   # the file; Python closes it even when its flush fails
            except OSError:
                pass
