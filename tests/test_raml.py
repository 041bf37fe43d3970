"""Tests for latentdiv/raml.py (DESIGN.md §8).

Samplers are checked against closed forms / brute-force enumeration with
chi-square tests (scipy.stats) at fixed seeds; the edit distance against a
plain Python dynamic programme.
"""

import functools
import itertools
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from latentdiv import logprobs
from latentdiv import payoff
from latentdiv import edits as edits_lib
from latentdiv import raml
from latentdiv import vocab

P_MIN = 1e-3  # chi-square acceptance level (fixed seeds: deterministic).


def chi_square_pvalue(observed, expected_probs, min_expected=5.0):
  """Chi-square goodness-of-fit p-value; bins with expected count < min_expected are pooled.

  The pooled bin is kept even when its expected count is tiny (e.g. 1e-40 at
  τ = 0.01), so a single observation there rejects the fit.
  """
  observed = np.asarray(observed, np.float64)
  probs = np.asarray(expected_probs, np.float64)
  expected = observed.sum() * probs / probs.sum()
  big = expected >= min_expected
  obs, exp = list(observed[big]), list(expected[big])
  if (~big).any():
    obs.append(observed[~big].sum())
    exp.append(expected[~big].sum())
  if len(obs) == 1:
    return 1.0
  return stats.chisquare(np.array(obs), np.array(exp)).pvalue


def np_log_rho(v_prime, tau, convention):
  if convention == "exact":
    return math.log(v_prime - 1) - 1.0 / tau
  return (1.0 - 1.0 / tau) * math.log(v_prime - 1) - 1.0 / tau


def np_hamming(a, b):
  return sum(int(x != y) for x, y in zip(a, b))


def np_levenshtein(a, b):
  d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i in range(len(a) + 1):
    d[i][0] = i
  for j in range(len(b) + 1):
    d[0][j] = j
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1,
                    d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
  return d[len(a)][len(b)]


def rkey(seed):
  """A PRNG key of the 'rbg' implementation (far cheaper to compile on CPU than
  threefry; the legacy uint32 keys are exercised in the variant tests)."""
  return jax.random.key(seed, impl="rbg")


# Jitted samplers shared by the tests (one compilation per shape / static option).
T_HAM = 14     # row length of every statistical Hamming test.
N_DRAWS = 20000
T_EDIT = 9     # row length of every edit-sampler test.
N_EDIT = 3000


@functools.partial(jax.jit, static_argnames=("convention", "n"))
def draw_hamming(key, target, mask, alphabet, tau, convention, n=N_DRAWS):
  keys = jax.random.split(key, n)
  return jax.vmap(lambda k: payoff.sample_hamming(k, target, mask, alphabet, tau, convention))(
      keys)


@functools.partial(jax.jit, static_argnames=("convention", "n", "append_eos"))
def draw_edit(key, target, length, alphabet, tau, convention, n=N_EDIT, append_eos=True):
  keys = jax.random.split(key, n)
  return jax.vmap(lambda k: edits_lib.sample_edit(
      k, target, length, alphabet, tau, convention, append_eos=append_eos))(keys)


@functools.partial(jax.jit, static_argnames=("convention",))
def batch_hamming_log_prob(samples, target, mask, alphabet, tau, convention):
  return jax.vmap(lambda y: payoff.hamming_log_prob(y, target, mask, alphabet, tau,
                                                  convention))(samples)


batch_edit_distance = jax.jit(jax.vmap(edits_lib.edit_distance, in_axes=(0, 0, None, None)))


def padded_row(content, t=T_HAM):
  """content + EOS + PAD to length t, and its editable mask."""
  row = jnp.array(list(content) + [vocab.EOS] + [vocab.PAD] * (t - len(content) - 1),
                  jnp.int32)
  return row, logprobs.content_mask(row)


# ---------------------------------------------------------------------------
# Count distribution of the Hamming sampler.
# ---------------------------------------------------------------------------


