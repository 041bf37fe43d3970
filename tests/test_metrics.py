"""Tests for latentdiv.metrics against brute-force NumPy and hand-derived cases."""

import functools
import math

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from scipy import stats

from latentdiv import metrics
from latentdiv import vocab

EOS, PAD, C = vocab.EOS, vocab.PAD, vocab.FIRST_CONTENT


# ----------------------------------------------------------- brute force


def _np_equal_up_to_eos(sample, reference):
  eos = np.flatnonzero(reference == EOS)
  end = eos[0] + 1 if eos.size else reference.size
  return bool(np.array_equal(sample[:end], reference[:end]))


def _np_match(samples, valid):
  b_count, k_count, _ = samples.shape
  out = np.full((b_count, k_count), -1)
  for b in range(b_count):
    for k in range(k_count):
      for s in range(valid.shape[1]):
        if _np_equal_up_to_eos(samples[b, k], valid[b, s]):
          out[b, k] = s
          break
  return out


def _np_counts(matches, num_strategies):
  counts = np.zeros((matches.shape[1], num_strategies), np.int64)
  for b in range(matches.shape[0]):
    for k in range(matches.shape[1]):
      if matches[b, k] >= 0:
        counts[k, matches[b, k]] += 1
  return counts


def _np_coverage(matches, num_strategies, threshold):
  counts = _np_counts(matches, num_strategies)
  assignment = []
  for k in range(counts.shape[0]):
    best = int(np.argmax(counts[k]))
    assignment.append(best if counts[k, best] / matches.shape[0] >= threshold else -1)
  recovered = {a for a in assignment if a >= 0}
  return len(recovered) / num_strategies, np.array(assignment)


def _np_nmi(matches, num_strategies, normalization):
  pairs = [(k, m) for k, m in zip(np.tile(np.arange(matches.shape[1]), matches.shape[0]),
                                  matches.reshape(-1)) if m >= 0]
  n = len(pairs)
  if n == 0:
    return 0.0
  joint, p_z, p_s = {}, {}, {}
  for k, s in pairs:
    joint[(k, s)] = joint.get((k, s), 0) + 1 / n
    p_z[k] = p_z.get(k, 0) + 1 / n
    p_s[s] = p_s.get(s, 0) + 1 / n
  mi = sum(p * math.log(p / (p_z[k] * p_s[s])) for (k, s), p in joint.items())
  h_z = -sum(p * math.log(p) for p in p_z.values())
  h_s = -sum(p * math.log(p) for p in p_s.values())
  norm = dict(arithmetic=(h_z + h_s) / 2, geometric=math.sqrt(h_z * h_s),
              min=min(h_z, h_s), max=max(h_z, h_s))[normalization]
  return mi / norm if norm > 0 else 0.0


def _random_case(rng, batch=12, num_latents=4, num_strategies=3, length=6):
  """Valid outputs of random lengths and samples that are copies, near-copies or noise."""
  valid = np.full((batch, num_strategies, length), PAD)
  for b in range(batch):
    for s in range(num_strategies):
      n = rng.integers(1, length)
      valid[b, s, :n] = rng.integers(C, C + 3, n)
      valid[b, s, n] = EOS
  samples = rng.integers(0, C + 3, (batch, num_latents, length))
  for b in range(batch):
    for k in range(num_latents):
      kind = rng.integers(4)
      if kind < 2:  # an exact copy, with garbage after the EOS for kind 1
        samples[b, k] = valid[b, rng.integers(num_strategies)]
        if kind == 1:
          end = np.flatnonzero(samples[b, k] == EOS)[0]
          samples[b, k, end + 1:] = rng.integers(0, C + 3, length - end - 1)
      elif kind == 2:  # a copy with one token changed
        samples[b, k] = valid[b, rng.integers(num_strategies)]
        t = rng.integers(length)
        samples[b, k, t] = (samples[b, k, t] + 1) % (C + 3)
  return samples, valid


def _random_matches(rng, batch, num_latents, num_strategies):
  return rng.integers(-1, num_strategies, (batch, num_latents))


# ------------------------------------------------------------------ tests


class SequenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_exact_match_hand_cases(self):
    target = np.array([[5, 6, EOS, PAD]] * 5 + [[5, 6, 7, 8]])
    pred = np.array([
        [5, 6, EOS, PAD],   # identical
        [5, 6, EOS, 9],     # differs only after EOS
        [5, 6, 7, EOS],     # no EOS where the target ends
        [5, EOS, PAD, PAD],  # ends too early
        [5, 7, EOS, PAD],   # wrong token
        [5, 6, 7, 8],       # target without EOS: all positions compared
    ])
    got = self.variant(metrics.exact_match)(pred, target)
    np.testing.assert_array_equal(got, [True, True, False, False, False, True])
    np.testing.assert_array_equal(
        got, [_np_equal_up_to_eos(p, t) for p, t in zip(pred, target)])

  def test_exact_match_shape_errors(self):
    with self.assertRaises(ValueError):
      metrics.exact_match(np.zeros((2, 3), int), np.zeros((2, 4), int))
    with self.assertRaises(AssertionError):
      metrics.exact_match(np.zeros((3,), int), np.zeros((3,), int))


class StrategyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((4, 3), (2, 5), (3, 3))
  def test_match_strategies_vs_brute_force(self, num_latents, num_strategies):
    rng = np.random.default_rng(num_latents * 10 + num_strategies)
    samples, valid = _random_case(rng, num_latents=num_latents,
                                  num_strategies=num_strategies)
    got = self.variant(metrics.match_strategies)(samples, valid)
    chex.assert_shape(got, (12, num_latents))
    chex.assert_type(got, jnp.int32)
    expected = _np_match(samples, valid)
    np.testing.assert_array_equal(got, expected)
    self.assertTrue((expected == -1).any() and (expected >= 0).any())

  def test_match_strategies_hand_case(self):
    valid = np.array([[[5, 6, EOS, PAD], [6, 5, EOS, PAD], [5, 6, 7, EOS]]])
    samples = np.array([[[5, 6, EOS, 9], [5, 6, 7, EOS], [5, 6, 7, 7], [6, 5, EOS, PAD],
                         [6, EOS, PAD, PAD]]])
    np.testing.assert_array_equal(metrics.match_strategies(samples, valid),
                                  [[0, 2, -1, 1, -1]])

  def test_match_strategies_shape_errors(self):
    with self.assertRaisesRegex(ValueError, "batch"):
      metrics.match_strategies(np.zeros((2, 3, 4), int), np.zeros((3, 3, 4), int))
    with self.assertRaisesRegex(ValueError, "length"):
      metrics.match_strategies(np.zeros((2, 3, 4), int), np.zeros((2, 3, 5), int))
    with self.assertRaises(AssertionError):
      metrics.match_strategies(np.zeros((2, 4), int), np.zeros((2, 3, 4), int))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((4, 3), (2, 5))
  def test_counts_validity_confusion_vs_brute_force(self, num_latents, num_strategies):
    rng = np.random.default_rng(0)
    matches = _random_matches(rng, 40, num_latents, num_strategies)
    counts = self.variant(functools.partial(metrics.latent_strategy_counts,
                                            num_strategies=num_strategies))(matches)
    np.testing.assert_array_equal(counts, _np_counts(matches, num_strategies))
    validity = self.variant(metrics.per_latent_validity)(matches)
    np.testing.assert_allclose(validity, (matches >= 0).mean(axis=0), rtol=1e-6)
    conf = self.variant(functools.partial(metrics.confusion,
                                          num_strategies=num_strategies))(matches)
    np.testing.assert_allclose(conf, _np_counts(matches, num_strategies) / 40, rtol=1e-6)
    np.testing.assert_allclose(conf.sum(axis=1), validity, rtol=1e-6)
    conf_valid = self.variant(functools.partial(
        metrics.confusion, num_strategies=num_strategies, over_valid=True))(matches)
    np.testing.assert_allclose(conf_valid.sum(axis=1), 1.0, rtol=1e-6)

  def test_confusion_row_without_valid_samples(self):
    matches = np.array([[0, -1], [1, -1]])
    np.testing.assert_allclose(metrics.confusion(matches, 2, over_valid=True),
                               [[0.5, 0.5], [0.0, 0.0]])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((4, 3, 0.5), (2, 5, 0.3), (6, 2, 0.5), (3, 3, 0.2))
  def test_coverage_vs_brute_force(self, num_latents, num_strategies, threshold):
    rng = np.random.default_rng(1)
    for _ in range(5):
      # Skewed per-latent strategy preferences so that dominance happens.
      prefs = rng.dirichlet(0.3 * np.ones(num_strategies + 1), num_latents)
      matches = np.stack([rng.choice(np.arange(-1, num_strategies), 30, p=p) for p in prefs],
                         axis=1)
      got = self.variant(functools.partial(
          metrics.strategy_coverage, num_strategies=num_strategies,
          threshold=threshold))(matches)
      coverage, assignment = _np_coverage(matches, num_strategies, threshold)
      np.testing.assert_allclose(got.coverage, coverage, rtol=1e-6)
      np.testing.assert_array_equal(got.assignment, assignment)

  @parameterized.parameters(2, 3, 5)
  def test_one_to_one_gives_full_coverage_and_nmi_one(self, num_strategies):
    perm = np.random.default_rng(num_strategies).permutation(num_strategies)
    matches = np.tile(perm[None, :], (20, 1))  # latent k always produces perm[k]
    result = metrics.strategy_coverage(matches, num_strategies)
    self.assertAlmostEqual(float(result.coverage), 1.0)
    np.testing.assert_array_equal(result.assignment, perm)
    for normalization in metrics.NMI_NORMALIZATIONS:
      nmi = metrics.latent_strategy_nmi(matches, num_strategies, normalization)
      self.assertAlmostEqual(float(nmi), 1.0, places=5)

  @parameterized.parameters(2, 3, 5)
  def test_collapse_gives_coverage_one_over_s_and_nmi_zero(self, num_strategies):
    matches = np.full((20, 4), num_strategies - 1)
    result = metrics.strategy_coverage(matches, num_strategies)
    self.assertAlmostEqual(float(result.coverage), 1.0 / num_strategies, places=6)
    np.testing.assert_array_equal(result.assignment, num_strategies - 1)
    for normalization in metrics.NMI_NORMALIZATIONS:
      self.assertEqual(float(metrics.latent_strategy_nmi(matches, num_strategies,
                                                         normalization)), 0.0)

  def test_coverage_threshold_and_invalid_samples(self):
    # Latent 0: 60% strategy 0. Latent 1: 40% strategy 1, 60% invalid.
    # Latent 2: 50/50 between strategies 0 and 2 (tie -> smallest index).
    matches = np.array([[0] * 6 + [1] * 4, [1] * 4 + [-1] * 6, [0] * 5 + [2] * 5]).T
    result = metrics.strategy_coverage(matches, 3, threshold=0.5)
    np.testing.assert_array_equal(result.assignment, [0, -1, 0])
    self.assertAlmostEqual(float(result.coverage), 1 / 3, places=6)
    result = metrics.strategy_coverage(matches, 3, threshold=0.4)
    np.testing.assert_array_equal(result.assignment, [0, 1, 0])
    self.assertAlmostEqual(float(result.coverage), 2 / 3, places=6)
    result = metrics.strategy_coverage(matches, 3, threshold=0.61)
    np.testing.assert_array_equal(result.assignment, [-1, -1, -1])
    self.assertEqual(float(result.coverage), 0.0)

  def test_coverage_k_not_equal_s(self):
    # K = 2 < S = 4: at most half the strategies can be recovered.
    matches = np.array([[0, 3]] * 10)
    result = metrics.strategy_coverage(matches, 4)
    self.assertAlmostEqual(float(result.coverage), 0.5)
    np.testing.assert_array_equal(result.assignment, [0, 3])
    # K = 4 > S = 2: pairs of latents share a strategy; all strategies recovered.
    matches = np.array([[0, 0, 1, 1]] * 10)
    result = metrics.strategy_coverage(matches, 2)
    self.assertAlmostEqual(float(result.coverage), 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*metrics.NMI_NORMALIZATIONS)
  def test_nmi_vs_brute_force(self, normalization):
    rng = np.random.default_rng(2)
    for num_latents, num_strategies in ((4, 3), (2, 5), (3, 3)):
      prefs = rng.dirichlet(np.ones(num_strategies + 1), num_latents)
      matches = np.stack([rng.choice(np.arange(-1, num_strategies), 50, p=p) for p in prefs],
                         axis=1)
      got = self.variant(functools.partial(
          metrics.latent_strategy_nmi, num_strategies=num_strategies,
          normalization=normalization))(matches)
      np.testing.assert_allclose(got, _np_nmi(matches, num_strategies, normalization),
                                 rtol=1e-5)

  def test_nmi_hand_checked(self):
    # Counts [[2, 0], [1, 1]] (plus invalid samples, which are ignored):
    # P(z,s) = [[1/2, 0], [1/4, 1/4]], P(z) = (1/2, 1/2), P(s) = (3/4, 1/4).
    matches = np.array([[0, 0], [0, 1], [-1, -1], [-1, -1]])  # columns: latents
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_z = math.log(2)
    h_s = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    for normalization, norm in (("arithmetic", (h_z + h_s) / 2),
                                ("geometric", math.sqrt(h_z * h_s)),
                                ("min", h_s), ("max", h_z)):
      self.assertAlmostEqual(float(metrics.latent_strategy_nmi(matches, 2, normalization)),
                             mi / norm, places=5)
    # K = 4 latents, two per strategy: I = H(S) = log 2, H(Z) = log 4.
    matches = np.array([[0, 0, 1, 1]] * 8)
    for normalization, value in (("arithmetic", 2 / 3), ("geometric", 1 / math.sqrt(2)),
                                 ("min", 1.0), ("max", 0.5)):
      self.assertAlmostEqual(float(metrics.latent_strategy_nmi(matches, 2, normalization)),
                             value, places=5)

  def test_nmi_degenerate_cases(self):
    # Independent latent and strategy (each latent produces both equally): 0.
    matches = np.array([[0, 0], [1, 1], [0, 0], [1, 1]])
    self.assertAlmostEqual(float(metrics.latent_strategy_nmi(matches, 2)), 0.0, places=6)
    # No valid sample, and a single latent on a single strategy: 0 by convention.
    self.assertEqual(float(metrics.latent_strategy_nmi(np.full((5, 3), -1), 3)), 0.0)
    self.assertEqual(float(metrics.latent_strategy_nmi(np.array([[1, -1]] * 4), 3)), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_latent_usage(self):
    winners = np.random.default_rng(3).integers(0, 5, 37)
    usage = self.variant(functools.partial(metrics.latent_usage, num_latents=5))(winners)
    np.testing.assert_allclose(usage, np.bincount(winners, minlength=5) / 37, rtol=1e-6)
    np.testing.assert_allclose(metrics.latent_usage(np.zeros(4, int), 3), [1.0, 0.0, 0.0])

  def test_option_errors(self):
    matches = np.zeros((4, 2), int)
    with self.assertRaisesRegex(ValueError, "arithmetic"):
      metrics.latent_strategy_nmi(matches, 2, "bogus")
    with self.assertRaisesRegex(ValueError, "threshold"):
      metrics.strategy_coverage(matches, 2, threshold=0.0)
    with self.assertRaisesRegex(ValueError, "num_strategies"):
      metrics.latent_strategy_counts(matches, 0)
    with self.assertRaises(AssertionError):
      metrics.per_latent_validity(np.zeros((4,), int))
    with self.assertRaises(AssertionError):
      metrics.latent_usage(np.zeros((4, 2), int), 2)


class MutualInformationMetricTest(chex.TestCase):

  def test_matches_numpy_and_is_bounded(self):
    rng = np.random.default_rng(5)
    b, k, length = 6, 3, 4
    logp = np.log(rng.dirichlet(np.ones(5), size=(b, k, k, length))[..., 0])
    mask = (rng.uniform(size=(b, k, length)) < 0.8).astype(np.float64)
    mean, stderr = metrics.mc_mutual_information(jnp.asarray(logp), jnp.asarray(mask))
    seq = np.sum(logp * mask[:, :, None, :], -1)  # [b, i, j]
    per = np.array([[seq[n, i, i] - np.log(np.mean(np.exp(seq[n, i]))) for i in range(k)]
                    for n in range(b)])
    np.testing.assert_allclose(mean, per.mean(), rtol=1e-5)
    np.testing.assert_allclose(stderr, per.mean(1).std(ddof=1) / np.sqrt(b), rtol=1e-4)
    self.assertLessEqual(float(per.max()), np.log(k) + 1e-9)

  def test_per_example_coverage_against_brute_force(self):
    rng = np.random.default_rng(7)
    matches = rng.integers(-1, 3, size=(9, 4))
    want = np.mean([len({m for m in row if m >= 0}) / 3 for row in matches])
    np.testing.assert_allclose(metrics.per_example_coverage(jnp.asarray(matches), 3), want,
                               rtol=1e-6)
    self.assertEqual(float(metrics.per_example_coverage(jnp.full((2, 3), -1), 3)), 0.0)

  def test_dead_latents(self):
    self.assertEqual(int(metrics.dead_latents(jnp.array([0.5, 0.0, 0.5]),
                                              jnp.array([1.0, 1.0, 0.4]))), 2)
    self.assertEqual(int(metrics.dead_latents(jnp.array([0.3, 0.3, 0.4]),
                                              jnp.array([0.9, 0.5, 1.0]))), 0)


class SequenceKLTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_vs_direct_computation(self):
    rng = np.random.default_rng(4)
    b, k, length = 7, 3, 5
    logp = np.log(rng.uniform(0.05, 1.0, (b, k, k, length))).astype(np.float32)
    mask = rng.uniform(size=(b, k, length)) < 0.8
    got = self.variant(metrics.mc_sequence_kl)(logp, mask)
    returns = np.zeros((b, k, k))
    for bb in range(b):
      for i in range(k):
        for j in range(k):
          returns[bb, i, j] = sum(logp[bb, i, i, t] - logp[bb, i, j, t]
                                  for t in range(length) if mask[bb, i, t])
    np.testing.assert_allclose(got.pairwise, returns.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.pairwise_stderr, returns.std(0, ddof=1) / np.sqrt(b),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.diag(got.pairwise), 0.0)
    per_example = np.array([np.mean([returns[bb, i, j] for i in range(k) for j in range(k)
                                     if i != j]) for bb in range(b)])
    np.testing.assert_allclose(got.mean, per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(got.stderr, per_example.std(ddof=1) / np.sqrt(b), rtol=1e-5)

  def test_estimates_the_exact_kl_of_a_tabular_model(self):
    # p_k(y) = Π_t p_{k,t}(y_t), independent positions: D_ij = Σ_t KL(p_{i,t} ‖ p_{j,t}).
    rng = np.random.default_rng(5)
    b, k, length, v = 4000, 3, 4, 5
    probs = rng.dirichlet(np.ones(v), (k, length))  # [K, L, V]
    exact = np.einsum("itv,itv->i", probs, np.log(probs))[:, None] - np.einsum(
        "itv,jtv->ij", probs, np.log(probs))
    # One rollout per (b, i) from p_i, scored under every j.
    u = rng.uniform(size=(b, k, length, 1))
    y = np.minimum((u > np.cumsum(probs, axis=-1)[None]).sum(-1), v - 1)  # [B, K(i), L]
    log_probs = np.log(probs)  # [K(j), L, V]
    logp = log_probs[np.arange(k)[None, None, :, None], np.arange(length)[None, None, None, :],
                     y[:, :, None, :]]  # [B, K(i), K(j), L]
    got = metrics.mc_sequence_kl(logp.astype(np.float32), np.ones((b, k, length), bool))
    z = np.abs(np.asarray(got.pairwise) - exact) / np.maximum(got.pairwise_stderr, 1e-12)
    self.assertTrue((z[~np.eye(k, dtype=bool)] < 4.0).all(), z)
    exact_mean = exact[~np.eye(k, dtype=bool)].mean()
    self.assertLess(abs(float(got.mean) - exact_mean) / float(got.stderr), 4.0)
    low, high = metrics.confidence_interval(got.mean, got.stderr, level=0.9999)
    self.assertTrue(float(low) < exact_mean < float(high))

  def test_shape_errors(self):
    with self.assertRaisesRegex(ValueError, "mask"):
      metrics.mc_sequence_kl(np.zeros((3, 2, 2, 4)), np.ones((3, 2, 5)))
    with self.assertRaisesRegex(ValueError, "K, K"):
      metrics.mc_sequence_kl(np.zeros((3, 2, 3, 4)), np.ones((3, 2, 4)))
    with self.assertRaisesRegex(ValueError, "batch >= 2"):
      metrics.mc_sequence_kl(np.zeros((1, 2, 2, 4)), np.ones((1, 2, 4)))
    with self.assertRaises(AssertionError):
      metrics.mc_sequence_kl(np.zeros((3, 2, 4)), np.ones((3, 2, 4)))

  def test_single_latent_has_no_pairs(self):
    logp = np.log(np.random.default_rng(6).uniform(0.1, 1.0, (4, 1, 1, 3)))
    got = metrics.mc_sequence_kl(logp, np.ones((4, 1, 3), bool))
    np.testing.assert_array_equal(got.pairwise, [[0.0]])
    self.assertEqual(float(got.mean), 0.0)
    self.assertEqual(float(got.stderr), 0.0)

  @parameterized.parameters(0.5, 0.9, 0.95, 0.99)
  def test_confidence_interval_vs_scipy(self, level):
    mean, stderr = np.array([1.0, -2.0]), np.array([0.5, 0.1])
    low, high = metrics.confidence_interval(jnp.asarray(mean, jnp.float32),
                                            jnp.asarray(stderr, jnp.float32), level)
    z = stats.norm.ppf((1 + level) / 2)
    np.testing.assert_allclose(low, mean - z * stderr, rtol=1e-5)
    np.testing.assert_allclose(high, mean + z * stderr, rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "level"):
      metrics.confidence_interval(mean, stderr, level=1.0)


if __name__ == "__main__":
  absltest.main()
