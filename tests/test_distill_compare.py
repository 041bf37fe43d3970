"""Tests of experiments/distill_compare.py and its configs (the OPD discount study)."""

import os
import sys

from absl.testing import absltest
from absl.testing import parameterized

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from experiments import distill_compare  # noqa: E402
from experiments.configs import branch_teacher  # noqa: E402
from experiments.configs import distill  # noqa: E402
from latentdiv import config as config_lib  # noqa: E402
from latentdiv import objectives  # noqa: E402


def _summary(kl, low, high):
  return dict(reverse_kl=kl, reverse_kl_ci_low=low, reverse_kl_ci_high=high, validity=[1.0],
              teacher_validity=[1.0], response_len=8.0, seconds_per_step=0.01)


class MethodsTest(parameterized.TestCase):

  @parameterized.parameters(("opd_rb", "opd_rb", 1.0), ("opd_rb_g0", "opd_rb", 0.0),
                            ("opd_kl_to_go_g0.9", "opd_kl_to_go", 0.9),
                            ("opd_rb_g.5", "opd_rb", 0.5), ("gkd", "gkd", 1.0))
  def test_parse_method(self, name, base, discount):
    self.assertEqual(distill.parse_method(name), (base, discount))

  @parameterized.parameters("opd_rb_g2", "gkd_g0.5", "opd_rb_g", "nope")
  def test_bad_methods_are_rejected(self, name):
    with self.assertRaisesRegex(ValueError, "method must be one of"):
      distill.get_config(name)

  def test_discount_study_arms(self):
    self.assertLen(distill.DISCOUNT_STUDY, 10)
    for task in distill_compare.TASKS:
      for method in distill.DISCOUNT_STUDY:
        config = distill_compare.student_config(task, method, "/t", seed=3, num_steps=0)
        objectives.validate(config)  # Every arm is a valid config.
        d = config.objective
        self.assertEqual(config.seed, 3)
        base, discount = distill.parse_method(method)
        if base.startswith("opd"):
          self.assertEqual((d.loss, float(d.discount), d.warm_start), ("opd", discount, "seq_kd"))
          # The warm-start checkpoint is kept: the variance is measured there.
          self.assertEqual(config.train.checkpoint_every, d.warm_start_steps)
          self.assertEqual(config.train.num_steps % d.warm_start_steps, 0)
        else:
          self.assertEqual(d.loss, method)
        self.assertEqual(config.task.name, task)
    branch = distill_compare.student_config("branch", "opd_rb", "/t", 0, 0)
    teacher = branch_teacher.get_config()
    self.assertEqual(config_lib.num_vocab(branch), config_lib.num_vocab(teacher))
    self.assertEqual((branch.model.num_latents, branch.objective.teacher_latent), (1, 0))
    self.assertEqual(teacher.model.num_latents, 1)
    self.assertEqual(distill_compare.label("opd_kl_to_go_g0.5"),
                     "OPD, kl_to_go (iv), warm-started, γ = 0.5")


class TableTest(absltest.TestCase):

  def test_paired_comparisons_and_table(self):
    results = {
        "opd_rb_g0": [_summary(15.0, 13.0, 17.0), _summary(2.0, 1.0, 3.0)],
        "opd_rb": [_summary(0.7, 0.6, 0.8), _summary(2.5, 1.5, 3.5)],
        "gkd": [_summary(14.0, 12.0, 16.0), _summary(2.4, 2.0, 2.8)],
    }
    lines = distill_compare.comparisons(results)
    self.assertIn("* opd_rb: γ = 1 below γ = 0 with non-overlapping 95% CIs in 1 of 2 seeds.",
                  lines)
    self.assertIn("* opd_rb (γ = 1) vs gkd: CIs overlap in 1 of 2 seeds; below in 1, above in 0.",
                  lines)
    variance = {"seed0": {"opd_rb": dict(mean_norm=2.0, variance=10.0)}}
    table = distill_compare.make_table(results, [30.0, 31.0], {"opd_rb": [5.0, 7.0]}, variance)
    self.assertIn("| OPD, rao_blackwell, warm-started, γ = 1 | 1.600 ± 1.273 |", table)
    self.assertIn("| 6.0 ± 1.4 | 2.00 ± 0.00 | 10 ± 0 |", table)


if __name__ == "__main__":
  absltest.main()
