"""Orbax checkpoints of the train state: periodic saves, resume, and corrupt-checkpoint fallback.

A thin layer over ``orbax.checkpoint.CheckpointManager`` (the ``args=`` API with
a ``preservation_policy``). What it adds is the policy researchers expect:

* resume from the newest checkpoint that restores;
* a checkpoint that fails to restore (partial write, corrupt file) is reported,
  skipped and moved to ``checkpoints_unreadable/`` beside the checkpoint
  directory — never deleted, and never overwritten by the resumed run saving
  the same step again (an ``.N`` suffix keeps repeated failures apart);
* the train state is saved with a small JSON record of the run (step, config).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


CHECKPOINT_DIR = "checkpoints"  # Inside a run's workdir.


class CheckpointError(RuntimeError):
  """No checkpoint in a non-empty checkpoint directory could be restored."""


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
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         force: bool = False) -> bool:
  """Saves ``state`` and the JSON ``meta`` at ``step`` if the policy (or ``force``) says so."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict, int] | None:
  """Restores the newest checkpoint that loads; ``None`` if there is none.

  Newer checkpoints that fail to load are reported with ``logging.warning`` and
  left in place.

  Args:
    manager: from ``make_manager``.
    abstract_state: a pytree of the state's structure (arrays or
      ``jax.ShapeDtypeStruct``), the restore target.

  Returns:
    ``(state, meta, step)`` or ``None`` when the directory holds no checkpoint.

  Raises:
    CheckpointError: checkpoints exist but none restores.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failures = []
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as err:  # pylint: disable=broad-except
      # Orbax raises a variety of errors for partial or corrupt files.
      message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
      kept_at = _set_aside(manager, step)
      logging.warning("Checkpoint at step %d in %s could not be restored (%s); it is "
                      "kept for inspection at %s; trying an older one.",
                      step, manager.directory, message, kept_at)
      print(f"WARNING: checkpoint at step {step} could not be restored ({message}); "
            f"kept for inspection at {kept_at}.", flush=True)
      failures.append((step, message))
      continue
    if failures:
      logging.warning("Resumed from step %d; skipped unreadable checkpoint(s) at %s.",
                      step, [s for s, _ in failures])
    return restored["state"], dict(restored["meta"]), step
  raise CheckpointError(
      f"None of the checkpoints in {manager.directory} could be restored: "
      + "; ".join(f"step {s}: {m}" for s, m in failures)
      + f". They are kept in {_unreadable_dir(manager)}; rerun to start afresh.")


def _unreadable_dir(manager: ocp.CheckpointManager) -> str:
  directory = os.fspath(manager.directory)
  return os.path.join(os.path.dirname(directory.rstrip(os.sep)), "checkpoints_unreadable")


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable step out of the manager's view; returns where it now lies."""
  source = os.path.join(os.fspath(manager.directory), str(step))
  target_dir = _unreadable_dir(manager)
  os.makedirs(target_dir, exist_ok=True)
  target, n = os.path.join(target_dir, str(step)), 1
  while os.path.exists(target):
    target, n = os.path.join(target_dir, f"{step}.{n}"), n + 1
  os.rename(source, target)
  manager.reload()
  return target


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

  Only the ``params`` of the saved train state are read (Orbax partial
  restore into ``abstract_params``); the optimiser state is never loaded and
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
    CheckpointError: the checkpoint does not restore.
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
