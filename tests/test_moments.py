"""Tests for latentdiv/moments.py: exactness of the estimators by enumeration.

DESIGN.md §7, in float64: the moment engine is checked against closed forms
and NumPy; :func:`moments.policy_gradient_estimates` against ``jax.grad`` of
the primitive; then every estimator × baseline of latentdiv/estimators.py run
through ``estimators.policy_gradient`` on the oracle's enumeration is shown
unbiased exactly (relative error ≤ 1e-6), the deliberately biased ones are
shown biased, exact variances are compared, and a Monte-Carlo mean over exact
samples is checked against the exact gradient. The tabular models and NumPy
references are tests/test_oracle.py's.
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
from latentdiv import moments as moments_lib
from latentdiv import oracle
from latentdiv import surrogates
from test_oracle import (  # pylint: disable=g-multiple-import
    MODELS, PAIRS, X64, _model, _np_context_rows, _np_log_softmax, _student_teacher, f)

EXACT_TOL = 1e-6
BIAS_MIN = 0.05


def _neg(tree):
  return jax.tree.map(jnp.negative, tree)


def _np_jsd_to_go(params, i, j, y_star):
  """Σ_{t'≥t} JSD(p_i(·|y*_<t'), p_j(·|y*_<t')) on a data sequence y*."""
  vocab, length = params.shape[-1], len(y_star)
  rows = _np_context_rows(vocab, length)
  jsd = []
  for t in range(length):
    row = rows[tuple(y_star[:t])]
    p = np.exp(_np_log_softmax(np.asarray(params[i, row])))
    q = np.exp(_np_log_softmax(np.asarray(params[j, row])))
    m = 0.5 * (p + q)
    jsd.append(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))
  return np.cumsum(np.array(jsd)[::-1])[::-1]


# ---------------------------------------------------------------------------
# Baselines, as oracle baseline_fn(tokens_L, r_t, kl_t, mask_t).
# ---------------------------------------------------------------------------


def _valid_baselines(params, i, j, length):
  """Baselines that never look at y_t or later tokens: must stay unbiased."""
  jsd_to_go = jnp.asarray(_np_jsd_to_go(params, i, j, (0,) * length))

  def prefix_tokens(y, r, kl, m):
    del r, kl, m
    prev = jnp.concatenate([jnp.zeros((1,), y.dtype), y[:-1]])
    return 0.1 + 0.3 * prev.astype(jsd_to_go.dtype)

  return {
      "none": None,
      "ema_constant": lambda y, r, kl, m: jnp.asarray(0.8, r.dtype),
      "jsd_control_variate": lambda y, r, kl, m: baselines.jsd_control_variate(
          jnp.asarray(0.6, r.dtype), jsd_to_go),
      "prefix_tokens": prefix_tokens,
      "context_kl": lambda y, r, kl, m: 1.3 * kl,
  }


MISSPECIFIED_BASELINES = {
    "sampled_reward": lambda y, r, kl, m: r,
    "current_token": lambda y, r, kl, m: 0.3 * y.astype(r.dtype),
}


# ---------------------------------------------------------------------------
# The moment engine.
# ---------------------------------------------------------------------------


