"""Tests of experiments/raml_compare.py and experiments/configs/raml.py (the seed-003 study)."""

import itertools
import json
import math
import os
import sys

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from experiments import raml_compare  # noqa: E402
from experiments.configs import raml as raml_config  # noqa: E402
from latentdiv import model as model_lib  # noqa: E402
from latentdiv import experiment  # noqa: E402
from latentdiv import vocab  # noqa: E402


class ArmsTest(parameterized.TestCase):

  def test_names_directories_and_labels(self):
    names = raml_compare.arms(["0.1", "0.30"], ["0.6", "0.8"])
    self.assertEqual(names, ["ml", "ls,0.1", "ls,0.3", "hamming,0.6", "hamming,0.8",
                             "edit,0.6", "edit,0.8"])
    self.assertEqual([raml_compare.arm_dir(a) for a in names],
                     ["ml", "ls_0.1", "ls_0.3", "hamming_0.6", "hamming_0.8", "edit_0.6",
                      "edit_0.8"])
    self.assertEqual(raml_compare.run_dir("/r", "edit,0.6", 2), "/r/edit_0.6/seed2")
    self.assertEqual(raml_compare.arm_label("hamming,0.8"), "RAML, Hamming, τ = 0.8")
    self.assertEqual(raml_compare.arm_label("ls,0.1"), "label smoothing, ε = 0.1")
    self.assertEqual(raml_compare.arms([], ["0.5"], ["edit"]), ["ml", "edit,0.5"])

  @parameterized.parameters("nope", "ml,0.1", "ls", "hamming,0.5,1", "edit,x")
  def test_malformed_arms_are_rejected(self, arm):
    with self.assertRaises(ValueError):
      raml_config.parse_arm(arm)

  def test_unknown_reward_is_rejected(self):
    with self.assertRaisesRegex(ValueError, "rewards must be among"):
      raml_compare.arms([], ["0.5"], ["bleu"])

  @parameterized.parameters(
      ("ml", "data", None, None), ("ls,0.2", "label_smoothing", None, None),
      ("hamming,0.6", "raml", "hamming", 0.6), ("edit,0.9", "raml", "edit", 0.9))
  def test_every_arm_builds_with_one_latent_and_no_divergence(self, arm, targets, reward, tau):
    config = raml_compare.get_config(arm, seed=2, num_steps=7)
    setup, _ = experiment.build(config)  # Validates; nothing compiles.
    self.assertEqual((config.seed, config.train.num_steps), (2, 7))
    self.assertEqual(config.model.num_latents, 1)
    self.assertEqual(config.objective.lambda_jsd, 0.0)
    self.assertEqual(config.objective.sequence_term.weight, 0.0)
    self.assertEqual(config.objective.raml.convention, "rescaled")
    self.assertEqual(config.objective.targets, targets)
    self.assertEqual(setup.task.name, "transduction")
    if targets == "label_smoothing":
      self.assertEqual(config.objective.raml.epsilon, 0.2)
    if reward is not None:
      self.assertEqual((config.objective.raml.reward, config.objective.raml.tau), (reward, tau))


def _brute_force_kl(model, params, prompt_P, target_T, lo, hi, tau_eff):
  """Σ_y q(y) (log q(y) − log p(y)) over every y in the Hamming neighbourhood of y*."""
  editable = [t for t, tok in enumerate(target_T) if tok >= vocab.FIRST_CONTENT]
  rows, distances = [], []
  for content in itertools.product(range(lo, hi), repeat=len(editable)):
    row = list(target_T)
    for t, tok in zip(editable, content):
      row[t] = tok
    rows.append(row)
    distances.append(sum(a != b for a, b in zip(row, target_T)))
  rows = np.array(rows, np.int32)
  distances = np.array(distances, np.float64)
  log_q = -distances / tau_eff
  log_q -= np.log(np.exp(log_q).sum())
  logits = np.asarray(jax.jit(model_lib.teacher_forced_logits, static_argnums=0)(
      model, params, jnp.asarray(np.repeat(prompt_P[None], len(rows), 0)), jnp.asarray(rows),
      jnp.zeros((len(rows),), jnp.int32)), np.float64)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  scored = np.arange(len(target_T)) <= list(target_T).index(vocab.EOS)
  token_lp = np.take_along_axis(log_softmax, rows[:, :, None], -1)[..., 0]
  log_p = (token_lp * scored).sum(-1)
  table = {tuple(r): (lq, lp) for r, lq, lp in zip(rows.tolist(), log_q, log_p)}
  return float(np.sum(np.exp(log_q) * (log_q - log_p))), table


class PayoffKLTest(chex.TestCase):
  """The table's KL(q || p_θ) against enumeration of the Hamming neighbourhood (tiny model)."""

  def test_matches_enumeration(self):
    lo, hi = vocab.FIRST_CONTENT, vocab.FIRST_CONTENT + 3  # V' = 3.
    prompt_len, target_len = 3, 4
    model = model_lib.LatentTransformer(model_lib.ModelConfig(
        vocab_size=hi, num_latents=1, max_len=prompt_len + target_len, d_model=16,
        num_heads=2, num_layers=1, d_ff=32))
    # Parameters scaled up so that p_θ is far from uniform.
    params = jax.jit(lambda key: jax.tree_util.tree_map(
        lambda a: 4.0 * a, model_lib.init_params(model, key)))(jax.random.PRNGKey(0))
    prompt = np.array([[3, 4, 5], [5, 0, 0]], np.int32)
    target = np.array([[5, 4, 3, vocab.EOS], [5, vocab.EOS, 0, 0]], np.int32)
    tau, num_samples = 0.9, 3000
    tau_eff = tau / (1.0 + math.log(hi - lo - 1))  # The 'rescaled' convention.
    diff, samples = raml_compare.payoff_kl_terms(
        model, params, jnp.asarray(prompt), jnp.asarray(target), jax.random.PRNGKey(1), tau,
        num_samples, (lo, hi))
    chex.assert_shape(diff, (2, num_samples))
    chex.assert_shape(samples, (2, num_samples, target_len))
    diff, samples = np.asarray(diff, np.float64), np.asarray(samples)
    for b in range(2):
      exact, table = _brute_force_kl(model, params, prompt[b], target[b], lo, hi, tau_eff)
      # Every sample lies in the neighbourhood and its term is log q − log p exactly.
      expected = np.array([np.subtract(*table[tuple(s)]) for s in samples[b].tolist()])
      np.testing.assert_allclose(diff[b], expected, rtol=1e-4, atol=1e-4)
      stderr = diff[b].std() / math.sqrt(num_samples)
      self.assertLess(abs(diff[b].mean() - exact), 5 * stderr + 1e-6)
      self.assertGreater(exact, 0.0)


def _write_run(workdir, exact_match, edit_distance, nll, kl=None, wall=None):
  os.makedirs(workdir, exist_ok=True)
  summary = dict(steps=10, exact_match=exact_match, edit_distance=edit_distance, nll=nll,
                 kl_payoff_to_model=123.0, task="transduction")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  record = {}
  if kl is not None:
    record.update(kl=kl, kl_tau=0.8, kl_samples=16)
  if wall is not None:
    record.update(wall_s=wall)
  if record:
    with open(os.path.join(workdir, "raml.json"), "w") as f:
      json.dump(record, f)


class AggregationTest(chex.TestCase):

  def test_table_and_plot_from_run_directories(self):
    root = self.create_tempdir().full_path
    docs = os.path.join(root, "docs")
    names = raml_compare.arms(["0.1"], ["0.6"], ["hamming", "edit"])
    ml = [(0.7, 0.5, 0.2, 3.0, 30.0), (0.8, 0.3, 0.1, 2.0, 50.0)]
    for seed, run in enumerate(ml):
      _write_run(raml_compare.run_dir(root, "ml", seed), *run)
    os.makedirs(raml_compare.run_dir(root, "ml", 2))  # Unfinished: left out.
    _write_run(raml_compare.run_dir(root, "hamming,0.6", 0), 0.6, 0.7, 0.4)  # No raml.json.
    _write_run(raml_compare.run_dir(root, "edit,0.6", 1), 0.1, 2.0, 0.9, 8.0, 70.0)

    table = raml_compare.aggregate(root, names, seeds=3)
    self.assertEqual(set(table), {"ml", "hamming,0.6", "edit,0.6"})
    columns = ("exact_match", "edit_distance", "nll", "kl", "wall_s")  # The ``ml`` tuples.
    for i, key in enumerate(columns):
      mean, std, n = table["ml"][key]
      values = [run[i] for run in ml]
      self.assertAlmostEqual(mean, np.mean(values))
      self.assertAlmostEqual(std, np.std(values, ddof=1))
      self.assertEqual(n, 2)
    self.assertTrue(np.isnan(table["hamming,0.6"]["kl"][0]))  # The summary's KL is not used.
    # Paired with the ML run of the same seed; none for ML itself.
    self.assertTrue(np.isnan(table["ml"]["d_exact_match"][0]))
    self.assertAlmostEqual(table["hamming,0.6"]["d_exact_match"][0], 0.6 - 0.7)
    self.assertAlmostEqual(table["hamming,0.6"]["d_edit_distance"][0], 0.7 - 0.5)
    self.assertAlmostEqual(table["edit,0.6"]["d_exact_match"][0], 0.1 - 0.8)
    self.assertTrue(np.isnan(table["edit,0.6"]["exact_match"][1]))  # One seed: no std.

    text = raml_compare.report(root, docs, names, seeds=3, kl_tau=0.8)
    lines = text.splitlines()
    self.assertLen(lines, 5)  # Header, rule, three rows (label smoothing has no run).
    ml_row = lines[2]
    self.assertTrue(ml_row.startswith("| maximum likelihood | 2 |"))
    self.assertIn(f"{np.mean([0.7, 0.8]):.3f} ± {np.std([0.7, 0.8], ddof=1):.3f}", ml_row)
    self.assertIn(f"{np.mean([3.0, 2.0]):.2f} ± {np.std([3.0, 2.0], ddof=1):.2f}", ml_row)
    hamming_row = [line for line in lines if "Hamming" in line][0]
    self.assertEqual(hamming_row.count("—"), 2)  # KL and wall time missing.
    self.assertEqual(ml_row.count("—"), 2)  # No paired differences for ML itself.
    edit_row = [line for line in lines if "edit distance, τ" in line][0]
    self.assertIn("| 0.100 | -0.700 | 2.000 | +1.700 | 0.900 | 8.00 | 70 |", edit_row)
    path = os.path.join(docs, "raml_compare.png")
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertGreater(os.path.getsize(path), 1000)
    with open(os.path.join(root, "table.md")) as f:
      self.assertEqual(f.read().strip(), text)


@pytest.mark.slow
class EndToEndTest(chex.TestCase):
  """Two arms, one seed, a few steps through train_and_evaluate (compiles: minutes on 2 cores)."""

  def test_runs_resume_skips_and_the_kl_reproduces_the_summary(self):
    root = self.create_tempdir().full_path
    names = ["ml", "hamming,0.8"]
    raml_compare.run_all(root, names, seeds=1, workers=1, num_steps=3, kl_samples=4)
    for arm in names:
      workdir = raml_compare.run_dir(root, arm, 0)
      with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
      with open(os.path.join(workdir, "raml.json")) as f:
        record = json.load(f)
      self.assertIsNotNone(record["wall_s"])
      # Same key, samples and τ as train.make_evaluate: the summary's KL recomputed.
      self.assertAlmostEqual(record["kl_own_recomputed"], summary["kl_payoff_to_model"],
                             delta=1e-3 * abs(summary["kl_payoff_to_model"]))
      again = raml_compare.run_one(arm, 0, workdir, num_steps=3, kl_samples=4)
      self.assertEqual(again, record)  # Finished: nothing retrained or re-evaluated.
    text = raml_compare.report(root, os.path.join(root, "docs"), names, 1, 0.8)
    self.assertLen(text.splitlines(), 4)


if __name__ == "__main__":
  absltest.main()
