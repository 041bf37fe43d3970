"""Tests of experiments/sweep.py: the process pool and the shared-flag helper of the sweep scripts."""

import os
import sys

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