class EngineTest(X64):

  @chex.variants(with_jit=True, without_jit=True)
  def test_weighted_moments_and_merge_match_numpy(self):
    rng = np.random.default_rng(0)
    n, c, p = 11, 3, 5
    g = rng.normal(size=(n, c, p)) * np.array([1.0, 10.0, 0.1])[None, :, None] + 3.0
    w = rng.uniform(size=(n, c))
    w[2, 1] = 0.0
    ref = rng.normal(size=(p,))
    weighted = self.variant(moments_lib.weighted_moments)
    merge = self.variant(moments_lib.merge_moments)
    # Merging uneven parts (one of them empty for a combo) equals the whole.
    w_empty = w.copy()
    w_empty[:4, 0] = 0.0
    for weights in (w, w_empty):
      total = None
      for lo, hi in [(0, 4), (4, 5), (5, n)]:
        part = weighted(jnp.asarray(g[lo:hi]), jnp.asarray(weights[lo:hi]), jnp.asarray(ref))
        total = part if total is None else merge(total, part)
      whole = weighted(jnp.asarray(g), jnp.asarray(weights), jnp.asarray(ref))
      chex.assert_shape([total.mean, whole.mean], (c, p))
      chex.assert_shape([total.weight, total.m2, total.cos_sum], (c,))
      for k in range(c):
        wk = weights[:, k]
        mean = (wk[:, None] * g[:, k]).sum(0) / wk.sum()
        m2 = sum(wk[m] * np.sum((g[m, k] - mean)**2) for m in range(n))
        cos = sum(wk[m] * g[m, k] @ ref / np.linalg.norm(g[m, k]) / np.linalg.norm(ref)
                  for m in range(n))
        for got in (total, whole):
          np.testing.assert_allclose(got.weight[k], wk.sum(), rtol=1e-12)
          np.testing.assert_allclose(got.mean[k], mean, rtol=1e-12)
          np.testing.assert_allclose(got.m2[k], m2, rtol=1e-12)
          np.testing.assert_allclose(got.cos_sum[k], cos, rtol=1e-12)
    no_ref = weighted(jnp.asarray(g), jnp.asarray(w))
    np.testing.assert_array_equal(no_ref.cos_sum, 0.0)
    with self.assertRaisesRegex(ValueError, "g_NxCxP, w_NxC"):
      moments_lib.weighted_moments(jnp.asarray(g), jnp.asarray(w[:, :2]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_support_moments_chunked_equals_whole(self):
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 3, size=(7, 2)))
    mask = jnp.ones((7, 2))
    index = rng.integers(0, 7, size=(23, 2))
    weight = jnp.asarray(rng.uniform(size=23))
    support = moments_lib.Support(tokens, mask, index, weight)
    factors = jnp.asarray([[0.5, 1.0], [0.5, 0.0]])

    def fn(y, m):  # K = 2 estimates of C = 2 estimators of dimension P = 4.
      a = jnp.concatenate([y.reshape(-1), m.reshape(-1)]).astype(jnp.float64)
      return jnp.stack([jnp.stack([a, a**2]), jnp.stack([a + 1.0, -a])])[:, :, :4]

    want = None
    for chunk_size in (100, 5, 1):  # One vmap; a scan with a padded last chunk.
      got = self.variant(functools.partial(
          moments_lib.support_moments, fn, chunk_size=chunk_size,
          estimate_weights_KxC=factors))(support)
      want = got if want is None else want
      chex.assert_trees_all_close(got, want, rtol=1e-12)
    g = np.stack([np.asarray(fn(tokens[r], mask[r])) for r in index])  # [M, K, C, P]
    w = np.asarray(weight)[:, None, None] * np.asarray(factors)[None]
    for c in range(2):
      mean = np.einsum("mk,mkp->p", w[:, :, c], g[:, :, c]) / w[:, :, c].sum()
      np.testing.assert_allclose(want.mean[c], mean, rtol=1e-12)
      np.testing.assert_allclose(want.weight[c], w[:, :, c].sum(), rtol=1e-12)

  def test_sequence_support(self):
    vocab, length, params = _model("v3l3")
    fn = oracle.bind(f, 1)
    for group in (1, 2):
      support = moments_lib.sequence_support(fn, params, vocab, length, group, eos_id=2)
      chex.assert_shape(support.index, (27**group, group))
      np.testing.assert_allclose(jnp.sum(support.weight), 1.0, atol=1e-12)
    with self.assertRaisesRegex(ValueError, "in pairs"):
      moments_lib.sequence_support(fn, params, 4, 6, 2)


