"""What the multi-run experiment scripts share: shared flags, one resumable run, a process pool.

``experiments/diversity_study.py`` and ``experiments/raml_compare.py`` train many
(arm, seed) runs with ``train.train_and_evaluate``, each in its own workdir,
and add a per-run record (``study.json``, ``raml.json``) of extra
evaluations. A finished run is never trained again; a run whose record is
missing or stale gets only its extra evaluation.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import threading
import time
from typing import Any, Callable, Sequence

from absl import flags

# Halve XLA's CPU compile time (these runs are small: compilation dominates).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")


def define_shared_flag(define: Callable, name: str, *args, **kwargs) -> flags.FlagHolder:
  """Defines a flag that several experiment scripts have (``--root``, ``--seeds``, ...).

  The test suite imports the scripts into one process, where absl refuses a
  second definition of the same name: the second script reuses the first's.
  """
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define(name, *args, **kwargs)


def train_once(config, workdir: str, record_name: str,
               needs_extra: Callable[[dict], bool],
               extra_eval: Callable[[], dict]) -> dict:
  """Trains ``config`` in ``workdir`` unless its ``summary.json`` exists, then its record.

  The run's output goes to ``workdir/train.log``. The record
  (``workdir/record_name``, JSON) holds ``wall_s`` (None when trained by an
  earlier invocation that wrote no record) and what ``extra_eval()``
  returns, recomputed whenever ``needs_extra(record)`` says so.

  Returns:
    The record.
  """
  from latentdiv import experiment  # pylint: disable=import-outside-toplevel
  from latentdiv import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  record_path = os.path.join(workdir, record_name)
  record = {}
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
  saved = workdir_lib.read_config_record(workdir)
  if saved is not None:  # A run of another config is never reused (or resumed) silently.
    diffs = workdir_lib.differences(workdir_lib.flatten(saved),
                                    workdir_lib.flatten(workdir_lib.config_record(config)))
    if diffs:
      raise ValueError(f"{workdir} holds a run of another config ({'; '.join(diffs)}): "
                       "remove it or use another --root.")
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    start = time.time()
    with open(os.path.join(workdir, "train.log"), "a") as log, \
        contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
      experiment.train_and_evaluate(config, workdir)
    record = dict(wall_s=time.time() - start)
  if needs_extra(record):
    record.update(extra_eval())
    record.setdefault("wall_s", None)
    with open(record_path, "w") as f:
      json.dump(record, f, indent=2)
  return record


def _exit_with_parent(parent: int) -> None:
  """Ends this worker when its parent is gone (a killed sweep leaves no orphan runs)."""
  while os.getppid() == parent:
    time.sleep(1.0)
  os._exit(1)  # pylint: disable=protected-access


def _init_worker(cache_dir: str, parent: int | None = None) -> None:
  if parent is not None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  except Exception:  # pylint: disable=broad-except
    pass  # The persistent cache only speeds up a rerun.


def run_jobs(jobs: Sequence[tuple], run_one: Callable[..., dict], root: str, workers: int,
             report: Callable[[tuple, dict, float], None], fast_compile: bool = False,
             **kwargs: Any) -> None:
  """Calls ``run_one(*job, **kwargs)`` for every job, in ``workers`` spawned processes.

  Args:
    jobs: argument tuples, in the order to start them (most expensive first
      keeps the pool busy to the end).
    run_one: a module-level function (it is pickled to the workers).
    root: the sweep's directory; ``root/.jax_cache`` is the persistent
      compilation cache shared by the workers.
    workers: processes; 1 runs in this process.
    report: ``(job, record, seconds since start)``, called as each job ends.
    fast_compile: run with ``FAST_COMPILE_FLAGS`` added to ``XLA_FLAGS`` (read
      when a worker's XLA backend starts; for CPU runs).
    **kwargs: passed to every ``run_one`` call.
  """
  if not jobs:
    print(f"All runs under {root} are finished.", flush=True)
    return
  print(f"{len(jobs)} run(s) to do under {root} with {workers} worker(s).", flush=True)
  cache_dir = os.path.join(os.path.abspath(root), ".jax_cache")
  start = time.time()
  previous_flags = os.environ.get("XLA_FLAGS")
  if fast_compile:
    os.environ["XLA_FLAGS"] = f"{previous_flags or ''} {FAST_COMPILE_FLAGS}".strip()
  try:
    if workers <= 1:
      _init_worker(cache_dir)
      for job in jobs:
        report(job, run_one(*job, **kwargs), time.time() - start)
      return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker,
        initargs=(cache_dir, os.getpid())) as pool:
      futures = {pool.submit(run_one, *job, **kwargs): job for job in jobs}
      for future in concurrent.futures.as_completed(futures):
        report(futures[future], future.result(), time.time() - start)
  finally:
    if previous_flags is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = previous_flags


def wall_text(record: dict) -> str:
  """A record's training wall time as ``'123s'`` (``'?'`` when unknown)."""
  wall = record.get("wall_s")
  return "?" if wall is None else f"{wall:.0f}s"


def restore_newest_params(config, workdir: str):
  """``(setup, objective, params)``: the config's setup and objective, and the newest parameters in ``workdir``.

  Raises:
    FileNotFoundError: ``workdir`` holds no readable checkpoint.
  """
  from latentdiv import experiment  # pylint: disable=import-outside-toplevel
  setup, objective = experiment.build(config)
  try:
    params = experiment.load(workdir).params
  except ValueError as err:
    raise FileNotFoundError(f"No checkpoint in {workdir}: {err}") from None
  return setup, objective, params


def load_run(workdir: str, record_name: str) -> dict | None:
  """``dict(summary, record)`` of one run: ``summary.json`` and its record (``{}`` if absent).

  None if the run has no summary (not finished).
  """
  summary_path = os.path.join(workdir, "summary.json")
  if not os.path.exists(summary_path):
    return None
  with open(summary_path) as f:
    summary = json.load(f)
  record = {}
  record_path = os.path.join(workdir, record_name)
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
  return dict(summary=summary, record=record)


def format_mean_std(mean: float, std: float, fmt: str) -> str:
  """``'0.71 ± 0.08'`` with ``fmt`` (a sign flag is dropped for the std); ``'—'`` for NaN."""
  if math.isnan(mean):
    return "—"
  text = fmt.format(mean)
  return text if math.isnan(std) else f"{text} ± {fmt.replace('+', '').format(std)}"


def pyplot():
  """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt
