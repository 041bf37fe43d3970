"""Tests for latentdiv.objectives.diversity: its steps compile once, are finite and learn."""

import os
import sys

import chex
import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from latentdiv import experiment  # noqa: E402
from latentdiv import objectives  # noqa: E402
from latentdiv import train  # noqa: E402
from latentdiv.objectives import diversity  # noqa: E402
from tests.test_train import tiny_config  # noqa: E402


class DiversityStepTest(parameterized.TestCase):
  @parameterized.parameters(
      dict(estimator="rao_blackwell", baseline="jsd"),
      dict(estimator="trajectory", baseline="none"),
      dict(estimator="reward_to_go_baseline", baseline="leave_one_out", num_rollouts=2),
      dict(estimator="kl_to_go_baseline", baseline="ema", num_pairs=2),
  )
  def test_seq_pg_step_compiles_once_and_is_finite(self, **seq_pg):
    config = tiny_config(weight=0.1, rollout_len=3, **seq_pg)
    setup, objective = experiment.build(config)
    state = train.init_state(setup, objective)
    step = train.make_train_step(setup, objective)
    for _ in range(3):
      state, metrics = step(state)
    self.assertEqual(step._cache_size(), 1)  # No recompilation across steps.
    self.assertEqual(int(state.step), 3)
    chex.assert_tree_all_finite((state.params, metrics))
    self.assertGreater(float(metrics["seq_kl"]), 0.0)

  @parameterized.parameters(
      dict(reconstruction="annealed_em", estimator="rao_blackwell", baseline="ema"),
      dict(reconstruction="relaxed_wta", estimator="kl_to_go_baseline", baseline="jsd"),
  )
  def test_mutual_information_step_with_a_remedy(self, reconstruction, **seq):
    config = tiny_config(weight=0.5, rollout_len=3, kind="mi", **seq)
    config.objective.reconstruction = reconstruction
    config.objective.anneal_steps = 2
    setup, objective = experiment.build(config)
    state = train.init_state(setup, objective)
    step = train.make_train_step(setup, objective)
    for _ in range(3):
      state, metrics = step(state)
    self.assertEqual(step._cache_size(), 1)
    chex.assert_tree_all_finite((state.params, metrics))
    self.assertNotIn("seq_kl", metrics)
    self.assertBetween(float(metrics["seq_mi"]), -1e-6, np.log(3) + 1e-6)
    result = objective.make_evaluate()(state.params)
    self.assertIn(int(result["dead_latents"]), range(4))
    self.assertBetween(float(result["per_example_coverage"]), 0.0, 1.0)

  @parameterized.parameters("kl", "mi")
  def test_seq_pg_step_is_one_program_with_the_time_loop_inside(self, kind):
    config = tiny_config(weight=0.1, rollout_len=3, kind=kind)
    setup, objective = experiment.build(config)
    state = train.init_state(setup, objective)
    hlo = train.make_train_step(setup, objective).lower(state).compile().as_text()
    self.assertIn("while", hlo)  # The rollout's lax.scan is compiled, not unrolled in Python.
    for marker in ("callback", "host_compute", "outfeed"):
      self.assertNotIn(marker, hlo.lower())

  @parameterized.parameters("raml", "label_smoothing")
  def test_raml_and_label_smoothing_steps(self, targets):
    config = tiny_config()
    config.task.name = "transduction"
    config.model.num_latents = 1
    config.objective.lambda_jsd = 0.0
    config.objective.targets = targets
    setup, objective = experiment.build(config)
    state = train.init_state(setup, objective)
    step = train.make_train_step(setup, objective)
    losses = []
    for _ in range(8):
      state, metrics = step(state)
      losses.append(float(metrics["rec_loss"]))
    self.assertEqual(step._cache_size(), 1)
    self.assertLess(np.mean(losses[-3:]), np.mean(losses[:3]))

  def test_bfloat16_compute_keeps_float32_params_and_a_close_loss(self):
    config = tiny_config()
    setup32, objective32 = experiment.build(config)
    config.model.dtype = "bfloat16"
    setup16, objective16 = experiment.build(config)
    state = train.init_state(setup32, objective32)
    batch = setup32.task.sample(jax.random.PRNGKey(0), 16)
    _, rec32, jsd32, _, _ = jax.jit(objective32.teacher_forced_terms)(state.params, batch)
    _, rec16, jsd16, _, _ = jax.jit(objective16.teacher_forced_terms)(state.params, batch)
    self.assertEqual(rec16.loss.dtype, np.float32)
    np.testing.assert_allclose(rec16.loss, rec32.loss, rtol=2e-2)
    np.testing.assert_allclose(jsd16.value, jsd32.value, atol=2e-2)
    new_state, _ = train.make_train_step(setup16, objective16)(
        train.init_state(setup16, objective16))
    for leaf in jax.tree_util.tree_leaves(new_state.params):
      self.assertEqual(leaf.dtype, np.float32)

  def test_summary_lines_name_what_was_measured(self):
    summary = dict(steps=3, task="transduction", coverage=1.0, per_example_coverage=0.9,
                   validity=[1.0, 0.5],
                   assignment=[0, -1], latent_usage=[0.7, 0.3], nmi=0.5, seq_kl=1.0,
                   seq_kl_stderr=0.1, token_jsd=0.2, nll=0.3, exact_match=0.9,
                   edit_distance=0.1, kl_payoff_to_model=2.0, dead_latents=1, seq_mi=0.25,
                   seq_mi_stderr=0.01)
    text = diversity.Diversity.format_summary(summary)
    for part in ("coverage : 1.00", "z=1->none", "exact match: 90.0%", "dead latents       : 1",
                 "I(Z; Y | x) (MC): 0.250 ± 0.010 nats (at most log K = 0.693)"):
      self.assertIn(part, text)

  def test_summary_and_lines_are_chosen_by_task_and_k(self):
    import types  # pylint: disable=import-outside-toplevel
    from latentdiv import cli  # pylint: disable=import-outside-toplevel
    raml = cli.load_config_file(os.path.join(_REPO, "experiments/configs/raml.py:hamming,0.8"))
    result = dict(coverage=0.0, validity=[0.5], assignment=[-1], confusion=[[0.0]],
                  latent_usage=[1.0], nmi=0.0, seq_kl=0.0, seq_kl_stderr=0.0, token_jsd=0.0,
                  nll=0.3, exact_match=0.9, edit_distance=0.1, kl_payoff_to_model=2.0,
                  per_example_coverage=0.0, dead_latents=0, seq_mi=0.0, seq_mi_stderr=0.0)
    state = types.SimpleNamespace(step=3, nonfinite_total=0)
    _, k1 = experiment.build(raml)  # K = 1 on transduction: nothing between latents.
    summary = k1.summary(state, result, 0.0)
    self.assertEqual(set(summary) - {"steps", "nonfinite_steps", "task", "num_latents"},
                     {"validity", "nll", "exact_match", "edit_distance", "kl_payoff_to_model"})
    text = k1.format_summary(summary) + k1.eval_line(result)
    for absent in ("coverage", "NMI", "nmi", "sequence KL", "usage", "JSD", "dead",
                   "mutual information"):
      self.assertNotIn(absent, text)
    _, k3 = experiment.build(objectives.base_config())  # K = 3 on a strategy task.
    result.update(validity=[0.5] * 3, latent_usage=[0.3] * 3, assignment=[0, 1, 2])
    summary = k3.summary(state, result, 0.0)
    self.assertContainsSubset({"coverage", "per_example_coverage", "nmi", "seq_kl", "seq_mi",
                               "latent_usage", "dead_latents", "token_jsd"}, summary)
    self.assertNotIn("exact_match", summary)
    line = k3.train_line(dict(loss=9.0, rec_loss=1.0, token_jsd=0.5, learning_rate=1e-3))
    self.assertTrue(line.startswith("objective 0.9500  rec 1.0000  jsd 0.5000"), line)
    self.assertNotIn("loss", line)  # The surrogate's value means nothing to a reader.

  def test_structure_reports_whether_the_sequence_term_is_on(self):
    on, off = tiny_config(weight=0.5), tiny_config(weight=0.0)
    from latentdiv import workdir  # pylint: disable=import-outside-toplevel
    structure = lambda c: diversity.Diversity.structure(workdir.config_record(c))  # noqa: E731
    self.assertTrue(structure(on)["objective.sequence_term.weight > 0"])
    self.assertFalse(structure(off)["objective.sequence_term.weight > 0"])
    self.assertEqual(structure(tiny_config(weight=0.5)), structure(on))
    self.assertEqual(workdir.differences(structure(on), structure(tiny_config(weight=0.9))), [])


if __name__ == "__main__":
  absltest.main()