class EditCountPmfTest(parameterized.TestCase):

  @parameterized.product(t=[1, 40], v_prime=[2, 1000])
  def test_rescaled_is_binomial(self, t, v_prime):
    for tau in (0.01, 0.6, 0.95, 100.0):
      self._check_rescaled_is_binomial(t, v_prime, tau)

  def _check_rescaled_is_binomial(self, t, v_prime, tau):
    with jax.enable_x64(True):
      log_pmf = np.asarray(payoff.log_edit_count_pmf(t, v_prime, tau, "rescaled"))
      rho = (v_prime - 1) ** (1.0 - 1.0 / tau) * math.exp(-1.0 / tau)
      expected = stats.binom.pmf(np.arange(t + 1), t, rho / (1.0 + rho))
      np.testing.assert_allclose(np.exp(log_pmf), expected, rtol=0, atol=1e-10)
      # Same distribution as "exact" at the effective temperature.
      tau_eff = float(payoff.effective_temperature(v_prime, tau, "rescaled"))
      np.testing.assert_allclose(tau_eff, tau / (1.0 + math.log(v_prime - 1)), rtol=1e-12)
      log_pmf_exact = np.asarray(payoff.log_edit_count_pmf(t, v_prime, tau_eff, "exact"))
      np.testing.assert_allclose(np.exp(log_pmf_exact), expected, rtol=0, atol=1e-10)

  def test_exact_matches_counts(self):
    for t, v_prime, tau in itertools.product([1, 15], [2, 3, 10], [0.05, 1.0, 20.0]):
      with jax.enable_x64(True):
        log_pmf = np.asarray(payoff.log_edit_count_pmf(t, v_prime, tau, "exact"))
      w = np.array([math.comb(t, e) * (v_prime - 1) ** e * math.exp(-e / tau)
                    for e in range(t + 1)], np.float64)
      np.testing.assert_allclose(np.exp(log_pmf), w / w.sum(), rtol=1e-9, atol=1e-14)

  @parameterized.product(convention=["exact", "rescaled"], x64=[False, True])
  def test_long_sequences_are_stable(self, convention, x64):
    for tau in (0.01, 0.9, 100.0):
      with jax.enable_x64(x64):
        log_pmf = payoff.log_edit_count_pmf(512, 30000, tau, convention)
        chex.assert_shape(log_pmf, (513,))
        self.assertTrue(bool(jnp.all(jnp.isfinite(log_pmf))))
        total = float(jnp.sum(jnp.exp(log_pmf)))
      self.assertAlmostEqual(total, 1.0, delta=1e-5 if not x64 else 1e-12)

  def test_edit_count_pmf_long_sequences_are_stable(self):
    for convention, tau in [("exact", 0.01), ("rescaled", 0.9), ("exact", 100.0)]:
      log_pmf = edits_lib.log_edit_distance_count_pmf(500, 30000, tau, convention, 512)
      chex.assert_shape(log_pmf, (513,))
      self.assertTrue(bool(jnp.all(jnp.isfinite(log_pmf))))
      self.assertAlmostEqual(float(jnp.sum(jnp.exp(log_pmf))), 1.0, delta=1e-5)

  def test_degenerate_cases(self):
    # tau = 0 is maximum likelihood; V' = 1 has no alternative; n = 0.
    for convention in raml.CONVENTIONS:
      for log_pmf in (payoff.log_edit_count_pmf(6, 10, 0.0, convention),
                      payoff.log_edit_count_pmf(6, 1, 0.7, convention),
                      payoff.log_edit_count_pmf(0, 10, 0.7, convention, max_length=6)):
        np.testing.assert_allclose(np.exp(np.asarray(log_pmf)), np.eye(7)[0], atol=1e-7)

  def test_per_row_length_with_masking(self):
    lengths = jnp.array([0, 3, 10])
    fn = jax.jit(jax.vmap(
        lambda n: payoff.log_edit_count_pmf(n, 7, 0.8, "rescaled", max_length=10)))
    out = np.asarray(fn(lengths))
    chex.assert_shape(out, (3, 11))
    for row, n in zip(out, [0, 3, 10]):
      np.testing.assert_allclose(
          row[:n + 1], np.asarray(payoff.log_edit_count_pmf(n, 7, 0.8, "rescaled")),
          rtol=1e-5, atol=1e-4)
      self.assertTrue(np.all(np.isneginf(row[n + 1:])))

  def test_traced_length_needs_max_length(self):
    with self.assertRaisesRegex(ValueError, "max_length"):
      jax.jit(lambda n: payoff.log_edit_count_pmf(n, 7, 0.8, "exact"))(3)

  def test_unknown_convention(self):
    with self.assertRaisesRegex(ValueError, "'exact', 'rescaled'"):
      payoff.log_edit_count_pmf(4, 5, 0.5, "paper")
    with self.assertRaisesRegex(ValueError, "allowed values"):
      payoff.hamming_log_odds(5, 0.5, "norouzi")


class CountPmfVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_pmfs_jit_and_no_jit(self):
    fn = self.variant(payoff.log_edit_count_pmf, static_argnames=("convention", "max_length"))
    log_pmf = fn(jnp.int32(5), 4, 0.8, convention="rescaled", max_length=8)
    chex.assert_shape(log_pmf, (9,))
    rho = 3 ** (1 - 1 / 0.8) * math.exp(-1 / 0.8)
    np.testing.assert_allclose(np.exp(np.asarray(log_pmf)),
                               stats.binom.pmf(np.arange(9), 5, rho / (1 + rho)), atol=1e-6)
    log_odds = self.variant(payoff.hamming_log_odds, static_argnames=("convention",))(
        4, 0.8, convention="rescaled")
    self.assertAlmostEqual(float(log_odds), math.log(rho), places=5)
    tau_eff = self.variant(payoff.effective_temperature, static_argnames=("convention",))(
        4, 0.8, convention="rescaled")
    self.assertAlmostEqual(float(tau_eff), 0.8 / (1 + math.log(3)), places=6)
    edit_pmf = self.variant(edits_lib.log_edit_distance_count_pmf,
                            static_argnames=("convention", "max_edits"))(
                                jnp.int32(4), 6, 0.8, convention="exact", max_edits=9)
    np.testing.assert_allclose(np.exp(np.asarray(edit_pmf)),
                               np_edit_count_pmf(4, 6, 0.8, "exact", 9), rtol=1e-4, atol=1e-7)
    self.assertEqual(int(self.variant(payoff.alphabet_size)(jnp.arange(7) % 2 == 0)), 4)


# ---------------------------------------------------------------------------
# Hamming sampler.
# ---------------------------------------------------------------------------


