"""The host loop every objective shares: resume, log, evaluate, checkpoint, stop.

``run_loop`` drives a jitted step (``latentdiv.train.make_train_step``) from
the host: it resumes from the newest checkpoint that verifies, compiles the
step and checks its memory against the device before the first step, logs
every ``log_every`` steps (stdout, ``metrics.jsonl``, TensorBoard:
``latentdiv.runlog``), evaluates every ``eval_every`` steps, checkpoints
every ``checkpoint_every`` steps, and stops cleanly on SIGTERM/SIGINT or a
streak of non-finite steps (DESIGN.md §11). It knows no objective and no
model: the step, the evaluation and the progress lines are arguments
(nanodo's ``Trainer`` loop, flax's lm1b ``train_and_evaluate``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import ml_collections

from latentdiv import checkpointing
from latentdiv import memory
from latentdiv import runlog as runlog_lib
from latentdiv import workdir as workdir_lib


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved before stopping."""

  def __init__(self, message: str, signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = int(signum)


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
  seconds_per_step: float  # Wall time per step, without the first step and evals.


def _compile(step: Callable, state, config) -> None:
  """Compiles ``step`` at ``state`` (a hit of jit's cache afterwards) and checks its memory."""
  if not hasattr(step, "lower"):
    return
  print("Compiling the train step (the first run of a config can take a minute)...",
        flush=True)
  start = time.time()
  compiled = step.lower(state).compile()
  needed = memory.check_fits(
      compiled, jax.local_devices()[0],
      f"Lower config.train.batch_size (now {config.train.batch_size}) or the model's size "
      f"(config.model), or use more devices.")
  size = f", {needed / 2**20:.0f} MiB beyond the state" if needed is not None else ""
  print(f"Compiled in {time.time() - start:.1f} s{size}.", flush=True)


def run_loop(config: ml_collections.ConfigDict, workdir: str, *, initial_state, restore_target,
             place: Callable, step: Callable, evaluate: Callable,
             train_line: Callable[[int, dict, float], str],
             eval_line: Callable[[int, dict], str],
             eval_at_start: bool = False, changes: Sequence[str] = ()) -> LoopResult:
  """Resume, compile, step, log, evaluate, checkpoint, stop on signals or a non-finite streak.

  Resumes from the newest checkpoint in ``workdir/checkpoints`` that
  verifies, compiles ``step`` and checks its memory (nothing is written
  before), runs until ``config.train.num_steps``, logs every ``log_every``
  steps, evaluates every ``eval_every`` steps and at the end, checkpoints
  every ``checkpoint_every`` steps and at the end.

  * Logs: rows up to a checkpoint are flushed before it is written; a start
    drops rows past its checkpoint (``runlog.RunLog``): no step is lost or
    repeated across kills.
  * SIGTERM/SIGINT: checkpoint, then ``Interrupted``.
  * Non-finite steps: a checkpoint is never taken of a state whose last step
    was non-finite (except the run's last), so a streak cannot rotate out the
    healthy ones; ``max_nonfinite_steps`` in a row raise ``NonFiniteError``
    after setting aside the checkpoint whose parameters gave the first
    non-finite step; the streak counter restarts at 0 on every resume.

  Args:
    config: the validated config (``train`` section used here).
    workdir: the run's directory (already locked and checked by the caller).
    initial_state: the state at step 0 (any layout).
    restore_target: ``jax.ShapeDtypeStruct`` tree (with shardings) to restore into.
    place: puts ``initial_state`` in the layout ``step`` expects.
    step: ``state -> (state, metrics)``, the jitted step (with ``.lower``).
    evaluate: ``state -> dict`` of Python values (host side).
    train_line: ``(step, metrics, steps_per_sec) -> str`` printed at log steps.
    eval_line: ``(step, result) -> str`` printed after each evaluation.
    eval_at_start: also evaluate a fresh run at step 0.
    changes: the accepted config changes of this start (``workdir.check_resume``).

  Returns:
    ``LoopResult``.
  """
  is_lead = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)
  record = workdir_lib.config_record(config)
  manager = checkpointing.make_manager(ckpt_dir, config.train.keep_checkpoints,
                                       config.train.checkpoint_every)
  log = None
  # A failed restore or save must not bury its one line under tensorstore's
  # reports of a closed event loop.
  quiet = checkpointing.quiet_failure_reports()
  quiet.__enter__()
  # Close the manager and the event writer on every path (errors included):
  # open ones can keep the interpreter from exiting.
  try:
    # Restored arrays land directly in the target's layout (each host reads
    # only its devices' shards); a fresh state is placed the same way, so the
    # step compiles once for both.
    restored = checkpointing.restore_latest(manager, restore_target)
    resumed_at = None
    if restored is not None:
      state, _, resumed_at = restored
      state = state.replace(nonfinite_streak=state.nonfinite_streak * 0)
      print(f"Resuming from step {resumed_at} ({workdir}).", flush=True)
      for change in changes:
        print(f"  changed: {change}", flush=True)
    else:
      state = place(initial_state)
    _compile(step, state, config)
    workdir_lib.record_start(workdir, record, resumed_at or 0, list(changes))
    log = runlog_lib.RunLog(workdir, resumed_at, enabled=is_lead)

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
      if log.write(dict(step=at, kind="train", time=now, steps_per_sec=rate, **aux)):
        print(train_line(at, aux, rate), flush=True)

    def run_eval(at):
      nonlocal eval_seconds
      start = time.time()
      result = evaluate(state)
      eval_seconds += time.time() - start
      log.write(dict(step=at, kind="eval", time=time.time(),
                     **{k: v for k, v in result.items() if k != "samples"}))
      if is_lead:
        print(f"{eval_line(at, result)}", flush=True)
      return result

    def flush_log():
      nonlocal pending
      if pending is not None:
        log_train(*pending)
        pending = None

    def save(at, force=False, last=False):
      """Checkpoints ``state`` at ``at`` (rows flushed first); never a non-finite state but the last."""
      if not (force or manager.should_save(at)):
        return False
      if int(state.nonfinite_streak) > 0 and not last:
        return False
      flush_log()
      log.flush()
      return checkpointing.save(manager, at, state, dict(step=at, config=record), force=force)

    if eval_at_start and step_done == 0:
      run_eval(0)
    timed_from, timed_start = None, None  # Step timing excludes the first step.
    with _stop_on_signals() as signals:
      while step_done < num_steps:
        state, aux = step(state)  # Dispatch; the device runs ahead of the host.
        step_done += 1
        if timed_from is None:
          jax.block_until_ready(state)
          timed_from, timed_start, eval_seconds = step_done, time.time(), 0.0
        if streak is not None and int(streak) >= config.train.max_nonfinite_steps:
          flush_log()
          _stop_nonfinite(manager, workdir, ckpt_dir, config, step_done - 1, int(streak))
        streak = state.nonfinite_streak
        flush_log()
        if step_done % config.train.log_every == 0 or step_done == num_steps:
          pending = (step_done, aux)
        if step_done % config.train.eval_every == 0 and step_done != num_steps:
          run_eval(step_done)
        save(step_done)
        if signals:
          flush_log()
          if manager.latest_step() != step_done:
            save(step_done, force=True)
          manager.wait_until_finished()
          log.flush()
          name = signal.Signals(signals[0]).name
          saved = manager.latest_step()
          where = (f"checkpoint saved at step {step_done}" if saved == step_done else
                   f"step {step_done} was non-finite, so the newest checkpoint is step {saved}")
          print(f"{name} received: {where} in {ckpt_dir}; rerun the same command to resume.",
                flush=True)
          raise Interrupted(f"{name} at step {step_done}; {where} in {ckpt_dir}.", signals[0])
    jax.block_until_ready(state)
    seconds_per_step = float("nan")
    if timed_from is not None and step_done > timed_from:
      seconds_per_step = (time.time() - timed_start - eval_seconds) / (step_done - timed_from)
    flush_log()
    if not manager.all_steps() or manager.latest_step() != step_done:
      save(step_done, force=True, last=True)
    manager.wait_until_finished()
    result = run_eval(step_done)
    log.flush()
    return LoopResult(state, result, seconds_per_step)
  finally:
    manager.close()
    if log is not None:
      log.close()
    quiet.__exit__(None, None, None)


