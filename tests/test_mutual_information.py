"""Tests for latentdiv/mutual_information.py against brute-force NumPy and the oracle.

The terms of one rollout are checked against an explicit mixture in NumPy
(the telescoping identity Σ_t r_t = log p_k(y) − log p̄(y) included), their
gradient structure (p̄ fixed inside KL_t, live in logp_target), the batched
memory-linear scoring pass against the one-rollout reference on the real
Transformer (values and gradients), and the Monte-Carlo MI against the exact
I of the oracle. Unbiasedness of every estimator is proven by enumeration in
tests/test_moments.py (``MutualInformationTest``).
"""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiv import estimators as est
from latentdiv import model as model_lib
from latentdiv import model_oracle
from latentdiv import mi_moments
from latentdiv import mutual_information as mi
from latentdiv import oracle
from latentdiv import sampling
from latentdiv import tasks
from latentdiv import vocab

K, L, V = 3, 4, 5


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _inputs(seed=0, valid=3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(K, L, V)) * 1.5
  tokens = rng.integers(0, V, size=L)
  mask = (np.arange(L) < valid).astype(np.float64)
  return logits, tokens, mask


def _np_terms(logits, tokens, mask, k):
  """Explicit loops: posteriors from prefix likelihoods, the mixture, r_t and KL_t."""
  logq = _np_log_softmax(logits)
  probs = np.exp(logq)
  logp, target, kl = np.zeros(L), np.zeros(L), np.zeros(L)
  for t in range(L):
    prefix = np.array([sum(logq[j, s, tokens[s]] * mask[s] for s in range(t))
                       for j in range(K)])
    w = np.exp(prefix - prefix.max())
    w /= w.sum()
    mix = sum(w[j] * probs[j, t] for j in range(K))
    logp[t] = logq[k, t, tokens[t]]
    target[t] = np.log(mix[tokens[t]])
    kl[t] = np.sum(probs[k, t] * (logq[k, t] - np.log(mix)))
  return logp, target, kl


class PosteriorWeightsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    rng = np.random.default_rng(0)
    logp = rng.normal(size=(K, L))
    mask = np.array([1.0, 1.0, 1.0, 0.0])
    got = self.variant(mi.posterior_log_weights)(logp, mask)
    chex.assert_shape(got, (K, L))
    for t in range(L):
      prefix = (logp * mask)[:, :t].sum(-1)
      want = prefix - np.log(np.exp(prefix).sum())
      np.testing.assert_allclose(got[:, t], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 0], -np.log(K), rtol=1e-6)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "logp_KxL"):
      mi.posterior_log_weights(jnp.zeros((K,)), jnp.zeros((L,)))


class MixtureTermsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_and_telescopes(self):
    logits, tokens, mask = _inputs()
    for k in range(K):
      got = self.variant(mi.mixture_terms)(logits, tokens, mask, k)
      chex.assert_shape(list(got), (L,))
      for a, b in zip(got, _np_terms(logits, tokens, mask, k)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      self.assertTrue(np.all(np.asarray(got.kl_t) >= -1e-6))
      # Σ_t r_t = log p_k(y) − log p̄(y) over the scored positions.
      logq = _np_log_softmax(logits)
      seq = np.array([np.sum(logq[j, np.arange(L), tokens] * mask) for j in range(K)])
      want = seq[k] - (np.log(np.exp(seq - seq.max()).sum()) + seq.max() - np.log(K))
      r = (np.asarray(got.logp_score_t) - np.asarray(got.logp_target_t)) * mask
      np.testing.assert_allclose(r.sum(), want, rtol=1e-5)

  def test_gradient_structure(self):
    logits, tokens, mask = map(jnp.asarray, _inputs(1, valid=L))
    k = 1
    others = np.arange(K) != k
    g_kl = jax.grad(lambda x: jnp.sum(mi.mixture_terms(x, tokens, mask, k).kl_t))(logits)
    chex.assert_trees_all_close(g_kl[others], np.zeros_like(g_kl[others]))  # p̄ held fixed.
    self.assertGreater(float(jnp.abs(g_kl[k]).sum()), 1e-3)
    g_target = jax.grad(
        lambda x: jnp.sum(mi.mixture_terms(x, tokens, mask, k).logp_target_t))(logits)
    self.assertGreater(float(jnp.abs(g_target[others]).sum()), 1e-3)  # live through every j.

  def test_identical_latents_give_zero(self):
    logits, tokens, mask = _inputs(2)
    same = np.broadcast_to(logits[:1], logits.shape)
    terms = mi.mixture_terms(same, tokens, mask, 2)
    np.testing.assert_allclose(terms.kl_t, 0.0, atol=1e-6)
    np.testing.assert_allclose(terms.logp_score_t, terms.logp_target_t, atol=1e-6)

  def test_errors(self):
    logits, tokens, mask = _inputs()
    with self.assertRaisesRegex(ValueError, "logits_KxLxV"):
      mi.mixture_terms(logits[0], tokens, mask, 0)
    with self.assertRaisesRegex(ValueError, "tokens_L"):
      mi.mixture_terms(logits, tokens[:-1], mask, 0)


class PolicyGradientTest(parameterized.TestCase):

  @parameterized.parameters(*est.ALL_ESTIMATORS)
  def test_is_the_primitive_on_fixed_terms_plus_the_pathwise_term(self, estimator):
    logits, tokens, mask = map(jnp.asarray, _inputs(3))
    terms = jax.vmap(mi.mixture_terms, (None, 0, 0, None))(
        logits, jnp.stack([tokens, tokens[::-1]]), jnp.stack([mask, mask]), 0)
    mask2 = jnp.stack([mask, mask])
    plain = mi.policy_gradient(estimator, terms, mask2)
    want = est.policy_gradient(estimator, terms._replace(
        logp_target_t=jax.lax.stop_gradient(terms.logp_target_t)), mask2, pathwise=False)
    np.testing.assert_allclose(plain.loss, want.loss, rtol=1e-6)
    with_pw = mi.policy_gradient(estimator, terms, mask2, pathwise=True)
    np.testing.assert_allclose(with_pw.loss,
                               plain.loss - jnp.sum(terms.logp_target_t * mask2, -1),
                               rtol=1e-6)


def _transformer():
  task = tasks.make_task("early_divergence", alphabet_size=3, prompt_len=3, num_strategies=3)
  model = model_lib.LatentTransformer(model_lib.ModelConfig(
      vocab_size=task.vocab_size, num_latents=K, max_len=task.prompt_len + task.target_len,
      d_model=16, num_heads=2, num_layers=1, d_ff=32))
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  batch = task.sample(jax.random.PRNGKey(1), 2)
  rollout = sampling.sample_latents(model, params, batch.prompt, jax.random.PRNGKey(2), 4)
  return model, params, batch.prompt, rollout


class RolloutTermsTest(parameterized.TestCase):
  """The batched, memory-linear scoring pass equals the one-rollout reference."""

  @parameterized.parameters(False, True)
  def test_values_and_gradients_match_mixture_terms(self, pathwise):
    model, params, prompt, rollout = _transformer()
    batch = prompt.shape[0]

    def reference(p):
      def one(prompt_P, tokens_L, mask_L, k):  # mixture_terms of ONE rollout.
        logits_fn = model_oracle.make_logits_fn(model, prompt_P)
        logits = jax.vmap(lambda j: logits_fn(p, tokens_L[None], j)[0])(jnp.arange(K))
        return mi.mixture_terms(logits, tokens_L, mask_L, k)

      over_k = jax.vmap(one, (None, 0, 0, 0))
      t = jax.vmap(over_k, (0, 0, 0, None))(prompt, rollout.tokens, rollout.mask,
                                            jnp.arange(K))
      if not pathwise:
        t = t._replace(logp_target_t=jax.lax.stop_gradient(t.logp_target_t))
      return t

    got = mi.rollout_terms(model, params, prompt, rollout.tokens, rollout.mask, pathwise)
    want = jax.jit(reference)(params)
    for a, b in zip(got, want):
      chex.assert_shape(a, (batch, K, 4))
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    weights = jnp.arange(batch * K * 4, dtype=jnp.float32).reshape(batch, K, 4) / 10.0

    def scalar(terms):
      return sum(jnp.sum(weights * (n + 1) * x * rollout.mask) for n, x in enumerate(terms))

    g_got = flatten_util.ravel_pytree(jax.jit(jax.grad(lambda p: scalar(mi.rollout_terms(
        model, p, prompt, rollout.tokens, rollout.mask, pathwise))))(params))[0]
    g_want = flatten_util.ravel_pytree(
        jax.jit(jax.grad(lambda p: scalar(reference(p))))(params))[0]
    self.assertLess(float(jnp.linalg.norm(g_got - g_want) / jnp.linalg.norm(g_want)), 1e-5)

  def test_wrong_number_of_rollouts(self):
    model, params, prompt, rollout = _transformer()
    with self.assertRaisesRegex(ValueError, "one rollout per latent"):
      mi.rollout_terms(model, params, prompt, rollout.tokens[:, :2], rollout.mask[:, :2])


class TransformerExactTest(absltest.TestCase):
  """The MI estimators on the real Transformer, exact by enumeration (DESIGN.md §7).

  A fresh 1-layer model with K = 3 latents over A = 2 content tokens, L = 3
  with EOS truncation, in float64 (its logits are rounded to float32, hence
  ~1e-7 rather than 1e-15).
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    task = tasks.make_task("early_divergence", alphabet_size=2, prompt_len=2, num_strategies=2)
    model = model_lib.LatentTransformer(model_lib.ModelConfig(
        vocab_size=task.vocab_size, num_latents=K, max_len=task.prompt_len + task.target_len,
        d_model=16, num_heads=2, num_layers=1, d_ff=32))
    params = model_lib.init_params(model, jax.random.PRNGKey(3))
    cls.prompt = task.sample(jax.random.PRNGKey(1), 1).prompt[0]
    with jax.enable_x64(True):
      cls.model, cls.params = model_oracle.to_float64(model, params)
      cls.logits_fn = staticmethod(model_oracle.make_logits_fn(cls.model, cls.prompt))
      cls.args = (cls.model.config.vocab_size, 3)
      cls.kw = dict(eos_id=vocab.EOS, pad_id=vocab.PAD)
      cls.true = jax.tree.map(jnp.negative, oracle.exact_mutual_information_grad(
          cls.logits_fn, cls.params, K, *cls.args, **cls.kw))

  def _moments(self, estimator, **kwargs):
    with jax.enable_x64(True):
      return mi_moments.mi_gradient_moments(self.logits_fn, self.params, K, estimator,
                                         *self.args, chunk_size=512, **self.kw, **kwargs)

  def test_unbiased_biased_and_variance_order(self):
    variance = {}
    for estimator in est.ALL_ESTIMATORS:
      m = self._moments(estimator)
      err = float(oracle.relative_error(m.mean, self.true))
      if estimator in est.ESTIMATORS:
        self.assertLess(err, 1e-6, msg=estimator)
      else:
        self.assertGreater(err, 0.05, msg=estimator)
      variance[estimator] = float(m.variance)
    # As the enumeration of the tabular models predicts: rao_blackwell 3-4x below trajectory.
    self.assertLess(3 * variance["rao_blackwell"], variance["trajectory"], msg=str(variance))
    self.assertLess(variance["kl_to_go"], variance["reward_to_go"], msg=str(variance))
    m = self._moments("rao_blackwell", pathwise=True)
    self.assertLess(float(oracle.relative_error(m.mean, self.true)), 1e-6)

  @pytest.mark.slow
  def test_leave_one_out(self):
    m = self._moments("rao_blackwell", baseline="leave_one_out")
    self.assertLess(float(oracle.relative_error(m.mean, self.true)), 1e-6)


class MonteCarloTest(absltest.TestCase):

  def test_bounded_and_converges_to_the_exact_mi(self):
    with jax.enable_x64(True):
      vocab, length = 3, 3
      params = oracle.init_tabular_params(jax.random.PRNGKey(4), K, vocab, length, 1.5)
      exact = float(oracle.exact_mutual_information(oracle.tabular_logits_fn, params, K,
                                                    vocab, length))
      num = 4000
      log_ratio = []
      for k in range(K):
        y, _ = oracle.sample_sequences(jax.random.PRNGKey(10 + k), oracle.tabular_logits_fn,
                                       params, k, vocab, length, num)
        logits = jnp.stack([oracle.tabular_logits_fn(params, y, j) for j in range(K)], 1)
        terms = jax.vmap(mi.mixture_terms, (0, 0, 0, None))(
            logits, y, jnp.ones(y.shape), k)
        log_ratio.append(jnp.sum(terms.logp_score_t - terms.logp_target_t, -1))
      samples = jnp.stack(log_ratio)  # [K, num]
      self.assertLessEqual(float(jnp.max(samples)), np.log(K) + 1e-9)
      mean, _ = mi.monte_carlo_mi(samples[None])
      stderr = float(jnp.std(samples)) / np.sqrt(samples.size)
      self.assertLess(abs(float(mean) - exact), 4 * stderr)
      self.assertGreater(exact, 0.1)

  def test_stderr_over_prompts(self):
    values = jnp.asarray([[[0.1, 0.3]], [[0.5, 0.7]]])  # [B=2, K=1, N=2]
    mean, stderr = mi.monte_carlo_mi(values)
    np.testing.assert_allclose(mean, 0.4, rtol=1e-6)
    np.testing.assert_allclose(stderr, np.std([0.2, 0.6], ddof=1) / np.sqrt(2), rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
