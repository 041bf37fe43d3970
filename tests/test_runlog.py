"""The metrics log (latentdiv/runlog.py): every step exactly once in metrics.jsonl and TensorBoard.

* a start from checkpoint N keeps the rows up to N, a fresh start none; the
  TensorBoard events are rebuilt from the kept rows (the old files go);
* a row already logged is not written again (a finished run rerun);
* ``exactly_once``: the check the process-level tests of
  ``tests/test_reliability.py`` apply to killed and resumed runs.
"""

import glob
import os
import tempfile

from absl.testing import absltest

from latentdiv import runlog


def _rows(step, kind="train"):
  return dict(step=step, kind=kind, loss=float(step), validity=[0.5, 1.0], note="text")


def exactly_once(workdir) -> dict:
  """``{kind: sorted steps}`` of the rows.

  Raises AssertionError if any (kind, step) appears twice in the rows, or any
  step twice in a TensorBoard tag.
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
    workdir = tempfile.mkdtemp()
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
    workdir = tempfile.mkdtemp()
    log = runlog.RunLog(workdir, None)
    for step in (5, 10):
      log.write(_rows(step))
    log.close()
    log = runlog.RunLog(workdir, None)  # No checkpoint restored: a run from step 0.
    log.write(_rows(5))
    log.close()
    self.assertEqual(exactly_once(workdir), dict(train=[5], eval=[]))
    self.assertEqual(runlog.read_scalars(workdir)["train/loss"], [(5, 5.0)])


if __name__ == "__main__":
  absltest.main()
