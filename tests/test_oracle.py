"""Exact-enumeration checks of the estimators (DESIGN.md §7), in float64.

The oracle itself is checked against independent NumPy enumerations (sequence
probabilities, KL with and without EOS truncation, finite differences); then
every estimator of latentdiv/estimators.py is shown unbiased exactly, the
deliberately biased ones are shown biased, exact variances are compared, and a
Monte-Carlo mean over exact samples is checked against the exact gradient.
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

from latentdiv import estimators as est
from latentdiv import oracle

K = 3
# name: (V, L, seed, logit scale).
MODELS = {"v3l3": (3, 3, 0, 1.0), "v2l4": (2, 4, 1, 1.5)}
PAIRS = ((0, 1), (2, 0), (1, 2))
EXACT_TOL = 1e-6
BIAS_MIN = 0.05
f = oracle.tabular_logits_fn


def _model(name):
  vocab, length, seed, scale = MODELS[name]
  params = oracle.init_tabular_params(
      jax.random.PRNGKey(seed), K, vocab, length, scale)
  return vocab, length, params


def _neg(tree):
  return jax.tree.map(jnp.negative, tree)


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


def _np_jsd_to_go(params, i, j, y_star):
  """Σ_{t'≥t} JSD(p_i(·|y*_<t'), p_j(·|y*_<t')) on a data sequence y*."""
  vocab, length = params.shape[-1], len(y_star)
  rows = _np_context_rows(vocab, length)
  jsd = []
  for t in range(length):
    row = rows[tuple(y_star[:t])]
    p = np.exp(_np_log_softmax(np.asarray(params[i, row])))
    q = np.exp(_np_log_softmax(np.asarray(params[j, row])))
    m = 0.5 * (p + q)
    jsd.append(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))
  return np.cumsum(np.array(jsd)[::-1])[::-1]


# ---------------------------------------------------------------------------
# Baselines, as oracle baseline_fn(tokens_L, r_t, kl_t, mask_t).
# ---------------------------------------------------------------------------


def _valid_baselines(params, i, j, length):
  """Baselines that never look at y_t or later tokens: must stay unbiased."""
  jsd_to_go = jnp.asarray(_np_jsd_to_go(params, i, j, (0,) * length))

  def prefix_tokens(y, r, kl, m):
    del r, kl, m
    prev = jnp.concatenate([jnp.zeros((1,), y.dtype), y[:-1]])
    return 0.1 + 0.3 * prev.astype(jsd_to_go.dtype)

  return {
      "none": None,
      "ema_constant": lambda y, r, kl, m: jnp.asarray(0.8, r.dtype),
      "jsd_control_variate": lambda y, r, kl, m: est.jsd_control_variate(
          jnp.asarray(0.6, r.dtype), jsd_to_go),
      "prefix_tokens": prefix_tokens,
      "context_kl": lambda y, r, kl, m: 1.3 * kl,
  }


MISSPECIFIED_BASELINES = {
    "sampled_reward": lambda y, r, kl, m: r,
    "current_token": lambda y, r, kl, m: 0.3 * y.astype(r.dtype),
}


class _X64(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))


# ---------------------------------------------------------------------------
# The oracle's own machinery.
# ---------------------------------------------------------------------------


class EnumerationTest(_X64):

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


class MomentsTest(_X64):

  def test_one_hot_estimator_closed_form(self):
    # g(y) = e_y: mean = p, total variance = 1 − ‖p‖².
    for name, eos_id in [("v3l3", None), ("v2l4", 1)]:
      vocab, length, params = _model(name)
      num = vocab**length
      g = lambda y, m: {"e": jax.nn.one_hot(
          oracle.sequence_index(y[None], vocab)[0], num)}
      moments = oracle.estimator_moments(g, f, params, 2, vocab, length, eos_id)
      p = jnp.exp(oracle.exact_sequence_logprobs(f, params, 2, vocab, length,
                                                 eos_id))
      np.testing.assert_allclose(moments.mean["e"], p, atol=1e-14)
      np.testing.assert_allclose(moments.variance, 1 - jnp.sum(p**2),
                                 rtol=1e-12)

  def test_pair_moments_closed_form(self):
    # g(y, y') = e_y + e_y': mean = 2p, total variance = 2(1 − ‖p‖²).
    vocab, length, params = _model("v3l3")
    num = vocab**length
    g = lambda y2, m2: jax.nn.one_hot(oracle.sequence_index(y2, vocab),
                                      num).sum(0)
    for chunk_size in [100, 4096]:  # 729 pairs: padded and single chunk.
      moments = oracle.pair_estimator_moments(g, f, params, 0, vocab, length,
                                              chunk_size=chunk_size)
      p = jnp.exp(oracle.exact_sequence_logprobs(f, params, 0, vocab, length))
      np.testing.assert_allclose(moments.mean, 2 * p, atol=1e-14)
      np.testing.assert_allclose(moments.variance, 2 * (1 - jnp.sum(p**2)),
                                 rtol=1e-12)
    with self.assertRaisesRegex(ValueError, "in pairs"):
      oracle.pair_estimator_moments(g, f, params, 0, 4, 6)

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
# Unbiasedness and variance of the inter-latent estimators.
# ---------------------------------------------------------------------------


