"""Tests for latentdiv.divergences against brute-force NumPy (float64) references."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from latentdiv import divergences

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (1.0, 2.0)
# An asymmetric pair: KL(P‖Q) ≈ 0.585 and KL(Q‖P) ≈ 0.498, so swapped
# directions are caught.
P_PROBS = np.array([0.2, 0.3, 0.5])
Q_PROBS = np.array([0.6, 0.3, 0.1])


# ---------------------------------------------------------------------------
# Brute-force NumPy references (float64, straight from the definitions).


def np_softmax(logits):
  logits = np.asarray(logits, np.float64)
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def np_kl(p, q):
  """Σ p log(p/q) with 0 log 0 = 0."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  ratio = np.where(p > 0, p / np.where(p > 0, q, 1.0), 1.0)
  return np.sum(np.where(p > 0, p * np.log(ratio), 0.0), -1)


def np_entropy(p):
  p = np.asarray(p, np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


def np_multi_jsd(probs, axis=0):
  """H(M) − mean_k H(P_k): the entropy form of DESIGN.md §4."""
  m = probs.mean(axis)
  return np_entropy(m) - np_entropy(probs).mean(axis)


def np_gjsd(p, q, beta):
  """β KL(P‖M) + (1−β) KL(Q‖M) with M formed in probability space."""
  m = beta * p + (1 - beta) * q
  return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)


def np_token_weights(kind, mask, jsd=None, prefix_len=None, temperature=0.1):
  mask = np.asarray(mask, bool)
  valid = mask.copy()
  if prefix_len is not None:
    count = 0
    for t in range(len(mask)):
      if mask[t]:
        count += 1
        valid[t] = count <= prefix_len
  if kind in ("uniform", "prefix"):
    return valid.astype(np.float64)
  z = np.where(valid, np.asarray(jsd, np.float64) / temperature, -np.inf)
  if not valid.any():
    return np.zeros(len(mask))
  e = np.where(valid, np.exp(z - z[valid].max()), 0.0)
  return valid.sum() * e / e.sum()


def _random_logits(seed, shape, scale=2.0):
  return np.asarray(np.random.default_rng(seed).normal(size=shape) * scale, np.float32)


def _extreme_logits(seed, shape):
  """Logits of ±1e4: one-hot-like distributions whose other entries underflow."""
  signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=shape)
  return np.asarray(signs * 1e4, np.float32)


def _assert_finite_grads(fn, *args):
  grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args))))(*args)
  chex.assert_tree_all_finite(grads)
  return grads


def _values_and_grads(fns, *args):
  """Values and gradients of several scalar-sum functions in one jitted call."""

  @jax.jit
  def run(*a):
    return [jax.value_and_grad(lambda *b, f=f: jnp.sum(f(*b)), argnums=tuple(range(len(a))))(*a)
            for f in fns]

  return run(*args)


# ---------------------------------------------------------------------------
# KL, entropy, K-way JSD.


class KLEntropyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_kl_and_entropy_match_numpy(self):
    p_logits = _random_logits(0, (4, 5, 7))
    q_logits = _random_logits(1, (4, 5, 7))
    kl = self.variant(divergences.kl_from_logits)(p_logits, q_logits)
    ent = self.variant(divergences.entropy_from_logits)(p_logits)
    chex.assert_shape([kl, ent], (4, 5))
    chex.assert_type([kl, ent], jnp.float32)
    np.testing.assert_allclose(kl, np_kl(np_softmax(p_logits), np_softmax(q_logits)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent, np_entropy(np_softmax(p_logits)), rtol=1e-5, atol=1e-6)

  def test_kl_axis_argument(self):
    p_logits = _random_logits(2, (6, 3))
    q_logits = _random_logits(3, (6, 3))
    kl = divergences.kl_from_logits(p_logits, q_logits, axis=0)
    chex.assert_shape(kl, (3,))
    np.testing.assert_allclose(kl, np_kl(np_softmax(p_logits.T), np_softmax(q_logits.T)), rtol=1e-5)

  def test_kl_direction_on_asymmetric_pair(self):
    with jax.enable_x64(True):
      kl_pq = divergences.kl_from_logits(jnp.log(jnp.asarray(P_PROBS)), jnp.log(jnp.asarray(Q_PROBS)))
      np.testing.assert_allclose(kl_pq, 0.2 * np.log(0.2 / 0.6) + 0.5 * np.log(5.0), rtol=1e-12)

  def test_shape_mismatch_names_arguments(self):
    with self.assertRaisesRegex(AssertionError, "p_logits and q_logits"):
      divergences.kl_from_logits(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


class MultiJSDTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_entropy_form(self):
    logits = _random_logits(4, (3, 6, 5))
    jsd = self.variant(divergences.multi_jsd)(logits)
    chex.assert_shape(jsd, (6,))
    chex.assert_type(jsd, jnp.float32)
    np.testing.assert_allclose(jsd, np_multi_jsd(np_softmax(logits)), rtol=1e-4, atol=1e-6)
    self.assertTrue(np.all(np.asarray(jsd) >= -1e-6))
    self.assertTrue(np.all(np.asarray(jsd) <= np.log(3) + 1e-6))

  def test_latent_axis_and_leading_dims(self):
    logits = _random_logits(5, (2, 6, 4, 5))  # [B, T, K, V]
    jsd = divergences.multi_jsd(logits, latent_axis=2)
    chex.assert_shape(jsd, (2, 6))
    np.testing.assert_allclose(jsd, np_multi_jsd(np_softmax(logits), axis=2), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(divergences.multi_jsd(logits, latent_axis=-2), jsd)

  def test_identical_latents_give_zero(self):
    row = _random_logits(6, (1, 6, 9))
    jsd = divergences.multi_jsd(np.repeat(row, 4, axis=0))
    np.testing.assert_allclose(jsd, 0.0, atol=1e-6)

  def test_disjoint_latents_reach_log_k(self):
    # Latent k puts all its mass on token k: M is uniform over K tokens.
    num_latents = 4
    logits = np.full((num_latents, 2, 6), -1e4, np.float32)
    for k in range(num_latents):
      logits[k, :, k] = 1e4
    jsd = divergences.multi_jsd(logits)
    np.testing.assert_allclose(jsd, np.log(num_latents), rtol=1e-6)

  def test_equals_symmetric_generalized_jsd_for_two_latents(self):
    logits = _random_logits(7, (2, 5, 6))
    np.testing.assert_allclose(
        divergences.multi_jsd(logits), divergences.generalized_jsd(logits[0], logits[1], 0.5),
        rtol=1e-5, atol=1e-7)

  def test_vocab_axis_cannot_be_latent_axis(self):
    with self.assertRaisesRegex(ValueError, "latent_axis"):
      divergences.multi_jsd(jnp.zeros((3, 4)), latent_axis=-1)

  def test_finite_for_extreme_logits(self):
    logits = jnp.asarray(_extreme_logits(8, (3, 5, 6)))
    jsd = divergences.multi_jsd(logits)
    chex.assert_tree_all_finite(jsd)
    np.testing.assert_allclose(jsd, np_multi_jsd(np_softmax(logits)), atol=1e-5)
    _assert_finite_grads(divergences.multi_jsd, logits)


# ---------------------------------------------------------------------------
# Generalised JSD_β, forward/reverse KL, GKD loss.


class GeneralizedJSDTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_over_beta_and_temperature(self):
    p_logits = _random_logits(10, (3, 4, 6))
    q_logits = _random_logits(11, (3, 4, 6))
    fn = self.variant(divergences.generalized_jsd)
    for beta, temperature in itertools.product(BETAS, TEMPERATURES):
      got = fn(p_logits, q_logits, beta, temperature)
      chex.assert_shape(got, (3, 4))
      want = np_gjsd(np_softmax(p_logits / temperature), np_softmax(q_logits / temperature), beta)
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"beta={beta}, T={temperature}")

  def test_endpoints_are_exactly_zero_with_finite_gradients(self):
    p_logits = jnp.asarray(_random_logits(12, (5, 6)))
    q_logits = jnp.asarray(_random_logits(13, (5, 6)))
    for beta in (0.0, 1.0):
      np.testing.assert_array_equal(divergences.generalized_jsd(p_logits, q_logits, beta), 0.0)
      grads = _assert_finite_grads(functools.partial(divergences.generalized_jsd, beta=beta),
                                   p_logits, q_logits)
      np.testing.assert_allclose(grads[0], 0.0, atol=1e-6)
      np.testing.assert_allclose(grads[1], 0.0, atol=1e-6)

  def test_symmetry_and_beta_swap(self):
    p_logits = _random_logits(14, (4, 5))
    q_logits = _random_logits(15, (4, 5))
    np.testing.assert_allclose(divergences.generalized_jsd(p_logits, q_logits, 0.5),
                               divergences.generalized_jsd(q_logits, p_logits, 0.5), rtol=1e-5)
    np.testing.assert_allclose(divergences.generalized_jsd(p_logits, q_logits, 0.2),
                               divergences.generalized_jsd(q_logits, p_logits, 0.8), rtol=1e-5)
    half = np.asarray(divergences.generalized_jsd(p_logits, q_logits, 0.5))
    self.assertTrue(np.all(half >= -1e-7) and np.all(half <= np.log(2) + 1e-6))

  def test_limits_recover_forward_and_reverse_kl(self):
    kl_pq = np_kl(P_PROBS, Q_PROBS)
    kl_qp = np_kl(Q_PROBS, P_PROBS)
    self.assertGreater(abs(kl_pq - kl_qp), 0.05)  # the pair really is asymmetric
    with jax.enable_x64(True):
      p_logits = jnp.log(jnp.asarray(P_PROBS))
      q_logits = jnp.log(jnp.asarray(Q_PROBS))
      for eps in (1e-3, 1e-4, 1e-6):
        near_zero = divergences.generalized_jsd(p_logits, q_logits, eps) / eps
        near_one = divergences.generalized_jsd(p_logits, q_logits, 1 - eps) / eps
        np.testing.assert_allclose(near_zero, kl_pq, rtol=5 * eps)
        np.testing.assert_allclose(near_one, kl_qp, rtol=5 * eps)
      np.testing.assert_allclose(divergences.forward_kl(p_logits, q_logits), kl_pq, rtol=1e-12)
      np.testing.assert_allclose(divergences.reverse_kl(p_logits, q_logits), kl_qp, rtol=1e-12)

  def test_beta_gradient_is_exact_including_endpoints(self):
    with jax.enable_x64(True):
      p_logits = jnp.log(jnp.asarray(P_PROBS))
      q_logits = jnp.log(jnp.asarray(Q_PROBS))
      dbeta = jax.grad(lambda b: divergences.generalized_jsd(p_logits, q_logits, b))
      # d JSD_β / dβ = KL(P‖M) − KL(Q‖M); at β=0 it is KL(P‖Q), at β=1 −KL(Q‖P).
      np.testing.assert_allclose(dbeta(0.0), np_kl(P_PROBS, Q_PROBS), rtol=1e-10)
      np.testing.assert_allclose(dbeta(1.0), -np_kl(Q_PROBS, P_PROBS), rtol=1e-10)
      for beta in (0.1, 0.3, 0.7):
        h = 1e-6
        fd = (np_gjsd(P_PROBS, Q_PROBS, beta + h) - np_gjsd(P_PROBS, Q_PROBS, beta - h)) / (2 * h)
        np.testing.assert_allclose(dbeta(beta), fd, rtol=1e-7)

  def test_logit_gradients_match_finite_differences(self):
    with jax.enable_x64(True):
      p_logits = jnp.asarray(np.random.default_rng(16).normal(size=5))
      q_logits = jnp.asarray(np.random.default_rng(17).normal(size=5))
      for beta in BETAS:
        grad = jax.grad(lambda q: divergences.generalized_jsd(p_logits, q, beta, 2.0))(q_logits)
        fd = np.zeros(5)
        for v in range(5):
          e = np.zeros(5)
          e[v] = 1e-6
          plus = np_gjsd(np_softmax(p_logits / 2.0), np_softmax((q_logits + e) / 2.0), beta)
          minus = np_gjsd(np_softmax(p_logits / 2.0), np_softmax((q_logits - e) / 2.0), beta)
          fd[v] = (plus - minus) / 2e-6
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-10, err_msg=f"beta={beta}")

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_reverse_kl_with_temperature(self):
    p_logits = _random_logits(18, (3, 7))
    q_logits = _random_logits(19, (3, 7))
    fwd = self.variant(divergences.forward_kl)(p_logits, q_logits, 2.0)
    rev = self.variant(divergences.reverse_kl)(p_logits, q_logits, 2.0)
    p, q = np_softmax(p_logits / 2.0), np_softmax(q_logits / 2.0)
    np.testing.assert_allclose(fwd, np_kl(p, q), rtol=1e-5)
    np.testing.assert_allclose(rev, np_kl(q, p), rtol=1e-5)

  def test_finite_for_extreme_logits(self):
    p_logits = jnp.asarray(_extreme_logits(20, (4, 6)))
    q_logits = jnp.asarray(_extreme_logits(21, (4, 6)))
    fns = [functools.partial(divergences.generalized_jsd, beta=beta) for beta in BETAS]
    fns += [divergences.forward_kl, divergences.reverse_kl]
    chex.assert_tree_all_finite(_values_and_grads(fns, p_logits, q_logits))
    np.testing.assert_allclose(divergences.generalized_jsd(p_logits, q_logits, 0.5),
                               np_gjsd(np_softmax(p_logits), np_softmax(q_logits), 0.5), atol=1e-5)

  def test_bad_beta_and_temperature(self):
    with self.assertRaisesRegex(ValueError, "beta"):
      divergences.generalized_jsd(jnp.zeros(3), jnp.zeros(3), 1.5)
    with self.assertRaisesRegex(ValueError, "temperature"):
      divergences.generalized_jsd(jnp.zeros(3), jnp.zeros(3), 0.5, 0.0)


class TokenWeightsTest(chex.TestCase):

  MASK = np.array([1, 0, 1, 1, 0, 1, 1], bool)
  JSD = np.array([0.1, 0.9, 0.3, 0.05, 0.7, 0.6, 0.2], np.float32)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      ("uniform", None), ("prefix", 2), ("prefix", 0), ("prefix", 9),
      ("divergence", None), ("divergence", 3))
  def test_matches_numpy(self, kind, prefix_len):
    fn = self.variant(lambda m, j: divergences.token_weights(kind, m, j, prefix_len, 0.1))
    got = fn(self.MASK, self.JSD)
    chex.assert_shape(got, (7,))
    np.testing.assert_allclose(got, np_token_weights(kind, self.MASK, self.JSD, prefix_len, 0.1),
                               rtol=1e-5, atol=1e-7)

  def test_prefix_counts_valid_positions_only(self):
    got = divergences.token_weights("prefix", self.MASK, prefix_len=2)
    np.testing.assert_array_equal(got, [1, 0, 1, 0, 0, 0, 0])
    traced = jax.jit(lambda m, n: divergences.token_weights("prefix", m, prefix_len=n))(self.MASK, 3)
    np.testing.assert_array_equal(traced, [1, 0, 1, 1, 0, 0, 0])

  def test_divergence_weighting_properties(self):
    hot = divergences.token_weights("divergence", self.MASK, self.JSD, weight_temperature=0.1)
    np.testing.assert_allclose(jnp.sum(hot), self.MASK.sum(), rtol=1e-6)  # averages 1 over valid tokens
    self.assertEqual(int(jnp.argmax(hot)), 5)  # the most divergent *valid* position
    np.testing.assert_array_equal(np.asarray(hot)[~self.MASK], 0.0)
    flat = divergences.token_weights("divergence", self.MASK, self.JSD, weight_temperature=1e6)
    np.testing.assert_allclose(flat, self.MASK.astype(np.float32), rtol=1e-5)
    # Gradient is stopped through the weights.
    grad = jax.grad(lambda j: jnp.sum(divergences.token_weights("divergence", self.MASK, j) * 1.7))(self.JSD)
    np.testing.assert_array_equal(grad, 0.0)

  def test_fully_masked(self):
    mask = np.zeros(7, bool)
    for kind in divergences.WEIGHTINGS:
      got = divergences.token_weights(kind, mask, self.JSD, prefix_len=3)
      np.testing.assert_array_equal(got, 0.0)

  def test_errors_name_the_argument(self):
    with self.assertRaisesRegex(ValueError, r"kind must be one of \('uniform', 'prefix', 'divergence'\)"):
      divergences.token_weights("entropy", self.MASK)
    with self.assertRaisesRegex(ValueError, "prefix_len"):
      divergences.token_weights("prefix", self.MASK)
    with self.assertRaisesRegex(ValueError, "jsd_T"):
      divergences.token_weights("divergence", self.MASK)
    with self.assertRaisesRegex(AssertionError, "mask_T and jsd_T"):
      divergences.token_weights("divergence", self.MASK, self.JSD[:5])
    with self.assertRaisesRegex(ValueError, "temperature"):
      divergences.token_weights("divergence", self.MASK, self.JSD, weight_temperature=-1.0)


class WeightedMeanTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_and_handles_zero_weights(self):
    values = _random_logits(40, (3, 6))
    weights = np.abs(_random_logits(41, (3, 6)))
    weights[1] = 0.0
    weights[2, :3] = 0.0
    values[2, 0] = np.inf  # ignored: zero weight
    got = self.variant(divergences.weighted_mean)(values, weights)
    chex.assert_shape(got, (3,))
    safe = np.where(weights > 0, values, 0.0)
    want = np.where(weights.sum(-1) > 0, (weights * safe).sum(-1) / np.maximum(weights.sum(-1), 1e-30), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    self.assertEqual(float(got[1]), 0.0)
    grads = jax.grad(lambda v: jnp.sum(divergences.weighted_mean(v, weights)))(jnp.asarray(values))
    chex.assert_tree_all_finite(grads)
    np.testing.assert_allclose(grads, weights / np.maximum(weights.sum(-1, keepdims=True), 1e-30), rtol=1e-5)

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(AssertionError, "values_T and weights_T"):
      divergences.weighted_mean(jnp.zeros(4), jnp.zeros(5))


class TokenJSDTest(chex.TestCase):

  MASK = np.array([1, 1, 0, 1, 1, 0], bool)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("uniform", None), ("prefix", 2), ("divergence", None))
  def test_matches_numpy(self, weighting, prefix_len):
    logits = _random_logits(50, (3, 6, 5))
    out = self.variant(lambda l, m: divergences.token_jsd(l, m, weighting, prefix_len, 0.1))(logits, self.MASK)
    chex.assert_shape([out.value, out.jsd_t, out.weights_t], [(), (6,), (6,)])
    jsd = np.where(self.MASK, np_multi_jsd(np_softmax(logits)), 0.0)
    weights = np_token_weights(weighting, self.MASK, jsd, prefix_len, 0.1)
    np.testing.assert_allclose(out.jsd_t, jsd, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.weights_t, weights, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.value, (weights * jsd).sum() / weights.sum(), rtol=1e-4)

  def test_vmap_over_batch(self):
    logits = _random_logits(51, (4, 3, 6, 5))
    masks = np.stack([self.MASK, np.ones(6, bool), np.zeros(6, bool), self.MASK[::-1]])
    fn = functools.partial(divergences.token_jsd, weighting="prefix", prefix_len=3)
    out = jax.jit(jax.vmap(fn))(logits, masks)
    chex.assert_shape([out.value, out.jsd_t], [(4,), (4, 6)])
    for b in range(4):
      single = fn(logits[b], masks[b])
      np.testing.assert_allclose(out.value[b], single.value, rtol=1e-6, atol=1e-7)
    self.assertEqual(float(out.value[2]), 0.0)

  def test_identical_latents_and_bounds(self):
    logits = np.repeat(_random_logits(52, (1, 6, 5)), 3, axis=0)
    out = divergences.token_jsd(logits, self.MASK)
    np.testing.assert_allclose(out.value, 0.0, atol=1e-6)
    spread = divergences.token_jsd(_random_logits(53, (3, 6, 5), scale=20.0), self.MASK)
    self.assertLessEqual(float(spread.value), np.log(3) + 1e-6)

  def test_extreme_logits_and_fully_masked_rows_have_finite_gradients(self):
    logits = jnp.asarray(_extreme_logits(54, (3, 6, 5)))
    masks = (self.MASK, np.zeros(6, bool))
    configs = list(itertools.product(masks, divergences.WEIGHTINGS))
    fns = [lambda l, m=m, w=w: divergences.token_jsd(l, m, w, 2).value for m, w in configs]
    results = _values_and_grads(fns, logits)
    chex.assert_tree_all_finite(results)
    for (mask, _), (value, grads) in zip(configs, results):
      if not mask.any():
        self.assertEqual(float(value), 0.0)
        np.testing.assert_array_equal(grads[0], 0.0)

  def test_shape_errors_name_the_argument(self):
    with self.assertRaisesRegex(AssertionError, "logits_KxTxV"):
      divergences.token_jsd(jnp.zeros((3, 6)), self.MASK)
    with self.assertRaisesRegex(AssertionError, "mask_T"):
      divergences.token_jsd(jnp.zeros((3, 5, 4)), self.MASK)
    with self.assertRaisesRegex(ValueError, "kind must be one of"):
      divergences.token_jsd(jnp.zeros((3, 6, 4)), self.MASK, "bogus")