class SampleHammingTest(parameterized.TestCase):

  @parameterized.parameters("exact", "rescaled")
  def test_edit_counts_follow_pmf(self, convention):
    lo = vocab.FIRST_CONTENT
    rng = np.random.default_rng(0)
    for t, v_prime in [(12, 5), (12, 50), (3, 2)]:
      target, mask = padded_row(rng.integers(lo, lo + v_prime, t))
      for i, tau in enumerate([0.01, 0.5, 0.9, 100.0]):
        samples, edits = draw_hamming(rkey(i), target, mask, (lo, lo + v_prime),
                                      tau, convention)
        samples, edits = np.asarray(samples), np.asarray(edits)
        # Reported e is the Hamming distance; EOS/PAD untouched; tokens valid.
        np.testing.assert_array_equal(edits, (samples != np.asarray(target)).sum(-1))
        np.testing.assert_array_equal(samples[:, t:],
                                      np.broadcast_to(target[t:], (N_DRAWS, T_HAM - t)))
        self.assertTrue(np.all((samples[:, :t] >= lo) & (samples[:, :t] < lo + v_prime)))
        with jax.enable_x64(True):
          pmf = np.exp(np.asarray(payoff.log_edit_count_pmf(t, v_prime, tau, convention)))
        counts = np.bincount(edits, minlength=t + 1)
        self.assertGreater(chi_square_pvalue(counts, pmf), P_MIN,
                           msg=f"t={t} V'={v_prime} tau={tau}: {counts} vs {pmf * N_DRAWS}")

  def test_chi_square_detects_the_wrong_convention(self):
    t, v_prime, tau = 10, 20, 0.9
    target, mask = padded_row([4] * t)
    _, edits = draw_hamming(rkey(0), target, mask, (3, 3 + v_prime), tau,
                            "rescaled")
    counts = np.bincount(np.asarray(edits), minlength=t + 1)
    with jax.enable_x64(True):
      wrong = np.exp(np.asarray(payoff.log_edit_count_pmf(t, v_prime, tau, "exact")))
    self.assertLess(chi_square_pvalue(counts, wrong), 1e-6)

  @parameterized.product(convention=["exact", "rescaled"], alphabet_kind=["range", "mask"])
  def test_sequence_frequencies_match_payoff_distribution(self, convention, alphabet_kind):
    # T = 3 editable positions inside a row with EOS and PAD; V' = 3.
    if alphabet_kind == "range":
      tokens = [3, 4, 5]
      alphabet = (3, 6)
    else:
      tokens = [3, 5, 7]
      alphabet = jnp.zeros((9,), bool).at[jnp.array(tokens)].set(True)
    target_content = [tokens[2], tokens[0], tokens[0]]
    target, mask = padded_row(target_content)
    tau = 0.7
    samples, _ = draw_hamming(rkey(1), target, mask, alphabet, tau, convention)
    samples = np.asarray(samples)
    np.testing.assert_array_equal(samples[:, 3:], np.broadcast_to(target[3:], (N_DRAWS, 11)))
    # Exact q(y | y*) ∝ exp(-d_H / tau_eff) by enumeration of all 27 outputs.
    tau_eff = tau if convention == "exact" else tau / (1.0 + math.log(2.0))
    ys = list(itertools.product(tokens, repeat=3))
    logits = np.array([-np_hamming(y, target_content) / tau_eff for y in ys])
    q = np.exp(logits - logits.max())
    q /= q.sum()
    index = {y: i for i, y in enumerate(ys)}
    counts = np.zeros(len(ys))
    for row in map(tuple, samples[:, :3]):
      counts[index[row]] += 1  # KeyError if a token left the alphabet.
    self.assertGreater(chi_square_pvalue(counts, q), P_MIN)
    # The library's exact log q matches the enumeration.
    with jax.enable_x64(True):
      rows = jnp.concatenate(
          [jnp.array(ys, jnp.int32), jnp.broadcast_to(target[3:], (27, 11))], axis=1)
      log_q = batch_hamming_log_prob(rows, target, mask, alphabet, tau, convention)
      np.testing.assert_allclose(np.exp(np.asarray(log_q)), q, rtol=1e-10)

  def test_small_tau_returns_target(self):
    target, mask = padded_row([3, 9, 4, 7])
    for tau in (0.0, 1e-3, 0.01):
      samples, edits = draw_hamming(rkey(2), target, mask, (3, 10), tau, "exact")
      np.testing.assert_array_equal(np.asarray(samples),
                                    np.broadcast_to(target, (N_DRAWS, T_HAM)))
      np.testing.assert_array_equal(np.asarray(edits), 0)

  def test_extremes(self):
    # All-padding row: nothing editable.
    target = jnp.zeros((T_HAM,), jnp.int32)
    mask = jnp.zeros((T_HAM,), bool)
    samples, edits = draw_hamming(rkey(0), target, mask, (3, 8), 5.0, "exact")
    np.testing.assert_array_equal(samples, np.zeros((N_DRAWS, T_HAM)))
    np.testing.assert_array_equal(edits, 0)
    log_q = batch_hamming_log_prob(samples[:2], target, mask, (3, 8), 5.0, "exact")
    np.testing.assert_array_equal(log_q, 0.0)
    # T = 1, V' = 2: the edit is the other token, with probability ρ/(1+ρ).
    target = jnp.array([3], jnp.int32)
    samples, edits = draw_hamming(rkey(3), target, jnp.ones((1,), bool), (3, 5),
                                  1.0, "exact", n=4000)
    samples, edits = np.asarray(samples), np.asarray(edits)
    np.testing.assert_array_equal(samples[:, 0], np.where(edits == 1, 4, 3))
    p1 = 1.0 / (1.0 + math.e)  # rho = e^-1
    counts = np.bincount(edits, minlength=2)
    self.assertGreater(chi_square_pvalue(counts, [1 - p1, p1]), P_MIN)

  def test_log_prob_impossible_samples(self):
    target, mask = padded_row([3, 4])
    bad = jnp.stack([target.at[3].set(5),   # differs outside the mask
                     target.at[1].set(9)])  # token outside the alphabet
    log_q = batch_hamming_log_prob(bad, target, mask, (3, 6), 0.8, "exact")
    self.assertTrue(np.all(np.isneginf(np.asarray(log_q))))

  def test_shape_errors(self):
    with self.assertRaises(AssertionError):
      payoff.sample_hamming(rkey(0), jnp.zeros((4,), jnp.int32),
                          jnp.ones((5,), bool), (3, 6), 1.0, "exact")
    with self.assertRaisesRegex(ValueError, "allowed values"):
      payoff.sample_hamming(rkey(0), jnp.zeros((4,), jnp.int32),
                          jnp.ones((4,), bool), (3, 6), 1.0, "bogus")


class SampleHammingVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_consistency(self):
    alphabet = jnp.zeros((12,), bool).at[3:12:2].set(True)
    fn = self.variant(payoff.sample_hamming, static_argnames=("convention",))
    target = jnp.array([3, 5, 7, 9, vocab.EOS, vocab.PAD], jnp.int32)
    mask = logprobs.content_mask(target)
    sample, e = fn(jax.random.PRNGKey(0), target, mask, alphabet, 2.0, convention="exact")
    chex.assert_shape(sample, (6,))
    chex.assert_shape(e, ())
    self.assertEqual(int(e), int(payoff.hamming_distance(sample, target, mask)))
    self.assertTrue(bool(jnp.all(alphabet[sample[:4]])))
    log_q = self.variant(payoff.hamming_log_prob, static_argnames=("convention",))(
        sample, target, mask, alphabet, 2.0, convention="exact")
    chex.assert_shape(log_q, ())
    self.assertTrue(bool(jnp.isfinite(log_q)))


# ---------------------------------------------------------------------------
# Edit distance and the approximate edit sampler.
# ---------------------------------------------------------------------------


class EditDistanceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_python_dp(self):
    rng = np.random.default_rng(0)
    n, ta, tb = 300, 7, 5
    a = rng.integers(3, 6, (n, ta))
    b = rng.integers(3, 6, (n, tb))
    a_len = rng.integers(0, ta + 1, n)
    b_len = rng.integers(0, tb + 1, n)
    fn = self.variant(jax.vmap(edits_lib.edit_distance))
    got = np.asarray(fn(jnp.asarray(a), jnp.asarray(a_len), jnp.asarray(b), jnp.asarray(b_len)))
    chex.assert_shape(got, (n,))
    want = [np_levenshtein(list(a[i, :a_len[i]]), list(b[i, :b_len[i]])) for i in range(n)]
    np.testing.assert_array_equal(got, want)

  def test_known_values_and_errors(self):
    a = jnp.array([3, 4, 5, 6, vocab.EOS, 0])
    self.assertEqual(int(edits_lib.edit_distance(a, 4, jnp.array([3, 5, 6, 7, 8]), 5)), 3)
    self.assertEqual(int(edits_lib.edit_distance(a, 0, a, 4)), 4)
    self.assertEqual(int(edits_lib.edit_distance(a, 4, a, 4)), 0)
    with self.assertRaises(AssertionError):
      edits_lib.edit_distance(jnp.zeros((2, 3), jnp.int32), 1, a, 2)


def np_edit_count_pmf(n, v_prime, tau, convention, max_edits):
  log_w = []
  for e in range(max_edits + 1):
    count = sum(math.comb(n, s) * math.comb(n + (e - s) - s, e - s)
                for s in range(min(n, e) + 1))
    log_w.append(math.log(count) + e * np_log_rho(v_prime, tau, convention))
  log_w = np.array(log_w)
  w = np.exp(log_w - log_w.max())
  return w / w.sum()