class UnbiasednessTest(_X64):

  @parameterized.product(model=tuple(MODELS), estimator=est.ESTIMATORS)
  def test_estimator_is_unbiased(self, model, estimator):
    vocab, length, params = _model(model)
    for i, j in PAIRS:
      true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
      baselines = (_valid_baselines(params, i, j, length)
                   if est.uses_baseline(estimator) else {"none": None})
      for name, baseline_fn in baselines.items():
        moments = oracle.estimator_gradient_moments(
            f, params, i, j, estimator, vocab, length, baseline_fn=baseline_fn)
        chex.assert_trees_all_equal_shapes(moments.mean, params)
        err = oracle.relative_error(moments.mean, true)
        self.assertLess(float(err), EXACT_TOL, msg=f"{estimator}/{name}/{i}{j}")

  @parameterized.product(model=tuple(MODELS),
                         estimator=est.BASELINED_ESTIMATORS)
  def test_leave_one_out_baseline_is_unbiased(self, model, estimator):
    vocab, length, params = _model(model)
    i, j = PAIRS[0] if model == "v3l3" else PAIRS[1]
    true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
    moments = oracle.leave_one_out_gradient_moments(f, params, i, j, estimator,
                                                    vocab, length)
    self.assertLess(float(oracle.relative_error(moments.mean, true)),
                    EXACT_TOL)
    self.assertGreater(float(moments.variance), 0.0)

  def test_leave_one_out_rejects_unbaselined(self):
    vocab, length, params = _model("v3l3")
    with self.assertRaisesRegex(ValueError, "takes no baseline"):
      oracle.leave_one_out_gradient_moments(f, params, 0, 1, "trajectory",
                                            vocab, length)

  @parameterized.parameters(*MODELS)
  def test_per_token_reward_is_biased(self, model):
    vocab, length, params = _model(model)
    for i, j in PAIRS:
      true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
      moments = oracle.estimator_gradient_moments(
          f, params, i, j, "per_token_reward", vocab, length)
      self.assertGreater(float(oracle.relative_error(moments.mean, true)),
                         BIAS_MIN)

  @parameterized.product(model=tuple(MODELS),
                         estimator=est.BASELINED_ESTIMATORS)
  def test_misspecified_baselines_are_biased(self, model, estimator):
    vocab, length, params = _model(model)
    for i, j in PAIRS[:2]:
      true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
      for name, baseline_fn in MISSPECIFIED_BASELINES.items():
        moments = oracle.estimator_gradient_moments(
            f, params, i, j, estimator, vocab, length, baseline_fn=baseline_fn)
        err = oracle.relative_error(moments.mean, true)
        self.assertGreater(float(err), BIAS_MIN, msg=name)

  @parameterized.parameters(*est.ESTIMATORS)
  def test_unbiased_with_eos_truncation(self, estimator):
    vocab, length, params = _model("v3l3")
    for i, j in PAIRS[:2]:
      true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length,
                                       eos_id=2))
      bl = (lambda y, r, kl, m: 0.5 * kl + 0.2) if est.uses_baseline(
          estimator) else None
      moments = oracle.estimator_gradient_moments(
          f, params, i, j, estimator, vocab, length, baseline_fn=bl, eos_id=2)
      self.assertLess(float(oracle.relative_error(moments.mean, true)),
                      EXACT_TOL)
    moments = oracle.estimator_gradient_moments(
        f, params, 0, 1, "per_token_reward", vocab, length, eos_id=2)
    true = _neg(oracle.exact_kl_grad(f, params, 0, 1, vocab, length, eos_id=2))
    self.assertGreater(float(oracle.relative_error(moments.mean, true)),
                       BIAS_MIN)

  @parameterized.parameters(*est.ESTIMATORS)
  def test_without_pathwise_estimates_score_part_only(self, estimator):
    # pathwise=False treats q = sg(p_j): the mean is −∇_θ through p_i only,
    # i.e. the gradient of KL(p_i ‖ p_j) with p_j's parameters frozen.
    vocab, length, params = _model("v2l4")
    i, j = 0, 1
    moments = oracle.estimator_gradient_moments(
        f, params, i, j, estimator, vocab, length, pathwise=False)
    score_only = oracle.exact_opd_kl_grad(
        lambda p, y: f(p, y, i), params, lambda p, y: f(p, y, j), params,
        vocab, length)
    self.assertLess(
        float(oracle.relative_error(moments.mean, _neg(score_only))),
        EXACT_TOL)
    full = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
    self.assertGreater(float(oracle.relative_error(moments.mean, full)),
                       BIAS_MIN)


