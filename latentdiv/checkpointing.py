"""Orbax checkpoints of the train state: saves, verified restores, and fallback.

A thin layer over ``orbax.checkpoint.CheckpointManager`` (the ``args=`` API with
a ``preservation_policy``). What it adds is the policy researchers expect
(DESIGN.md §11):

* every checkpoint gets ``checksums.sha256`` (SHA-256 of each of its files,
  ``sha256sum -c`` format), verified before it is restored: Orbax 0.12.8
  checks no array data (its zarr3 layout has a crc32c over the shard index
  only), so a flipped bit would otherwise restore silently;
* resume from the newest checkpoint that verifies and restores; one that
  does not (flipped bit, partial write, unreadable directory) is reported,
  skipped and moved to ``checkpoints_unreadable/`` beside the checkpoint
  directory (or, where it cannot be moved, e.g. a directory without
  permissions, renamed ``STEP.unreadable`` in place) — never deleted, and
  never overwritten by the resumed run saving the same step again;
* a checkpoint whose arrays do not match the state about to be restored
  (another model, another objective) is refused (``StructureMismatchError``)
  and left alone: it is not corrupt;
* the train state is saved with a small JSON record (step, config), so the
  config of a run can be read back even without its ``config.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging as pylogging
import os
import sys
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


CHECKPOINT_DIR = "checkpoints"  # Inside a run's workdir.
CHECKSUM_FILE = "checksums.sha256"  # Inside each step's directory.
UNREADABLE_DIR = "checkpoints_unreadable"
NONFINITE_DIR = "checkpoints_nonfinite"


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved, or none in a non-empty directory could be restored."""


class StructureMismatchError(CheckpointError):
  """A checkpoint's arrays do not match the state to restore (another config's run)."""


