"""The host loop every objective shares: resume, log, evaluate, checkpoint, stop.

``run_loop`` drives a jitted step (``latentdiv.train.make_train_step``) from
the host: it resumes from the newest readable checkpoint, logs every
``log_every`` steps (stdout, ``metrics.jsonl``, TensorBoard), evaluates every
``eval_every`` steps, checkpoints every ``checkpoint_every`` steps, and stops
cleanly on SIGTERM/SIGINT or a streak of non-finite steps. It knows no
objective and no model: the step, the evaluation and the progress lines are
arguments (nanodo's ``Trainer`` loop, flax's lm1b ``train_and_evaluate``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections

from latentdiv import checkpointing
from latentdiv import workdir as workdir_lib


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved before stopping."""


@contextlib.contextmanager
def _stop_on_signals():
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""
  received = []

  def handler(signum, frame):  # pylint: disable=unused-argument
    received.append(signum)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, handler)
  try:
    yield received
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


class LoopResult(NamedTuple):
  """What ``run_loop`` hands back: the final state, the final evaluation, the step time."""

  state: Any
  final_eval: dict
  seconds_per_step: float  # Wall time per step, without the first (compiling) step and evals.


def run_loop(config: ml_collections.ConfigDict, workdir: str, *, initial_state, restore_target,
             place: Callable, step: Callable, evaluate: Callable,
             train_line: Callable[[int, dict, float], str],
             eval_line: Callable[[int, dict], str],
             eval_at_start: bool = False) -> LoopResult:
  """Resume, step, log, evaluate, checkpoint, stop on signals or a non-finite streak.

  Resumes from the newest readable checkpoint in ``workdir/checkpoints``,
  runs ``step`` until ``config.train.num_steps``, logs every ``log_every``
  steps (stdout, ``metrics.jsonl``, TensorBoard), evaluates every
  ``eval_every`` steps and at the end, checkpoints every ``checkpoint_every``
  steps and at the end. SIGTERM/SIGINT: checkpoint, then ``Interrupted``.
  ``max_nonfinite_steps`` consecutive non-finite steps: ``NonFiniteError``.

  Args:
    config: the validated config (``train`` section used here).
    workdir: the run's directory (already locked and checked by the caller).
    initial_state: the state at step 0 (any layout).
    restore_target: ``jax.ShapeDtypeStruct`` tree (with shardings) to restore into.
    place: puts ``initial_state`` in the layout ``step`` expects.
    step: ``state -> (state, metrics)``, the jitted step.
    evaluate: ``state -> dict`` of Python values (host side).
    train_line: ``(step, metrics, steps_per_sec) -> str`` printed at log steps.
    eval_line: ``(step, result) -> str`` printed after each evaluation.
    eval_at_start: also evaluate a fresh run at step 0.

  Returns:
    ``LoopResult``.
  """
  is_lead = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  manager = checkpointing.make_manager(ckpt_dir, config.train.keep_checkpoints,
                                       config.train.checkpoint_every)
  # Close the manager and the event writer on every path (errors included):
  # open ones can keep the interpreter from exiting.
  writer = None
  try:
    # Restored arrays land directly in the target's layout (each host reads
    # only its devices' shards); a fresh state is placed the same way, so the
    # step compiles once for both.
    restored = checkpointing.restore_latest(manager, restore_target)
    if restored is not None:
      state, _, ckpt_step = restored
      print(f"Resuming from step {ckpt_step} ({workdir}).", flush=True)
      if is_lead:
        workdir_lib.truncate_log(workdir, ckpt_step)
    else:
      state = place(initial_state)
    workdir_lib.write_config(workdir, config)

    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    writer = SummaryWriter(workdir) if is_lead else None
    num_steps = config.train.num_steps
    step_done = int(state.step)
    last_time, last_step = time.time(), step_done
    pending = None  # Metrics of the previous step, pulled to the host one step late.
    streak = None  # The previous step's count of consecutive non-finite steps.
    eval_seconds = 0.0

    def log_train(at, aux):
      nonlocal last_time, last_step
      now = time.time()
      rate = (at - last_step) / max(now - last_time, 1e-9)
      last_time, last_step = now, at
      aux = {k: float(v) for k, v in jax.device_get(aux).items()}
      if is_lead:
        workdir_lib.write_scalars(writer, at, aux, "train")
        writer.add_scalar("train/steps_per_sec", rate, at)
        workdir_lib.append_log(workdir, dict(step=at, kind="train", time=now, **aux))
        print(train_line(at, aux, rate), flush=True)

    def run_eval(at):
      nonlocal eval_seconds
      start = time.time()
      result = evaluate(state)
      eval_seconds += time.time() - start
      if is_lead:
        workdir_lib.write_scalars(writer, at, result, "eval")
        workdir_lib.append_log(workdir, dict(step=at, kind="eval", **{
            k: v for k, v in result.items() if k != "samples"}))
        print(eval_line(at, result), flush=True)
      return result

    def flush_log():
      nonlocal pending
      if pending is not None:
        log_train(*pending)
        pending = None

    if eval_at_start and step_done == 0:
      run_eval(0)
    timed_from, timed_start = None, None  # Step timing excludes the first (compiling) step.
    with _stop_on_signals() as signals:
      while step_done < num_steps:
        state, aux = step(state)  # Dispatch; the device runs ahead of the host.
        step_done += 1
        if timed_from is None:
          jax.block_until_ready(state)
          timed_from, timed_start, eval_seconds = step_done, time.time(), 0.0
        if streak is not None and int(streak) >= config.train.max_nonfinite_steps:
          flush_log()
          manager.wait_until_finished()
          raise NonFiniteError(
              f"{int(streak)} consecutive steps ending at step {step_done - 1} had a "
              f"non-finite loss or gradient (parameters were left unchanged by each). The "
              f"newest checkpoint is step {manager.latest_step()} in {ckpt_dir}. Lower "
              f"optim.learning_rate or inspect the inputs, then rerun to resume from it.")
        streak = state.nonfinite_streak
        flush_log()
        if step_done % config.train.log_every == 0 or step_done == num_steps:
          pending = (step_done, aux)
        if step_done % config.train.eval_every == 0 and step_done != num_steps:
          run_eval(step_done)
        checkpointing.save(manager, step_done, state, dict(step=step_done))
        if signals:
          flush_log()
          if manager.latest_step() != step_done:
            checkpointing.save(manager, step_done, state, dict(step=step_done), force=True)
          manager.wait_until_finished()
          name = signal.Signals(signals[0]).name
          print(f"{name} received: checkpoint saved at step {step_done} in {ckpt_dir}; "
                f"rerun the same command to resume.", flush=True)
          raise Interrupted(f"{name} at step {step_done}; checkpoint saved in {ckpt_dir}.")
    jax.block_until_ready(state)
    seconds_per_step = float("nan")
    if timed_from is not None and step_done > timed_from:
      seconds_per_step = (time.time() - timed_start - eval_seconds) / (step_done - timed_from)
    flush_log()
    if not manager.all_steps() or manager.latest_step() != step_done:
      checkpointing.save(manager, step_done, state, dict(step=step_done), force=True)
    manager.wait_until_finished()
    return LoopResult(state, run_eval(step_done), seconds_per_step)
  finally:
    manager.close()
    if writer is not None:
      writer.close()
