"""Tests for latentdiv/oracle.py (DESIGN.md §7), in float64.

The oracle is checked against independent NumPy enumerations (sequence
probabilities, KL with and without EOS truncation, finite differences), its
sampler by a chi-square test, and every function under jit and no-jit. The
exactness of the estimators through the oracle is tests/test_moments.py; the
NumPy references here are shared with it.
"""
import functools
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from latentdiv import oracle

K = 3
# name: (V, L, seed, logit scale).
MODELS = {"v3l3": (3, 3, 0, 1.0), "v2l4": (2, 4, 1, 1.5)}
PAIRS = ((0, 1), (2, 0), (1, 2))
f = oracle.tabular_logits_fn


def _model(name):
  vocab, length, seed, scale = MODELS[name]
  params = oracle.init_tabular_params(
      jax.random.PRNGKey(seed), K, vocab, length, scale)
  return vocab, length, params


def _student_teacher(name):
  """(V, L, student_fn, student_params, teacher_fn, teacher_params) for OPD."""
  vocab, length, student = _model(name)
  teacher = oracle.init_tabular_params(jax.random.PRNGKey(11), 1, vocab,
                                       length, 2.0)
  return (vocab, length, lambda p, y: f(p, y, 0), student,
          lambda p, y: f(p, y, 0), teacher)


# ---------------------------------------------------------------------------
# Independent NumPy references.
# ---------------------------------------------------------------------------


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_context_rows(vocab, length):
  rows = {}
  for t in range(length):
    for prefix in itertools.product(range(vocab), repeat=t):
      rows[prefix] = len(rows)
  return rows


def _np_sequences(vocab, length, eos_id=None):
  """Distinct (possibly EOS-truncated) sequences, by recursion."""
  out = []

  def rec(prefix):
    if len(prefix) == length or (prefix and prefix[-1] == eos_id):
      out.append(prefix)
      return
    for v in range(vocab):
      rec(prefix + (v,))

  rec(())
  return out


def _np_logprob(params, k, y, rows):
  params = np.asarray(params)
  return sum(
      _np_log_softmax(params[k, rows[tuple(y[:t])]])[v] for t, v in enumerate(y))


def _np_kl(params_p, kp, params_q, kq, vocab, length, eos_id=None):
  rows = _np_context_rows(vocab, length)
  total = 0.0
  for y in _np_sequences(vocab, length, eos_id):
    lp = _np_logprob(params_p, kp, y, rows)
    lq = _np_logprob(params_q, kq, y, rows)
    total += np.exp(lp) * (lp - lq)
  return total


