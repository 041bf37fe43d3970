"""Tests of experiments/sweep.py: the process pool and the shared-flag helper of the sweep scripts."""

import json
import os
import signal
import subprocess
import sys
import time

from absl import flags
from absl.testing import absltest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import sweep  # noqa: E402


class RunJobsTest(absltest.TestCase):

  def _run(self, workers):
    reports = []
    root = self.create_tempdir().full_path
    before = os.environ.get("XLA_FLAGS")
    # `dict` stands in for a run: a builtin pickles by reference to spawned workers.
    jobs = [([("job", i)],) for i in range(3)]
    sweep.run_jobs(jobs, dict, root, workers,
                   lambda job, record, elapsed: reports.append((job, record, elapsed)),
                   fast_compile=True, extra=7)
    self.assertEqual(os.environ.get("XLA_FLAGS"), before)  # restored afterwards.
    return reports

  def test_every_job_runs_once_in_this_process_or_in_workers(self):
    for workers in (1, 2):
      reports = self._run(workers)
      self.assertCountEqual([r[1] for r in reports],
                            [dict(job=i, extra=7) for i in range(3)])
      for job, record, elapsed in reports:
        self.assertEqual(record["job"], job[0][0][1])  # each report names its own job.
        self.assertGreaterEqual(elapsed, 0.0)

  def test_no_jobs_says_so(self):
    sweep.run_jobs([], dict, "/nonexistent", 2, lambda *a: self.fail("no report expected"))


def _alive(pid: int) -> bool:
  """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return "\tZ" not in next(line for line in f if line.startswith("State:"))
  except (FileNotFoundError, StopIteration):
    return False


class WorkerLifetimeTest(absltest.TestCase):

  def test_a_worker_ends_when_its_parent_dies(self):
    # A killed sweep must not leave orphan workers writing runs into its root: the
    # watcher that sweep's worker initialiser starts ends the worker with its parent.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = ("import os, sys; sys.path.insert(0, %r); from experiments import sweep; "
              "sweep._exit_with_parent(os.getppid())" % repo)
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         "c = subprocess.Popen([sys.executable, '-c', %r]); print(c.pid, flush=True); "
         "time.sleep(60)" % worker], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    try:
      time.sleep(1.0)
      self.assertTrue(_alive(pid))
      parent.kill()
      parent.wait()
      deadline = time.time() + 10
      while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
      self.assertFalse(_alive(pid))
    finally:
      parent.kill()
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)


class TrainOnceTest(absltest.TestCase):

  def test_a_run_of_another_config_is_refused(self):
    from latentdiv import objectives, workdir  # pylint: disable=import-outside-toplevel
    root = self.create_tempdir().full_path
    config = objectives.base_config()
    old = objectives.base_config()
    old.objective.lambda_jsd = 0.5
    with open(os.path.join(root, "config.json"), "w") as f:
      json.dump(workdir.config_record(old), f)
    with open(os.path.join(root, "summary.json"), "w") as f:
      json.dump({}, f)
    with self.assertRaisesRegex(ValueError, r"objective.lambda_jsd: 0.5 -> 0.1"):
      sweep.train_once(config, root, "r.json", lambda r: False, dict)


class SharedFlagTest(absltest.TestCase):

  def test_second_definition_reuses_the_first(self):
    first = sweep.define_shared_flag(flags.DEFINE_integer, "sweep_test_flag", 3, "help")
    second = sweep.define_shared_flag(flags.DEFINE_integer, "sweep_test_flag", 5, "help")
    self.assertEqual(first.value, 3)
    self.assertEqual(second.value, 3)

  def test_wall_text(self):
    self.assertEqual(sweep.wall_text(dict(wall_s=12.4)), "12s")
    self.assertEqual(sweep.wall_text(dict(wall_s=None)), "?")
    self.assertEqual(sweep.wall_text({}), "?")


if __name__ == "__main__":
  absltest.main()