class SampleEditTest(parameterized.TestCase):

  @parameterized.parameters("exact", "rescaled")
  def test_count_pmf_matches_formula(self, convention):
    for n, tau in itertools.product([0, 4, 9], [0.3, 5.0]):
      with jax.enable_x64(True):
        got = np.exp(np.asarray(edits_lib.log_edit_distance_count_pmf(n, 6, tau, convention, 9)))
      np.testing.assert_allclose(got, np_edit_count_pmf(n, 6, tau, convention, 9),
                                 rtol=1e-9, atol=1e-14)

  @parameterized.parameters(
      dict(convention="rescaled", tau=0.9, append_eos=True),
      dict(convention="rescaled", tau=3.0, append_eos=True),
      dict(convention="exact", tau=0.7, append_eos=False))
  def test_samples_are_valid_and_bounded(self, convention, tau, append_eos):
    t, length, lo, hi = T_EDIT, 5, 3, 8
    target = jnp.array([3, 7, 4, 4, 6, vocab.EOS, 0, 0, 0], jnp.int32)
    out = draw_edit(rkey(0), target, length, (lo, hi), tau, convention,
                    append_eos=append_eos)
    tokens, lengths, edits = map(np.asarray, out)
    chex.assert_shape([tokens, lengths, edits], [(N_EDIT, t), (N_EDIT,), (N_EDIT,)])
    max_content = t - 1 if append_eos else t
    self.assertTrue(np.all((lengths >= 0) & (lengths <= max_content)))
    pos = np.arange(t)[None, :]
    content = pos < lengths[:, None]
    self.assertTrue(np.all(~content | ((tokens >= lo) & (tokens < hi))))
    if append_eos:
      np.testing.assert_array_equal(tokens[pos == lengths[:, None]], vocab.EOS)
      after = pos > lengths[:, None]
    else:
      self.assertFalse(np.any(tokens == vocab.EOS))
      after = ~content
    np.testing.assert_array_equal(tokens[after], vocab.PAD)
    # The drawn e follows its count pmf and bounds the true edit distance,
    # with equality for e <= 1.
    pmf = np_edit_count_pmf(length, hi - lo, tau, convention, t)
    self.assertGreater(chi_square_pvalue(np.bincount(edits, minlength=t + 1), pmf), P_MIN)
    dist = np.asarray(batch_edit_distance(jnp.asarray(tokens), jnp.asarray(lengths),
                                          target, length))
    self.assertTrue(np.all(dist <= edits))
    np.testing.assert_array_equal(dist[edits <= 1], edits[edits <= 1])
    # Measured approximation gap: for few edits most survive (edits cancel or
    # merge with probability ~1/V' each); near the length bounds it saturates.
    few = edits <= 3
    if few.sum() >= 100:
      self.assertGreater(dist[few].mean(), 0.7 * edits[few].mean())

  def test_small_tau_returns_target(self):
    target = jnp.array([3, 7, 4, vocab.EOS, 0, 0, 0, 0, 0], jnp.int32)
    out = draw_edit(rkey(0), target, 3, (3, 8), 0.0, "rescaled")
    np.testing.assert_array_equal(np.asarray(out.tokens),
                                  np.broadcast_to(target, (N_EDIT, T_EDIT)))
    np.testing.assert_array_equal(np.asarray(out.length), 3)
    np.testing.assert_array_equal(np.asarray(out.num_edits), 0)

  def test_extremes(self):
    # Empty target: the first edit must be an insertion.
    target = jnp.zeros((T_EDIT,), jnp.int32)
    out = draw_edit(rkey(1), target, 0, (3, 5), 10.0, "rescaled")
    tokens, lengths, edits = map(np.asarray, out)
    self.assertTrue(np.all(lengths <= np.minimum(edits, T_EDIT - 1)))
    np.testing.assert_array_equal(lengths[edits == 1], 1)
    np.testing.assert_array_equal(tokens[np.arange(N_EDIT), lengths], vocab.EOS)
    # T = 1 with EOS: no room for content.
    out = edits_lib.sample_edit(rkey(0), jnp.array([vocab.EOS]), 0, (3, 5), 10.0,
                           "exact")
    np.testing.assert_array_equal(out.tokens, [vocab.EOS])
    self.assertEqual(int(out.length), 0)


class SampleEditVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes(self):
    fn = self.variant(edits_lib.sample_edit,
                      static_argnames=("convention", "max_edits", "append_eos"))
    target = jnp.array([3, 7, 4, vocab.EOS, 0, 0], jnp.int32)
    alphabet = jnp.arange(10) >= 3
    out = fn(rkey(3), target, 3, alphabet, 2.0, convention="exact", max_edits=4)
    chex.assert_shape([out.tokens, out.length, out.num_edits], [(6,), (), ()])
    self.assertLessEqual(int(out.num_edits), 4)
    self.assertLessEqual(int(edits_lib.edit_distance(out.tokens, out.length, target, 3)),
                         int(out.num_edits))
    self.assertEqual(int(out.tokens[out.length]), vocab.EOS)


class SampleRamlTargetsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hamming_batch(self):
    targets = jnp.array([[3, 4, 5, 6, vocab.EOS, 0],
                         [7, 8, vocab.EOS, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0]], jnp.int32)
    masks = jax.vmap(logprobs.content_mask)(targets)
    fn = self.variant(raml.sample_raml_targets,
                      static_argnames=("n_samples", "convention", "reward", "max_edits"))
    out = fn(rkey(0), targets, masks, n_samples=16, alphabet=(3, 9), tau=0.9,
             convention="rescaled", reward="hamming")
    chex.assert_shape(out.tokens, (3, 16, 6))
    chex.assert_shape(out.num_edits, (3, 16))
    dist = jax.vmap(jax.vmap(payoff.hamming_distance, in_axes=(0, None, None)))(
        out.tokens, targets, masks)
    np.testing.assert_array_equal(out.num_edits, dist)
    np.testing.assert_array_equal(out.tokens[2], 0)
    # Samples vary within an example (not one shared sample).
    self.assertGreater(len({tuple(r) for r in np.asarray(out.tokens[0])}), 5)

  @chex.variants(with_jit=True)  # The eager path of sample_edit: SampleEditVariantsTest.
  def test_edit_batch(self):
    targets = jnp.array([[3, 4, 5, vocab.EOS, 0, 0],
                         [7, vocab.EOS, 0, 0, 0, 0]], jnp.int32)
    masks = jax.vmap(logprobs.content_mask)(targets)
    fn = self.variant(raml.sample_raml_targets,
                      static_argnames=("n_samples", "convention", "reward", "max_edits"))
    out = fn(rkey(1), targets, masks, n_samples=16, alphabet=(3, 9), tau=0.9,
             convention="rescaled", reward="edit", max_edits=4)
    chex.assert_shape(out.tokens, (2, 16, 6))
    self.assertTrue(bool(jnp.all(out.num_edits <= 4)))
    self.assertTrue(bool(jnp.all(jnp.sum(out.tokens == vocab.EOS, -1) == 1)))

  def test_unknown_reward(self):
    with self.assertRaisesRegex(ValueError, "'hamming', 'edit'"):
      raml.sample_raml_targets(rkey(0), jnp.zeros((1, 3), jnp.int32),
                               jnp.zeros((1, 3), bool), 2, (3, 5), 1.0, "exact", reward="bleu")


