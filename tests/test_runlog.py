"""The metrics log (latentdiv/runlog.py): every step exactly once in metrics.jsonl and TensorBoard.

* a start from checkpoint N keeps the rows up to N, a fresh start none; the
  TensorBoard events are rebuilt from the kept rows (the old files go);
* a row already logged is not written again (a finished run rerun);
* a run that dies the instant a checkpoint is complete has that step's row
  on disk (rows are flushed before each checkpoint), so its resume loses and
  repeats nothing.
"""

import contextlib
import glob
import importlib.util
import io
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
from jax.experimental.compilation_cache import compilation_cache

from latentdiv import checkpointing
from latentdiv import experiment
from latentdiv import runlog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "configs", "tiny.py")
_MODULE = {}
_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def setUpModule():  # pylint: disable=invalid-name
  _MODULE["tmp"] = tempfile.mkdtemp(prefix="latentdiv_runlog_")
  _MODULE["old_flags"] = {name: getattr(jax.config, name) for name in _CACHE_FLAGS}
  jax.config.update("jax_compilation_cache_dir", os.path.join(_MODULE["tmp"], "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()


def tearDownModule():  # pylint: disable=invalid-name
  for name, value in _MODULE["old_flags"].items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  shutil.rmtree(_MODULE["tmp"], ignore_errors=True)


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _rows(step, kind="train"):
  return dict(step=step, kind=kind, loss=float(step), validity=[0.5, 1.0], note="text")


def exactly_once(workdir) -> dict:
  """``{kind: sorted steps}`` of the rows, and of TensorBoard's loss/coverage-like tags.

  Raises AssertionError if any (kind, step) appears twice in either.
  """
  rows = runlog.read_rows(workdir)
  keys = [(r["kind"], r["step"]) for r in rows]
  assert len(keys) == len(set(keys)), f"repeated rows: {sorted(keys)}"
  scalars = runlog.read_scalars(workdir)
  for tag, points in scalars.items():
    steps = [s for s, _ in points]
    assert len(steps) == len(set(steps)), f"repeated TensorBoard steps in {tag}: {steps}"
  out = {}
  for kind in ("train", "eval"):
    out[kind] = sorted(s for k, s in keys if k == kind)
  return out


class RunLogTest(absltest.TestCase):

  def test_a_start_keeps_rows_up_to_its_checkpoint_and_tensorboard_mirrors_them(self):
    workdir = tempfile.mkdtemp(dir=_MODULE["tmp"])
    log = runlog.RunLog(workdir, None)
    for step in (5, 10, 15):
      self.assertTrue(log.write(_rows(step)))
    self.assertTrue(log.write(_rows(10, "eval")))
    log.flush()  # Not closed: a kill.
    with open(os.path.join(workdir, runlog.LOG_FILE), "a") as f:
      f.write('{"step": 20, "kind": "tr')  # A line cut short.
    log = runlog.RunLog(workdir, 10)
    self.assertFalse(log.write(_rows(10, "eval")))  # Already logged.
    self.assertTrue(log.write(_rows(15)))
    log.close()
    self.assertEqual(exactly_once(workdir), dict(train=[5, 10, 15], eval=[10]))
    self.assertLen(glob.glob(os.path.join(workdir, "events.out.tfevents.*")), 1)
    scalars = runlog.read_scalars(workdir)
    self.assertEqual(scalars["train/loss"], [(5, 5.0), (10, 10.0), (15, 15.0)])
    self.assertEqual(scalars["train/validity/1"], [(5, 1.0), (10, 1.0), (15, 1.0)])
    self.assertNotIn("train/note", scalars)

  def test_a_fresh_start_clears_old_rows_and_events(self):
    workdir = tempfile.mkdtemp(dir=_MODULE["tmp"])
    log = runlog.RunLog(workdir, None)
    for step in (5, 10):
      log.write(_rows(step))
    log.close()
    log = runlog.RunLog(workdir, None)  # No checkpoint restored: a run from step 0.
    log.write(_rows(5))
    log.close()
    self.assertEqual(exactly_once(workdir), dict(train=[5], eval=[]))
    self.assertEqual(runlog.read_scalars(workdir)["train/loss"], [(5, 5.0)])


class _Killed(BaseException):
  """Stands for SIGKILL: nothing after it runs but ``finally`` blocks."""


class DeathAtACheckpointTest(absltest.TestCase):

  def test_a_run_dying_as_its_checkpoint_completes_loses_no_row(self):
    workdir = tempfile.mkdtemp(dir=_MODULE["tmp"])
    config = tiny_config()
    config.train.num_steps, config.train.checkpoint_every = 20, 10
    real_save = checkpointing.save

    def save_then_die(manager, step, *args, **kwargs):
      saved = real_save(manager, step, *args, **kwargs)
      if saved and step == 10:
        raise _Killed()
      return saved

    with mock.patch.object(checkpointing, "save", save_then_die), \
        contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaises(_Killed):
        experiment.train_and_evaluate(config, workdir)
    self.assertEqual(checkpointing.checkpoint_steps(workdir), [10])
    self.assertIn(10, [r["step"] for r in runlog.read_rows(workdir)])  # Before the checkpoint.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      experiment.train_and_evaluate(config, workdir)
    self.assertIn("Resuming from step 10 ", out.getvalue())
    self.assertEqual(exactly_once(workdir), dict(train=[5, 10, 15, 20], eval=[20]))
    # A rerun of the finished run evaluates again but logs no second row.
    with contextlib.redirect_stdout(io.StringIO()):
      experiment.train_and_evaluate(config, workdir)
    self.assertEqual(exactly_once(workdir), dict(train=[5, 10, 15, 20], eval=[20]))
    self.assertEqual([s for s, _ in runlog.read_scalars(workdir)["train/learning_rate"]],
                     [5, 10, 15, 20])


if __name__ == "__main__":
  absltest.main()
