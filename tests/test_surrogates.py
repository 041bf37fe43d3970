"""Tests for latentdiv/surrogates.py: the single-rollout surrogates.

Each is checked against the loop-based NumPy reference of DESIGN.md §5.3's
coefficients (``test_estimators._np_coefficients``), for its gradient
structure (what is stop-gradiented; the frozen teacher) and its errors. The
batched primitive they wrap is tested in tests/test_estimators.py and proven
unbiased by enumeration in tests/test_moments.py.
"""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from latentdiv import estimators as est
from latentdiv import surrogates
from test_estimators import L, _np_coefficients, _random_inputs


class CoefficientsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_matches_numpy(self, estimator):
    fn = self.variant(functools.partial(surrogates.per_token_coefficients,
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
      return jnp.sum(surrogates.per_token_coefficients(estimator, r, kl, mask, b))

    grads = jax.grad(total, argnums=(0, 1))(r, kl, b)
    chex.assert_trees_all_close(grads, (np.zeros(L), np.zeros(L)))
    if b is not None:
      chex.assert_trees_all_close(jax.grad(total, argnums=2)(r, kl, b),
                                  np.zeros(L))

  def test_bool_mask(self):
    r, kl, mask, _ = _random_inputs(5)
    np.testing.assert_allclose(
        surrogates.per_token_coefficients("kl_to_go", r, kl, mask.astype(bool)),
        surrogates.per_token_coefficients("kl_to_go", r, kl, mask))

  def test_errors(self):
    r, kl, mask, baseline = _random_inputs(6)
    with self.assertRaisesRegex(ValueError, "allowed.*trajectory"):
      surrogates.per_token_coefficients("reinforce", r, kl, mask)
    with self.assertRaisesRegex(ValueError, "takes no baseline"):
      surrogates.per_token_coefficients("reward_to_go", r, kl, mask, baseline)
    with self.assertRaisesRegex(ValueError, "r_t, kl_t, mask_t"):
      surrogates.per_token_coefficients("trajectory", r, kl[:-1], mask)
    with self.assertRaisesRegex(ValueError, "r_t, kl_t, mask_t"):
      surrogates.per_token_coefficients("trajectory", r[None], kl[None], mask[None])
    with self.assertRaisesRegex(ValueError, "baseline_t"):
      surrogates.per_token_coefficients("kl_to_go_baseline", r, kl, mask,
                                 baseline[:-1])
    with self.assertRaisesRegex(ValueError, "allowed"):
      est.estimator_returns("reinforce", r, kl, mask)


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
        functools.partial(surrogates.sequence_kl_surrogate, estimator,
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
      surrogates.sequence_kl_surrogate("bogus", x, x, x, x)
    with self.assertRaisesRegex(ValueError, "logp_score_t"):
      surrogates.sequence_kl_surrogate("trajectory", x, x[:-1], x, x)
    with self.assertRaisesRegex(ValueError, "takes no baseline"):
      surrogates.sequence_kl_surrogate("kl_to_go", x, x, x, x, baseline_t=x)


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
        functools.partial(surrogates.sequence_kl_surrogate_from_logits, estimator))
    terms = est.per_token_terms(lp, lq, y)
    want = surrogates.sequence_kl_surrogate(estimator, *terms, mask, b)
    np.testing.assert_allclose(fn(lp, lq, y, mask, b), want, rtol=1e-6)

  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_pathwise_flag_controls_target_gradient(self, estimator):
    lp, lq, y, mask = self._inputs()
    grad = lambda pw: jax.grad(
        lambda q: surrogates.sequence_kl_surrogate_from_logits(
            estimator, lp, q, y, mask, pathwise=pw))(lq)
    chex.assert_trees_all_close(grad(False), np.zeros_like(lq))
    self.assertGreater(float(jnp.abs(grad(True)).sum()), 1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_opd_sign_and_frozen_teacher(self, estimator):
    lp, lq, y, mask = self._inputs()
    b = np.linspace(0.0, 1.0, L) if est.uses_baseline(estimator) else None
    fn = self.variant(functools.partial(surrogates.opd_surrogate, estimator))
    value = fn(lp, lq, y, mask, b)
    chex.assert_shape(value, ())
    want = -surrogates.sequence_kl_surrogate_from_logits(estimator, lp, lq, y, mask,
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
        lambda lp_t: -surrogates.sequence_kl_surrogate(
            estimator, lp_t, terms.logp_target_t, terms.kl_t, mask, b,
            pathwise=False))(terms.logp_score_t)
    np.testing.assert_allclose(g_logp, a * mask, rtol=1e-5, atol=1e-6)

  def test_opd_shared_parameters_leak_nothing_to_teacher(self):
    # Student and teacher are one model at two latents sharing parameters.
    w = jnp.asarray(np.random.default_rng(0).normal(size=(2, L, 4)))
    _, _, y, mask = self._inputs()
    for estimator in est.ESTIMATORS:
      shared = jax.grad(lambda w: surrogates.opd_surrogate(estimator, w[0], w[1], y,
                                                    mask))(w)
      student_only = jax.grad(lambda w: surrogates.opd_surrogate(
          estimator, w[0], jax.lax.stop_gradient(w[1]), y, mask))(w)
      chex.assert_trees_all_close(shared, student_only)
      chex.assert_trees_all_close(shared[1], np.zeros((L, 4)))


if __name__ == "__main__":
  absltest.main()