class PairwiseTokenJSDTest(chex.TestCase):

  MASK = np.array([1, 1, 1, 0, 1], bool)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("uniform", None), ("prefix", 2), ("divergence", None))
  def test_matches_numpy(self, weighting, prefix_len):
    logits = _random_logits(60, (4, 5, 6))
    out = self.variant(lambda l, m: divergences.pairwise_token_jsd(l, m, weighting, prefix_len, 0.1))(
        logits, self.MASK)
    chex.assert_shape([out.value, out.jsd_t, out.weights_t], [(4, 4), (4, 4, 5), (4, 4, 5)])
    probs = np_softmax(logits)
    for i, j in itertools.product(range(4), repeat=2):
      jsd = np.zeros(5) if i == j else np.where(self.MASK, np_gjsd(probs[i], probs[j], 0.5), 0.0)
      weights = np_token_weights(weighting, self.MASK, jsd, prefix_len, 0.1)
      want = 0.0 if i == j else (weights * jsd).sum() / weights.sum()
      np.testing.assert_allclose(out.jsd_t[i, j], jsd, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(out.value[i, j], want, rtol=1e-4, atol=1e-6, err_msg=f"pair {(i, j)}")
    np.testing.assert_array_equal(np.diag(out.value), 0.0)
    np.testing.assert_allclose(out.value, out.value.T, rtol=1e-6)
    self.assertTrue(np.all(np.asarray(out.value) <= np.log(2) + 1e-6))

  def test_identical_latents_give_zero_matrix(self):
    logits = np.repeat(_random_logits(61, (1, 5, 6)), 3, axis=0)
    np.testing.assert_allclose(divergences.pairwise_token_jsd(logits, self.MASK).value, 0.0, atol=1e-6)

  def test_jsd_to_go_is_reverse_cumsum(self):
    logits = _random_logits(62, (3, 5, 6))
    out = divergences.pairwise_token_jsd(logits, self.MASK, "prefix", 3)
    to_go = jax.jit(divergences.jsd_to_go)(out.jsd_t, out.weights_t)
    chex.assert_shape(to_go, (3, 3, 5))
    w_jsd = np.asarray(out.weights_t, np.float64) * np.asarray(out.jsd_t, np.float64)
    want = np.stack([[[w_jsd[i, j, t:].sum() for t in range(5)] for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(to_go, want, rtol=1e-5, atol=1e-7)
    # Σ_{t'>=t} over the prefix: beyond the prefix it is 0; at t=0 it is Ĵ·Σw.
    np.testing.assert_array_equal(np.asarray(to_go)[..., 4], 0.0)
    np.testing.assert_allclose(to_go[..., 0], out.value * jnp.sum(out.weights_t, -1), rtol=1e-5)

  def test_extreme_logits_and_fully_masked(self):
    logits = jnp.asarray(_extreme_logits(63, (3, 5, 6)))
    configs = list(itertools.product((self.MASK, np.zeros(5, bool)), divergences.WEIGHTINGS))
    fns = [lambda l, m=m, w=w: divergences.pairwise_token_jsd(l, m, w, 2).value for m, w in configs]
    fns += [lambda l, m=m: divergences.jsd_to_go(*divergences.pairwise_token_jsd(l, m, "prefix", 2)[1:])
            for m, _ in configs[::3]]
    results = _values_and_grads(fns, logits)
    chex.assert_tree_all_finite(results)
    np.testing.assert_array_equal(results[3][0], 0.0)  # fully masked: all pairs 0

  def test_shape_errors_name_the_argument(self):
    with self.assertRaisesRegex(AssertionError, "logits_KxTxV"):
      divergences.pairwise_token_jsd(jnp.zeros((3, 5)), self.MASK)
    with self.assertRaisesRegex(AssertionError, "mask_T"):
      divergences.pairwise_token_jsd(jnp.zeros((3, 5, 4)), self.MASK[:, None])


if __name__ == "__main__":
  absltest.main()
