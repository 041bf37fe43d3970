"""Tests for latentdiv.train: a short run learns, checkpoints, resumes; the step is one program."""

import json
import os

import chex
import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from latentdiv import config as config_lib
from latentdiv import train


def tiny_config(**seq_pg):
  config = config_lib.base_config()
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.num_layers = 1
  config.model.d_ff = 64
  config.task.prompt_len = 3
  config.train.batch_size = 16
  config.train.num_steps = 30
  config.train.log_every = 5
  config.train.eval_every = 1000
  config.train.checkpoint_every = 10
  config.eval.batch_size = 32
  config.optim.warmup_steps = 5
  config.optim.learning_rate = 1e-2
  for name, value in seq_pg.items():
    config.seq_pg[name] = value
  return config


def _read_log(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


class TrainLoopTest(parameterized.TestCase):

  def test_short_run_learns_checkpoints_and_resumes(self):
    workdir = self.create_tempdir().full_path
    config = tiny_config()
    summary = train.train_and_evaluate(config, workdir)
    for key in ("coverage", "validity", "latent_usage", "nmi", "token_jsd", "nll", "steps"):
      self.assertIn(key, summary)
    self.assertEqual(summary["steps"], 30)
    self.assertLen(summary["validity"], config.model.num_latents)
    log = _read_log(workdir)
    self.assertLess(log[-1]["rec_loss"], 0.8 * log[0]["rec_loss"])
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                   if d.isdigit())
    self.assertEqual(steps[-1], 30)
    with open(os.path.join(workdir, "summary.json")) as f:
      self.assertEqual(json.load(f)["steps"], 30)

    # A second run on the same workdir continues from step 30, not from zero.
    config.train.num_steps = 40
    summary = train.train_and_evaluate(config, workdir)
    self.assertEqual(summary["steps"], 40)
    new_steps = [r["step"] for r in _read_log(workdir)][len(log):]
    self.assertEqual(new_steps, [35, 40])

  def test_resumed_run_equals_uninterrupted_run(self):
    config = tiny_config()
    # A constant learning rate, so that stopping at step 10 (num_steps=10) changes
    # nothing but where the run stops; the data order and RNG must resume exactly.
    config.optim.schedule = "constant"
    config.train.num_steps = 20
    straight = self.create_tempdir().full_path
    summary_straight = train.train_and_evaluate(config, straight)
    interrupted = self.create_tempdir().full_path
    config.train.num_steps = 10
    train.train_and_evaluate(config, interrupted)
    config.train.num_steps = 20
    summary_resumed = train.train_and_evaluate(config, interrupted)
    for key in ("nll", "token_jsd", "validity", "latent_usage"):
      np.testing.assert_allclose(summary_resumed[key], summary_straight[key], rtol=1e-6)


class TrainStepTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(estimator="rao_blackwell", baseline="jsd"),
      dict(estimator="trajectory", baseline="none"),
      dict(estimator="reward_to_go_baseline", baseline="leave_one_out", num_rollouts=2),
      dict(estimator="kl_to_go_baseline", baseline="ema", num_pairs=2),
  )
  def test_seq_pg_step_compiles_once_and_is_finite(self, **seq_pg):
    config = tiny_config(lambda_pg=0.1, rollout_len=3, **seq_pg)
    setup = train.build(config)
    state = train.init_state(setup)
    step = train.make_train_step(setup)
    for _ in range(3):
      state, metrics = step(state)
    self.assertEqual(step._cache_size(), 1)  # No recompilation across steps.
    self.assertEqual(int(state.step), 3)
    chex.assert_tree_all_finite((state.params, metrics))
    self.assertGreater(float(metrics["seq_kl"]), 0.0)

  def test_seq_pg_step_is_one_program_with_the_time_loop_inside(self):
    config = tiny_config(lambda_pg=0.1, rollout_len=3)
    setup = train.build(config)
    state = train.init_state(setup)
    hlo = train.make_train_step(setup).lower(state).compile().as_text()
    self.assertIn("while", hlo)  # The rollout's lax.scan is compiled, not unrolled in Python.
    for marker in ("callback", "host_compute", "outfeed"):
      self.assertNotIn(marker, hlo.lower())

  def test_seeds_compile_to_the_same_programs(self):
    # Keys and the evaluation batch are arguments, not constants: a sweep over
    # seeds hits JAX's persistent compilation cache after the first run.
    texts = []
    for seed in (0, 1):
      config = tiny_config(lambda_pg=0.1, rollout_len=3)
      config.seed = seed
      setup = train.build(config)
      state = train.init_state(setup)
      evaluate, _ = train.make_evaluate(setup)
      texts.append((train.make_train_step(setup).lower(state).as_text(),
                     evaluate.lower(state.params).as_text()))
    self.assertEqual(texts[0][0], texts[1][0])
    self.assertEqual(texts[0][1], texts[1][1])

  @parameterized.parameters("raml", "label_smoothing")
  def test_raml_and_label_smoothing_steps(self, targets):
    config = tiny_config()
    config.task.name = "transduction"
    config.model.num_latents = 1
    config.objective.lambda_jsd = 0.0
    config.objective.targets = targets
    setup = train.build(config)
    state = train.init_state(setup)
    step = train.make_train_step(setup)
    losses = []
    for _ in range(8):
      state, metrics = step(state)
      losses.append(float(metrics["rec_loss"]))
    self.assertEqual(step._cache_size(), 1)
    self.assertLess(np.mean(losses[-3:]), np.mean(losses[:3]))

  def test_bfloat16_compute_keeps_float32_params_and_a_close_loss(self):
    config = tiny_config()
    setup32 = train.build(config)
    config.model.dtype = "bfloat16"
    setup16 = train.build(config)
    state = train.init_state(setup32)
    batch = setup32.task.sample(jax.random.PRNGKey(0), 16)
    _, rec32, jsd32, _ = train.teacher_forced_terms(setup32, state.params, batch)
    _, rec16, jsd16, _ = train.teacher_forced_terms(setup16, state.params, batch)
    self.assertEqual(rec16.loss.dtype, np.float32)
    np.testing.assert_allclose(rec16.loss, rec32.loss, rtol=2e-2)
    np.testing.assert_allclose(jsd16.value, jsd32.value, atol=2e-2)
    new_state, _ = train.make_train_step(setup16)(train.init_state(setup16))
    for leaf in jax.tree_util.tree_leaves(new_state.params):
      self.assertEqual(leaf.dtype, np.float32)

  def test_pg_weight_schedule(self):
    config = tiny_config(lambda_pg=2.0, warmup_steps=10, ramp_steps=4)
    weights = [float(train.pg_weight(config, s)) for s in (0, 9, 10, 11, 13, 100)]
    np.testing.assert_allclose(weights, [0.0, 0.0, 0.5, 1.0, 2.0, 2.0])


if __name__ == "__main__":
  absltest.main()