def make_manager(directory: str, keep: int, save_every: int) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` that keeps the ``keep`` latest checkpoints.

  Saves are synchronous: when ``save`` returns the checkpoint is complete, so a
  run killed right after a save resumes from it.

  Args:
    directory: where checkpoints live (``WORKDIR/checkpoints``).
    keep: how many of the latest checkpoints to preserve.
    save_every: steps between periodic saves (``save(..., force=True)`` always saves).
  """
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=checkpoint_managers.FixedIntervalPolicy(save_every),
      preservation_policy=checkpoint_managers.LatestN(keep),
      enable_async_checkpointing=False,
      create=True,
  )
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options,
      item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                         meta=ocp.JsonCheckpointHandler()))


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def _file_digests(directory: str) -> dict[str, str]:
  """``{relative path: sha256}`` of every file under ``directory`` but the checksum file."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel != CHECKSUM_FILE:
        with open(path, "rb") as f:
          out[rel] = hashlib.file_digest(f, "sha256").hexdigest()
  return out


def write_checksums(directory: str) -> None:
  """``directory/checksums.sha256``: the SHA-256 of each file (``sha256sum -c`` format)."""
  lines = [f"{digest}  {rel}\n" for rel, digest in sorted(_file_digests(directory).items())]
  tmp = os.path.join(directory, CHECKSUM_FILE + ".tmp")
  with open(tmp, "w") as f:
    f.writelines(lines)
  os.replace(tmp, os.path.join(directory, CHECKSUM_FILE))


def verify_checksums(directory: str) -> bool | None:
  """True if every file listed in ``checksums.sha256`` has its digest; None if there is no list.

  Raises:
    CheckpointError: a listed file is missing or differs (naming it), or the
      directory cannot be read.
  """
  listing = os.path.join(directory, CHECKSUM_FILE)
  try:
    with open(listing) as f:
      expected = dict(reversed(line.rstrip("\n").split("  ", 1)) for line in f if line.strip())
  except FileNotFoundError:
    if not os.access(directory, os.R_OK | os.X_OK) or not os.path.isdir(directory):
      raise CheckpointError(f"{directory} cannot be read") from None
    return None
  except (OSError, ValueError) as err:
    raise CheckpointError(f"{listing} cannot be read ({err})") from None
  try:
    actual = _file_digests(directory)
  except OSError as err:
    raise CheckpointError(f"{directory} cannot be read ({err})") from None
  for rel, digest in sorted(expected.items()):
    if actual.get(rel) != digest:
      what = "is missing" if rel not in actual else "does not match its SHA-256"
      raise CheckpointError(f"checksum mismatch: {rel} {what}")
  return True


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         force: bool = False) -> bool:
  """Saves ``state`` and the JSON ``meta`` at ``step`` if the policy (or ``force``) says so.

  Then writes the checkpoint's ``checksums.sha256`` (process 0).

  Raises:
    CheckpointError: the save failed (e.g. no space left), with Orbax's reason.
  """
  try:
    saved = manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    if saved and jax.process_index() == 0:
      write_checksums(_step_dir(manager, step))
  except Exception as err:  # pylint: disable=broad-except
    raise CheckpointError(f"Could not save the checkpoint at step {step} in "
                          f"{manager.directory}: {_brief(err)}") from None
  return saved


def _brief(err: Exception) -> str:
  text = str(err).strip()
  return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'a/b/0': (shape, dtype)}`` of a pytree's array leaves, whatever its node types."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  return {"/".join(name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_structure(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises StructureMismatchError if checkpoint ``step``'s arrays differ from ``abstract_state``'s.

  Reads only Orbax's metadata (names, shapes, dtypes), never the arrays.
  """
  saved = _signature(manager.item_metadata(step)["state"])
  wanted = _signature(abstract_state)
  diffs = [f"{path}: {saved.get(path, 'absent')} in the checkpoint, "
           f"{wanted.get(path, 'absent')} now"
           for path in sorted(set(saved) | set(wanted)) if saved.get(path) != wanted.get(path)]
  if diffs:
    raise StructureMismatchError(
        f"The checkpoint at step {step} in {manager.directory} holds another model or "
        f"objective ({len(diffs)} arrays differ: {'; '.join(diffs[:3])}"
        f"{'; ...' if len(diffs) > 3 else ''}). Run with the config it was written with or "
        "choose another --workdir.")


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict, int] | None:
  """Restores the newest checkpoint that verifies and loads; ``None`` if there is none.

  Newer checkpoints that fail their checksum or fail to load are reported
  with ``logging.warning`` and a printed line, and set aside.

  Args:
    manager: from ``make_manager``.
    abstract_state: a pytree of the state's structure (arrays or
      ``jax.ShapeDtypeStruct``), the restore target.

  Returns:
    ``(state, meta, step)`` or ``None`` when the directory holds no checkpoint.

  Raises:
    StructureMismatchError: a readable checkpoint of another structure.
    CheckpointError: checkpoints exist but none restores.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failures = []
  for step in steps:
    try:
      verified = verify_checksums(_step_dir(manager, step))
      try:
        check_structure(manager, step, abstract_state)
      except StructureMismatchError:
        raise
      except Exception as err:  # pylint: disable=broad-except
        raise CheckpointError(f"its metadata cannot be read ({_brief(err)})") from None
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except StructureMismatchError:
      raise
    except Exception as err:  # pylint: disable=broad-except
      # Orbax raises a variety of errors for partial or corrupt files.
      message = str(err) if isinstance(err, CheckpointError) else _brief(err)
      kept_at = set_aside(manager, step, UNREADABLE_DIR)
      logging.warning("Checkpoint at step %d in %s could not be restored (%s); it is "
                      "kept for inspection at %s; trying an older one.",
                      step, manager.directory, message, kept_at)
      print(f"WARNING: checkpoint at step {step} could not be restored ({message}); "
            f"kept for inspection at {kept_at}.", flush=True)
      failures.append((step, message))
      continue
    if verified is None:
      logging.warning("Checkpoint at step %d has no %s (written by an older version); "
                      "restored unverified.", step, CHECKSUM_FILE)
    if failures:
      logging.warning("Resumed from step %d; skipped unreadable checkpoint(s) at %s.",
                      step, [s for s, _ in failures])
    return restored["state"], dict(restored["meta"]), step
  raise CheckpointError(
      f"None of the checkpoints in {manager.directory} could be restored: "
      + "; ".join(f"step {s}: {m}" for s, m in failures)
      + f". They are kept in {_aside_dir(manager, UNREADABLE_DIR)}; rerun to start afresh.")


def _aside_dir(manager: ocp.CheckpointManager, name: str) -> str:
  directory = os.fspath(manager.directory)
  return os.path.join(os.path.dirname(directory.rstrip(os.sep)), name)


def _free_name(directory: str, base: str) -> str:
  target, n = os.path.join(directory, base), 1
  while os.path.exists(target):
    target, n = os.path.join(directory, f"{base}.{n}"), n + 1
  return target


def set_aside(manager: ocp.CheckpointManager, step: int, where: str) -> str:
  """Moves checkpoint ``step`` out of the manager's view into ``WORKDIR/where``; returns its path.

  A directory that cannot be moved to another parent (moving a directory
  needs write permission on it) is renamed ``STEP.unreadable`` in place,
  which Orbax does not list as a step.

  Raises:
    CheckpointError: it can be neither moved nor renamed.
  """
  source = _step_dir(manager, step)
  target_dir = _aside_dir(manager, where)
  if not os.path.lexists(source):  # Another host of the run moved it first.
    manager.reload()
    return os.path.join(target_dir, str(step))
  try:
    os.makedirs(target_dir, exist_ok=True)
    target = _free_name(target_dir, str(step))
    os.rename(source, target)
  except OSError:
    target = _free_name(os.fspath(manager.directory), f"{step}.unreadable")
    try:
      os.rename(source, target)
    except OSError as err:
      raise CheckpointError(
          f"The checkpoint at step {step} ({source}) is unreadable and cannot be moved "
          f"aside ({err.strerror}): move or delete it, then rerun.") from None
  manager.reload()
  return target


def newest_config_record(directory: str) -> dict | None:
  """The config record saved with the newest checkpoint in ``directory`` that has one.

  Reads the JSON ``meta`` item's file directly (no manager, nothing written).
  """
  if not os.path.isdir(directory):
    return None
  for step in sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True):
    try:
      with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
        record = json.load(f).get("config")
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(record, dict):
      return record
  return None


def abstract_like(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves for a restore target."""
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints in ``workdir/checkpoints``, oldest first (read-only)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> Any:
  """The model parameters saved in ``workdir/checkpoints`` (read-only; nothing else is loaded).

  The checkpoint's checksums are verified first; then only the ``params``
  of the saved train state are read (Orbax partial restore into
  ``abstract_params``); the optimiser state is never loaded and
  the workdir is never written. Teacher loading, the sweeps, the diagnostics
  and ``latentdiv.experiment.load`` all come through here.

  Args:
    workdir: a run's directory (holding ``checkpoints/``).
    abstract_params: the parameters' structure (arrays or
      ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape`` of the model's init);
      leaves without a sharding land on the first local device.
    step: the checkpoint to read; None = the newest.

  Returns:
    The parameter pytree.

  Raises:
    ValueError: no checkpoint (or not ``step``) in ``workdir/checkpoints``.
    CheckpointError: the checkpoint fails its checksum or does not restore.
  """
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  if not os.path.isdir(directory):
    raise ValueError(f"No checkpoints in {directory}: train that run first.")
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = manager.all_steps()
    if not steps:
      raise ValueError(f"No checkpoints in {directory}: train that run first.")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"No checkpoint at step {step} in {directory}; it has {sorted(steps)}.")
    device = jax.local_devices()[0]
    target = {"params": jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=getattr(a, "sharding", None)
            or jax.sharding.SingleDeviceSharding(device)), abstract_params)}
    try:
      verify_checksums(os.path.join(directory, str(step)))
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
    except Exception as err:  # pylint: disable=broad-except
      raise CheckpointError(
          f"The checkpoint at step {step} in {directory} did not restore: "
          f"{type(err).__name__}: {err}") from err
  finally:
    manager.close()
  return restored["state"]["params"]


class _DropThreadReports(pylogging.Filter):
  """Drops Orbax's report of an exception in one of its I/O threads (it re-raises it to the caller)."""

  def filter(self, record):
    return not (record.pathname.endswith(os.path.join("futures", "future.py"))
                and "raised an exception" in record.getMessage())


@contextlib.contextmanager
def quiet_failure_reports():
  """Keeps a failed restore or save to the one line its caller reports, while active.

  * After a failed restore or save, Orbax closes its asyncio event loop while
    tensorstore's I/O threads still complete the futures of the abandoned
    operations; each completion reports ``RuntimeError('Event loop is
    closed')`` through ``sys.unraisablehook`` (hundreds of tracebacks that
    bury the useful line). Nothing waits on those futures: they are dropped.
  * A failed save is also logged, with its traceback, by every Orbax thread
    it went through, before the same error reaches ``save`` (which raises it
    as one ``CheckpointError`` line): those reports are dropped.

  Every other unraisable exception and log record goes through as before.
  """
  previous = sys.unraisablehook
  thread_reports = _DropThreadReports()

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  pylogging.getLogger("absl").addFilter(thread_reports)
  try:
    yield
  finally:
    sys.unraisablehook = previous
    pylogging.getLogger("absl").removeFilter(thread_reports)
