"""Tests of experiments/diversity_study.py and its config (the diversity study)."""

import json
import os
import sys

from absl.testing import absltest
from absl.testing import parameterized
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from experiments import diversity_study  # noqa: E402
from experiments.configs import diversity_study as study  # noqa: E402
from latentdiv import experiment  # noqa: E402
from latentdiv import objectives  # noqa: E402


class ConfigTest(parameterized.TestCase):

  @parameterized.product(task=study.TASKS, objective=study.OBJECTIVES)
  def test_every_cell_is_valid_and_rolls_out_every_content_token(self, task, objective):
    config = study.get_config(f"{task},{objective},relaxed_wta")
    objectives.validate(config)
    setup, _ = experiment.build(config)
    s = config.objective.sequence_term
    self.assertEqual(s.rollout_len, setup.task.target_len - 1)
    self.assertEqual(s.weight > 0, objective in ("kl", "mi"))
    self.assertEqual(config.objective.lambda_jsd > 0, objective == "jsd")
    if objective in ("kl", "mi"):
      self.assertEqual(s.kind, objective)

  def test_weight_override(self):
    self.assertEqual(study.get_config("late,jsd,hard_em,0.03").objective.lambda_jsd, 0.03)
    self.assertEqual(study.get_config("late,mi,hard_em,2").objective.sequence_term.weight, 2.0)
    with self.assertRaisesRegex(ValueError, "WEIGHT applies to"):
      study.get_config("late,recon,hard_em,0.1")

  def test_bad_arguments_name_the_part(self):
    with self.assertRaisesRegex(ValueError, r"TASK,OBJECTIVE,RECONSTRUCTION\[,WEIGHT\]"):
      study.get_config("late,mi")
    with self.assertRaisesRegex(ValueError, "OBJECTIVE must be one of"):
      study.get_config("late,js,hard_em")


def _write_run(workdir, coverage, per_example, validity, dead, ms=12.0):
  os.makedirs(workdir, exist_ok=True)
  summary = dict(coverage=coverage, per_example_coverage=per_example, validity=validity,
                 dead_latents=dead, nmi=0.5, seq_mi=0.9, seq_kl=20.0)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  with open(os.path.join(workdir, diversity_study.RECORD), "w") as f:
    json.dump(dict(wall_s=30.0, ms_per_step=ms), f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in (25, 50, 75, 100, 125):
      # The first interval compiles (+5 s); the evaluations at 50 and 100 take 3 s
      # each and land in the rows of their steps.
      extra = 5.0 * (step > 25) + 3.0 * (step >= 50) + 3.0 * (step >= 100)
      f.write(json.dumps(dict(step=step, kind="train", time=step * ms / 1e3 + extra)) + "\n")
      if step % 50 == 0:
        f.write(json.dumps(dict(step=step, kind="eval", per_example_coverage=per_example,
                                dead_latents=dead, seq_mi=0.9)) + "\n")


class AggregateTest(absltest.TestCase):

  def test_table_goal_counts_and_plot(self):
    root = self.create_tempdir().full_path
    runs = [(1.0, 1.0, [1.0, 0.95, 0.92], 0), (1.0, 0.99, [1.0, 0.8, 1.0], 0),
            (0.67, 0.96, [1.0, 1.0, 0.0], 1)]
    for seed, run in enumerate(runs):
      _write_run(diversity_study.run_dir(root, "late", "mi", "relaxed_wta", seed), *run)
    rows = diversity_study.aggregate(root, ["late"], ["mi"], ["relaxed_wta"], seeds=4)
    (row,) = rows
    self.assertEqual(row["seeds"], 3)
    self.assertEqual(row["coverage_1"], 2)
    self.assertEqual(row["goal"], 1)  # Seed 1's min validity 0.8, seed 2's dead latent.
    self.assertAlmostEqual(row["dead_latents"], 1 / 3)
    self.assertAlmostEqual(row["min_validity"], (0.92 + 0.8 + 0.0) / 3)
    text = diversity_study.table(rows)
    self.assertIn("| late | + sequence MI | relaxed_wta | 3 |", text)
    self.assertIn("2/3 | 1/3 |", text)
    path = os.path.join(root, "curves.png")
    diversity_study.plot_curves(root, rows, 4, path)
    self.assertGreater(os.path.getsize(path), 1000)

  def test_weight_variants(self):
    self.assertEqual(diversity_study.split_objective("jsd@0.03"), ("jsd", "0.03"))
    self.assertEqual(diversity_study.split_objective("mi"), ("mi", None))
    self.assertEqual(diversity_study.objective_label("jsd@0.03"), "+ token JSD (λ_jsd = 0.03)")
    config = diversity_study.get_config("late", "mi@2", "hard_em", 3)
    self.assertEqual((config.objective.sequence_term.weight, config.seed), (2.0, 3))

  def test_seconds_per_step_from_the_logged_times(self):
    root = self.create_tempdir().full_path
    _write_run(root, 1.0, 1.0, [1.0], 0, ms=20.0)
    self.assertAlmostEqual(diversity_study._seconds_per_step(root), 0.02)


class RunTest(absltest.TestCase):

  @pytest.mark.slow
  def test_run_then_resume_skips(self):
    root = self.create_tempdir().full_path
    workdir = diversity_study.run_dir(root, "placement", "mi", "relaxed_wta", 0)
    record = diversity_study.run_one("placement", "mi", "relaxed_wta", 0, workdir, num_steps=3)
    self.assertIn("ms_per_step", record)
    with open(os.path.join(workdir, "summary.json")) as f:
      self.assertIn("seq_mi", json.load(f))
    again = diversity_study.run_one("placement", "mi", "relaxed_wta", 0, workdir, num_steps=3)
    self.assertEqual(again["wall_s"], record["wall_s"])  # Not trained again.


if __name__ == "__main__":
  absltest.main()
