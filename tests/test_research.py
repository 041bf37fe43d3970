"""Tests of experiments/research.py and the research_* configs (the seed-000 study)."""

import json
import os
import sys

from absl.testing import absltest
from absl.testing import parameterized
import chex
import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from experiments import research  # noqa: E402
from experiments.configs import research_common  # noqa: E402
from latentdiv import experiment  # noqa: E402


def _brute_force_per_example_coverage(matches, num_strategies):
  total = 0.0
  for row in matches:
    total += len({int(m) for m in row if m >= 0}) / num_strategies
  return total / len(matches)


class PerExampleCoverageTest(parameterized.TestCase):

  @parameterized.parameters((3, 3, 0), (2, 4, 1), (5, 3, 2))
  def test_matches_brute_force(self, num_latents, num_strategies, seed):
    rng = np.random.default_rng(seed)
    matches = rng.integers(-1, num_strategies, size=(50, num_latents))
    self.assertAlmostEqual(research.per_example_coverage(matches, num_strategies),
                           _brute_force_per_example_coverage(matches, num_strategies))

  def test_invariant_to_x_dependent_labelling_unlike_a_fixed_assignment(self):
    # Each latent produces a different strategy for every x, but which one depends on x.
    matches = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1]])
    self.assertEqual(research.per_example_coverage(matches, 3), 1.0)
    self.assertEqual(research.per_example_coverage(np.zeros((4, 3), int), 3), 1 / 3)
    self.assertEqual(research.per_example_coverage(-np.ones((4, 3), int), 3), 0.0)

  def test_rejects_wrong_rank(self):
    with self.assertRaisesRegex(ValueError, "matches must be"):
      research.per_example_coverage(np.zeros((4,), int), 3)


class ConfigTest(parameterized.TestCase):

  @parameterized.product(arm=research_common.ARMS, task=research_common.TASKS)
  def test_every_arm_builds_and_covers_the_divergent_positions(self, arm, task):
    config = research.get_config(arm, task, seed=2)
    setup, _ = experiment.build(config)  # Validates; nothing compiles.
    self.assertEqual(config.seed, 2)
    self.assertEqual(config.objective.jsd_prefix_len, setup.task.target_len)
    # Rollouts cover every content token (the divergent ones are the last 3 of the late task).
    self.assertEqual(config.objective.sequence_term.rollout_len, setup.task.target_len - 1)
    self.assertEqual(setup.task.num_strategies, config.model.num_latents)
    uses_jsd = arm not in ("recon", "seq_rb_nojsd")
    uses_pg = arm.startswith("seq")
    self.assertEqual(config.objective.lambda_jsd > 0, uses_jsd)
    self.assertEqual(config.objective.sequence_term.weight > 0, uses_pg)
    expected = {"seq_rb": ("rao_blackwell", "none"), "seq_traj": ("trajectory", "none"),
                "seq_cv": ("reward_to_go_baseline", "jsd"),
                "seq_rb_nojsd": ("rao_blackwell", "none")}
    if uses_pg:
      self.assertEqual((config.objective.sequence_term.estimator, config.objective.sequence_term.baseline), expected[arm])

  def test_late_task_strategies_share_the_prefix_and_permute_the_suffix(self):
    setup, _ = experiment.build(research.get_config("jsd", "late"))
    import jax  # pylint: disable=import-outside-toplevel
    batch = jax.jit(setup.task.sample, static_argnums=1)(jax.random.PRNGKey(0), 16)
    valid = np.asarray(batch.valid_outputs)  # [B, S, T]
    prompt_len = setup.config.task.prompt_len
    np.testing.assert_array_equal(np.broadcast_to(valid[:, :1, :prompt_len], valid[:, :, :prompt_len].shape),
                                  valid[:, :, :prompt_len])
    suffix = valid[:, :, prompt_len:-1]
    np.testing.assert_array_equal(np.sort(suffix, -1), np.sort(suffix[:, :1], -1).repeat(3, 1))
    self.assertTrue(np.all(suffix[:, 0] != suffix[:, 1]))

  def test_unknown_arm_and_task_are_rejected(self):
    with self.assertRaisesRegex(ValueError, "arm must be one of"):
      research.get_config("nope", "early")
    with self.assertRaisesRegex(ValueError, "task must be one of"):
      research.get_config("jsd", "middle")