class ClosedFormTest(X64):

  def test_one_hot_estimator_closed_form(self):
    # g(y) = e_y: mean = p, total variance = 1 − ‖p‖².
    for name, eos_id in [("v3l3", None), ("v2l4", 1)]:
      vocab, length, params = _model(name)
      num = vocab**length
      g = lambda y, m: {"e": jax.nn.one_hot(
          oracle.sequence_index(y[None], vocab)[0], num)}
      moments = moments_lib.estimator_moments(g, f, params, 2, vocab, length, eos_id)
      p = jnp.exp(oracle.exact_sequence_logprobs(f, params, 2, vocab, length,
                                                 eos_id))
      np.testing.assert_allclose(moments.mean["e"], p, atol=1e-14)
      np.testing.assert_allclose(moments.variance, 1 - jnp.sum(p**2),
                                 rtol=1e-12)

  def test_pair_moments_closed_form(self):
    # g(y, y') = e_y + e_y': mean = 2p, total variance = 2(1 − ‖p‖²).
    vocab, length, params = _model("v3l3")
    num = vocab**length
    g = lambda y2, m2: jax.nn.one_hot(oracle.sequence_index(y2, vocab),
                                      num).sum(0)
    for chunk_size in [100, 4096]:  # 729 pairs: padded and single chunk.
      moments = moments_lib.pair_estimator_moments(g, f, params, 0, vocab, length,
                                              chunk_size=chunk_size)
      p = jnp.exp(oracle.exact_sequence_logprobs(f, params, 0, vocab, length))
      np.testing.assert_allclose(moments.mean, 2 * p, atol=1e-14)
      np.testing.assert_allclose(moments.variance, 2 * (1 - jnp.sum(p**2)),
                                 rtol=1e-12)
    with self.assertRaisesRegex(ValueError, "in pairs"):
      moments_lib.pair_estimator_moments(g, f, params, 0, 4, 6)


