"""Tests for latentdiv.reconstruction against brute-force NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from latentdiv import reconstruction


def np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_log_mean_exp(x):
  """log((1/K) Σ_k exp(x_k)) by brute force in float64 (values are moderate)."""
  return np.log(np.mean(np.exp(np.asarray(x, np.float64)), axis=-1))


def _loglik(seed, shape=(6, 4)):
  return np.asarray(np.random.default_rng(seed).normal(size=shape) * 3 - 10, np.float32)


class EMLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hard_em_picks_best_latent(self):
    loglik = _loglik(3)
    loss, winners = self.variant(reconstruction.hard_em_loss)(loglik)
    chex.assert_shape([loss, winners], [(), (6,)])
    chex.assert_type([loss, winners], [jnp.float32, jnp.int32])
    np.testing.assert_array_equal(winners, np.argmax(loglik, -1))
    np.testing.assert_allclose(loss, -np.mean(np.max(loglik, -1)), rtol=1e-6)

  def test_hard_em_gradient_flows_only_to_winner(self):
    loglik = _loglik(4)
    grad = jax.grad(lambda l: reconstruction.hard_em_loss(l)[0])(loglik)
    want = np.zeros_like(loglik)
    want[np.arange(6), np.argmax(loglik, -1)] = -1.0 / 6
    np.testing.assert_allclose(grad, want, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_soft_em_equals_log_mean_exp(self):
    loglik = _loglik(5)
    loss = self.variant(reconstruction.soft_em_loss)(loglik)
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(loss, -np.mean(np_log_mean_exp(loglik)), rtol=1e-5)
    # Its gradient weighs each latent by its responsibility.
    grad = jax.grad(reconstruction.soft_em_loss)(loglik)
    resp = np.exp(loglik - loglik.max(-1, keepdims=True))
    resp /= resp.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, -resp / 6, rtol=1e-5, atol=1e-8)

  def test_soft_em_bounds_hard_em(self):
    # −log mean_k p_k lies between −max_k ℓ_k and −max_k ℓ_k + log K.
    loglik = _loglik(6)
    soft = float(reconstruction.soft_em_loss(loglik))
    hard = float(reconstruction.hard_em_loss(loglik)[0])
    self.assertGreaterEqual(soft, hard - 1e-5)
    self.assertLessEqual(soft, hard + np.log(4) + 1e-5)

  def test_extreme_log_likelihoods_stay_finite(self):
    loglik = jnp.asarray([[-1e4, -2e4, -3e4], [0.0, -1e4, -1e4]], jnp.float32)
    for fn in (lambda l: reconstruction.hard_em_loss(l)[0], reconstruction.soft_em_loss):
      value, grad = jax.value_and_grad(fn)(loglik)
      chex.assert_tree_all_finite((value, grad))
    # Row losses: (1e4 + log 3) and (0 + log 3); the other terms underflow.
    np.testing.assert_allclose(reconstruction.soft_em_loss(loglik), (1e4 + 2 * np.log(3)) / 2, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_responsibilities_and_usage(self):
    loglik = _loglik(7, (40, 3))
    resp = self.variant(reconstruction.responsibilities)(loglik)
    usage = self.variant(reconstruction.latent_usage)(loglik)
    chex.assert_shape([resp, usage], [(40, 3), (3,)])
    shifted = np.exp(loglik - loglik.max(-1, keepdims=True))
    np.testing.assert_allclose(resp, shifted / shifted.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(usage, np.bincount(np.argmax(loglik, -1), minlength=3) / 40, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(usage), 1.0, rtol=1e-6)
    # Stop-gradient.
    grad = jax.grad(lambda l: jnp.sum(reconstruction.responsibilities(l) * jnp.arange(3.0)[None, :]))(loglik)
    np.testing.assert_array_equal(grad, 0.0)

  def test_usage_shows_collapse(self):
    loglik = _loglik(8, (10, 4))
    loglik[:, 2] += 100.0  # latent 2 explains everything
    np.testing.assert_array_equal(reconstruction.latent_usage(loglik), [0.0, 0.0, 1.0, 0.0])

  def test_shape_errors_name_the_argument(self):
    for fn in (reconstruction.hard_em_loss, reconstruction.soft_em_loss, reconstruction.responsibilities,
               reconstruction.latent_usage):
      with self.assertRaisesRegex(AssertionError, "loglik_BxK"):
        fn(jnp.zeros(4))


class RemediesTest(chex.TestCase):
  """Relaxed winner-take-all and annealed EM (DESIGN.md §5.7)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_relaxed_wta_matches_numpy_and_its_limits(self):
    loglik = _loglik(11)
    for eps in (0.0, 0.1, 0.5):
      loss, winners = self.variant(reconstruction.relaxed_wta_loss)(loglik, eps)
      best = np.argmax(loglik, -1)
      w = np.where(np.arange(4)[None] == best[:, None], 1 - eps, eps / 3)
      np.testing.assert_allclose(loss, -np.mean(np.sum(w * loglik, -1)), rtol=1e-5)
      np.testing.assert_array_equal(winners, best)
    np.testing.assert_allclose(reconstruction.relaxed_wta_loss(loglik, 0.0)[0],
                               reconstruction.hard_em_loss(loglik)[0], rtol=1e-6)
    # Every latent of every example gets a share of the gradient (a latent that
    # wins nothing still learns); hard-EM gives the losers none.
    grad = jax.grad(lambda l: reconstruction.relaxed_wta_loss(l, 0.1)[0])(loglik)
    self.assertTrue(np.all(np.asarray(grad) < 0))
    hard = jax.grad(lambda l: reconstruction.hard_em_loss(l)[0])(loglik)
    self.assertEqual(int(np.sum(np.asarray(hard) != 0)), loglik.shape[0])

  def test_annealed_em_interpolates_soft_and_hard(self):
    loglik = jnp.asarray(_loglik(12))
    soft = jax.grad(reconstruction.soft_em_loss)(loglik)
    at_one = jax.grad(lambda l: reconstruction.annealed_em_loss(l, 1.0))(loglik)
    np.testing.assert_allclose(at_one, soft, rtol=1e-5, atol=1e-7)
    hard = jax.grad(lambda l: reconstruction.hard_em_loss(l)[0])(loglik)
    at_zero = jax.grad(lambda l: reconstruction.annealed_em_loss(l, 0.0))(loglik)
    np.testing.assert_allclose(at_zero, hard, rtol=1e-6)
    np.testing.assert_allclose(
        [float(reconstruction.annealing_temperature(s, 100)) for s in (0, 50, 100, 300)],
        [1.0, 0.5, 0.0, 0.0])

  @parameterized.parameters("relaxed_wta", "annealed_em")
  def test_dispatch(self, kind):
    loglik = _loglik(13)
    out = reconstruction.reconstruction_loss(kind, loglik, epsilon=0.2, temperature=0.5)
    want = (reconstruction.relaxed_wta_loss(loglik, 0.2)[0] if kind == "relaxed_wta"
            else reconstruction.annealed_em_loss(loglik, 0.5))
    np.testing.assert_allclose(out.loss, want, rtol=1e-6)
    np.testing.assert_array_equal(out.winners, np.argmax(loglik, -1))


class ReconstructionLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("hard_em", "soft_em")
  def test_dispatch(self, kind):
    loglik = _loglik(9)
    out = self.variant(lambda l: reconstruction.reconstruction_loss(kind, l))(loglik)
    chex.assert_shape([out.loss, out.winners, out.responsibilities, out.usage], [(), (6,), (6, 4), (4,)])
    want = -np.mean(np.max(loglik, -1)) if kind == "hard_em" else -np.mean(np_log_mean_exp(loglik))
    np.testing.assert_allclose(out.loss, want, rtol=1e-5)
    np.testing.assert_array_equal(out.winners, np.argmax(loglik, -1))
    np.testing.assert_allclose(out.usage, np.bincount(np.argmax(loglik, -1), minlength=4) / 6, rtol=1e-6)

  def test_unknown_kind(self):
    with self.assertRaisesRegex(ValueError, r"kind must be one of \('hard_em', 'soft_em', 'relaxed_wta'"):
      reconstruction.reconstruction_loss("em", jnp.zeros((2, 3)))


if __name__ == "__main__":
  absltest.main()