class VarianceTest(_X64):

  @parameterized.parameters(*MODELS)
  def test_variance_ordering(self, model):
    vocab, length, params = _model(model)
    for i, j in PAIRS:
      var = {
          e: float(oracle.estimator_gradient_moments(f, params, i, j, e, vocab,
                                                     length).variance)
          for e in ("trajectory", "reward_to_go", "kl_to_go", "rao_blackwell")
      }
      self.assertLess(var["rao_blackwell"], var["trajectory"], msg=str(var))
      self.assertLessEqual(var["reward_to_go"], var["trajectory"],
                           msg=str(var))
      self.assertGreater(var["rao_blackwell"], 0.0)

  def test_variance_matches_explicit_sum(self):
    # Σ_y p(y)‖g(y)‖² − ‖E g‖², with g(y) built by hand for every y.
    vocab, length, params = _model("v3l3")
    i, j, estimator = 1, 2, "kl_to_go"
    moments = oracle.estimator_gradient_moments(f, params, i, j, estimator,
                                                vocab, length)
    seqs = oracle.all_sequences(vocab, length)
    p = np.exp(np.asarray(oracle.exact_sequence_logprobs(f, params, i, vocab,
                                                         length)))
    grad_fn = jax.jit(jax.grad(
        lambda w, y: est.sequence_kl_surrogate_from_logits(
            estimator, f(w, y[None], i)[0], f(w, y[None], j)[0], y,
            jnp.ones(length))))
    second = 0.0
    for y, py in zip(seqs, p):
      second += py * float(jnp.sum(grad_fn(params, y)**2))
    want = second - float(jnp.sum(moments.mean**2))
    np.testing.assert_allclose(moments.variance, want, rtol=1e-10)


# ---------------------------------------------------------------------------
# Monte Carlo over exact samples.
# ---------------------------------------------------------------------------


class MonteCarloTest(_X64):

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

  @parameterized.parameters(*MODELS)
  def test_sample_mean_converges_to_exact_gradient(self, model):
    vocab, length, params = _model(model)
    i, j, n = 2, 0, 4000
    tokens, mask = oracle.sample_sequences(jax.random.PRNGKey(42), f, params,
                                           i, vocab, length, n)
    true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))

    def batch_loss(w, estimator):
      return jnp.mean(jax.vmap(
          functools.partial(est.sequence_kl_surrogate_from_logits, estimator))(
              f(w, tokens, i), f(w, tokens, j), tokens, mask))

    # One jitted program: the batch gradient of every estimator.
    mc_grads = jax.jit(lambda w: {
        e: jax.grad(batch_loss)(w, e) for e in est.ALL_ESTIMATORS})(params)
    for estimator in est.ALL_ESTIMATORS:
      mc = mc_grads[estimator]
      var = oracle.estimator_gradient_moments(f, params, i, j, estimator,
                                              vocab, length).variance
      sq_err = float(jnp.sum((mc - true)**2))
      if estimator in est.ESTIMATORS:
        self.assertLessEqual(sq_err, 5 * float(var) / n, msg=estimator)
      else:  # The biased coefficient is caught by the same check.
        self.assertGreater(sq_err, 5 * float(var) / n, msg=estimator)


# ---------------------------------------------------------------------------
# On-policy distillation.
# ---------------------------------------------------------------------------