class PolicyGradientEstimatesTest(X64):

  def test_rows_are_the_gradients_of_each_rollouts_loss(self):
    vocab, length, params = _model("v3l3")
    support = moments_lib.sequence_support(oracle.bind(f, 0), params, vocab, length)
    tokens, mask = support.tokens[jnp.asarray([4, 17, 9])], support.mask[:3]
    mask = mask.at[1, 2].set(0.0)
    combos = (("trajectory", "none"), ("kl_to_go_baseline", "leave_one_out"),
              ("rao_blackwell", "jsd"), ("reward_to_go_baseline", "ema"))
    values = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, length)))
    for pathwise in (True, False):
      got = moments_lib.policy_gradient_estimates(
          oracle.bind(f, 0), oracle.bind(f, 2), params, tokens, mask, combos, values,
          pathwise)
      chex.assert_shape(got, (3, 4, params.size))
      for c, (estimator, baseline) in enumerate(combos):
        def loss(w, n, estimator=estimator, baseline=baseline, c=c):
          lq = f(w, tokens, 2)
          terms = jax.vmap(est.per_token_terms)(
              f(w, tokens, 0), lq if pathwise else jax.lax.stop_gradient(lq), tokens)
          value = values[c] if baseline in ("ema", "jsd") else None
          return est.policy_gradient(estimator, terms, mask, baseline=baseline,
                                     baseline_value=value, pathwise=pathwise).loss[n]
        for n in range(3):
          np.testing.assert_allclose(got[n, c], jax.grad(loss)(params, n).reshape(-1),
                                     rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# Unbiasedness and variance of the inter-latent estimators.
# ---------------------------------------------------------------------------


class UnbiasednessTest(X64):

  @parameterized.product(model=tuple(MODELS), estimator=est.ESTIMATORS)
  def test_estimator_is_unbiased(self, model, estimator):
    vocab, length, params = _model(model)
    for i, j in PAIRS:
      true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
      baselines = (_valid_baselines(params, i, j, length)
                   if est.uses_baseline(estimator) else {"none": None})
      for name, baseline_fn in baselines.items():
        moments = moments_lib.estimator_gradient_moments(
            f, params, i, j, estimator, vocab, length, baseline_fn=baseline_fn)
        chex.assert_trees_all_equal_shapes(moments.mean, params)
        err = oracle.relative_error(moments.mean, true)
        self.assertLess(float(err), EXACT_TOL, msg=f"{estimator}/{name}/{i}{j}")

  @parameterized.parameters(*MODELS)
  def test_every_estimator_and_baseline_through_the_primitive(self, model):
    # DESIGN.md §7: the exact expectation of every estimator × baseline of
    # estimators.policy_gradient equals the exact gradient; the biased ones differ.
    vocab, length, params = _model(model)
    i, j = PAIRS[1]
    true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
    jsd_to_go = jnp.asarray(_np_jsd_to_go(params, i, j, (0,) * length))
    ema = jnp.linspace(0.3, 1.1, length)
    values = {"none": None, "leave_one_out": None,
              "ema": lambda y, r, kl, m: ema,
              "jsd": lambda y, r, kl, m: baselines.jsd_control_variate(
                  jnp.asarray(0.6, r.dtype), jsd_to_go)}
    for estimator in est.ALL_ESTIMATORS:
      for baseline in baselines.BASELINES:
        if baseline != "none" and not est.uses_baseline(estimator):
          continue
        m = moments_lib.estimator_gradient_moments(
            f, params, i, j, estimator, vocab, length, values[baseline],
            baseline=baseline)
        err = float(oracle.relative_error(m.mean, true))
        if estimator in est.ESTIMATORS:
          self.assertLess(err, EXACT_TOL, msg=f"{estimator}/{baseline}")
        else:
          self.assertGreater(err, BIAS_MIN, msg=f"{estimator}/{baseline}")
    for name, fn in MISSPECIFIED_BASELINES.items():  # A baseline that sees y_t.
      m = moments_lib.estimator_gradient_moments(f, params, i, j, "rao_blackwell", vocab,
                                                 length, fn, baseline="ema")
      self.assertGreater(float(oracle.relative_error(m.mean, true)), BIAS_MIN, msg=name)

  def test_baseline_argument_errors(self):
    vocab, length, params = _model("v3l3")
    moments = functools.partial(moments_lib.estimator_gradient_moments, f, params, 0, 1)
    fn = lambda y, r, kl, m: kl  # noqa: E731
    with self.assertRaisesRegex(ValueError, "takes no baseline"):
      moments("kl_to_go", vocab, length, fn)
    with self.assertRaisesRegex(ValueError, "baseline_fn gives the value"):
      moments("rao_blackwell", vocab, length, baseline="ema")
    with self.assertRaisesRegex(ValueError, "baseline_fn gives the value"):
      moments("rao_blackwell", vocab, length, fn, baseline="leave_one_out")
    with self.assertRaisesRegex(ValueError, "allowed"):
      moments("rao_blackwell", vocab, length, baseline="batch_mean")

  @parameterized.product(model=tuple(MODELS),
                         estimator=est.BASELINED_ESTIMATORS)
  def test_leave_one_out_baseline_is_unbiased(self, model, estimator):
    vocab, length, params = _model(model)
    i, j = PAIRS[0] if model == "v3l3" else PAIRS[1]
    true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
    moments = moments_lib.leave_one_out_gradient_moments(f, params, i, j, estimator,
                                                    vocab, length)
    self.assertLess(float(oracle.relative_error(moments.mean, true)),
                    EXACT_TOL)
    self.assertGreater(float(moments.variance), 0.0)

  def test_leave_one_out_rejects_unbaselined(self):
    vocab, length, params = _model("v3l3")
    with self.assertRaisesRegex(ValueError, "takes no baseline"):
      moments_lib.leave_one_out_gradient_moments(f, params, 0, 1, "trajectory",
                                            vocab, length)

  @parameterized.parameters(*MODELS)
  def test_per_token_reward_is_biased(self, model):
    vocab, length, params = _model(model)
    for i, j in PAIRS:
      true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
      moments = moments_lib.estimator_gradient_moments(
          f, params, i, j, "per_token_reward", vocab, length)
      self.assertGreater(float(oracle.relative_error(moments.mean, true)),
                         BIAS_MIN)

  @parameterized.product(model=tuple(MODELS),
                         estimator=est.BASELINED_ESTIMATORS)
  def test_misspecified_baselines_are_biased(self, model, estimator):
    vocab, length, params = _model(model)
    for i, j in PAIRS[:2]:
      true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
      for name, baseline_fn in MISSPECIFIED_BASELINES.items():
        moments = moments_lib.estimator_gradient_moments(
            f, params, i, j, estimator, vocab, length, baseline_fn=baseline_fn)
        err = oracle.relative_error(moments.mean, true)
        self.assertGreater(float(err), BIAS_MIN, msg=name)

  @parameterized.parameters(*est.ESTIMATORS)
  def test_unbiased_with_eos_truncation(self, estimator):
    vocab, length, params = _model("v3l3")
    for i, j in PAIRS[:2]:
      true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length,
                                       eos_id=2))
      bl = (lambda y, r, kl, m: 0.5 * kl + 0.2) if est.uses_baseline(
          estimator) else None
      moments = moments_lib.estimator_gradient_moments(
          f, params, i, j, estimator, vocab, length, baseline_fn=bl, eos_id=2)
      self.assertLess(float(oracle.relative_error(moments.mean, true)),
                      EXACT_TOL)
    moments = moments_lib.estimator_gradient_moments(
        f, params, 0, 1, "per_token_reward", vocab, length, eos_id=2)
    true = _neg(oracle.exact_kl_grad(f, params, 0, 1, vocab, length, eos_id=2))
    self.assertGreater(float(oracle.relative_error(moments.mean, true)),
                       BIAS_MIN)

  @parameterized.parameters(*est.ESTIMATORS)
  def test_without_pathwise_estimates_score_part_only(self, estimator):
    # pathwise=False treats q = sg(p_j): the mean is −∇_θ through p_i only,
    # i.e. the gradient of KL(p_i ‖ p_j) with p_j's parameters frozen.
    vocab, length, params = _model("v2l4")
    i, j = 0, 1
    moments = moments_lib.estimator_gradient_moments(
        f, params, i, j, estimator, vocab, length, pathwise=False)
    score_only = oracle.exact_opd_kl_grad(
        lambda p, y: f(p, y, i), params, lambda p, y: f(p, y, j), params,
        vocab, length)
    self.assertLess(
        float(oracle.relative_error(moments.mean, _neg(score_only))),
        EXACT_TOL)
    full = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))
    self.assertGreater(float(oracle.relative_error(moments.mean, full)),
                       BIAS_MIN)


