"""Tests for latentdiv.sequence_term: the schedule, the pair weights and one term's outputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

from latentdiv import model as model_lib
from latentdiv import sequence_term


def _model(num_latents=3):
  config = model_lib.ModelConfig(vocab_size=6, num_latents=num_latents, max_len=8,
                                 d_model=16, num_heads=2, num_layers=1, d_ff=32)
  model = model_lib.LatentTransformer(config)
  return model, model_lib.init_params(model, jax.random.PRNGKey(0))


class ScheduleTest(parameterized.TestCase):

  def test_weight_schedule(self):
    weights = [float(sequence_term.weight_at(s, 2.0, 10, 4)) for s in (0, 9, 10, 11, 13, 100)]
    np.testing.assert_allclose(weights, [0.0, 0.0, 0.5, 1.0, 2.0, 2.0])

  @parameterized.parameters(0, 2, 6)
  def test_pair_weights_sum_to_one_off_the_diagonal(self, num_pairs):
    w = sequence_term.pair_weights(jax.random.PRNGKey(0), 5, 3, num_pairs)
    chex.assert_shape(w, (5, 3, 3))
    np.testing.assert_allclose(jnp.sum(w, axis=(1, 2)), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(jnp.diagonal(w, axis1=1, axis2=2), 0.0)
    if num_pairs:
      np.testing.assert_array_equal(jnp.sum(w > 0, axis=(1, 2)), num_pairs)


class SequenceTermTest(parameterized.TestCase):

  # (Every estimator × baseline runs through the whole train step in
  # tests/objectives/test_diversity.py; here the term's own outputs.)
  @parameterized.parameters(
      dict(estimator="rao_blackwell", baseline="none"),
      dict(estimator="kl_to_go_baseline", baseline="ema"),
  )
  def test_outputs_and_state(self, **kwargs):
    model, params = _model()
    settings = sequence_term.Settings(rollout_len=3, **kwargs)
    prompt = jnp.full((4, 2), 3, jnp.int32)
    extra = sequence_term.init_state(settings)
    term = jax.jit(lambda p, e: sequence_term.sequence_term(model, p, prompt,
                                                            jax.random.PRNGKey(1), e, settings))(
                                                                params, extra)
    chex.assert_shape(term.surrogate, ())
    chex.assert_tree_all_finite(term)
    self.assertGreater(float(term.metrics["seq_kl"]), 0.0)
    self.assertEqual(jax.tree_util.tree_structure(term.extra), jax.tree_util.tree_structure(extra))
    if kwargs["baseline"] == "ema":
      self.assertGreater(float(jnp.max(jnp.abs(term.extra["ema"]))), 0.0)
    grads = jax.jit(jax.grad(lambda p: sequence_term.sequence_term(
        model, p, prompt, jax.random.PRNGKey(1), extra, settings).surrogate))(params)
    self.assertGreater(float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree_util.tree_leaves(grads))),
                       0.0)

  def test_mutual_information_equals_its_parts(self):
    # N = 2 rollouts per (x, k) with leave-one-out: the grouping that matters.
    self._check_mutual_information_parts(estimator="rao_blackwell", baseline="leave_one_out",
                                         num_rollouts=2)

  @parameterized.parameters(
      dict(estimator="rao_blackwell", baseline="none", num_rollouts=1),
      dict(estimator="kl_to_go_baseline", baseline="ema", num_rollouts=1),
      dict(estimator="reward_to_go_baseline", baseline="jsd", num_rollouts=1),
  )
  @pytest.mark.slow  # Below the parameters: absl copies the mark to each case.
  def test_mutual_information_equals_its_parts_other_baselines(self, **kwargs):
    self._check_mutual_information_parts(**kwargs)

  def _check_mutual_information_parts(self, **kwargs):
    # kind='mi' against the same rollouts (same key) scored one at a time by
    # mutual_information.mixture_terms and grouped per (x, k) by hand.
    from latentdiv import mutual_information as mi, sampling  # pylint: disable=import-outside-toplevel
    model, params = _model()
    settings = sequence_term.Settings(rollout_len=3, kind="mi", **kwargs)
    prompt = jax.random.randint(jax.random.PRNGKey(2), (3, 2), 3, 6)
    data_logits = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 4, 6))
    data_mask = jnp.ones((3, 4), bool)
    extra = sequence_term.init_state(settings)
    key = jax.random.PRNGKey(1)
    term = jax.jit(lambda p: sequence_term.sequence_term(
        model, p, prompt, key, extra, settings, data_logits, data_mask))(params)
    chex.assert_tree_all_finite(term)
    self.assertBetween(float(term.metrics["seq_mi"]), -1e-6, np.log(3) + 1e-6)
    self.assertNotIn("seq_kl", term.metrics)

    n = kwargs["num_rollouts"]
    prompt_bn = jnp.repeat(prompt, n, axis=0)
    rollout = sampling.sample_latents(model, params, prompt_bn, jax.random.split(key)[0], 3)

    def manual(p):
      def one(prompt_P, tokens_L, mask_L, k):
        logits = jax.vmap(lambda j: model_lib.teacher_forced_logits(
            model, p, prompt_P[None], tokens_L[None], jnp.full((1,), j))[0])(jnp.arange(3))
        return mi.mixture_terms(logits, tokens_L, mask_L, k)
      terms = jax.vmap(jax.vmap(one, (None, 0, 0, 0)), (0, 0, 0, None))(
          prompt_bn, rollout.tokens, rollout.mask, jnp.arange(3))  # [BN, K, L]
      group = lambda a: jnp.moveaxis(a.reshape((3, n) + a.shape[1:]), 1, 2)  # noqa: E731
      terms = type(terms)(*map(group, terms))
      mask = group(rollout.mask)
      value = None
      if kwargs["baseline"] == "ema":
        value = jnp.broadcast_to(extra["ema"], mask.shape)
      elif kwargs["baseline"] == "jsd":
        value = jnp.zeros(mask.shape)  # c = 0 before any fit.
      fn = lambda tm, m, v: mi.policy_gradient(  # noqa: E731
          settings.estimator, tm, m, baseline=settings.baseline, baseline_value=v).loss
      if value is None:
        fn0 = lambda tm, m: mi.policy_gradient(  # noqa: E731
            settings.estimator, tm, m, baseline=settings.baseline).loss
        loss = jax.vmap(jax.vmap(fn0))(terms, mask)
      else:
        loss = jax.vmap(jax.vmap(fn))(terms, mask, value)
      return -jnp.mean(loss)

    np.testing.assert_allclose(term.surrogate, jax.jit(manual)(params), rtol=1e-5, atol=1e-6)
    g_term = jax.jit(jax.grad(lambda p: sequence_term.sequence_term(
        model, p, prompt, key, extra, settings, data_logits, data_mask).surrogate))(params)
    g_manual = jax.jit(jax.grad(manual))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_term), jax.tree_util.tree_leaves(g_manual)):
      self.assertLess(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12)), 1e-4)

  def test_ema_and_explained_variance_leave_out_the_diagonal_pairs(self):
    model, params = _model()
    settings = sequence_term.Settings(rollout_len=3, estimator="kl_to_go_baseline",
                                      baseline="ema", ema_decay=0.0)
    prompt = jnp.full((4, 2), 3, jnp.int32)
    run = lambda s: jax.jit(lambda p: sequence_term.sequence_term(  # noqa: E731
        model, p, prompt, jax.random.PRNGKey(1), sequence_term.init_state(s), s))(params)
    term = run(settings)
    # With decay 0 the EMA is this step's mean kl_to_go return per position over
    # the off-diagonal groups i ≠ j (the i = j returns are 0 and stay out).
    from latentdiv import estimators, sampling  # pylint: disable=import-outside-toplevel
    rollout = jax.jit(lambda p: sampling.sample_latents(
        model, p, prompt, jax.random.split(jax.random.PRNGKey(1))[0], 3))(params)
    terms = jax.jit(lambda p: sequence_term.pair_terms(model, p, prompt, rollout.tokens))(params)
    mask = jnp.broadcast_to(rollout.mask[:, :, None], terms.kl_t.shape).astype(jnp.float32)
    r = (terms.logp_score_t - terms.logp_target_t) * mask
    kl = terms.kl_t * mask
    returns = (r + estimators.reverse_cumsum(kl) - kl) * mask
    off = mask * (1.0 - jnp.eye(3))[None, :, :, None]
    want = jnp.sum(returns * off, axis=(0, 1, 2)) / jnp.sum(off, axis=(0, 1, 2))
    np.testing.assert_allclose(term.extra["ema"], want, rtol=1e-4, atol=1e-5)
    settings_mi = settings._replace(kind="mi")
    term_mi = run(settings_mi)
    self.assertGreater(float(term_mi.extra["ema"][0]), 0.0)

  def test_pair_terms_equal_scoring_every_pair_at_once(self):
    # The lax.map over the target latent (memory linear in K) against the
    # direct [B, K, K, L, V] scoring pass: values and gradients.
    from latentdiv import estimators, sampling  # pylint: disable=import-outside-toplevel
    model, params = _model(num_latents=3)
    prompt = jax.random.randint(jax.random.PRNGKey(2), (4, 2), 3, 6)
    tokens = sampling.sample_latents(model, params, prompt, jax.random.PRNGKey(3), 4).tokens

    def direct(p):
      logits = sampling.score_latents(model, p, prompt, tokens)  # [B, i, j, L, V]
      score = jnp.broadcast_to(
          jnp.diagonal(logits, axis1=1, axis2=2).transpose(0, 3, 1, 2)[:, :, None],
          logits.shape)
      toks = jnp.broadcast_to(tokens[:, :, None], logits.shape[:-1])
      return jax.vmap(jax.vmap(jax.vmap(estimators.per_token_terms)))(score, logits, toks)

    got = jax.jit(lambda p: sequence_term.pair_terms(model, p, prompt, tokens))(params)
    want = jax.jit(direct)(params)
    for g, w in zip(got, want):
      chex.assert_shape(g, (4, 3, 3, 4))
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.diagonal(got.kl_t, axis1=1, axis2=2), 0.0, atol=1e-6)
    scalar = lambda t: jnp.sum(t.kl_t) + jnp.sum(t.logp_target_t * t.logp_score_t)  # noqa: E731
    g_got = jax.jit(jax.grad(
        lambda p: scalar(sequence_term.pair_terms(model, p, prompt, tokens))))(params)
    g_want = jax.jit(jax.grad(lambda p: scalar(direct(p))))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
      # Relative to each leaf's scale: float32 sums in another order.
      self.assertLess(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12)), 1e-5)

  def test_bad_arguments(self):
    model, params = _model()
    prompt = jnp.full((2, 2), 3, jnp.int32)
    with self.assertRaisesRegex(ValueError, "kind must be one of"):
      sequence_term.sequence_term(model, params, prompt, jax.random.PRNGKey(0), {},
                                  sequence_term.Settings(kind="js"))
    with self.assertRaisesRegex(ValueError, "needs data_logits"):
      sequence_term.sequence_term(model, params, prompt, jax.random.PRNGKey(0),
                                  sequence_term.init_state(sequence_term.Settings(baseline="jsd")),
                                  sequence_term.Settings(baseline="jsd"))
    with self.assertRaisesRegex(ValueError, "num_pairs applies to kind 'kl' only"):
      sequence_term.sequence_term(model, params, prompt, jax.random.PRNGKey(0), {},
                                  sequence_term.Settings(kind="mi", num_pairs=2))


if __name__ == "__main__":
  absltest.main()