# ---------------------------------------------------------------------------
# Importance weights, losses, distillation view, label smoothing.
# ---------------------------------------------------------------------------


def _enumerate_tiny():
  """All 27 contents of length 3 over {3, 4, 5}, the target content and their d_H."""
  ys = np.array(list(itertools.product([3, 4, 5], repeat=3)))
  target = np.array([5, 3, 3])
  d = (ys != target).sum(-1)
  return ys, target, d


class ImportanceWeightsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_softmax_and_is_normalised(self):
    rng = np.random.default_rng(0)
    r = rng.normal(size=10) * 3
    lq = rng.normal(size=10) - 5
    fn = self.variant(raml.importance_weights)
    w = fn(jnp.asarray(r), jnp.asarray(lq), 0.5)
    chex.assert_shape(w, (10,))
    lw = r / 0.5 - lq
    want = np.exp(lw - lw.max())
    np.testing.assert_allclose(w, want / want.sum(), rtol=1e-5)
    # Extreme values stay finite; masks zero out samples; nothing valid -> zeros.
    w = fn(jnp.array([1e4, -1e4, 0.0]), jnp.array([-1e4, 0.0, 0.0]), 1e-3)
    self.assertTrue(bool(jnp.all(jnp.isfinite(w))))
    self.assertTrue(bool(jnp.all(w >= 0)))
    self.assertAlmostEqual(float(jnp.sum(w)), 1.0, places=6)
    w = fn(jnp.asarray(r), jnp.asarray(lq), 0.5, jnp.arange(10) < 4)
    np.testing.assert_array_equal(w[4:], 0.0)
    self.assertAlmostEqual(float(jnp.sum(w)), 1.0, places=6)
    w = fn(jnp.asarray(r), jnp.asarray(lq), 0.5, jnp.zeros((10,), bool))
    np.testing.assert_array_equal(w, 0.0)
    ess = self.variant(raml.effective_sample_size)(jnp.array([0.5, 0.25, 0.25, 0.0]))
    self.assertAlmostEqual(float(ess), 1.0 / 0.375, places=4)

  def test_self_proposal_gives_uniform_weights(self):
    # Reward -d_H at the proposal's own temperature: exp(r/τ)/q is constant.
    ys, target, d = _enumerate_tiny()
    row, mask = padded_row(target)
    rows = jnp.concatenate([jnp.asarray(ys, jnp.int32),
                            jnp.broadcast_to(row[3:], (27, T_HAM - 3))], axis=1)
    log_q = batch_hamming_log_prob(rows, row, mask, (3, 6), 0.4, "exact")
    w = raml.importance_weights(-jnp.asarray(d, jnp.float32), log_q, 0.4)
    np.testing.assert_allclose(w, np.full(27, 1 / 27), rtol=1e-5)

  def test_snis_estimates_edit_distance_payoff(self):
    # Target q_r ∝ exp(-d_E/τ) over the 27 contents, proposal = Hamming sampler.
    ys, target, _ = _enumerate_tiny()
    d_edit = np.array([np_levenshtein(list(y), list(target)) for y in ys], np.float64)
    tau = 0.5
    p = np.exp(-d_edit / tau)
    p /= p.sum()
    exact_mean = float((p * d_edit).sum())
    row, mask = padded_row(target)
    samples, _ = draw_hamming(rkey(5), row, mask, (3, 6), 1.0, "exact")
    log_q = batch_hamming_log_prob(samples, row, mask, (3, 6), 1.0, "exact")
    d = batch_edit_distance(samples, jnp.full((N_DRAWS,), 3), row, 3).astype(jnp.float32)
    w = raml.importance_weights(-d, log_q, tau)
    self.assertGreater(float(raml.effective_sample_size(w)), 2000)
    self.assertAlmostEqual(float(jnp.sum(w * d)), exact_mean, delta=0.03)
    # Without the weights the proposal's mean is far off: the check has teeth.
    self.assertGreater(abs(float(jnp.mean(d)) - exact_mean), 0.2)