def _stop_nonfinite(manager, workdir: str, ckpt_dir: str, config, last: int, streak: int):
  """Sets aside the checkpoint that led into the streak, records the stop, raises NonFiniteError."""
  first = last - streak + 1
  manager.wait_until_finished()
  moved = ""
  if first - 1 in manager.all_steps() and first - 1 > 0:
    # Its parameters gave the first non-finite step: resuming from it would fail again.
    kept = checkpointing.set_aside(manager, first - 1, checkpointing.NONFINITE_DIR)
    moved = (f" The checkpoint at step {first - 1}, whose parameters gave the first "
             f"non-finite step, was moved to {kept}.")
  healthy = manager.latest_step()
  workdir_lib.record_nonfinite_stop(workdir, last, healthy)
  lr = config.optim.learning_rate
  start = (f"resumes from step {healthy}, the newest healthy checkpoint in {ckpt_dir}"
           if healthy is not None else "starts afresh (no healthy checkpoint is left)")
  raise NonFiniteError(
      f"{streak} consecutive steps ending at step {last} had a non-finite loss or gradient "
      f"(parameters were left unchanged by each; none was checkpointed).{moved} Rerun with a "
      f"lower learning rate, e.g. --config.optim.learning_rate={lr / 10:g}: the run {start} "
      f"(a learning-rate change is accepted after a non-finite stop); or inspect the inputs.")
