"""Tests for latentdiv/mi_moments.py: the MI estimators are exact by enumeration.

DESIGN.md §5.6, §7, in float64 on the tabular models of tests/test_oracle.py:
every estimator × baseline, with and without the pathwise term, has exact
expectation ``−∇I`` (relative error ≤ 1e-6); the current-step coefficient
and baselines that look at y_t are biased; the variances fall in the order
of the KL estimators and match an explicit sum. The Transformer's exactness
is in tests/test_mutual_information.py.
"""
from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from latentdiv import baselines
from latentdiv import estimators as est
from latentdiv import mi_moments
from latentdiv import mutual_information as mi
from latentdiv import oracle
from test_moments import BIAS_MIN, EXACT_TOL, MISSPECIFIED_BASELINES, _neg
from test_oracle import K, MODELS, X64, _model, f


class MutualInformationTest(X64):
  """DESIGN.md §5.6: every MI estimator × baseline, with and without the pathwise term."""

  @parameterized.product(model=tuple(MODELS), pathwise=(False, True))
  def test_every_estimator_and_baseline_is_unbiased(self, model, pathwise):
    vocab, length, params = _model(model)
    true = _neg(oracle.exact_mutual_information_grad(f, params, K, vocab, length))
    ema = jnp.linspace(0.2, 0.9, length)
    values = {"none": None, "leave_one_out": None, "ema": lambda y, r, kl, m: ema,
              # A data-side control variate: any function of the context only.
              "jsd": lambda y, r, kl, m: 0.7 * kl + 0.05}
    for estimator in est.ALL_ESTIMATORS:
      for baseline in baselines.BASELINES:
        if baseline != "none" and not est.uses_baseline(estimator):
          continue
        m = mi_moments.mi_gradient_moments(f, params, K, estimator, vocab, length,
                                            baseline=baseline, baseline_fn=values[baseline],
                                            pathwise=pathwise)
        chex.assert_trees_all_equal_shapes(m.mean, params)
        err = float(oracle.relative_error(m.mean, true))
        if estimator in est.ESTIMATORS:
          self.assertLess(err, EXACT_TOL, msg=f"{estimator}/{baseline}/{pathwise}")
        else:  # The current-step-only coefficient.
          self.assertGreater(err, BIAS_MIN, msg=f"{estimator}/{baseline}/{pathwise}")
    for name, fn in MISSPECIFIED_BASELINES.items():
      m = mi_moments.mi_gradient_moments(f, params, K, "rao_blackwell", vocab, length,
                                          baseline="ema", baseline_fn=fn, pathwise=pathwise)
      self.assertGreater(float(oracle.relative_error(m.mean, true)), BIAS_MIN, msg=name)

  def test_unbiased_with_eos_truncation(self):
    vocab, length, params = _model("v3l3")
    true = _neg(oracle.exact_mutual_information_grad(f, params, K, vocab, length, 2))
    for estimator in est.ESTIMATORS:
      m = mi_moments.mi_gradient_moments(f, params, K, estimator, vocab, length, eos_id=2)
      self.assertLess(float(oracle.relative_error(m.mean, true)), EXACT_TOL, msg=estimator)

  @parameterized.parameters(*MODELS)
  def test_variance_ordering(self, model):
    vocab, length, params = _model(model)
    var = {e: float(mi_moments.mi_gradient_moments(f, params, K, e, vocab, length).variance)
           for e in ("trajectory", "reward_to_go", "kl_to_go", "rao_blackwell")}
    self.assertLess(var["reward_to_go"], var["trajectory"], msg=str(var))
    self.assertLess(var["kl_to_go"], var["reward_to_go"], msg=str(var))
    self.assertLess(3 * var["rao_blackwell"], var["trajectory"], msg=str(var))

  def test_variance_matches_explicit_sum(self):
    # One draw: k ~ U, y ~ p_k; Σ_k Σ_y p_k(y)/K ‖g_k(y)‖² − ‖E g‖², g built by hand.
    vocab, length, params = _model("v2l4")
    estimator = "kl_to_go"
    moments = mi_moments.mi_gradient_moments(f, params, K, estimator, vocab, length)
    seqs = oracle.all_sequences(vocab, length)
    ones = jnp.ones((1, length))

    def loss(w, y, k):
      logits = jnp.stack([f(w, y[None], j) for j in range(K)], 1)
      terms = jax.vmap(mi.mixture_terms, (0, 0, 0, None))(logits, y[None], ones, k)
      return -jnp.sum(mi.policy_gradient(estimator, terms, ones).loss)

    grad_fn = jax.jit(jax.grad(loss), static_argnums=2)
    second = 0.0
    for k in range(K):
      p = np.exp(np.asarray(oracle.exact_sequence_logprobs(f, params, k, vocab, length)))
      for y, py in zip(seqs, p):
        second += py / K * float(jnp.sum(grad_fn(params, y, k)**2))
    want = second - float(jnp.sum(moments.mean**2))
    np.testing.assert_allclose(moments.variance, want, rtol=1e-10)


if __name__ == "__main__":
  absltest.main()