class ImportanceTargetsTest(chex.TestCase):
  """``sample_importance_targets`` (the batched sampler of the train step) against enumeration."""

  def _tiny(self, reward="edit_is", rows=400, n=32, proposal_tau=None, seed=0):
    ys, target, _ = _enumerate_tiny()
    row, mask = padded_row(target, t=6)
    out = raml.sample_importance_targets(
        rkey(seed), jnp.broadcast_to(row, (rows, 6)), jnp.broadcast_to(mask, (rows, 6)), n,
        (3, 6), 0.8, "rescaled", reward, proposal_tau=proposal_tau)
    return ys, target, row, mask, out

  def test_weights_equal_the_exact_ratio_of_payoff_to_proposal(self):
    ys, target, row, mask, out = self._tiny(rows=3, n=16)
    chex.assert_shape(out.tokens, (3, 16, 6))
    chex.assert_shape(out.weights, (3, 16))
    chex.assert_shape(out.ess, (3,))
    # Exact, by enumeration: q_r(y) ∝ exp(−d_E(y, y*)/τ_eff), proposal q_H over the 27 contents.
    tau_eff = 0.8 / (1.0 + math.log(2.0))
    d_edit = {tuple(y): np_levenshtein(list(y), list(target)) for y in ys}
    rows = jnp.concatenate([jnp.asarray(ys, jnp.int32),
                            jnp.broadcast_to(row[3:], (27, 3))], axis=1)
    log_q = np.asarray(batch_hamming_log_prob(rows, row, mask, (3, 6), 0.8, "rescaled"),
                       np.float64)
    self.assertAlmostEqual(float(np.exp(log_q).sum()), 1.0, places=5)
    log_q = {tuple(y): lq for y, lq in zip(ys, log_q)}
    for b in range(3):
      contents = [tuple(np.asarray(t)[:3]) for t in out.tokens[b]]
      log_w = np.array([-d_edit[c] / tau_eff - log_q[c] for c in contents])
      want = np.exp(log_w - log_w.max())
      np.testing.assert_allclose(out.weights[b], want / want.sum(), rtol=1e-4)
      self.assertAlmostEqual(float(out.ess[b]), 1.0 / float((want / want.sum()) @
                                                            (want / want.sum())), places=3)

  def test_weighted_samples_estimate_the_payoff_distribution(self):
    # A wider proposal (τ_prop = 2) than the target (τ = 0.8), both rescaled.
    ys, target, _, _, out = self._tiny(rows=400, n=32, proposal_tau=2.0)
    tau_eff = 0.8 / (1.0 + math.log(2.0))
    d_edit = np.array([np_levenshtein(list(y), list(target)) for y in ys], np.float64)
    q_r = np.exp(-d_edit / tau_eff)
    q_r /= q_r.sum()
    index = {tuple(y): i for i, y in enumerate(ys)}
    estimate = np.zeros(27)
    for b in range(400):
      for t, w in zip(np.asarray(out.tokens[b]), np.asarray(out.weights[b])):
        estimate[index[tuple(t[:3])]] += w / 400
    self.assertLess(0.5 * np.abs(estimate - q_r).sum(), 0.03)
    # The proposal alone is off (the check has teeth): its own frequencies.
    counts = np.zeros(27)
    for t in np.asarray(out.tokens).reshape(-1, 6):
      counts[index[tuple(t[:3])]] += 1
    self.assertGreater(0.5 * np.abs(counts / counts.sum() - q_r).sum(), 0.15)
    # ESS/N approaches 1 / E_q[(q_r/q)^2] (exact, by enumeration) for large N.
    row, mask = padded_row(target, t=6)
    rows = jnp.concatenate([jnp.asarray(ys, jnp.int32),
                            jnp.broadcast_to(row[3:], (27, 3))], axis=1)
    q_prop = np.exp(np.asarray(batch_hamming_log_prob(rows, row, mask, (3, 6), 2.0,
                                                      "rescaled"), np.float64))
    want_fraction = 1.0 / float(np.sum(q_r ** 2 / q_prop))
    self.assertAlmostEqual(float(jnp.mean(out.ess)) / 32, want_fraction, delta=0.05)

  def test_bleu_reward_and_unknown_names(self):
    _, _, _, _, out = self._tiny(reward="bleu_is", rows=4, n=8)
    chex.assert_tree_all_finite(out.weights)
    np.testing.assert_allclose(jnp.sum(out.weights, axis=1), 1.0, rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "Unknown reward 'edit'"):
      self._tiny(reward="edit")


class LossesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_raml_loss(self):
    ll = jnp.array([-1.0, -2.0, -4.0, -8.0])
    fn = self.variant(raml.raml_loss)
    self.assertAlmostEqual(float(fn(ll)), 3.75, places=6)
    self.assertAlmostEqual(float(fn(ll, None, jnp.array([True, True, False, False]))), 1.5,
                           places=6)
    w = jnp.array([0.1, 0.2, 0.3, 0.4])
    self.assertAlmostEqual(float(fn(ll, w)), float(-(w * ll).sum()), places=6)
    grad_w = jax.grad(lambda w_: fn(ll, w_))(w)
    np.testing.assert_array_equal(grad_w, 0.0)  # weights are constants.
    np.testing.assert_allclose(jax.grad(lambda l: fn(l, w))(ll), -w)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sequence_log_likelihood_and_ml_limit(self):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(T_HAM, 9)).astype(np.float32)
    target, _ = padded_row([3, 8, 4])
    mask = self.variant(logprobs.output_mask)(target)
    np.testing.assert_array_equal(mask, np.arange(T_HAM) <= 3)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = sum(lp[t, int(target[t])] for t in range(4))
    got = self.variant(logprobs.sequence_log_likelihood)(jnp.asarray(logits), target, mask)
    self.assertAlmostEqual(float(got), want, places=5)
    # tau = 0: every RAML sample is y*, so the RAML loss is the ML loss.
    samples, _ = draw_hamming(rkey(0), target, logprobs.content_mask(target),
                              (3, 9), 0.0, "rescaled")
    ll = jax.vmap(lambda y: logprobs.sequence_log_likelihood(jnp.asarray(logits), y, mask))(
        samples[:8])
    self.assertAlmostEqual(float(self.variant(raml.raml_loss)(ll)), -want, places=5)

  def test_kl_payoff_to_model(self):
    ys, target, d = _enumerate_tiny()
    tau = 0.6
    q = np.exp(-d / tau)
    q /= q.sum()
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(27))
    exact_kl = float((q * (np.log(q) - np.log(p))).sum())
    row, mask = padded_row(target)
    samples, _ = draw_hamming(rkey(6), row, mask, (3, 6), tau, "exact")
    log_q = batch_hamming_log_prob(samples, row, mask, (3, 6), tau, "exact")
    index = np.asarray(samples[:, :3] - 3) @ np.array([9, 3, 1])
    log_p = jnp.asarray(np.log(p)[index], jnp.float32)
    est = raml.kl_payoff_to_model(log_q, log_p)
    sd = float(jnp.std(log_q - log_p))
    self.assertAlmostEqual(float(est), exact_kl, delta=4 * sd / math.sqrt(N_DRAWS))
    # Weighted form with uniform weights is the plain mean; masks drop samples.
    lq, lp = jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0])
    self.assertAlmostEqual(float(raml.kl_payoff_to_model(lq, lp, jnp.array([0.5, 0.5]))),
                           float(raml.kl_payoff_to_model(lq, lp)), places=6)
    self.assertAlmostEqual(float(raml.kl_payoff_to_model(lq, lp, None,
                                                         jnp.array([True, False]))), 2.0)


class LabelSmoothingTest(chex.TestCase):

  def _np_prior(self, v, prior, alphabet, unigram):
    if prior == "unigram":
      return unigram / unigram.sum()
    pi = np.zeros(v)
    if alphabet is None:
      pi[:] = 1.0
    else:
      pi[alphabet[0]:alphabet[1]] = 1.0
    return pi / pi.sum()

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("uniform_all", "uniform", None),
      ("uniform_alphabet", "uniform", (3, 7)),
      ("unigram", "unigram", None))
  def test_targets_and_loss_closed_form(self, prior, alphabet):
    v, eps = 8, 0.1
    rng = np.random.default_rng(0)
    unigram = rng.integers(1, 10, v).astype(np.float32)
    targets = jnp.array([3, 6, 5, vocab.EOS, 0], jnp.int32)
    mask = logprobs.output_mask(targets)
    logits = rng.normal(size=(5, v)).astype(np.float32)
    kwargs = dict(prior=prior, alphabet=alphabet,
                  unigram=jnp.asarray(unigram) if prior == "unigram" else None)
    smoothed = self.variant(raml.label_smoothing_targets,
                            static_argnames=("vocab_size", "prior"))(
                                targets, vocab_size=v, epsilon=eps, **kwargs)
    chex.assert_shape(smoothed, (5, v))
    pi = self._np_prior(v, prior, alphabet, unigram)
    want = (1 - eps) * np.eye(v)[np.asarray(targets)] + eps * pi[None]
    np.testing.assert_allclose(smoothed, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(smoothed).sum(-1), 1.0, rtol=1e-6)
    loss = self.variant(raml.label_smoothing_loss, static_argnames=("prior",))(
        jnp.asarray(logits), targets, mask, eps, **kwargs)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want_loss = -(want * lp).sum(-1)[np.asarray(mask)].sum()
    self.assertAlmostEqual(float(loss), float(want_loss), places=4)

  def test_extremes(self):
    # All-padding row -> 0; T=1, V=2; -inf logits outside the prior's support.
    self.assertEqual(float(raml.label_smoothing_loss(
        jnp.zeros((4, 5)), jnp.zeros((4,), jnp.int32), jnp.zeros((4,), bool), 0.1)), 0.0)
    loss = raml.label_smoothing_loss(jnp.array([[0.3, -0.2]]), jnp.array([1]),
                                     jnp.array([True]), 0.2)
    lp = np.log(np.exp([0.3, -0.2]) / np.exp([0.3, -0.2]).sum())
    self.assertAlmostEqual(float(loss), -(0.9 * lp[1] + 0.1 * lp[0]), places=5)
    logits = jnp.array([[-jnp.inf, -jnp.inf, -jnp.inf, 0.5, 0.1, -0.3]])
    loss = raml.label_smoothing_loss(logits, jnp.array([4]), jnp.array([True]), 0.1,
                                     alphabet=(3, 6))
    self.assertTrue(bool(jnp.isfinite(loss)))

  def test_option_errors(self):
    with self.assertRaisesRegex(ValueError, "'uniform', 'unigram'"):
      raml.label_smoothing_targets(jnp.zeros((2,), jnp.int32), 4, 0.1, prior="zipf")
    with self.assertRaisesRegex(ValueError, "unigram"):
      raml.label_smoothing_loss(jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32),
                                jnp.ones((2,), bool), 0.1, prior="unigram")
    with self.assertRaises(AssertionError):
      raml.label_smoothing_loss(jnp.zeros((3, 4)), jnp.zeros((2,), jnp.int32),
                                jnp.ones((2,), bool), 0.1)
