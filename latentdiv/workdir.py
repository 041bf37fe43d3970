"""A run's directory: its name, its lock, its config record and the rules of a resume.

A workdir holds ``checkpoints/`` (Orbax), ``config.json`` (the config of the
run), ``config_history.jsonl`` (every start of the run, with what changed),
``metrics.jsonl`` and TensorBoard event files (``latentdiv.runlog``) and
``summary.json``. This module owns the rules around them, for every objective
alike (DESIGN.md §11):

* a default run folder named after the whole config argument and its
  overrides (``default_name``), and a usable directory or a one-line error
  (``check_usable``);
* one run at a time (``lock``: ``fcntl.flock`` on ``.lock``, held for the
  run's life and released by the kernel when the process dies, so no stale
  lock survives a kill, a reused pid or a renamed host);
* a run never changes silently (``check_resume``): every changed field is
  listed; a change of the checkpointed state's structure is refused; any
  other change needs the caller's explicit ``accept_changes``, except a
  lower learning rate after a non-finite stop (the recovery the error
  advises); ``config.json`` is rewritten only for an accepted change, and
  ``config_history.jsonl`` keeps every start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np

from latentdiv import checkpointing

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
CHECKPOINT_DIR = checkpointing.CHECKPOINT_DIR
# What a resume after a non-finite stop may change without accept_changes.
RECOVERY_FIELDS = ("optim.learning_rate",)
_MAX_NAME = 100


class ConfigMismatchError(ValueError):
  """A run whose config differs from the one its workdir holds, not accepted."""


class WorkdirBusyError(RuntimeError):
  """Another live process is training in the same workdir."""


class WorkdirError(ValueError):
  """The workdir cannot be used (empty name, a file, not writable)."""


# ---------------------------------------------------------------------------
# Names and usability.


def _clean(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "-"


def default_name(config_spec: str, overrides: dict[str, Any]) -> str:
  """The run folder's name from the config argument and the overrides given.

  ``experiments/configs/raml.py:hamming,0.8`` → ``raml_hamming_0.8``;
  ``--config.train.num_steps=300 --config.objective.lambda_jsd=0.5`` on the
  default file → ``default_lambda_jsd_0.5_num_steps_300`` (overrides sorted
  by path, each named by its last component unless two share it). A name
  longer than 100 characters is cut and ends in a hash of the whole.

  Args:
    config_spec: the ``--config`` value, ``PATH`` or ``PATH:ARG``.
    overrides: ``{dotted field path: value}`` of the ``--config.FIELD`` flags.
  """
  path, _, arg = str(config_spec).partition(":")
  parts = [os.path.splitext(os.path.basename(path))[0] or "config"]
  if arg:
    parts += [_clean(a) for a in arg.split(",")]
  leaves = [p.split(".")[-1] for p in overrides]
  for path_, value in sorted(overrides.items()):
    leaf = path_.split(".")[-1]
    key = leaf if leaves.count(leaf) == 1 else path_
    parts += [key, _clean(value)]
  name = "_".join(parts)
  if len(name) > _MAX_NAME:
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    name = f"{name[:_MAX_NAME - 11]}_{digest}"
  return name


def check_usable(workdir: str) -> None:
  """Raises WorkdirError (one line, naming the path) if ``workdir`` cannot hold a run.

  Creates the directory (and its parents) if needed; probes that files can
  be created in it (``os.access`` would say yes to root on a read-only
  mount).
  """
  if not workdir or not str(workdir).strip():
    raise WorkdirError("--workdir is empty: give a directory, or leave the flag out for "
                       "the default workdir/<config name>.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory: choose another path.")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as err:
    raise WorkdirError(f"--workdir={workdir} is not usable ({err.strerror or err}): choose a "
                       "writable directory.") from None


# ---------------------------------------------------------------------------
# Config records.


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


def changed_fields(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """``{path: (old, new)}`` for every key whose value differs between two flat dicts."""
  return {path: (old.get(path), new.get(path))
          for path in sorted(set(old) | set(new)) if old.get(path) != new.get(path)}


def differences(old: dict, new: dict) -> list[str]:
  """``'field: old -> new'`` for every key whose value differs between two flat dicts."""
  return [f"{path}: {a!r} -> {b!r}" for path, (a, b) in changed_fields(old, new).items()]


def has_checkpoints(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds at least one step."""
  return bool(checkpointing.checkpoint_steps(workdir))


def read_config_record(workdir: str) -> dict | None:
  """``workdir/config.json`` as a dict, or None if there is none (or it does not parse)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def read_history(workdir: str) -> list[dict]:
  """The entries of ``config_history.jsonl``, oldest first (lines cut by a kill skipped)."""
  entries = []
  try:
    with open(os.path.join(workdir, HISTORY_FILE)) as f:
      for line in f:
        with contextlib.suppress(ValueError):
          entries.append(json.loads(line))
  except OSError:
    pass
  return entries


def _append_history(workdir: str, entry: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
      f.write(json.dumps(dict(time=time.time(), **entry)) + "\n")


def record_start(workdir: str, record: dict, step: int, changes: list[str]) -> None:
  """Appends a start to the history; (re)writes ``config.json`` on a first start or a change."""
  _append_history(workdir, dict(event="start", step=step, changes=changes, config=record))
  if jax.process_index() == 0 and (changes or read_config_record(workdir) is None):
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def record_nonfinite_stop(workdir: str, step: int, checkpoint: int | None) -> None:
  """Notes a non-finite stop: the next start may lower the learning rate without accept_changes."""
  _append_history(workdir, dict(event="nonfinite_stop", step=step, checkpoint=checkpoint))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``workdir/config.json`` (process 0 only): the record of a run made outside the loop."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      json.dump(config_record(config), f, indent=2)


def write_summary(workdir: str, summary: dict) -> None:
  """``workdir/summary.json`` (process 0 only)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
      json.dump(summary, f, indent=2)