class VarianceTest(X64):

  @parameterized.parameters(*MODELS)
  def test_variance_ordering(self, model):
    vocab, length, params = _model(model)
    for i, j in PAIRS:
      var = {
          e: float(moments_lib.estimator_gradient_moments(f, params, i, j, e, vocab,
                                                     length).variance)
          for e in ("trajectory", "reward_to_go", "kl_to_go", "rao_blackwell")
      }
      self.assertLess(var["rao_blackwell"], var["trajectory"], msg=str(var))
      self.assertLessEqual(var["reward_to_go"], var["trajectory"],
                           msg=str(var))
      self.assertGreater(var["rao_blackwell"], 0.0)

  def test_variance_matches_explicit_sum(self):
    # Σ_y p(y)‖g(y)‖² − ‖E g‖², with g(y) built by hand for every y.
    vocab, length, params = _model("v3l3")
    i, j, estimator = 1, 2, "kl_to_go"
    moments = moments_lib.estimator_gradient_moments(f, params, i, j, estimator,
                                                vocab, length)
    seqs = oracle.all_sequences(vocab, length)
    p = np.exp(np.asarray(oracle.exact_sequence_logprobs(f, params, i, vocab,
                                                         length)))
    grad_fn = jax.jit(jax.grad(
        lambda w, y: surrogates.sequence_kl_surrogate_from_logits(
            estimator, f(w, y[None], i)[0], f(w, y[None], j)[0], y,
            jnp.ones(length))))
    second = 0.0
    for y, py in zip(seqs, p):
      second += py * float(jnp.sum(grad_fn(params, y)**2))
    want = second - float(jnp.sum(moments.mean**2))
    np.testing.assert_allclose(moments.variance, want, rtol=1e-10)