def _write_run(workdir, coverage, validity, nmi, seq_kl, wall, per_example, steps=(50, 100)):
  os.makedirs(workdir, exist_ok=True)
  k, s = len(validity), 3
  confusion = np.full((k, s), 0.1).tolist()
  summary = dict(steps=steps[-1], coverage=coverage, validity=validity, nmi=nmi,
                 seq_kl=seq_kl, seq_kl_stderr=0.1, token_jsd=0.2, nll=0.01,
                 latent_usage=[1 / k] * k, assignment=[0] * k, confusion=confusion,
                 task="early_divergence", nonfinite_steps=0)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  with open(os.path.join(workdir, "research.json"), "w") as f:
    json.dump(dict(wall_s=wall, per_example_coverage=per_example), f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in steps:
      f.write(json.dumps(dict(step=step, kind="train", loss=1.0)) + "\n")
      f.write(json.dumps(dict(step=step, kind="eval", coverage=coverage, validity=validity,
                              nmi=nmi, seq_kl=seq_kl * step / steps[-1])) + "\n")


class AggregationTest(chex.TestCase):

  def test_table_and_plots_from_run_directories(self):
    root = self.create_tempdir().full_path
    docs = os.path.join(root, "docs")
    runs = [dict(coverage=1.0, validity=[0.9, 1.0, 0.8], nmi=0.5, seq_kl=10.0, wall=30.0,
                 per_example=0.9),
            dict(coverage=2 / 3, validity=[1.0, 0.7, 0.95], nmi=0.7, seq_kl=14.0, wall=40.0,
                 per_example=0.6)]
    for seed, run in enumerate(runs):
      _write_run(research.run_dir(root, "early", "jsd", seed), **run)
    # An unfinished run (no summary) is left out; a run without research.json has NaN wall.
    os.makedirs(research.run_dir(root, "early", "jsd", 2))
    _write_run(research.run_dir(root, "late", "recon", 0), 0.0, [0.5, 0.5, 0.5], 0.0, 2.0,
               1.0, 0.3)
    os.remove(os.path.join(research.run_dir(root, "late", "recon", 0), "research.json"))

    table = research.aggregate(root, ["early", "late"], ["recon", "jsd"], seeds=3)
    self.assertEqual(set(table), {("early", "jsd"), ("late", "recon")})
    cell = table[("early", "jsd")]
    for key, values in [("coverage", [1.0, 2 / 3]), ("min_validity", [0.8, 0.7]),
                        ("nmi", [0.5, 0.7]), ("seq_kl", [10.0, 14.0]), ("wall_s", [30.0, 40.0]),
                        ("per_example_coverage", [0.9, 0.6])]:
      mean, std, n = cell[key]
      self.assertAlmostEqual(mean, np.mean(values))
      self.assertAlmostEqual(std, np.std(values, ddof=1))
      self.assertEqual(n, 2)
    late = table[("late", "recon")]
    self.assertEqual(late["wall_s"][2], 0)
    self.assertTrue(np.isnan(late["per_example_coverage"][0]))
    self.assertTrue(np.isnan(late["coverage"][1]))  # One seed: no std.

    text = research.report(root, docs, ["early", "late"], ["recon", "jsd"], seeds=3)
    lines = text.splitlines()
    self.assertLen(lines, 4)  # Header, rule, two rows.
    early_row = [line for line in lines if line.startswith("| early")][0]
    self.assertIn(research_common.ARM_LABELS["jsd"], early_row)
    self.assertIn(f"{np.mean([0.8, 0.7]):.3f} ± {np.std([0.8, 0.7], ddof=1):.3f}", early_row)
    self.assertIn("| 2 |", early_row)
    late_row = [line for line in lines if line.startswith("| late")][0]
    self.assertIn("—", late_row)  # Missing per-example coverage and wall time.
    for name in ("research_curves.png", "research_confusion.png"):
      path = os.path.join(docs, name)
      self.assertGreater(os.path.getsize(path), 1000)
      with open(path, "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    with open(os.path.join(root, "table.md")) as f:
      self.assertEqual(f.read().strip(), text)

  def test_eval_curves_read_the_eval_lines_only(self):
    root = self.create_tempdir().full_path
    workdir = research.run_dir(root, "early", "jsd", 0)
    _write_run(workdir, 1.0, [0.9, 1.0, 0.8], 0.5, 10.0, 30.0, 0.9, steps=(50, 100, 150))
    curves = research.eval_curves(research.load_run(workdir))
    np.testing.assert_array_equal(curves["min_validity"][0], [50, 100, 150])
    np.testing.assert_allclose(curves["min_validity"][1], [0.8] * 3)
    np.testing.assert_allclose(curves["seq_kl"][1], [10 / 3, 20 / 3, 10.0])


@pytest.mark.slow
class EndToEndTest(chex.TestCase):
  """One arm, one seed, a few steps through train_and_evaluate (compiles: slow on 2 cores)."""

  def test_run_then_resume_skips(self):
    root = self.create_tempdir().full_path
    workdir = research.run_dir(root, "early", "seq_cv", 0)
    record = research.run_one("seq_cv", "early", 0, workdir, num_steps=3)
    self.assertIsNotNone(record["wall_s"])
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    # The recomputed samples are those the library's evaluation matched.
    np.testing.assert_allclose(record["validity_recomputed"], summary["validity"])
    again = research.run_one("seq_cv", "early", 0, workdir, num_steps=3)
    self.assertEqual(again, record)  # Finished: nothing retrained.
    text = research.report(root, os.path.join(root, "docs"), ["early"], ["seq_cv"], 1)
    self.assertIn("| early |", text)


if __name__ == "__main__":
  absltest.main()
