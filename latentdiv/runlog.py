"""A run's metrics log: ``metrics.jsonl`` and the TensorBoard event file that mirrors it.

``metrics.jsonl`` is the record (one JSON row per log step and evaluation,
``{"step", "kind", ...}``); the TensorBoard event file is rebuilt from it at
every start, so the two always hold the same steps (DESIGN.md §11):

* on a start from checkpoint N, rows past N are dropped (written after the
  checkpoint by a run that was then killed); on a fresh start every row is
  dropped; the event files are replaced by one replaying the kept rows;
* a row already present for a ``(kind, step)`` is not written again (the
  final evaluation of a finished run that is rerun);
* ``flush`` is called before each checkpoint, so the rows up to a
  checkpoint's step are on disk before the checkpoint exists.

Together: a run killed at any moment and resumed holds every step exactly
once, in both files.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time

import numpy as np

LOG_FILE = "metrics.jsonl"
_EVENTS = "events.out.tfevents.*"
# Per-latent lists written to TensorBoard as one scalar per latent.
_PER_LATENT = ("validity", "latent_usage")


def read_rows(workdir: str) -> list[dict]:
  """The rows of ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
  rows = []
  try:
    with open(os.path.join(workdir, LOG_FILE)) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
          rows.append(row)
  except FileNotFoundError:
    pass
  return rows


def truncate_rows(workdir: str, last_step: int) -> list[dict]:
  """Keeps the rows with ``step <= last_step`` (none for ``last_step < 0``); returns them."""
  rows = [r for r in read_rows(workdir) if r["step"] <= last_step]
  path = os.path.join(workdir, LOG_FILE)
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(path + ".tmp", path)
  return rows


def _scalars(row: dict):
  """``(tag, value)`` of the TensorBoard scalars of a row (per-latent lists as ``name/k``)."""
  for name, value in row.items():
    if name in ("step", "kind", "time") or isinstance(value, (bool, str)) or value is None:
      continue
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
      continue
    if array.ndim == 0:
      yield f"{row['kind']}/{name}", float(array)
    elif array.ndim == 1 and name in _PER_LATENT:
      for k, v in enumerate(array):
        yield f"{row['kind']}/{name}/{k}", float(v)


class RunLog:
  """Appends rows to ``metrics.jsonl`` and TensorBoard, resuming from a checkpoint's step.

  Args:
    workdir: the run's directory.
    resumed_step: the step of the checkpoint the run starts from; None for a
      fresh start.
    enabled: False in every process but 0 of a multi-host run (nothing is
      read or written).
  """

  def __init__(self, workdir: str, resumed_step: int | None, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self._logged, self._writer = set(), None
    if not enabled:
      return
    rows = truncate_rows(workdir, -1 if resumed_step is None else resumed_step)
    old_events = glob.glob(os.path.join(workdir, _EVENTS))
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # A suffix of its own: never the name of an old file (same second, same host).
    self._writer = SummaryWriter(workdir, flush_secs=30,
                                 filename_suffix=f".{os.getpid()}.{time.time_ns()}")
    for row in rows:
      self._write_events(row)
      self._logged.add((row["kind"], row["step"]))
    self.flush()
    for path in old_events:  # After the replay is on disk: a kill in between loses nothing.
      os.remove(path)

  def _write_events(self, row: dict) -> None:
    for tag, value in _scalars(row):
      self._writer.add_scalar(tag, value, row["step"], walltime=row.get("time"))

  def write(self, row: dict) -> bool:
    """Appends ``row`` (``step``, ``kind`` and values) unless that (kind, step) is logged."""
    key = (row["kind"], row["step"])
    if not self.enabled or key in self._logged:
      return False
    with open(os.path.join(self.workdir, LOG_FILE), "a") as f:
      f.write(json.dumps(row) + "\n")
    self._write_events(row)
    self._logged.add(key)
    return True

  def flush(self) -> None:
    """Puts the TensorBoard events in the file (rows are written as they come)."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _records(path: str):
  """The records of a TFRecord file (a record cut short at the end is skipped)."""
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    end = offset + 12 + length + 4
    if end > len(data):
      return
    yield data[offset + 12:offset + 12 + length]
    offset = end


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every TensorBoard scalar in ``workdir``'s event files: ``{tag: [(step, value), ...]}``.

  In file order, duplicates kept (what a checker of lost or repeated steps
  needs; TensorBoard itself would show the same here, since the event files
  are rebuilt at every start).
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, _EVENTS))):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out