class OpdTest(_X64):

  def _student_teacher(self, name):
    vocab, length, student = _model(name)
    teacher = oracle.init_tabular_params(jax.random.PRNGKey(11), 1, vocab,
                                         length, 2.0)
    return (vocab, length, lambda p, y: f(p, y, 0), student,
            lambda p, y: f(p, y, 0), teacher)

  @parameterized.product(model=tuple(MODELS), eos=[False, True])
  def test_every_estimator_unbiased(self, model, eos):
    vocab, length, sfn, sp, tfn, tp = self._student_teacher(model)
    eos_id = (vocab - 1) if eos else None
    true = oracle.exact_opd_kl_grad(sfn, sp, tfn, tp, vocab, length, eos_id)
    chex.assert_trees_all_equal_shapes(true, sp)
    for estimator in est.ALL_ESTIMATORS:
      baselines = [None]
      if est.uses_baseline(estimator):
        baselines += [lambda y, r, kl, m: 0.7 * kl - 0.1,
                      lambda y, r, kl, m: jnp.asarray(1.1, r.dtype)]
      for baseline_fn in baselines:
        moments = oracle.opd_gradient_moments(sfn, sp, tfn, tp, estimator,
                                              vocab, length, baseline_fn,
                                              eos_id)
        err = float(oracle.relative_error(moments.mean, true))
        if estimator == "per_token_reward":
          self.assertGreater(err, BIAS_MIN)
        else:
          self.assertLess(err, EXACT_TOL, msg=estimator)

  def test_exact_opd_kl_matches_numpy(self):
    for name, eos_id in [("v3l3", 2), ("v2l4", None)]:
      vocab, length, sfn, sp, tfn, tp = self._student_teacher(name)
      got = oracle.exact_opd_kl(sfn, sp, tfn, tp, vocab, length, eos_id)
      np.testing.assert_allclose(
          got, _np_kl(sp, 0, tp, 0, vocab, length, eos_id), rtol=1e-10)

  def test_teacher_gets_zero_gradient(self):
    vocab, length, sfn, sp, tfn, tp = self._student_teacher("v3l3")
    seqs = oracle.all_sequences(vocab, length)
    mask = jnp.ones(seqs.shape)
    for estimator in est.ALL_ESTIMATORS:

      def teacher_grad(y, m, estimator=estimator):
        return jax.grad(lambda t: est.opd_surrogate(
            estimator, sfn(sp, y[None])[0], tfn(t, y[None])[0], y, m))(tp)

      g = jax.vmap(teacher_grad)(seqs, mask)
      chex.assert_shape(g, (seqs.shape[0],) + tp.shape)
      np.testing.assert_array_equal(g, 0.0)
    teacher_grad = jax.grad(lambda t: oracle.exact_opd_kl(
        sfn, sp, tfn, t, vocab, length))(tp)
    np.testing.assert_array_equal(teacher_grad, 0.0)


class JitTest(_X64):

  @chex.variants(with_jit=True, without_jit=True)
  def test_moments_under_jit(self):
    vocab, length, params = _model("v2l4")
    fn = self.variant(lambda w, i, j: oracle.estimator_gradient_moments(
        f, w, i, j, "rao_blackwell", vocab, length))
    moments = fn(params, 0, 1)
    chex.assert_trees_all_equal_shapes(moments.mean, params)
    chex.assert_shape(moments.variance, ())
    true = _neg(oracle.exact_kl_grad(f, params, 0, 1, vocab, length))
    self.assertLess(float(oracle.relative_error(moments.mean, true)),
                    EXACT_TOL)
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

  @chex.variants(with_jit=True, without_jit=True)
  def test_opd_and_pairs_under_jit(self):
    vocab, length, params = _model("v2l4")
    sfn = lambda w, y: f(w, y, 0)
    tfn = lambda w, y: f(w, y, 1)
    kl, grad, moments = self.variant(lambda s, t: (
        oracle.exact_opd_kl(sfn, s, tfn, t, vocab, length, 1),
        oracle.exact_opd_kl_grad(sfn, s, tfn, t, vocab, length, 1),
        oracle.opd_gradient_moments(sfn, s, tfn, t, "kl_to_go", vocab, length,
                                    eos_id=1)))(params, params)
    chex.assert_shape(kl, ())
    chex.assert_trees_all_equal_shapes(grad, params)
    chex.assert_trees_all_equal_shapes(moments.mean, params)
    self.assertLess(float(oracle.relative_error(moments.mean, grad)),
                    EXACT_TOL)
    # 256 pairs in chunks of 100: the lax.scan path.
    loo = self.variant(lambda w: oracle.leave_one_out_gradient_moments(
        f, w, 0, 1, "rao_blackwell", vocab, length, chunk_size=100))(params)
    chex.assert_trees_all_equal_shapes(loo.mean, params)
    chex.assert_shape(loo.variance, ())
    true = _neg(oracle.exact_kl_grad(f, params, 0, 1, vocab, length))
    self.assertLess(float(oracle.relative_error(loo.mean, true)), EXACT_TOL)
    one_hot = self.variant(lambda w: oracle.estimator_moments(
        lambda y, m: jax.nn.one_hot(y, vocab), f, w, 2, vocab, length))(params)
    chex.assert_shape(one_hot.mean, (length, vocab))
    np.testing.assert_allclose(one_hot.mean.sum(-1), 1.0, atol=1e-12)


if __name__ == "__main__":
  absltest.main()
