"""Tests for latentdiv/estimators.py against brute-force NumPy references.

The unbiasedness of the estimators is proven by exact enumeration in
tests/test_moments.py; here each pure function is checked against an
independent loop-based NumPy implementation of its equation, its gradient
structure (what is and is not stop-gradiented), shapes under jit / no-jit, and
its errors; :func:`estimators.policy_gradient` is checked against the
single-sequence surrogates (both signs) and the baselines.
"""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from latentdiv import baselines
from latentdiv import estimators as est
from latentdiv import surrogates

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

  def test_check_combination(self):
    for estimator in est.ALL_ESTIMATORS:
      for baseline in baselines.BASELINES:
        if baseline == "none" or est.uses_baseline(estimator):
          est.check_combination(estimator, baseline)
        else:
          with self.assertRaisesRegex(ValueError, "takes no baseline"):
            est.check_combination(estimator, baseline)
    with self.assertRaisesRegex(ValueError, "allowed"):
      est.check_combination("reinforce", "none")
    with self.assertRaisesRegex(ValueError, "allowed"):
      est.check_combination("rao_blackwell", "batch_mean")


class ReverseCumsumTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    x = np.random.default_rng(0).normal(size=(3, L))
    got = self.variant(est.reverse_cumsum)(x)
    want = np.array([[x[b, t:].sum() for t in range(L)] for b in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


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


def _group(seed, n=3, length=L, vocab=4):
  """N rollouts of one group: logits of p and q, tokens and masks of lengths 4, 2, 5, ..."""
  rng = np.random.default_rng(seed)
  lp = jnp.asarray(rng.normal(size=(n, length, vocab)), jnp.float32)
  lq = jnp.asarray(rng.normal(size=(n, length, vocab)), jnp.float32)
  y = jnp.asarray(rng.integers(0, vocab, size=(n, length)), jnp.int32)
  lengths = [4, 2, 5, 3, 1][:n]
  mask = jnp.asarray(np.arange(length)[None] < np.array(lengths)[:, None], jnp.float32)
  return lp, lq, y, mask


def _terms(lp, lq, y):
  return jax.vmap(est.per_token_terms)(lp, lq, y)


class PolicyGradientTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*[
      (e, pathwise, b) for e in est.ALL_ESTIMATORS for pathwise in (True, False)
      for b in ("none", "jsd", "ema") if b == "none" or est.uses_baseline(e)])
  def test_equals_the_single_sequence_surrogate(self, estimator, pathwise, baseline):
    lp, lq, y, mask = _group(0)
    rng = np.random.default_rng(1)
    value = {"none": None, "jsd": jnp.asarray(rng.normal(size=(3, L)), jnp.float32),
             "ema": jnp.asarray(rng.normal(size=(L,)), jnp.float32)}[baseline]
    fn = self.variant(functools.partial(est.policy_gradient, estimator,
                                        baseline=baseline, pathwise=pathwise))
    new = lambda a, q: fn(_terms(a, q if pathwise else jax.lax.stop_gradient(q), y),  # noqa: E731
                          mask, baseline_value=value).loss
    b_NxL = None if value is None else jnp.broadcast_to(value, mask.shape)

    def old(a, q):  # The single-sequence surrogate, a loss of −∇D: the opposite sign.
      return jnp.stack([surrogates.sequence_kl_surrogate_from_logits(
          estimator, a[n], q[n], y[n], mask[n], None if b_NxL is None else b_NxL[n],
          pathwise) for n in range(3)])

    got = new(lp, lq)
    chex.assert_shape(got, (3,))
    np.testing.assert_allclose(got, -old(lp, lq), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda a, q: jnp.sum(new(a, q)), argnums=(0, 1))(lp, lq)
    want = jax.grad(lambda a, q: -jnp.sum(old(a, q)), argnums=(0, 1))(lp, lq)
    chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_opd_equals_opd_surrogate(self, estimator):
    lp, lq, y, mask = _group(2)
    b = np.linspace(0.0, 1.0, L, dtype=np.float32) if est.uses_baseline(estimator) else None
    kind = "ema" if b is not None else "none"

    def loss(lp):
      terms = _terms(lp, jax.lax.stop_gradient(lq), y)
      return self.variant(functools.partial(
          est.policy_gradient, estimator, baseline=kind, pathwise=False))(
              terms, mask, baseline_value=b).loss

    old = lambda lp: jax.vmap(lambda a, q, t, m: surrogates.opd_surrogate(  # noqa: E731
        estimator, a, q, t, m, b))(lp, lq, y, mask)
    np.testing.assert_allclose(loss(lp), old(lp), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.grad(lambda a: loss(a).sum())(lp),
                                jax.grad(lambda a: old(a).sum())(lp), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_returns_baseline_and_r_t(self, estimator):
    lp, lq, y, mask = _group(3)
    terms = _terms(lp, lq, y)
    baseline = "leave_one_out" if est.uses_baseline(estimator) else "none"
    out = self.variant(functools.partial(est.policy_gradient, estimator,
                                         baseline=baseline))(terms, mask)
    chex.assert_shape([out.returns, out.baseline, out.r_t], (3, L))
    r = np.asarray(terms.logp_score_t - terms.logp_target_t) * np.asarray(mask)
    np.testing.assert_allclose(out.r_t, r, rtol=1e-6, atol=1e-7)
    for n in range(3):
      np.testing.assert_allclose(
          out.returns[n], _np_coefficients(estimator, r[n], terms.kl_t[n], mask[n]),
          rtol=1e-5, atol=1e-5)
    want_b = (np.asarray(baselines.leave_one_out_baseline(out.returns, mask)) * mask
              if baseline == "leave_one_out" else np.zeros((3, L)))
    np.testing.assert_allclose(out.baseline, want_b, rtol=1e-6, atol=1e-7)
    # Nothing but the loss carries a gradient.
    for field in ("returns", "baseline", "r_t"):
      g = jax.grad(lambda a, f=field: jnp.sum(getattr(est.policy_gradient(
          estimator, _terms(a, lq, y), mask, baseline=baseline), f)))(lp)
      chex.assert_trees_all_close(g, np.zeros_like(lp))

  def test_leave_one_out_is_the_others_mean(self):
    lp, lq, y, mask = _group(4, n=2)
    terms = _terms(lp, lq, y)
    out = est.policy_gradient("kl_to_go_baseline", terms, mask, baseline="leave_one_out")
    both = (mask[0] * mask[1])[None]  # Positions scored in both rollouts swap returns.
    np.testing.assert_allclose(out.baseline * both, out.returns[::-1] * both, rtol=1e-6)
    # Rollout n's loss is that of the single-sequence surrogate with the other's returns.
    for n in range(2):
      want = -surrogates.sequence_kl_surrogate("kl_to_go_baseline", *[t[n] for t in terms],
                                        mask[n], out.baseline[n])
      np.testing.assert_allclose(out.loss[n], want, rtol=1e-5)

  def test_given_values_broadcast_and_are_masked(self):
    lp, lq, y, mask = _group(5)
    terms = _terms(lp, lq, y)
    for value in (jnp.float32(0.7), jnp.arange(L, dtype=jnp.float32),
                  jnp.ones((3, L)), jnp.ones((3, 1))):
      out = est.policy_gradient("rao_blackwell", terms, mask, baseline="ema",
                                baseline_value=value)
      np.testing.assert_allclose(out.baseline,
                                 np.broadcast_to(np.asarray(value), (3, L)) * mask)

  def test_single_rollout_and_baselined_estimator_without_baseline(self):
    lp, lq, y, mask = _group(6, n=1)
    terms = _terms(lp, lq, y)
    a = est.policy_gradient("kl_to_go_baseline", terms, mask)
    b = est.policy_gradient("kl_to_go", terms, mask)
    chex.assert_trees_all_close(a, b)
    chex.assert_shape(a.loss, (1,))

  def test_errors(self):
    lp, lq, y, mask = _group(7)
    terms = _terms(lp, lq, y)
    pg = est.policy_gradient
    with self.assertRaisesRegex(ValueError, "allowed"):
      pg("reinforce", terms, mask)
    with self.assertRaisesRegex(ValueError, "allowed"):
      pg("rao_blackwell", terms, mask, baseline="batch_mean")
    for baseline in ("leave_one_out", "ema", "jsd"):
      with self.assertRaisesRegex(ValueError, "takes no baseline"):
        pg("kl_to_go", terms, mask, baseline=baseline, baseline_value=jnp.ones(L))
    for baseline in ("ema", "jsd"):
      with self.assertRaisesRegex(ValueError, "baseline_value is required"):
        pg("rao_blackwell", terms, mask, baseline=baseline)
    for baseline in ("none", "leave_one_out"):
      with self.assertRaisesRegex(ValueError, "not accepted otherwise"):
        pg("rao_blackwell", terms, mask, baseline=baseline, baseline_value=jnp.ones(L))
    with self.assertRaisesRegex(ValueError, "does not broadcast"):
      pg("rao_blackwell", terms, mask, baseline="jsd", baseline_value=jnp.ones((2, L)))
    with self.assertRaisesRegex(ValueError, "does not broadcast"):
      pg("rao_blackwell", terms, mask, baseline="ema", baseline_value=jnp.ones((1, 3, L)))
    with self.assertRaisesRegex(ValueError, "N >= 2"):
      pg("rao_blackwell", jax.tree.map(lambda a: a[:1], terms), mask[:1],
         baseline="leave_one_out")
    with self.assertRaisesRegex(ValueError, "mask_NxL"):
      pg("trajectory", terms, mask[:, :-1])
    with self.assertRaisesRegex(ValueError, "mask_NxL"):
      pg("trajectory", jax.tree.map(lambda a: a[0], terms), mask[0])


class DiscountTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_discounted_sum_to_go_matches_a_loop(self):
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    for gamma in (0.0, 0.3, 1.0):
      got = self.variant(est.discounted_sum_to_go, static_argnums=1)(x, gamma)
      want = np.zeros_like(x)
      for t in range(5):
        want[:, t] = sum(gamma ** (u - t) * x[:, u] for u in range(t, 5))
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_returns_under_a_discount(self):
    rng = np.random.default_rng(1)
    r, kl = (jnp.asarray(rng.normal(size=4), jnp.float32) for _ in range(2))
    mask = jnp.asarray([1, 1, 1, 0], jnp.float32)
    g = 0.5
    got = est.estimator_returns("kl_to_go", r, kl, mask, discount=g)
    rm, klm = np.asarray(r * mask), np.asarray(kl * mask)
    want = [rm[t] + sum(g ** (u - t) * klm[u] for u in range(t + 1, 4)) for t in range(4)]
    np.testing.assert_allclose(got, np.asarray(want) * np.asarray(mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est.estimator_returns("kl_to_go", r, kl, mask, discount=0.0),
                               est.estimator_returns("per_token_reward", r, kl, mask), atol=1e-7)
    np.testing.assert_allclose(est.estimator_returns("rao_blackwell", r, kl, mask, discount=0.0),
                               0.0, atol=1e-7)
    # Length normalisation divides the future by the number of scored positions after t.
    got = est.estimator_returns("kl_to_go", r, kl, mask, length_normalize=True)
    after = np.array([2, 1, 0, 0], np.float32)
    want = [rm[t] + (klm[t + 1:].sum() / max(after[t], 1.0)) for t in range(4)]
    np.testing.assert_allclose(got, np.asarray(want) * np.asarray(mask), rtol=1e-5, atol=1e-6)

  def test_variant_errors(self):
    r = jnp.zeros(3)
    with self.assertRaisesRegex(ValueError, "discount must be a number in"):
      est.estimator_returns("kl_to_go", r, r, r, discount=1.5)
    with self.assertRaisesRegex(ValueError, "apply to the to-go estimators"):
      est.estimator_returns("trajectory", r, r, r, discount=0.5)
    with self.assertRaisesRegex(ValueError, "apply to the to-go estimators"):
      est.estimator_returns("per_token_reward", r, r, r, length_normalize=True)


if __name__ == "__main__":
  absltest.main()
