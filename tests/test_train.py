"""Tests for latentdiv.train: the objective-agnostic loop (state, one step builder, the host loop)."""

import json
import os

import chex
import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import jax.numpy as jnp
import ml_collections

from latentdiv import experiment
from latentdiv import model as model_lib
from latentdiv import objectives
from latentdiv import train


def tiny_config(**seq_pg):
  config = objectives.base_config()
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
    config.objective.sequence_term[name] = value
  return config


def _read_log(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


class TrainLoopTest(parameterized.TestCase):

  def test_short_run_learns_checkpoints_and_resumes(self):
    workdir = self.create_tempdir().full_path
    config = tiny_config()
    config.optim.schedule = "constant"  # Extended below: num_steps is the cosine's horizon.
    summary = experiment.train_and_evaluate(config, workdir)
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
    summary = experiment.train_and_evaluate(config, workdir, accept_changes=True)
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
    summary_straight = experiment.train_and_evaluate(config, straight)
    interrupted = self.create_tempdir().full_path
    config.train.num_steps = 10
    experiment.train_and_evaluate(config, interrupted)
    config.train.num_steps = 20
    summary_resumed = experiment.train_and_evaluate(config, interrupted, accept_changes=True)
    for key in ("nll", "token_jsd", "validity", "latent_usage"):
      np.testing.assert_allclose(summary_resumed[key], summary_straight[key], rtol=1e-6)




class ToyObjective(train.Objective):
  """An objective written against the loop alone: maximum likelihood of latent 0 on the data."""

  name = "toy"

  @classmethod
  def default_config(cls):
    o = ml_collections.ConfigDict()
    o.name = cls.name
    return o

  def init_extra(self):
    return dict(calls=jnp.zeros((), jnp.int32))

  def loss(self, params, frozen, extra, batch, key, step):
    latent = jnp.zeros(batch.prompt.shape[:1], jnp.int32)
    logits = model_lib.teacher_forced_logits(self.setup.model, params, batch.prompt,
                                             batch.target, latent)
    nll = -jnp.sum(jax.vmap(__import__("latentdiv").logprobs.sequence_log_likelihood)(
        logits, batch.target, batch.target_mask)) / jnp.sum(batch.target_mask)
    return nll, (dict(nll=nll), dict(calls=extra["calls"] + 1))

  def make_evaluate(self, mesh=None):
    return lambda params, frozen: dict(param_norm=jnp.sqrt(sum(
        jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))))


class ObjectiveInterfaceTest(parameterized.TestCase):

  def test_the_loop_trains_an_objective_it_has_never_seen(self):
    config = tiny_config()
    config.objective = ToyObjective.default_config()
    setup = train.build_setup(config)
    objective = ToyObjective(setup)
    workdir = self.create_tempdir().full_path
    summary = train.train_and_evaluate(setup, objective, workdir)
    self.assertEqual(summary["steps"], 30)
    self.assertIn("param_norm", summary)
    log = _read_log(workdir)
    self.assertLess(log[-1]["nll"], 0.8 * log[0]["nll"])
    self.assertEqual(log[-1]["loss"], log[-1]["nll"])  # The loop logs the loss it differentiates.
    state = train.init_state(setup, objective)
    step = train.make_train_step(setup, objective)
    for _ in range(3):
      state, _ = step(state)
    self.assertEqual(int(state.extra["calls"]), 3)  # The objective's extra state is carried.
    self.assertEqual(step._cache_size(), 1)

  def test_the_loop_module_imports_no_objective(self):
    import latentdiv.train as loop  # pylint: disable=import-outside-toplevel
    with open(loop.__file__) as f:
      source = f.read()
    self.assertNotIn("objectives", "".join(
        line for line in source.splitlines(True) if line.startswith(("import", "from"))))

  def test_objectives_are_registered_by_name(self):
    self.assertEqual(set(objectives.NAMES), {"diversity", "distillation"})
    with self.assertRaisesRegex(ValueError, r"config.objective.name must be one of"):
      objectives.get("nonsense")
    for name in objectives.NAMES:
      config = objectives.base_config(name)
      self.assertEqual(config.objective.name, name)

  def test_load_returns_what_sampling_needs(self):
    workdir = self.create_tempdir().full_path
    config = tiny_config()
    config.train.num_steps = 10
    experiment.train_and_evaluate(config, workdir)
    loaded = experiment.load(workdir)
    self.assertEqual(loaded.model.config.num_latents, config.model.num_latents)
    setup, objective = experiment.build(config)
    want = train.init_state(setup, objective)
    chex.assert_trees_all_equal_shapes(loaded.params, want.params)
    from latentdiv import sampling  # pylint: disable=import-outside-toplevel
    rollout = sampling.sample_latents(loaded.model, loaded.params,
                                      loaded.task.sample(jax.random.PRNGKey(0), 4).prompt,
                                      jax.random.PRNGKey(1), loaded.task.target_len)
    chex.assert_shape(rollout.tokens, (4, config.model.num_latents, loaded.task.target_len))
    with self.assertRaisesRegex(ValueError, "No checkpoint at step 3"):
      experiment.load(workdir, step=3)


class TrainStepTest(parameterized.TestCase):

  def test_seeds_compile_to_the_same_programs(self):
    # Keys and the evaluation batch are arguments, not constants: a sweep over
    # seeds hits JAX's persistent compilation cache after the first run.
    texts = []
    for seed in (0, 1):
      config = tiny_config(weight=0.1, rollout_len=3)
      config.seed = seed
      setup, objective = experiment.build(config)
      state = train.init_state(setup, objective)
      evaluate = objective.make_evaluate()
      texts.append((train.make_train_step(setup, objective).lower(state).as_text(),
                    evaluate.bound.lower(state.params).as_text()))
    self.assertEqual(texts[0][0], texts[1][0])
    self.assertEqual(texts[0][1], texts[1][1])


if __name__ == "__main__":
  absltest.main()