class X64(parameterized.TestCase):
  """Runs every test in float64."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))


# ---------------------------------------------------------------------------
# The oracle's own machinery.
# ---------------------------------------------------------------------------


class EnumerationTest(X64):

  def test_all_sequences_and_index(self):
    for vocab, length in [(2, 1), (3, 3), (2, 4), (4, 2)]:
      seqs = oracle.all_sequences(vocab, length)
      chex.assert_shape(seqs, (vocab**length, length))
      self.assertEqual(seqs.dtype, jnp.int32)
      np.testing.assert_array_equal(
          seqs, np.array(list(itertools.product(range(vocab), repeat=length))))
      np.testing.assert_array_equal(
          oracle.sequence_index(seqs, vocab), np.arange(vocab**length))
    with self.assertRaisesRegex(ValueError, "too many"):
      oracle.all_sequences(50, 6)
    with self.assertRaisesRegex(ValueError, "vocab_size >= 2"):
      oracle.all_sequences(1, 3)
    with self.assertRaisesRegex(ValueError, "tokens_NxL"):
      oracle.sequence_index(jnp.zeros(3, jnp.int32), 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tabular_logits_match_prefix_table(self):
    for name in MODELS:
      vocab, length, params = _model(name)
      chex.assert_shape(params,
                        (K, (vocab**length - 1) // (vocab - 1), vocab))
      self.assertEqual(params.dtype, jnp.float64)
      tokens = oracle.all_sequences(vocab, length)
      rows = _np_context_rows(vocab, length)
      for latent in range(K):
        logits = self.variant(f)(params, tokens, latent)
        chex.assert_shape(logits, (vocab**length, length, vocab))
        want = np.array([[np.asarray(params)[latent, rows[tuple(y[:t])]]
                          for t in range(length)] for y in np.asarray(tokens)])
        np.testing.assert_array_equal(logits, want)

  def test_tabular_errors(self):
    params = oracle.init_tabular_params(jax.random.PRNGKey(0), K, 3, 3)
    with self.assertRaisesRegex(ValueError, "contexts"):
      f(params, jnp.zeros((2, 4), jnp.int32), 0)
    with self.assertRaisesRegex(ValueError, "params_KxCxV, tokens_NxL"):
      f(params, jnp.zeros((4,), jnp.int32), 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_truncation_mask(self):
    tokens = jnp.array([[0, 2, 0], [2, 1, 0], [1, 1, 1], [0, 0, 2], [2, 0, 0]])
    mask, canonical = self.variant(
        functools.partial(oracle.truncation_mask, eos_id=2, pad_id=0))(tokens)
    np.testing.assert_array_equal(
        mask, [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(canonical, [True, False, True, True, True])
    mask, canonical = self.variant(oracle.truncation_mask)(tokens)
    np.testing.assert_array_equal(mask, np.ones((5, 3)))
    self.assertTrue(np.all(np.asarray(canonical)))

  def test_sequence_logprobs_match_numpy(self):
    for name, eos_id in [("v3l3", None), ("v3l3", 2), ("v2l4", None),
                         ("v2l4", 1)]:
      vocab, length, params = _model(name)
      rows = _np_context_rows(vocab, length)
      truncated = _np_sequences(vocab, length, eos_id)
      for latent in range(K):
        logp = oracle.exact_sequence_logprobs(f, params, latent, vocab, length,
                                              eos_id)
        chex.assert_shape(logp, (vocab**length,))
        np.testing.assert_allclose(jax.scipy.special.logsumexp(logp), 0.0,
                                   atol=1e-12)
        finite = np.isfinite(np.asarray(logp))
        self.assertEqual(finite.sum(), len(truncated))
        seqs = np.asarray(oracle.all_sequences(vocab, length))
        got = {}
        for y, lp in zip(seqs[finite], np.asarray(logp)[finite]):
          y = tuple(int(v) for v in y)
          if eos_id is not None and eos_id in y:
            y = y[:y.index(eos_id) + 1]
          got[y] = lp
        want = {y: _np_logprob(params, latent, y, rows) for y in truncated}
        self.assertEqual(set(got), set(want))
        for y in want:
          np.testing.assert_allclose(got[y], want[y], rtol=1e-12)

  def test_exact_step_log_probs(self):
    vocab, length, params = _model("v3l3")
    logp = oracle.exact_step_log_probs(f, params, 1, vocab, length)
    chex.assert_shape(logp, (vocab**length, length, vocab))
    np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1.0, atol=1e-12)
    logits = f(params, oracle.all_sequences(vocab, length), 1)
    np.testing.assert_allclose(logp, _np_log_softmax(np.asarray(logits)),
                               atol=1e-12)
    with self.assertRaisesRegex(ValueError, "vocabulary must be V"):
      oracle.exact_step_log_probs(lambda p, y, k: f(p, y, k)[..., :2], params,
                                  1, vocab, length)

  def test_exact_kl_matches_numpy(self):
    for name, eos_id in [("v3l3", None), ("v3l3", 2), ("v2l4", None),
                         ("v2l4", 1)]:
      vocab, length, params = _model(name)
      for i, j in PAIRS:
        got = oracle.exact_kl(f, params, i, j, vocab, length, eos_id)
        want = _np_kl(params, i, params, j, vocab, length, eos_id)
        np.testing.assert_allclose(got, want, rtol=1e-10)
        self.assertGreater(float(got), 0.0)
      np.testing.assert_allclose(
          oracle.exact_kl(f, params, 1, 1, vocab, length, eos_id), 0.0,
          atol=1e-14)

  def test_exact_kl_grad_matches_finite_differences(self):
    for name, eos_id in [("v3l3", None), ("v2l4", 1)]:
      vocab, length, params = _model(name)
      direction = jax.random.normal(jax.random.PRNGKey(5), params.shape)
      kl = jax.jit(oracle.exact_kl, static_argnums=(0, 4, 5, 6))
      kl_grad = jax.jit(oracle.exact_kl_grad, static_argnums=(0, 4, 5, 6))
      for i, j in PAIRS[:2]:
        grad = kl_grad(f, params, i, j, vocab, length, eos_id)
        chex.assert_trees_all_equal_shapes(grad, params)
        d = lambda eps: kl(f, params + eps * direction, i, j, vocab, length,
                           eos_id)
        eps = 1e-5
        fd = (d(eps) - d(-eps)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=1e-7)
        # Latents other than i and j get no gradient.
        other = 3 - i - j
        np.testing.assert_array_equal(grad[other], 0.0)


class MutualInformationTest(X64):

  def test_exact_mi_matches_numpy(self):
    for name, eos_id in [("v3l3", None), ("v3l3", 2), ("v2l4", 1)]:
      vocab, length, params = _model(name)
      rows = _np_context_rows(vocab, length)
      total = 0.0
      for y in _np_sequences(vocab, length, eos_id):
        lp = np.array([_np_logprob(params, k, y, rows) for k in range(K)])
        log_mix = np.log(np.mean(np.exp(lp)))
        total += np.sum(np.exp(lp) * (lp - log_mix)) / K
      got = oracle.exact_mutual_information(f, params, K, vocab, length, eos_id)
      np.testing.assert_allclose(got, total, rtol=1e-10)
      self.assertBetween(float(got), 0.0, np.log(K))

  def test_bounds_are_reached(self):
    vocab, length, params = _model("v3l3")
    same = jnp.broadcast_to(params[:1], params.shape)
    np.testing.assert_allclose(
        oracle.exact_mutual_information(f, same, K, vocab, length), 0.0, atol=1e-12)
    # Latent k always writes token k: disjoint supports, I = log K.
    apart = jnp.broadcast_to(30.0 * jnp.eye(K)[:, None, :], params.shape)
    np.testing.assert_allclose(
        oracle.exact_mutual_information(f, apart, K, vocab, length), np.log(K), rtol=1e-9)

  def test_exact_mi_grad_matches_finite_differences(self):
    vocab, length, params = _model("v2l4")
    direction = jax.random.normal(jax.random.PRNGKey(6), params.shape)
    grad = oracle.exact_mutual_information_grad(f, params, K, vocab, length, 1)
    value = lambda eps: oracle.exact_mutual_information(  # noqa: E731
        f, params + eps * direction, K, vocab, length, 1)
    eps = 1e-5
    np.testing.assert_allclose(jnp.vdot(grad, direction),
                               (value(eps) - value(-eps)) / (2 * eps), rtol=1e-7)


class HelpersTest(X64):

  @chex.variants(with_jit=True, without_jit=True)
  def test_relative_error(self):
    a = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([[3.0]])}
    b = {"x": jnp.array([1.5, 2.0]), "y": jnp.array([[2.0]])}
    got = self.variant(oracle.relative_error)(a, b)
    chex.assert_shape(got, ())
    np.testing.assert_allclose(
        got, np.sqrt(0.25 + 1.0) / np.sqrt(1.5**2 + 4 + 4), rtol=1e-12)
    self.assertEqual(float(self.variant(oracle.relative_error)(b, b)), 0.0)
    with self.assertRaisesRegex(ValueError, "a_tree, b_tree"):
      oracle.relative_error({"x": jnp.ones(2)}, {"x": jnp.ones(3)})

  @chex.variants(with_jit=True, without_jit=True)
  def test_chi_square_statistic(self):
    counts = jnp.array([10, 25, 15, 0])
    probs = jnp.array([0.2, 0.5, 0.3, 0.0])
    stat, dof = self.variant(oracle.chi_square_statistic)(counts, probs)
    want = scipy.stats.chisquare([10, 25, 15], 50 * np.array([0.2, 0.5, 0.3]))
    np.testing.assert_allclose(stat, want.statistic, rtol=1e-12)
    self.assertEqual(int(dof), 2)
    stat, _ = oracle.chi_square_statistic(jnp.array([1, 2, 1]),
                                          jnp.array([0.5, 0.5, 0.0]))
    self.assertEqual(float(stat), np.inf)
    with self.assertRaisesRegex(ValueError, "counts_M, probs_M"):
      oracle.chi_square_statistic(jnp.ones(3), jnp.ones(4))


# ---------------------------------------------------------------------------
# Monte Carlo over exact samples.
# ---------------------------------------------------------------------------


class MonteCarloTest(X64):

  def test_sampler_chi_square(self):
    vocab, length, params = _model("v3l3")
    sample = jax.jit(oracle.sample_sequences, static_argnums=(1, 4, 5, 6, 7))
    for eos_id in [None, 2]:
      n = 20000
      tokens, mask = sample(jax.random.PRNGKey(0), f, params, 1, vocab, length,
                            n, eos_id)
      chex.assert_shape([tokens, mask], (n, length))
      counts = jnp.bincount(oracle.sequence_index(tokens, vocab),
                            length=vocab**length)
      probs = jnp.exp(oracle.exact_sequence_logprobs(f, params, 1, vocab,
                                                     length, eos_id))
      stat, dof = oracle.chi_square_statistic(counts, probs)
      p_value = scipy.stats.chi2.sf(float(stat), int(dof))
      self.assertGreater(p_value, 1e-3)


# ---------------------------------------------------------------------------
# On-policy distillation.
# ---------------------------------------------------------------------------


class OpdTest(X64):

  def test_exact_opd_kl_matches_numpy(self):
    for name, eos_id in [("v3l3", 2), ("v2l4", None)]:
      vocab, length, sfn, sp, tfn, tp = _student_teacher(name)
      got = oracle.exact_opd_kl(sfn, sp, tfn, tp, vocab, length, eos_id)
      np.testing.assert_allclose(
          got, _np_kl(sp, 0, tp, 0, vocab, length, eos_id), rtol=1e-10)

  def test_exact_opd_kl_ignores_the_teacher_gradient(self):
    vocab, length, sfn, sp, tfn, tp = _student_teacher("v3l3")
    teacher_grad = jax.grad(lambda t: oracle.exact_opd_kl(
        sfn, sp, tfn, t, vocab, length))(tp)
    np.testing.assert_array_equal(teacher_grad, 0.0)


class JitTest(X64):

  @chex.variants(with_jit=True, without_jit=True)
  def test_oracle_under_jit(self):
    vocab, length, params = _model("v2l4")
    kl = self.variant(lambda w, i, j: oracle.exact_kl(f, w, i, j, vocab,
                                                      length, 1))(params, 0, 1)
    chex.assert_shape(kl, ())
    np.testing.assert_allclose(kl, _np_kl(params, 0, params, 1, vocab, length,
                                          1), rtol=1e-10)
    logp = self.variant(lambda w: oracle.exact_sequence_logprobs(
        f, w, 2, vocab, length))(params)
    chex.assert_shape(logp, (vocab**length,))
    tokens, mask = self.variant(lambda key: oracle.sample_sequences(
        key, f, params, 0, vocab, length, 7))(jax.random.PRNGKey(0))
    chex.assert_shape([tokens, mask], (7, length))
    index = self.variant(functools.partial(oracle.sequence_index,
                                           vocab_size=vocab))(tokens)
    chex.assert_shape(index, (7,))
    step = self.variant(lambda w: oracle.exact_step_log_probs(
        f, w, 0, vocab, length))(params)
    chex.assert_shape(step, (vocab**length, length, vocab))
    sfn = oracle.bind(f, 0)
    tfn = oracle.bind(f, 1)
    kl, grad = self.variant(lambda s, t: (
        oracle.exact_opd_kl(sfn, s, tfn, t, vocab, length, 1),
        oracle.exact_opd_kl_grad(sfn, s, tfn, t, vocab, length, 1)))(params, params)
    chex.assert_shape(kl, ())
    chex.assert_trees_all_equal_shapes(grad, params)
    np.testing.assert_allclose(kl, _np_kl(params, 0, params, 1, vocab, length, 1),
                               rtol=1e-10)


class SizesTest(absltest.TestCase):

  def test_num_sequences(self):
    self.assertEqual(oracle.num_sequences(3, 4), 81)
    self.assertEqual(oracle.num_sequences(3, 4, group_size=2), 81)
    with self.assertRaisesRegex(ValueError, "too many to enumerate in pairs"):
      oracle.num_sequences(4, 6, group_size=2)
    with self.assertRaisesRegex(ValueError, "in groups of 3"):
      oracle.num_sequences(4, 4, group_size=3)
    with self.assertRaisesRegex(ValueError, "too many to enumerate \\("):
      oracle.num_sequences(2, 21)
    with self.assertRaisesRegex(ValueError, "group_size >= 1"):
      oracle.num_sequences(2, 2, group_size=0)


if __name__ == "__main__":
  absltest.main()
