"""Tests for latentdiv/estimators.py against brute-force NumPy references.

The unbiasedness of the estimators is proven by exact enumeration in
tests/test_oracle.py; here each pure function is checked against an
independent loop-based NumPy implementation of its equation, its gradient
structure (what is and is not stop-gradiented), shapes under jit / no-jit, and
its errors.
"""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from latentdiv import estimators as est

L = 5


def _np_coefficients(estimator, r, kl, mask, baseline=None):
  """Loop-over-t reference of DESIGN.md §5.3's table."""
  r = np.asarray(r, np.float64) * mask
  kl = np.asarray(kl, np.float64) * mask
  out = np.zeros_like(r)
  for t in range(len(r)):
    if not mask[t]:
      continue
    if estimator == "trajectory":
      a = r.sum()
    elif estimator in ("reward_to_go", "reward_to_go_baseline"):
      a = r[t:].sum()
    elif estimator in ("kl_to_go", "kl_to_go_baseline"):
      a = r[t] + kl[t + 1:].sum()
    elif estimator == "rao_blackwell":
      a = kl[t + 1:].sum()
    elif estimator == "per_token_reward":
      a = r[t]
    else:
      raise AssertionError(estimator)
    if baseline is not None:
      a -= np.broadcast_to(baseline, r.shape)[t]
    out[t] = a
  return out


def _random_inputs(seed, length=L, valid=3):
  rng = np.random.default_rng(seed)
  r = rng.normal(size=length).astype(np.float32)
  kl = rng.uniform(0.0, 2.0, size=length).astype(np.float32)
  mask = (np.arange(length) < valid).astype(np.float32)
  baseline = rng.normal(size=length).astype(np.float32)
  return r, kl, mask, baseline


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


class NamesTest(absltest.TestCase):

  def test_names(self):
    self.assertEqual(est.ESTIMATORS,
                     ("trajectory", "reward_to_go", "reward_to_go_baseline",
                      "kl_to_go", "kl_to_go_baseline", "rao_blackwell"))
    self.assertEqual(est.BIASED_ESTIMATORS, ("per_token_reward",))
    self.assertNotIn("per_token_reward", est.ESTIMATORS)
    for name in est.ALL_ESTIMATORS:
      self.assertEqual(est.uses_baseline(name),
                       name.endswith("_baseline") or name == "rao_blackwell")
    with self.assertRaisesRegex(ValueError, "allowed"):
      est.uses_baseline("reinforce")


class CoefficientsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_matches_numpy(self, estimator):
    fn = self.variant(functools.partial(est.per_token_coefficients,
                                        estimator))
    returns_fn = self.variant(functools.partial(est.estimator_returns,
                                                estimator))
    for seed, valid in [(0, 5), (1, 3), (2, 1), (3, 0)]:
      r, kl, mask, baseline = _random_inputs(seed, valid=valid)
      got = fn(r, kl, mask)
      chex.assert_shape(got, (L,))
      np.testing.assert_allclose(got, _np_coefficients(estimator, r, kl, mask),
                                 rtol=1e-5, atol=1e-5)
      returns = returns_fn(r, kl, mask)
      np.testing.assert_allclose(returns, got, rtol=1e-6, atol=1e-6)
      if est.uses_baseline(estimator):
        got_b = fn(r, kl, mask, baseline)
        np.testing.assert_allclose(
            got_b, _np_coefficients(estimator, r, kl, mask, baseline),
            rtol=1e-5, atol=1e-5)
        got_scalar = fn(r, kl, mask, jnp.float32(0.7))
        np.testing.assert_allclose(
            got_scalar, _np_coefficients(estimator, r, kl, mask, 0.7),
            rtol=1e-5, atol=1e-5)

  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_no_gradient_flows_through_coefficients(self, estimator):
    r, kl, mask, baseline = _random_inputs(4)
    b = baseline if est.uses_baseline(estimator) else None

    def total(r, kl, b):
      return jnp.sum(est.per_token_coefficients(estimator, r, kl, mask, b))

    grads = jax.grad(total, argnums=(0, 1))(r, kl, b)
    chex.assert_trees_all_close(grads, (np.zeros(L), np.zeros(L)))
    if b is not None:
      chex.assert_trees_all_close(jax.grad(total, argnums=2)(r, kl, b),
                                  np.zeros(L))

  def test_bool_mask(self):
    r, kl, mask, _ = _random_inputs(5)
    np.testing.assert_allclose(
        est.per_token_coefficients("kl_to_go", r, kl, mask.astype(bool)),
        est.per_token_coefficients("kl_to_go", r, kl, mask))

  def test_errors(self):
    r, kl, mask, baseline = _random_inputs(6)
    with self.assertRaisesRegex(ValueError, "allowed.*trajectory"):
      est.per_token_coefficients("reinforce", r, kl, mask)
    with self.assertRaisesRegex(ValueError, "takes no baseline"):
      est.per_token_coefficients("reward_to_go", r, kl, mask, baseline)
    with self.assertRaisesRegex(ValueError, "r_t, kl_t, mask_t"):
      est.per_token_coefficients("trajectory", r, kl[:-1], mask)
    with self.assertRaisesRegex(ValueError, "r_t, kl_t, mask_t"):
      est.per_token_coefficients("trajectory", r[None], kl[None], mask[None])
    with self.assertRaisesRegex(ValueError, "baseline_t"):
      est.per_token_coefficients("kl_to_go_baseline", r, kl, mask,
                                 baseline[:-1])
    with self.assertRaisesRegex(ValueError, "allowed"):
      est.estimator_returns("reinforce", r, kl, mask)


class ReverseCumsumTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    x = np.random.default_rng(0).normal(size=(3, L))
    got = self.variant(est.reverse_cumsum)(x)
    want = np.array([[x[b, t:].sum() for t in range(L)] for b in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class SurrogateTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(estimator=est.ALL_ESTIMATORS, pathwise=[True, False])
  def test_value_and_gradients(self, estimator, pathwise):
    rng = np.random.default_rng(7)
    logp = -rng.uniform(0.1, 2.0, size=L).astype(np.float32)
    logq = -rng.uniform(0.1, 2.0, size=L).astype(np.float32)
    kl = rng.uniform(0.0, 1.0, size=L).astype(np.float32)
    mask = (np.arange(L) < 4).astype(np.float32)
    baseline = (rng.normal(size=L).astype(np.float32)
                if est.uses_baseline(estimator) else None)
    fn = self.variant(
        functools.partial(est.sequence_kl_surrogate, estimator,
                          pathwise=pathwise))
    value = fn(logp, logq, kl, mask, baseline)
    chex.assert_shape(value, ())
    a = _np_coefficients(estimator, logp - logq, kl, mask, baseline)
    if estimator == "rao_blackwell":
      want = -np.sum(kl * mask) - np.sum(a * logp * mask)
    else:
      want = -np.sum(a * logp * mask) + pathwise * np.sum(logq * mask)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
    g_p, g_q, g_kl = jax.grad(fn, argnums=(0, 1, 2))(logp, logq, kl, mask,
                                                   baseline)
    # Score term: d S / d log p_t = −A_t (r_t is stop-gradiented).
    np.testing.assert_allclose(g_p, -a * mask, rtol=1e-5, atol=1e-6)
    if estimator == "rao_blackwell":
      np.testing.assert_allclose(g_q, np.zeros(L), atol=0)
      np.testing.assert_allclose(g_kl, -mask, atol=0)
    else:
      np.testing.assert_allclose(g_q, mask * pathwise, atol=0)
      np.testing.assert_allclose(g_kl, np.zeros(L), atol=0)

  def test_errors(self):
    x = jnp.zeros(L)
    with self.assertRaisesRegex(ValueError, "allowed"):
      est.sequence_kl_surrogate("bogus", x, x, x, x)
    with self.assertRaisesRegex(ValueError, "logp_score_t"):
      est.sequence_kl_surrogate("trajectory", x, x[:-1], x, x)
    with self.assertRaisesRegex(ValueError, "takes no baseline"):
      est.sequence_kl_surrogate("kl_to_go", x, x, x, x, baseline_t=x)


class PerTokenTermsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    rng = np.random.default_rng(1)
    lp = rng.normal(size=(L, 4)).astype(np.float32)
    lq = rng.normal(size=(L, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=L)
    terms = self.variant(est.per_token_terms)(lp, lq, y)
    chex.assert_shape([terms.logp_score_t, terms.logp_target_t, terms.kl_t],
                      (L,))
    np_lp, np_lq = _np_log_softmax(lp), _np_log_softmax(lq)
    np.testing.assert_allclose(terms.logp_score_t, np_lp[np.arange(L), y],
                               rtol=1e-5)
    np.testing.assert_allclose(terms.logp_target_t, np_lq[np.arange(L), y],
                               rtol=1e-5)
    np.testing.assert_allclose(
        terms.kl_t, (np.exp(np_lp) * (np_lp - np_lq)).sum(-1), rtol=1e-4,
        atol=1e-6)
    self.assertTrue(np.all(np.asarray(terms.kl_t) >= 0))

  def test_extreme_logits_are_finite(self):
    lp = jnp.array([[1e4, -1e4, 0.0]] * 2)
    lq = jnp.array([[-1e4, 1e4, 0.0]] * 2)
    terms = est.per_token_terms(lp, lq, jnp.array([0, 2]))
    self.assertTrue(np.all(np.isfinite(np.asarray(terms.kl_t))))

  def test_errors(self):
    x = jnp.zeros((L, 3))
    with self.assertRaisesRegex(ValueError, "logits_score_LxV"):
      est.per_token_terms(x, jnp.zeros((L, 4)), jnp.zeros(L, jnp.int32))
    with self.assertRaisesRegex(ValueError, "tokens_L"):
      est.per_token_terms(x, x, jnp.zeros(L + 1, jnp.int32))


class LogitSurrogatesTest(parameterized.TestCase):

  def _inputs(self):
    rng = np.random.default_rng(3)
    lp = rng.normal(size=(L, 4)).astype(np.float32)
    lq = rng.normal(size=(L, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=L).astype(np.int32)
    mask = (np.arange(L) < 4).astype(np.float32)
    return lp, lq, y, mask

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_from_logits_matches_array_version(self, estimator):
    lp, lq, y, mask = self._inputs()
    b = np.linspace(0.0, 1.0, L) if est.uses_baseline(estimator) else None
    fn = self.variant(
        functools.partial(est.sequence_kl_surrogate_from_logits, estimator))
    terms = est.per_token_terms(lp, lq, y)
    want = est.sequence_kl_surrogate(estimator, *terms, mask, b)
    np.testing.assert_allclose(fn(lp, lq, y, mask, b), want, rtol=1e-6)

  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_pathwise_flag_controls_target_gradient(self, estimator):
    lp, lq, y, mask = self._inputs()
    grad = lambda pw: jax.grad(
        lambda q: est.sequence_kl_surrogate_from_logits(
            estimator, lp, q, y, mask, pathwise=pw))(lq)
    chex.assert_trees_all_close(grad(False), np.zeros_like(lq))
    self.assertGreater(float(jnp.abs(grad(True)).sum()), 1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_opd_sign_and_frozen_teacher(self, estimator):
    lp, lq, y, mask = self._inputs()
    b = np.linspace(0.0, 1.0, L) if est.uses_baseline(estimator) else None
    fn = self.variant(functools.partial(est.opd_surrogate, estimator))
    value = fn(lp, lq, y, mask, b)
    chex.assert_shape(value, ())
    want = -est.sequence_kl_surrogate_from_logits(estimator, lp, lq, y, mask,
                                                  b, pathwise=False)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    # The teacher gets no gradient, even through KL_t (rao_blackwell).
    g_teacher = jax.grad(fn, argnums=1)(lp, lq, y, mask, b)
    chex.assert_trees_all_close(g_teacher, np.zeros_like(lq))
    # Sign: d L_opd / d log π(y_t|c_t) = +A_t (descending it lowers log π
    # where the log-ratio to go is large).
    terms = est.per_token_terms(lp, lq, y)
    a = _np_coefficients(estimator, terms.logp_score_t - terms.logp_target_t,
                         terms.kl_t, mask, b)
    g_logp = jax.grad(
        lambda lp_t: -est.sequence_kl_surrogate(
            estimator, lp_t, terms.logp_target_t, terms.kl_t, mask, b,
            pathwise=False))(terms.logp_score_t)
    np.testing.assert_allclose(g_logp, a * mask, rtol=1e-5, atol=1e-6)

  def test_opd_shared_parameters_leak_nothing_to_teacher(self):
    # Student and teacher are one model at two latents sharing parameters.
    w = jnp.asarray(np.random.default_rng(0).normal(size=(2, L, 4)))
    _, _, y, mask = self._inputs()
    for estimator in est.ESTIMATORS:
      shared = jax.grad(lambda w: est.opd_surrogate(estimator, w[0], w[1], y,
                                                    mask))(w)
      student_only = jax.grad(lambda w: est.opd_surrogate(
          estimator, w[0], jax.lax.stop_gradient(w[1]), y, mask))(w)
      chex.assert_trees_all_close(shared, student_only)
      chex.assert_trees_all_close(shared[1], np.zeros((L, 4)))


class LeaveOneOutTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    rng = np.random.default_rng(0)
    n = 4
    returns = rng.normal(size=(n, L)).astype(np.float32)
    mask = np.ones((n, L), np.float32)
    mask[0, 3:] = 0
    mask[1, 1:] = 0
    mask[2, 1:] = 0
    mask[3, 1:] = 0  # Position 1.. is valid only in rollout 0 (partly).
    got = self.variant(est.leave_one_out_baseline)(returns, mask)
    chex.assert_shape(got, (n, L))
    want = np.zeros((n, L))
    for i in range(n):
      for t in range(L):
        others = [returns[m, t] for m in range(n) if m != i and mask[m, t]]
        want[i, t] = np.mean(others) if others else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  def test_two_rollouts_swap(self):
    returns = jnp.array([[1.0, 2.0], [3.0, 5.0]])
    got = est.leave_one_out_baseline(returns, jnp.ones((2, 2)))
    np.testing.assert_allclose(got, returns[::-1])

  def test_no_gradient(self):
    returns = jnp.ones((3, L))
    g = jax.grad(lambda x: est.leave_one_out_baseline(x, jnp.ones(
        (3, L))).sum())(returns)
    chex.assert_trees_all_close(g, np.zeros((3, L)))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "N >= 2"):
      est.leave_one_out_baseline(jnp.ones((1, L)), jnp.ones((1, L)))
    with self.assertRaisesRegex(ValueError, "returns_NxL, mask_NxL"):
      est.leave_one_out_baseline(jnp.ones((2, L)), jnp.ones((2, L + 1)))
    with self.assertRaisesRegex(ValueError, "returns_NxL, mask_NxL"):
      est.leave_one_out_baseline(jnp.ones((L,)), jnp.ones((L,)))


class EmaAndControlVariateTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ema_update(self):
    got = self.variant(functools.partial(est.ema_update, decay=0.9))(
        jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0]))
    np.testing.assert_allclose(got, [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1],
                               rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "ema, value"):
      est.ema_update(jnp.zeros(2), jnp.zeros(3), 0.9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jsd_control_variate(self):
    j = jnp.array([0.5, 0.3, 0.1])
    got = self.variant(est.jsd_control_variate)(jnp.float32(2.0), j)
    np.testing.assert_allclose(got, 2.0 * np.asarray(j), rtol=1e-6)
    g = jax.grad(lambda c: est.jsd_control_variate(c, j).sum())(1.0)
    self.assertEqual(float(g), 0.0)
    with self.assertRaisesRegex(ValueError, "c"):
      est.jsd_control_variate(jnp.ones(2), j)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fit_first_batch_is_least_squares(self):
    rng = np.random.default_rng(0)
    jsd = rng.uniform(size=(6, L)).astype(np.float32)
    ret = (2.0 * jsd + 0.3 * rng.normal(size=(6, L))).astype(np.float32)
    mask = (rng.uniform(size=(6, L)) < 0.8).astype(np.float32)
    fit = self.variant(
        functools.partial(est.fit_control_variate_coefficient, decay=0.9))
    state, c = fit(est.init_control_variate_state(), ret, jsd, mask=mask)
    chex.assert_shape(c, ())
    w = mask.ravel().astype(bool)
    r, j = ret.ravel()[w], jsd.ravel()[w]
    want = np.mean((r - r.mean()) * (j - j.mean())) / np.var(j)
    np.testing.assert_allclose(c, want, rtol=1e-4)
    self.assertEqual(int(state.count), 1)

  def test_fit_ema_over_batches(self):
    rng = np.random.default_rng(1)
    decay = 0.8
    state = est.init_control_variate_state(jnp.float32)
    moments = np.zeros(4)
    for k in range(1, 4):
      j = rng.uniform(size=32)
      r = -1.5 * j + 0.1 * rng.normal(size=32) + k
      state, c = est.fit_control_variate_coefficient(state, r, j, decay)
      moments = decay * moments + (1 - decay) * np.array(
          [r.mean(), j.mean(), (r * j).mean(), (j * j).mean()])
    m = moments / (1 - decay**3)
    want = (m[2] - m[0] * m[1]) / (m[3] - m[1]**2)
    np.testing.assert_allclose(c, want, rtol=1e-3)
    np.testing.assert_allclose(
        est.control_variate_coefficient(state, decay), c, rtol=1e-6)

  def test_fit_degenerate(self):
    self.assertEqual(
        float(est.control_variate_coefficient(est.init_control_variate_state(),
                                              0.9)), 0.0)
    _, c = est.fit_control_variate_coefficient(
        est.init_control_variate_state(), jnp.arange(4.0), jnp.ones(4), 0.9)
    self.assertEqual(float(c), 0.0)  # Var(Ĵ) = 0.
    with self.assertRaisesRegex(ValueError, "returns, jsd_values"):
      est.fit_control_variate_coefficient(est.init_control_variate_state(),
                                          jnp.ones(3), jnp.ones(4), 0.9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_explained_variance(self):
    rng = np.random.default_rng(2)
    ret = rng.normal(size=(4, L))
    base = 0.8 * ret + 0.1 * rng.normal(size=(4, L))
    mask = (rng.uniform(size=(4, L)) < 0.7).astype(np.float64)
    fn = self.variant(est.explained_variance)
    w = mask.astype(bool)
    want = 1 - np.var((ret - base)[w]) / np.var(ret[w])
    np.testing.assert_allclose(fn(ret, base, mask), want, rtol=1e-4)
    np.testing.assert_allclose(fn(ret, ret), 1.0, atol=1e-6)
    np.testing.assert_allclose(fn(ret, np.full_like(ret, 3.0)), 0.0,
                               atol=1e-5)
    self.assertEqual(float(fn(np.ones(3), np.zeros(3))), 0.0)
    with self.assertRaisesRegex(ValueError, "returns, baseline"):
      est.explained_variance(jnp.ones(3), jnp.ones(2))


if __name__ == "__main__":
  absltest.main()
