"""Tests for latentdiv.datasets: fresh data, finite training sets in epochs, held-out sets."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from latentdiv import datasets
from latentdiv import experiment
from latentdiv import objectives
from latentdiv import tasks
from latentdiv import train


def _examples(n, width=3):
  prompt = np.arange(n * width, dtype=np.int32).reshape(n, width)
  return tasks.Batch(prompt=prompt, target=prompt + 1, target_mask=np.ones((n, width), bool),
                     strategy=np.zeros((n,), np.int32),
                     valid_outputs=(prompt + 1)[:, None, :])


def finite_config(train_size=48, **train_fields):
  config = objectives.base_config()
  config.task.name = "transduction"
  config.task.prompt_len = 5
  config.task.alphabet_size = 6
  config.model.num_latents = 1
  config.model.d_model = 16
  config.model.num_heads = 2
  config.model.num_layers = 1
  config.model.d_ff = 32
  config.objective.lambda_jsd = 0.0
  config.objective.jsd_prefix_len = 1
  config.data.train_size = train_size
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 2
  config.optim.learning_rate = 1e-2
  config.train.batch_size = 16
  config.train.num_steps = 20
  config.train.log_every = 5
  config.train.eval_every = 1000
  config.train.checkpoint_every = 7
  config.eval.batch_size = 32
  for name, value in train_fields.items():
    config.train[name] = value
  return config


class ArrayDatasetTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_epoch_is_a_permutation_and_batches_straddle_epochs(self):
    n, b = 10, 4
    dataset = datasets.make_dataset(_examples(n), jax.random.PRNGKey(0), b)
    indices = self.variant(dataset.indices_at)
    stream = np.concatenate([np.asarray(indices(jnp.int32(s))) for s in range(15)])  # 6 epochs
    epochs = stream.reshape(6, n)
    for e in range(6):
      self.assertEqual(sorted(epochs[e]), list(range(n)), f"epoch {e}")
    self.assertGreater(len({tuple(e) for e in epochs}), 1)  # reshuffled per epoch
    # Step 2 covers stream positions 8..11: the end of epoch 0 and the start of epoch 1.
    first, second = np.asarray(dataset.permutation(0)), np.asarray(dataset.permutation(1))
    np.testing.assert_array_equal(indices(jnp.int32(2)), [first[8], first[9], second[0],
                                                          second[1]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_is_the_examples_at_the_indices(self):
    examples = _examples(7)
    dataset = datasets.make_dataset(examples, jax.random.PRNGKey(3), 3)
    batch = self.variant(dataset.batch_at)(jnp.int32(5))
    index = np.asarray(dataset.indices_at(5))
    chex.assert_shape(batch.prompt, (3, 3))
    np.testing.assert_array_equal(batch.prompt, examples.prompt[index])
    np.testing.assert_array_equal(batch.valid_outputs, examples.valid_outputs[index])

  def test_the_same_step_gives_the_same_batch_and_the_source_is_a_jit_argument(self):
    dataset = datasets.make_dataset(_examples(9), jax.random.PRNGKey(0), 4)
    other_key = dataset.replace(key=jax.random.PRNGKey(1))
    fn = jax.jit(lambda source, step: source.batch_at(step).prompt)
    np.testing.assert_array_equal(fn(dataset, 11), fn(dataset, 11))
    self.assertFalse(np.array_equal(fn(dataset, 11), fn(other_key, 11)))
    self.assertEqual(fn._cache_size(), 1)  # keys and arrays are arguments, not constants

  def test_rows_beyond_the_size_are_never_drawn_and_sizes_share_a_program(self):
    examples = _examples(12)
    small = datasets.make_dataset(examples, jax.random.PRNGKey(0), 3, size=5)
    large = datasets.make_dataset(examples, jax.random.PRNGKey(0), 3, size=12)
    fn = jax.jit(lambda source, step: source.indices_at(step))
    stream = np.concatenate([np.asarray(fn(small, s)) for s in range(10)])  # 6 epochs of 5
    for e in range(6):
      self.assertEqual(sorted(stream[5 * e:5 * (e + 1)]), list(range(5)))
    fn(large, 0)
    self.assertEqual(fn._cache_size(), 1)
    with self.assertRaisesRegex(ValueError, r"size=13 must be in \[1, 12\]"):
      datasets.make_dataset(examples, jax.random.PRNGKey(0), 3, size=13)

  def test_batch_size_must_fit_the_set(self):
    with self.assertRaisesRegex(ValueError, r"config.train.batch_size=8 must be in \[1, 5\]"):
      datasets.make_dataset(_examples(5), jax.random.PRNGKey(0), 8)

  def test_cycle_rows(self):
    rows = datasets.cycle_rows(_examples(3), 7)
    np.testing.assert_array_equal(rows.prompt[:, 0], [0, 3, 6, 0, 3, 6, 0])


class BuildTest(parameterized.TestCase):

  def test_fresh_data_is_the_task_generator_at_fold_in_step(self):
    config = finite_config(train_size=0)
    setup, _ = experiment.build(config)
    self.assertIsInstance(setup.data.train, datasets.FreshData)
    self.assertIsNone(setup.data.train_eval)
    want = setup.task.sample(jax.random.fold_in(train.data_key(config), 4), 16)
    chex.assert_trees_all_equal(setup.data.train.batch_at(4), want)
    chex.assert_trees_all_equal(setup.data.heldout,
                                setup.task.sample(train.eval_key(config), 32))

  def test_training_set_is_distinct_disjoint_from_heldout_and_nested(self):
    config = finite_config(train_size=64)
    setup, _ = experiment.build(config)
    examples = setup.data.train.examples
    pairs = {np.concatenate([p, t]).tobytes()
             for p, t in zip(np.asarray(examples.prompt), np.asarray(examples.target))}
    self.assertLen(pairs, 64)
    heldout = {p.tobytes() for p in np.asarray(setup.data.heldout.prompt)}
    self.assertEmpty(heldout & {p.tobytes() for p in np.asarray(examples.prompt)})
    # The held-out set does not depend on the training-set size; the sets are nested.
    small, _ = experiment.build(finite_config(train_size=16))
    chex.assert_trees_all_equal(small.data.heldout, setup.data.heldout)
    np.testing.assert_array_equal(small.data.train.examples.prompt, examples.prompt[:16])
    np.testing.assert_array_equal(setup.data.train_eval.prompt[:32], examples.prompt[:32])
    # With a capacity, the arrays hold the first C examples and the size is an array.
    config = finite_config(train_size=16)
    config.data.train_capacity = 64
    padded, _ = experiment.build(config)
    chex.assert_trees_all_equal(padded.data.train.examples, setup.data.train.examples)
    self.assertEqual(int(padded.data.train.size), 16)
    np.testing.assert_array_equal(padded.data.train_eval.prompt[:16], examples.prompt[:16])
    np.testing.assert_array_equal(padded.data.train_eval.prompt[16:32], examples.prompt[:16])

  def test_a_task_too_small_for_the_training_set_is_refused(self):
    config = finite_config(train_size=200)
    config.task.prompt_len = 2
    config.task.min_len = 1
    config.task.alphabet_size = 2
    config.eval.batch_size = 16
    config.objective.sequence_term.rollout_len = 3  # T = 3 on this task.
    setup, _ = experiment.build(config)  # The data are drawn on first use.
    with self.assertRaisesRegex(ValueError, r"config.data.train_size=200 is more than the task"):
      setup.data.train  # pylint: disable=pointless-statement

  def test_train_size_smaller_than_a_batch_is_refused_before_building(self):
    with self.assertRaisesRegex(ValueError, r"config.data.train_size=8 must be 0 .* at least "
                                r"config.train.batch_size=16"):
      experiment.build(finite_config(train_size=8))


class FiniteTrainingTest(parameterized.TestCase):

  def test_resume_mid_epoch_equals_the_uninterrupted_run(self):
    # 48 examples, batches of 16: 3 steps per epoch; stop at step 7 (mid-epoch) and resume.
    straight = self.create_tempdir().full_path
    want = experiment.train_and_evaluate(finite_config(num_steps=11), straight)
    interrupted = self.create_tempdir().full_path
    experiment.train_and_evaluate(finite_config(num_steps=7), interrupted)
    # A longer run of the same config: accepted explicitly (DESIGN.md §11).
    got = experiment.train_and_evaluate(finite_config(num_steps=11), interrupted,
                                        accept_changes=True)
    for key in ("nll", "train_nll", "exact_match", "train_exact_match"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
    with open(os.path.join(straight, "metrics.jsonl")) as f:
      evals = [r for r in map(json.loads, f) if r["kind"] == "eval"]
    self.assertIn("train_nll", evals[-1])
    self.assertIn("train_edit_distance", want)


if __name__ == "__main__":
  absltest.main()
