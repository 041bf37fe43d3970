"""A run's directory: its lock, its config record, the resume check and the files it writes.

A workdir holds ``checkpoints/`` (Orbax), ``config.json`` (the config the run
was started with), ``metrics.jsonl`` (one JSON line per log step and
evaluation), TensorBoard event files and ``summary.json``. This module owns
the rules around them, for every objective alike:

* one run at a time (``lock``);
* a resume whose config changes the structure of the checkpointed state is
  refused before anything is restored (``check_config_matches``), naming the
  fields;
* log lines written after the checkpoint a run resumes from are dropped
  (``truncate_log``), so a resumed run's log equals an uninterrupted one's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any, Iterable

from absl import logging
import jax
import ml_collections
import numpy as np

from latentdiv import checkpointing

CONFIG_FILE = "config.json"
LOG_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = checkpointing.CHECKPOINT_DIR


class ConfigMismatchError(ValueError):
  """A resume whose config changes the structure of the checkpointed state."""


class WorkdirBusyError(RuntimeError):
  """Another live process is training in the same workdir."""


def config_record(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (what ``config.json`` holds)."""
  return json.loads(config.to_json_best_effort())


def flatten(record: dict, prefix: str = "") -> dict:
  """``{'a': {'b': 1}}`` → ``{'a.b': 1}``."""
  out = {}
  for key, value in record.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def select(record: dict, fields: Iterable[str]) -> dict:
  """The entries of the flattened ``record`` at or below each dotted prefix in ``fields``."""
  flat = flatten(record)
  fields = tuple(fields)
  return {path: value for path, value in flat.items()
          if any(path == f or path.startswith(f + ".") for f in fields)}


def differences(old: dict, new: dict) -> list[str]:
  """``'field: old -> new'`` for every key whose value differs between two flat dicts."""
  return [f"{path}: {old.get(path)!r} -> {new.get(path)!r}"
          for path in sorted(set(old) | set(new)) if old.get(path) != new.get(path)]


def has_checkpoints(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds at least one step."""
  return bool(checkpointing.checkpoint_steps(workdir))


def read_config_record(workdir: str) -> dict | None:
  """``workdir/config.json`` as a dict, or None if there is none (or it does not parse)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def check_config_matches(workdir: str, structure: dict, structure_of) -> None:
  """Raises ConfigMismatchError if ``workdir``'s checkpoints come from a structurally different config.

  Args:
    workdir: the run's directory.
    structure: the structural values of the config about to run (flat dict).
    structure_of: ``record -> flat dict``, the same selection applied to the
      saved ``config.json``.
  """
  saved = read_config_record(workdir)
  if saved is None or not has_checkpoints(workdir):
    return
  diffs = differences(structure_of(saved), structure)
  if diffs:
    raise ConfigMismatchError(
        f"The config differs from the one the checkpoints in {workdir!r} were written "
        f"with, in fields that change the run: {'; '.join(diffs)}. Use the original "
        f"values or a new --workdir.")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``workdir/config.json`` (process 0 only)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      json.dump(config_record(config), f, indent=2)


def write_summary(workdir: str, summary: dict) -> None:
  """``workdir/summary.json`` (process 0 only)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=2)


def append_log(workdir: str, record: dict[str, Any]) -> None:
  """One line of ``metrics.jsonl``."""
  with open(os.path.join(workdir, LOG_FILE), "a") as f:
    f.write(json.dumps(record) + "\n")


def truncate_log(workdir: str, last_step: int) -> None:
  """Drops ``metrics.jsonl`` lines past ``last_step`` (written after the checkpoint a run resumes from)."""
  path = os.path.join(workdir, LOG_FILE)
  if not os.path.exists(path):
    return
  lines = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # A line cut short by a kill.
        continue
      if record["step"] <= last_step:
        lines.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(lines)
  os.replace(path + ".tmp", path)


def to_python(tree):
  """Arrays → Python lists and scalars (for JSON)."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), tree)


def write_scalars(writer, step, metrics: dict, prefix: str):
  """TensorBoard scalars of ``metrics`` under ``prefix/`` (per-latent lists as ``name/k``)."""
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      writer.add_scalar(f"{prefix}/{name}", float(value), step)
    elif value.ndim == 1 and name in ("validity", "latent_usage"):
      for k, v in enumerate(value):
        writer.add_scalar(f"{prefix}/{name}/{k}", float(v), step)


@contextlib.contextmanager
def lock(workdir: str):
  """Holds ``WORKDIR/.lock`` (pid and host) for the duration of a run.

  A second run on the same workdir refuses to start while the first is alive.
  A lock left behind by a killed run (its pid no longer exists on this host)
  is taken over with a warning.

  Raises:
    WorkdirBusyError: another live run holds the lock.
  """
  path = os.path.join(workdir, ".lock")
  host = socket.gethostname()
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      try:
        with open(path) as f:
          owner = json.load(f)
      except (OSError, ValueError):
        owner = {}
      pid, owner_host = owner.get("pid"), owner.get("host")
      alive = False
      if isinstance(pid, int) and owner_host == host:
        try:
          os.kill(pid, 0)
          alive = True
        except ProcessLookupError:
          alive = False
        except PermissionError:
          alive = True
      elif owner_host not in (None, host):
        alive = True  # Cannot check a process on another host: assume it runs.
      if alive:
        raise WorkdirBusyError(
            f"Another run (pid {pid} on {owner_host}) is using workdir {workdir!r}. "
            f"Wait for it, stop it, or choose another --workdir. If no such run "
            f"exists, delete {path}.") from None
      logging.warning("Taking over the stale lock of a stopped run (pid %s) in %s.",
                      pid, workdir)
      os.remove(path)
  else:
    raise WorkdirBusyError(f"Could not acquire {path}.")
  with os.fdopen(fd, "w") as f:
    json.dump(dict(pid=os.getpid(), host=host), f)
  try:
    yield
  finally:
    try:
      os.remove(path)
    except FileNotFoundError:
      pass


def lock_for_this_process(workdir: str):
  """``lock`` in process 0; nothing in the other processes of a multi-host run.

  Every host of a multi-host run runs the same command on the same (shared)
  workdir: the lock keeps out OTHER runs, so only one process holds it.
  """
  if jax.process_index() == 0:
    return lock(workdir)
  return contextlib.nullcontext()