# ---------------------------------------------------------------------------
# Monte Carlo over exact samples.
# ---------------------------------------------------------------------------


class MonteCarloTest(X64):

  @parameterized.parameters(*MODELS)
  def test_sample_mean_converges_to_exact_gradient(self, model):
    vocab, length, params = _model(model)
    i, j, n = 2, 0, 4000
    tokens, mask = oracle.sample_sequences(jax.random.PRNGKey(42), f, params,
                                           i, vocab, length, n)
    true = _neg(oracle.exact_kl_grad(f, params, i, j, vocab, length))

    def batch_loss(w, estimator):
      return jnp.mean(jax.vmap(
          functools.partial(surrogates.sequence_kl_surrogate_from_logits, estimator))(
              f(w, tokens, i), f(w, tokens, j), tokens, mask))

    # One jitted program: the batch gradient of every estimator.
    mc_grads = jax.jit(lambda w: {
        e: jax.grad(batch_loss)(w, e) for e in est.ALL_ESTIMATORS})(params)
    for estimator in est.ALL_ESTIMATORS:
      mc = mc_grads[estimator]
      var = moments_lib.estimator_gradient_moments(f, params, i, j, estimator,
                                              vocab, length).variance
      sq_err = float(jnp.sum((mc - true)**2))
      if estimator in est.ESTIMATORS:
        self.assertLessEqual(sq_err, 5 * float(var) / n, msg=estimator)
      else:  # The biased coefficient is caught by the same check.
        self.assertGreater(sq_err, 5 * float(var) / n, msg=estimator)


# ---------------------------------------------------------------------------
# On-policy distillation.
# ---------------------------------------------------------------------------


class OpdTest(X64):

  @parameterized.product(model=tuple(MODELS), eos=[False, True])
  def test_every_estimator_unbiased(self, model, eos):
    vocab, length, sfn, sp, tfn, tp = _student_teacher(model)
    eos_id = (vocab - 1) if eos else None
    true = oracle.exact_opd_kl_grad(sfn, sp, tfn, tp, vocab, length, eos_id)
    chex.assert_trees_all_equal_shapes(true, sp)
    for estimator in est.ALL_ESTIMATORS:
      baseline_fns = [None]
      if est.uses_baseline(estimator):
        baseline_fns += [lambda y, r, kl, m: 0.7 * kl - 0.1,
                      lambda y, r, kl, m: jnp.asarray(1.1, r.dtype)]
      for baseline_fn in baseline_fns:
        moments = moments_lib.opd_gradient_moments(sfn, sp, tfn, tp, estimator,
                                              vocab, length, baseline_fn,
                                              eos_id)
        err = float(oracle.relative_error(moments.mean, true))
        if estimator == "per_token_reward":
          self.assertGreater(err, BIAS_MIN)
        else:
          self.assertLess(err, EXACT_TOL, msg=estimator)

  @parameterized.parameters(*MODELS)
  def test_discount_and_length_normalisation_bias(self, model):
    # DESIGN.md §6.4: γ = 1 is the unbiased estimator and γ = 0 the per-token
    # reward (kl_to_go / reward_to_go forms) or the single-step ∇KL_t term
    # (rao_blackwell); 0 < γ < 1 and MiniLLM's length normalisation are biased.
    vocab, length, sfn, sp, tfn, tp = _student_teacher(model)
    true = oracle.exact_opd_kl_grad(sfn, sp, tfn, tp, vocab, length)
    moments = functools.partial(moments_lib.opd_gradient_moments, sfn, sp, tfn, tp,
                                vocab_size=vocab, length=length)
    per_token = moments("per_token_reward").mean
    for estimator in ("reward_to_go", "kl_to_go", "rao_blackwell"):
      errors = {g: float(oracle.relative_error(moments(estimator, discount=g).mean, true))
                for g in (0.0, 0.5, 0.9, 1.0)}
      self.assertLess(errors[1.0], EXACT_TOL, msg=estimator)
      for g in (0.0, 0.5, 0.9):
        self.assertGreater(errors[g], 1e-3, msg=(estimator, g))
      self.assertGreater(errors[0.0], errors[0.9], msg=estimator)
      if estimator != "rao_blackwell":  # γ = 0 IS the per-token reward.
        self.assertLess(float(oracle.relative_error(
            moments(estimator, discount=0.0).mean, per_token)), EXACT_TOL)
      normalised = moments(estimator, length_normalize=True).mean
      self.assertGreater(float(oracle.relative_error(normalised, true)), 1e-3)

  def test_leave_one_out_unbiased(self):
    vocab, length, sfn, sp, tfn, tp = _student_teacher("v2l4")
    true = oracle.exact_opd_kl_grad(sfn, sp, tfn, tp, vocab, length)
    for estimator in est.BASELINED_ESTIMATORS:
      m = moments_lib.opd_gradient_moments(sfn, sp, tfn, tp, estimator, vocab, length,
                                           baseline="leave_one_out")
      self.assertLess(float(oracle.relative_error(m.mean, true)), EXACT_TOL)

  def test_teacher_gets_zero_gradient(self):
    vocab, length, sfn, sp, tfn, tp = _student_teacher("v3l3")
    seqs = oracle.all_sequences(vocab, length)
    mask = jnp.ones(seqs.shape)
    for estimator in est.ALL_ESTIMATORS:

      def teacher_grad(y, m, estimator=estimator):
        return jax.grad(lambda t: surrogates.opd_surrogate(
            estimator, sfn(sp, y[None])[0], tfn(t, y[None])[0], y, m))(tp)

      g = jax.vmap(teacher_grad)(seqs, mask)
      chex.assert_shape(g, (seqs.shape[0],) + tp.shape)
      np.testing.assert_array_equal(g, 0.0)


