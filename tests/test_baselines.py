"""Tests for latentdiv/baselines.py against brute-force NumPy references.

That the baselines keep the estimators unbiased is proven by exact
enumeration in tests/test_moments.py; here each function is checked against
its equation, its stop-gradient, jit / no-jit and its errors.
"""
import functools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from latentdiv import baselines

L = 5


class NamesTest(absltest.TestCase):

  def test_names(self):
    self.assertEqual(baselines.BASELINES, ("none", "leave_one_out", "ema", "jsd"))
    self.assertEqual(baselines.GIVEN_BASELINES, ("ema", "jsd"))
    for name in baselines.BASELINES:
      baselines.check_baseline(name)
    with self.assertRaisesRegex(ValueError, "allowed"):
      baselines.check_baseline("batch_mean")


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
    got = self.variant(baselines.leave_one_out_baseline)(returns, mask)
    chex.assert_shape(got, (n, L))
    want = np.zeros((n, L))
    for i in range(n):
      for t in range(L):
        others = [returns[m, t] for m in range(n) if m != i and mask[m, t]]
        want[i, t] = np.mean(others) if others else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  def test_two_rollouts_swap(self):
    returns = jnp.array([[1.0, 2.0], [3.0, 5.0]])
    got = baselines.leave_one_out_baseline(returns, jnp.ones((2, 2)))
    np.testing.assert_allclose(got, returns[::-1])

  def test_no_gradient(self):
    returns = jnp.ones((3, L))
    g = jax.grad(lambda x: baselines.leave_one_out_baseline(x, jnp.ones(
        (3, L))).sum())(returns)
    chex.assert_trees_all_close(g, np.zeros((3, L)))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "N >= 2"):
      baselines.leave_one_out_baseline(jnp.ones((1, L)), jnp.ones((1, L)))
    with self.assertRaisesRegex(ValueError, "returns_NxL, mask_NxL"):
      baselines.leave_one_out_baseline(jnp.ones((2, L)), jnp.ones((2, L + 1)))
    with self.assertRaisesRegex(ValueError, "returns_NxL, mask_NxL"):
      baselines.leave_one_out_baseline(jnp.ones((L,)), jnp.ones((L,)))


class EmaAndControlVariateTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ema_update(self):
    got = self.variant(functools.partial(baselines.ema_update, decay=0.9))(
        jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0]))
    np.testing.assert_allclose(got, [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1],
                               rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "ema, value"):
      baselines.ema_update(jnp.zeros(2), jnp.zeros(3), 0.9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jsd_control_variate(self):
    j = jnp.array([0.5, 0.3, 0.1])
    got = self.variant(baselines.jsd_control_variate)(jnp.float32(2.0), j)
    np.testing.assert_allclose(got, 2.0 * np.asarray(j), rtol=1e-6)
    g = jax.grad(lambda c: baselines.jsd_control_variate(c, j).sum())(1.0)
    self.assertEqual(float(g), 0.0)
    with self.assertRaisesRegex(ValueError, "c"):
      baselines.jsd_control_variate(jnp.ones(2), j)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fit_first_batch_is_least_squares(self):
    rng = np.random.default_rng(0)
    jsd = rng.uniform(size=(6, L)).astype(np.float32)
    ret = (2.0 * jsd + 0.3 * rng.normal(size=(6, L))).astype(np.float32)
    mask = (rng.uniform(size=(6, L)) < 0.8).astype(np.float32)
    fit = self.variant(
        functools.partial(baselines.fit_control_variate_coefficient, decay=0.9))
    state, c = fit(baselines.init_control_variate_state(), ret, jsd, mask=mask)
    chex.assert_shape(c, ())
    w = mask.ravel().astype(bool)
    r, j = ret.ravel()[w], jsd.ravel()[w]
    want = np.mean((r - r.mean()) * (j - j.mean())) / np.var(j)
    np.testing.assert_allclose(c, want, rtol=1e-4)
    self.assertEqual(int(state.count), 1)

  def test_fit_ema_over_batches(self):
    rng = np.random.default_rng(1)
    decay = 0.8
    state = baselines.init_control_variate_state(jnp.float32)
    moments = np.zeros(4)
    for k in range(1, 4):
      j = rng.uniform(size=32)
      r = -1.5 * j + 0.1 * rng.normal(size=32) + k
      state, c = baselines.fit_control_variate_coefficient(state, r, j, decay)
      moments = decay * moments + (1 - decay) * np.array(
          [r.mean(), j.mean(), (r * j).mean(), (j * j).mean()])
    m = moments / (1 - decay**3)
    want = (m[2] - m[0] * m[1]) / (m[3] - m[1]**2)
    np.testing.assert_allclose(c, want, rtol=1e-3)
    np.testing.assert_allclose(
        baselines.control_variate_coefficient(state, decay), c, rtol=1e-6)

  def test_fit_degenerate(self):
    self.assertEqual(
        float(baselines.control_variate_coefficient(baselines.init_control_variate_state(),
                                              0.9)), 0.0)
    _, c = baselines.fit_control_variate_coefficient(
        baselines.init_control_variate_state(), jnp.arange(4.0), jnp.ones(4), 0.9)
    self.assertEqual(float(c), 0.0)  # Var(Ĵ) = 0.
    with self.assertRaisesRegex(ValueError, "returns, jsd_values"):
      baselines.fit_control_variate_coefficient(baselines.init_control_variate_state(),
                                          jnp.ones(3), jnp.ones(4), 0.9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_explained_variance(self):
    rng = np.random.default_rng(2)
    ret = rng.normal(size=(4, L))
    base = 0.8 * ret + 0.1 * rng.normal(size=(4, L))
    mask = (rng.uniform(size=(4, L)) < 0.7).astype(np.float64)
    fn = self.variant(baselines.explained_variance)
    w = mask.astype(bool)
    want = 1 - np.var((ret - base)[w]) / np.var(ret[w])
    np.testing.assert_allclose(fn(ret, base, mask), want, rtol=1e-4)
    np.testing.assert_allclose(fn(ret, ret), 1.0, atol=1e-6)
    np.testing.assert_allclose(fn(ret, np.full_like(ret, 3.0)), 0.0,
                               atol=1e-5)
    self.assertEqual(float(fn(np.ones(3), np.zeros(3))), 0.0)
    with self.assertRaisesRegex(ValueError, "returns, baseline"):
      baselines.explained_variance(jnp.ones(3), jnp.ones(2))


class PositionMeanTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    rng = np.random.default_rng(3)
    returns = rng.normal(size=(2, 3, L))
    weights = rng.uniform(size=(2, 3, L)) * (rng.uniform(size=(2, 3, L)) < 0.7)
    weights[..., -1] = 0.0
    got = self.variant(baselines.position_mean)(returns, weights)
    chex.assert_shape(got, (L,))
    for t in range(L - 1):
      w = weights[..., t]
      np.testing.assert_allclose(got[t], np.sum(w * returns[..., t]) / w.sum(),
                                 rtol=1e-5)
    self.assertEqual(float(got[-1]), 0.0)  # No weight: 0, not NaN.
    g = jax.grad(lambda r: baselines.position_mean(r, weights).sum())(returns)
    chex.assert_trees_all_close(g, np.zeros_like(returns))
    with self.assertRaisesRegex(ValueError, "returns_NxL, weights_NxL"):
      baselines.position_mean(returns, weights[0])


class FittedConstantsTest(absltest.TestCase):

  def test_fitted_constants_match_numpy(self):
    rng = np.random.default_rng(1)
    e, m, n, l = 2, 3, 5, 4
    returns = rng.normal(size=(e, m, n, l)) + 2.0
    mask = (rng.uniform(size=(m, n, l)) < 0.8).astype(np.float64)
    mask[..., 0] = 1.0
    weights = rng.uniform(size=(m, n))
    jsd = rng.uniform(size=(m, l))
    returns[1] = 0.5 + 3.0 * jsd[:, None, :] + 0.1 * rng.normal(size=(m, n, l))
    with jax.enable_x64(True):
      ema, c = baselines.fitted_constants(jnp.asarray(returns), jnp.asarray(mask),
                                     jnp.asarray(weights), jnp.asarray(jsd))
    for k in range(e):
      for t in range(l):
        w = weights * mask[:, :, t]
        np.testing.assert_allclose(ema[k, t], np.sum(w * returns[k, :, :, t]) / w.sum(),
                                   rtol=1e-10)
      w = weights[:, :, None] * mask
      j = np.broadcast_to(jsd[:, None, :], mask.shape)
      mean = lambda x: np.sum(w * x) / w.sum()  # noqa: E731
      r = returns[k]
      cov = mean(r * j) - mean(r) * mean(j)
      np.testing.assert_allclose(c[k], cov / (mean(j * j) - mean(j)**2), rtol=1e-8)
    self.assertAlmostEqual(float(c[1]), 3.0, delta=0.1)  # R ≈ 0.5 + 3 J.


if __name__ == "__main__":
  absltest.main()
