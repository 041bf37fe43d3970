"""Tests for latentdiv.tasks: determinism, conventions, and each construction vs NumPy."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from latentdiv import tasks
from latentdiv import vocab

C = vocab.FIRST_CONTENT

# (name, kwargs) of every configuration under test.
CONFIGS = (
    ("early_divergence", {}),
    ("early_divergence", dict(alphabet_size=6, prompt_len=4, num_strategies=3, shift=2)),
    ("late_divergence", {}),
    ("late_divergence", dict(variant="permute")),
    ("late_divergence", dict(alphabet_size=5, prompt_len=7, num_divergent=4,
                             num_strategies=4, variant="permute")),
    ("transduction", {}),
    ("transduction", dict(transform="copy")),
    ("transduction", dict(transform="dedup", alphabet_size=3, prompt_len=8, min_len=1)),
    ("branch", {}),
    ("branch", dict(alphabet_size=8, prompt_len=6)),
)
NAMED_CONFIGS = tuple(
    (f"{name}_{i}", name, kwargs) for i, (name, kwargs) in enumerate(CONFIGS))
ONE_PER_TASK = tuple(NAMED_CONFIGS[i] for i in (0, 3, 5, 8))


BATCH = 256

# One compiled sampler per task configuration (a Task is hashable by value).
_sample_jit = jax.jit(lambda task, key: task.sample(key, BATCH), static_argnums=0)


def _draw(task, seed, num_batches=1):
  """``num_batches`` jitted batches of BATCH examples, concatenated, as NumPy."""
  batches = [_sample_jit(task, jax.random.PRNGKey(seed * 1000 + i))
             for i in range(num_batches)]
  return jax.tree.map(lambda *x: np.concatenate([np.asarray(v) for v in x]), *batches)


def _reference_outputs(task, prompt):
  """Brute-force NumPy/Python construction of the S valid outputs of one prompt."""
  opts = dict(task.options)
  a, p, t_len, s_count = (task.alphabet_size, task.prompt_len, task.target_len,
                          task.num_strategies)
  out = np.full((s_count, t_len), vocab.PAD, np.int64)
  sym = [int(v) - C for v in prompt]
  for s in range(s_count):
    if task.name == "early_divergence":
      row = [C + (sym[t] + s * opts["shift"]) % a for t in range(p)]
    elif task.name == "branch":
      if s == 0:
        row = [C] + [C + v for v in sym]
      else:
        row = [C + 1] + [C + sym[sym[t] % p] for t in range(p)]
    elif task.name == "late_divergence":
      d = opts["num_divergent"]
      if opts["variant"] == "shift":
        suffix = [C + (sym[j] + s * opts["shift"]) % a for j in range(d)]
      else:
        suffix = [C + sym[(j + s) % d] for j in range(d)]
      row = [C + v for v in sym] + suffix
    else:
      x = [int(v) for v in prompt if v != vocab.PAD]
      if opts["transform"] == "reverse":
        row = x[::-1]
      elif opts["transform"] == "copy":
        row = x
      else:
        row = [k for k, _ in itertools.groupby(x)]
    out[s, :len(row)] = row
    out[s, len(row)] = vocab.EOS
  return out


class TaskTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*ONE_PER_TASK)
  def test_shapes_dtypes_and_jit_equals_eager(self, name, kwargs):
    task = tasks.make_task(name, **kwargs)
    batch = self.variant(task.sample, static_argnames="batch_size")(
        jax.random.PRNGKey(0), batch_size=BATCH)
    b, p, t, s = BATCH, task.prompt_len, task.target_len, task.num_strategies
    chex.assert_shape([batch.prompt, batch.target, batch.target_mask, batch.strategy,
                       batch.valid_outputs], [(b, p), (b, t), (b, t), (b,), (b, s, t)])
    for array in (batch.prompt, batch.target, batch.strategy, batch.valid_outputs):
      chex.assert_type(array, jnp.int32)
    chex.assert_type(batch.target_mask, jnp.bool_)
    self.assertEqual(task.vocab_size, vocab.NUM_RESERVED + task.alphabet_size)
    # Jitted (traced key) and eager sampling draw the same batch.
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, batch), _draw(task, seed=0))

  @parameterized.named_parameters(*NAMED_CONFIGS)
  def test_determinism(self, name, kwargs):
    task = tasks.make_task(name, **kwargs)
    key = jax.random.fold_in(jax.random.PRNGKey(0), 5)  # e.g. the batch of step 5
    first = _sample_jit(task, key)
    again = _sample_jit(tasks.make_task(name, **kwargs), key)
    other = _sample_jit(task, jax.random.fold_in(jax.random.PRNGKey(0), 6))
    chex.assert_trees_all_equal(first, again)
    self.assertFalse(np.array_equal(first.prompt, other.prompt))

  @parameterized.named_parameters(*NAMED_CONFIGS)
  def test_outputs_match_numpy_construction(self, name, kwargs):
    task = tasks.make_task(name, **kwargs)
    batch = _draw(task, seed=1)
    for b in range(BATCH):
      np.testing.assert_array_equal(batch.valid_outputs[b],
                                    _reference_outputs(task, batch.prompt[b]))
    np.testing.assert_array_equal(task.outputs(batch.prompt[0]), batch.valid_outputs[0])

  @parameterized.named_parameters(*NAMED_CONFIGS)
  def test_target_is_the_drawn_strategy_and_conventions(self, name, kwargs):
    task = tasks.make_task(name, **kwargs)
    for seed in range(3):
      batch = _draw(task, seed)
      rows = np.arange(batch.strategy.shape[0])
      np.testing.assert_array_equal(batch.target, batch.valid_outputs[rows, batch.strategy])
      self.assertTrue(((batch.strategy >= 0) & (batch.strategy < task.num_strategies)).all())
      # Prompts: content tokens, then (transduction only) PAD at the end.
      content = (batch.prompt >= C) & (batch.prompt < task.vocab_size)
      is_pad = batch.prompt == vocab.PAD
      self.assertTrue((content | is_pad).all())
      self.assertTrue((np.diff(is_pad.astype(int), axis=1) >= 0).all())
      if name != "transduction":
        self.assertFalse(is_pad.any())
      # Outputs: content, exactly one EOS, then PAD; the mask covers content + EOS.
      rows = batch.valid_outputs.reshape(-1, task.target_len)
      np.testing.assert_array_equal((rows == vocab.EOS).sum(axis=1), 1)
      position = np.arange(task.target_len)[None, :]
      eos_at = np.argmax(rows == vocab.EOS, axis=1)[:, None]
      is_content = (rows >= C) & (rows < task.vocab_size)
      np.testing.assert_array_equal(is_content, position < eos_at)
      np.testing.assert_array_equal(rows == vocab.PAD, position > eos_at)
      expected_mask = np.arange(task.target_len)[None, :] <= np.argmax(
          batch.target == vocab.EOS, axis=1)[:, None]
      np.testing.assert_array_equal(batch.target_mask, expected_mask)

  @parameterized.named_parameters(*NAMED_CONFIGS[:5])
  def test_strategies_roughly_uniform(self, name, kwargs):
    task = tasks.make_task(name, **kwargs)
    strategy = _draw(task, seed=0, num_batches=16).strategy
    shares = np.bincount(strategy, minlength=task.num_strategies) / strategy.size
    np.testing.assert_allclose(shares, 1.0 / task.num_strategies, atol=0.04)

  @parameterized.parameters(
      dict(), dict(alphabet_size=6, prompt_len=4, num_strategies=3, shift=2),
      dict(alphabet_size=7, num_strategies=7, shift=3))
  def test_early_divergence_first_token_distinct(self, **kwargs):
    task = tasks.make_task("early_divergence", **kwargs)
    for seed in range(5):
      outputs = _draw(task, seed).valid_outputs  # [B, S, T]
      s = task.num_strategies
      for i, j in itertools.combinations(range(s), 2):
        # Distinct at the first position, indeed at every content position.
        self.assertTrue((outputs[:, i, 0] != outputs[:, j, 0]).all())
        self.assertTrue((outputs[:, i, :-1] != outputs[:, j, :-1]).all())

  @parameterized.parameters(
      dict(variant="shift"), dict(variant="permute"),
      dict(variant="shift", num_divergent=1, num_strategies=4, alphabet_size=4),
      dict(variant="permute", alphabet_size=4, prompt_len=4, num_divergent=4,
           num_strategies=2))
  def test_late_divergence_shared_prefix_distinct_suffix(self, **kwargs):
    task = tasks.make_task("late_divergence", **kwargs)
    p, d = task.prompt_len, dict(task.options)["num_divergent"]
    self.assertEqual(task.target_len, p + d + 1)
    for seed in range(5):
      batch = _draw(task, seed)
      outputs = batch.valid_outputs
      # Shared prefix: every strategy copies the prompt on the first T-1-d tokens.
      np.testing.assert_array_equal(
          outputs[:, :, :p], np.broadcast_to(batch.prompt[:, None, :], outputs[:, :, :p].shape))
      for i, j in itertools.combinations(range(task.num_strategies), 2):
        self.assertTrue((outputs[:, i, p:p + d] != outputs[:, j, p:p + d]).all())
      if kwargs["variant"] == "permute":
        # Same multiset of suffix tokens across strategies; distinct prompt head.
        suffix = np.sort(outputs[:, :, p:p + d], axis=-1)
        np.testing.assert_array_equal(suffix, np.broadcast_to(suffix[:, :1], suffix.shape))
        head = np.sort(batch.prompt[:, :d], axis=-1)
        self.assertTrue((np.diff(head, axis=-1) > 0).all())

  def test_late_permute_marginals_match_across_strategies(self):
    # Per-position token marginals (over x) agree across strategies: each is uniform.
    task = tasks.make_task("late_divergence", variant="permute")
    outputs = _draw(task, seed=0, num_batches=32).valid_outputs
    p, a = task.prompt_len, task.alphabet_size
    for s in range(task.num_strategies):
      for t in range(p, task.target_len - 1):
        shares = np.bincount(outputs[:, s, t] - C, minlength=a) / outputs.shape[0]
        np.testing.assert_allclose(shares, 1.0 / a, atol=0.025)

  @parameterized.parameters("reverse", "copy", "dedup")
  def test_transduction_variable_lengths(self, transform):
    task = tasks.make_task("transduction", transform=transform, prompt_len=6, min_len=2)
    batch = _draw(task, seed=0, num_batches=4)
    self.assertEqual(task.num_strategies, 1)
    np.testing.assert_array_equal(batch.strategy, 0)
    input_len = (batch.prompt != vocab.PAD).sum(axis=1)
    np.testing.assert_array_equal(np.unique(input_len), np.arange(2, 7))
    output_len = batch.target_mask.sum(axis=1) - 1  # content tokens, EOS excluded
    self.assertGreater(len(np.unique(output_len)), 3)
    if transform == "dedup":
      self.assertTrue((output_len <= input_len).all())
      self.assertTrue((output_len < input_len).any())
    else:
      np.testing.assert_array_equal(output_len, input_len)

  def test_branch_announces_its_continuation(self):
    # The first token names the branch; the copy branch repeats the prompt, the
    # other reads x at the position each x_t points to (DESIGN.md §9).
    task = tasks.make_task("branch", alphabet_size=8, prompt_len=6)
    self.assertEqual((task.num_strategies, task.target_len), (2, 8))
    batch = _draw(task, seed=3)
    outputs, prompt = batch.valid_outputs, batch.prompt
    np.testing.assert_array_equal(outputs[:, 0, 0], C)
    np.testing.assert_array_equal(outputs[:, 1, 0], C + 1)
    np.testing.assert_array_equal(outputs[:, 0, 1:7], prompt)
    pointer = (prompt - C) % 6
    np.testing.assert_array_equal(outputs[:, 1, 1:7], np.take_along_axis(prompt, pointer, 1))
    self.assertTrue((outputs[:, 0, 1:7] != outputs[:, 1, 1:7]).any(axis=1).mean() > 0.9)

  def test_task_is_hashable_and_compared_by_value(self):
    a = tasks.make_task("late_divergence", variant="permute")
    b = tasks.make_task("late_divergence", variant="permute")
    c = tasks.make_task("late_divergence", variant="shift")
    self.assertEqual(a, b)
    self.assertEqual(hash(a), hash(b))
    self.assertNotEqual(a, c)
    self.assertCountEqual(tasks.TASKS, tasks._FACTORIES)  # pylint: disable=protected-access

  def test_pattern_placement_writes_the_prompt_at_each_offset(self):
    task = tasks.make_task("pattern_placement", alphabet_size=6, prompt_len=4, num_strategies=3)
    self.assertEqual((task.target_len, task.num_strategies), (7, 3))
    batch = task.sample(jax.random.PRNGKey(0), 64)
    filler = vocab.FIRST_CONTENT  # Symbol 0.
    prompt = np.asarray(batch.prompt)
    self.assertFalse((prompt == filler).any())  # Prompts never use the filler.
    outputs = np.asarray(batch.valid_outputs)
    for s in range(3):
      np.testing.assert_array_equal(outputs[:, s, s:s + 4], prompt)
      self.assertTrue((outputs[:, s, :s] == filler).all())
      self.assertTrue((outputs[:, s, s + 4:6] == filler).all())
      self.assertTrue((outputs[:, s, 6] == vocab.EOS).all())
    # Every pair of strategies differs somewhere for every prompt.
    for a in range(3):
      for b in range(a + 1, 3):
        self.assertTrue((outputs[:, a] != outputs[:, b]).any(axis=1).all())
    with self.assertRaisesRegex(ValueError, "alphabet_size must be >= 2"):
      tasks.make_task("pattern_placement", alphabet_size=1)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "early_divergence"):
      tasks.make_task("nope")
    with self.assertRaisesRegex(ValueError, "colliding"):
      tasks.make_task("early_divergence", alphabet_size=6, num_strategies=3, shift=3)
    with self.assertRaisesRegex(ValueError, "colliding"):
      tasks.make_task("late_divergence", alphabet_size=4, num_strategies=5)
    with self.assertRaisesRegex(ValueError, "permute"):
      tasks.make_task("late_divergence", variant="permute", num_divergent=2, num_strategies=3)
    with self.assertRaisesRegex(ValueError, "shift.*permute"):
      tasks.make_task("late_divergence", variant="bogus")
    with self.assertRaisesRegex(ValueError, "num_divergent"):
      tasks.make_task("late_divergence", prompt_len=2, num_divergent=3)
    with self.assertRaisesRegex(ValueError, "reverse"):
      tasks.make_task("transduction", transform="sort")
    with self.assertRaisesRegex(ValueError, "min_len"):
      tasks.make_task("transduction", prompt_len=3, min_len=4)
    with self.assertRaisesRegex(ValueError, "alphabet_size"):
      tasks.make_task("early_divergence", alphabet_size=0)
    with self.assertRaisesRegex(ValueError, "hard_branch"):
      tasks.make_task("branch", hard_branch="sum")
    with self.assertRaisesRegex(ValueError, "alphabet_size"):
      tasks.make_task("branch", alphabet_size=1)
    with self.assertRaisesRegex(ValueError, "batch_size"):
      tasks.make_task("early_divergence").sample(jax.random.PRNGKey(0), 0)
    with self.assertRaises(TypeError):
      tasks.make_task("early_divergence", num_divergent=2)
    with self.assertRaises(AssertionError):
      tasks.make_task("early_divergence").outputs(jnp.zeros((3,), jnp.int32))


if __name__ == "__main__":
  absltest.main()