class JitTest(X64):

  @chex.variants(with_jit=True, without_jit=True)
  def test_moments_under_jit(self):
    vocab, length, params = _model("v2l4")
    fn = self.variant(lambda w, i, j: moments_lib.estimator_gradient_moments(
        f, w, i, j, "rao_blackwell", vocab, length))
    moments = fn(params, 0, 1)
    chex.assert_trees_all_equal_shapes(moments.mean, params)
    chex.assert_shape(moments.variance, ())
    true = _neg(oracle.exact_kl_grad(f, params, 0, 1, vocab, length))
    self.assertLess(float(oracle.relative_error(moments.mean, true)),
                    EXACT_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_opd_and_pairs_under_jit(self):
    vocab, length, params = _model("v2l4")
    sfn = lambda w, y: f(w, y, 0)
    tfn = lambda w, y: f(w, y, 1)
    grad, moments = self.variant(lambda s, t: (
        oracle.exact_opd_kl_grad(sfn, s, tfn, t, vocab, length, 1),
        moments_lib.opd_gradient_moments(sfn, s, tfn, t, "kl_to_go", vocab, length,
                                         eos_id=1)))(params, params)
    chex.assert_trees_all_equal_shapes(moments.mean, params)
    self.assertLess(float(oracle.relative_error(moments.mean, grad)),
                    EXACT_TOL)
    # 256 pairs in chunks of 100: the lax.scan path.
    loo = self.variant(lambda w: moments_lib.leave_one_out_gradient_moments(
        f, w, 0, 1, "rao_blackwell", vocab, length, chunk_size=100))(params)
    chex.assert_trees_all_equal_shapes(loo.mean, params)
    chex.assert_shape(loo.variance, ())
    true = _neg(oracle.exact_kl_grad(f, params, 0, 1, vocab, length))
    self.assertLess(float(oracle.relative_error(loo.mean, true)), EXACT_TOL)
    one_hot = self.variant(lambda w: moments_lib.estimator_moments(
        lambda y, m: jax.nn.one_hot(y, vocab), f, w, 2, vocab, length))(params)
    chex.assert_shape(one_hot.mean, (length, vocab))
    np.testing.assert_allclose(one_hot.mean.sum(-1), 1.0, atol=1e-12)


if __name__ == "__main__":
  absltest.main()