def to_python(tree):
  """Arrays → Python lists and scalars (for JSON)."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), tree)


# ---------------------------------------------------------------------------
# The resume check.


def previous_record(workdir: str) -> tuple[dict | None, str]:
  """The config the workdir's run was made with, and where it was read.

  ``config.json``; if that is missing or unreadable, the record saved with
  the newest checkpoint that has one. ``(None, '')`` for a fresh workdir.
  """
  record = read_config_record(workdir)
  if record is not None:
    return record, os.path.join(workdir, CONFIG_FILE)
  record = checkpointing.newest_config_record(os.path.join(workdir, CHECKPOINT_DIR))
  if record is not None:
    return record, f"the newest checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}"
  return None, ""


def check_resume(workdir: str, record: dict, structure_of, *, accept_changes: bool = False,
                 defaults: dict | None = None) -> list[str]:
  """The changes of a run against its workdir's config; raises unless they may continue.

  Rules (DESIGN.md §11): a change of the checkpointed state's structure
  (``structure_of``) is refused while checkpoints exist; so is a change of
  ``train.num_steps`` under the cosine schedule (its decay horizon: the
  steps already taken followed another curve); any other change is refused
  unless ``accept_changes``, except ``RECOVERY_FIELDS`` after a non-finite
  stop. Nothing is written.

  Args:
    workdir: the run's directory (locked by the caller).
    record: ``config_record`` of the config about to run.
    structure_of: ``record -> flat dict`` of the structural values.
    accept_changes: continue with non-structural changes.
    defaults: a record of the schema's defaults: a field the saved record
      lacks (written by an older version) counts as its default.

  Returns:
    ``'field: old -> new'`` for each change (empty for a fresh workdir or the
    same config).

  Raises:
    ConfigMismatchError: listing every changed field, and why it is refused.
  """
  previous, source = previous_record(workdir)
  if previous is None:
    return []
  old = dict(flatten(defaults or {}), **flatten(previous))
  changes = changed_fields(old, flatten(record))
  if not changes:
    return []
  listed = "; ".join(f"{p}: {a!r} -> {b!r}" for p, (a, b) in changes.items())
  resumable = has_checkpoints(workdir)
  if resumable:
    structural = differences(structure_of(previous), structure_of(record))
    if structural:
      raise ConfigMismatchError(
          f"The config differs from the one of the checkpoints in {workdir!r} (read from "
          f"{source}) in fields that change the checkpointed state: {'; '.join(structural)}. "
          f"Use the original values or a new --workdir. All changes: {listed}.")
    schedule = {old.get("optim.schedule"), record["optim"]["schedule"]}
    if "train.num_steps" in changes and "cosine" in schedule:
      raise ConfigMismatchError(
          f"config.train.num_steps changes {changes['train.num_steps'][0]} -> "
          f"{changes['train.num_steps'][1]} in {workdir!r}: the cosine learning-rate schedule "
          "decays over num_steps, so the steps already taken followed another curve. Use a "
          "new --workdir (or optim.schedule='constant' from the start).")
  history = read_history(workdir)
  recovering = (history and history[-1].get("event") == "nonfinite_stop"
                and set(changes) <= set(RECOVERY_FIELDS))
  if not (accept_changes or recovering):
    what = "resume" if resumable else "reuse"
    raise ConfigMismatchError(
        f"{workdir!r} holds a run of another config (read from {source}); refusing to {what} "
        f"it with: {listed}. Pass --accept_config_changes to continue it with these values "
        f"(recorded in {HISTORY_FILE}), or choose another --workdir.")
  return [f"{p}: {a!r} -> {b!r}" for p, (a, b) in changes.items()]


# ---------------------------------------------------------------------------
# The lock.


def _owner(path: str) -> str:
  try:
    with open(path) as f:
      owner = json.load(f)
    return f"pid {owner.get('pid')} on {owner.get('host')}"
  except (OSError, ValueError, AttributeError):
    return "another process"


@contextlib.contextmanager
def lock(workdir: str):
  """Holds an exclusive ``fcntl.flock`` on ``WORKDIR/.lock`` for the duration of a run.

  The kernel grants the lock to one open file at a time, atomically, and
  releases it when the holder exits, however it dies: a killed run leaves no
  stale lock, and a reused pid or a new host name cannot make one look
  alive. The file itself stays (removing it would let a third process lock
  a new file while a second still holds the old one); it records the
  holder's pid and host for the message. On network filesystems flock is as
  reliable as the filesystem's locking (NFSv4: yes).

  Raises:
    WorkdirBusyError: another live process holds the lock.
  """
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
      if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirBusyError(
          f"Another run ({_owner(path)}) is using workdir {workdir!r}. Wait for it, stop it, "
          f"or choose another --workdir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname())).encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the flock.


def lock_for_this_process(workdir: str):
  """``lock`` in process 0; nothing in the other processes of a multi-host run.

  Every host of a multi-host run runs the same command on the same (shared)
  workdir: the lock keeps out OTHER runs, so only one process holds it.
  """
  if jax.process_index() == 0:
    return lock(workdir)
  return contextlib.nullcontext()
