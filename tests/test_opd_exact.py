"""Tests for latentdiv/opd_exact.py: each OPD variant's bias, exactly (DESIGN.md §6.4, §7).

In float64 on the tabular models of tests/test_oracle.py (and, for a few
variants, on a real Transformer student and teacher):

* the future decomposition of ``∇KL(π ‖ q)`` sums to the oracle's gradient;
* every discount γ and MiniLLM's length normalisation: the library's estimator
  mean equals theory's ``C + Σ_{t<t'} W[t, t'] F[t, t']`` to 1e-6, so the bias
  has the sign and size theory predicts; it is 0 at γ = 1 and not otherwise;
* teacher-mixed sampling: with ``sequence`` weights every variant keeps its
  on-policy mean exactly; MiniLLM's ``token`` weights are biased even at
  γ = 1, by less as α → 0.
"""

import functools

from absl.testing import absltest
import chex
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiv import estimators as est
from latentdiv import model as model_lib
from latentdiv import moments as moments_lib
from latentdiv import opd
from latentdiv import opd_exact
from latentdiv import oracle
from latentdiv import vocab
from test_oracle import X64, _student_teacher

GAMMAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
EXACT_TOL = 1e-6
V = opd_exact.Variant


def _setting(name, eos):
  vocab_size, length, sfn, sp, tfn, tp = _student_teacher(name)
  return (sfn, sp, tfn, tp), dict(vocab_size=vocab_size, length=length,
                                  eos_id=(vocab_size - 1) if eos else None)


def _table(name, eos, variants):
  models, sizes = _setting(name, eos)
  return opd_exact.bias_table(*models, variants, **sizes)


class DecompositionTest(X64):

  @chex.variants(with_jit=True, without_jit=True)
  def test_pieces_sum_to_the_exact_gradient(self):
    for name, eos in (("v3l3", False), ("v2l4", True)):
      (sfn, sp, tfn, tp), sizes = _setting(name, eos)
      dec = self.variant(lambda s, t, sfn=sfn, tfn=tfn, sizes=sizes:
                         opd_exact.future_decomposition(sfn, s, tfn, t, **sizes))(sp, tp)
      length = sizes["length"]
      chex.assert_shape(dec.future, (length, length, dec.current.shape[0]))
      np.testing.assert_array_equal(dec.future[np.tril_indices(length)], 0.0)
      exact = flatten_util.ravel_pytree(oracle.exact_opd_kl_grad(
          sfn, sp, tfn, tp, **sizes))[0]
      total = dec.current + dec.future.sum((0, 1))
      self.assertLess(float(oracle.relative_error(total, exact)), 1e-12)
      # Both parts matter: the future is a sizeable share of the gradient.
      self.assertGreater(float(jnp.linalg.norm(dec.future.sum((0, 1)))),
                         0.1 * float(jnp.linalg.norm(exact)))

  def test_future_weights(self):
    w = opd_exact.future_weights(3, 0.5)
    np.testing.assert_allclose(w, [[0, 0.5, 0.25], [0, 0, 0.5], [0, 0, 0]])
    w = opd_exact.future_weights(3, 0.5, length_normalize=True)
    np.testing.assert_allclose(w, [[0, 0.25, 0.125], [0, 0, 0.5], [0, 0, 0]])
    np.testing.assert_array_equal(opd_exact.future_weights(3, 1.0)[0], [0, 1, 1])


class DiscountTest(X64):

  def _check_discounts(self, name, eos, estimators):
    variants = [V(e, g) for e in estimators for g in GAMMAS]
    rows = _table(name, eos, variants + [V(est.PER_TOKEN_REWARD)])
    by_key = {(r["estimator"], r["discount"]): r for r in rows}
    for e in estimators:
      errors = [by_key[(e, g)]["relative_error"] for g in GAMMAS]
      for g in GAMMAS:
        row = by_key[(e, g)]
        # The measured mean IS theory's: bias = Σ (γ^{t'−t} − 1) F[t, t'].
        self.assertLess(row["theory_error"], EXACT_TOL, msg=(name, eos, e, g))
        if g < 1:
          self.assertGreater(row["relative_error"], 1e-3, msg=(name, eos, e, g))
          self.assertLess(row["cosine"], 1.0 - 1e-6)
      self.assertLess(errors[-1], EXACT_TOL, msg=(name, eos, e))
      self.assertAlmostEqual(by_key[(e, 1.0)]["cosine"], 1.0, places=9)
      self.assertGreater(errors[0], errors[-2])  # γ = 0 is further off than γ = 0.9.
      # γ = 0 of every to-go form has the per-token reward's mean.
      self.assertAlmostEqual(errors[0], by_key[(est.PER_TOKEN_REWARD, 1.0)]["relative_error"],
                             places=9)
    return rows

  def test_discount_bias_matches_theory(self):
    for eos in (False, True):
      self._check_discounts("v3l3", eos, ("kl_to_go", "rao_blackwell"))

  @pytest.mark.slow
  def test_discount_bias_matches_theory_every_form(self):
    for name in ("v3l3", "v2l4"):
      for eos in (False, True):
        self._check_discounts(name, eos, ("reward_to_go", "kl_to_go", "rao_blackwell"))

  def test_single_step_kl_and_length_normalisation(self):
    # MiniLLM's single-step term: the mean of reward_to_go (unbiased at γ = 1);
    # length normalisation (fixed length): W = γ^{t'−t} / (L − 1 − t), biased.
    variants = [V("reward_to_go", g, single_step_kl=True) for g in (0.0, 0.5, 1.0)]
    variants += [V(e, g, length_normalize=True) for e in ("kl_to_go", "reward_to_go")
                 for g in (0.5, 1.0)]
    variants += [V("reward_to_go", 1.0, length_normalize=True, single_step_kl=True)]
    rows = _table("v2l4", False, variants)
    for row in rows:
      self.assertLess(row["theory_error"], EXACT_TOL, msg=row)
      unbiased = row["discount"] == 1.0 and not row["length_normalize"]
      if unbiased:
        self.assertLess(row["relative_error"], EXACT_TOL, msg=row)
      else:
        self.assertGreater(row["relative_error"], 1e-2, msg=row)
    # With EOS the normalisation's divisor depends on the future: no closed form,
    # still biased.
    rows = _table("v3l3", True, [V("rao_blackwell", 1.0, length_normalize=True)])
    self.assertNotIn("theory_error", rows[0])
    self.assertGreater(rows[0]["relative_error"], 1e-2)


class TeacherMixTest(X64):

  def test_sequence_weights_keep_the_on_policy_mean(self):
    (sfn, sp, tfn, tp), sizes = _setting("v3l3", True)
    plain = [V("kl_to_go", 1.0), V("rao_blackwell", 0.5), V("reward_to_go", 0.0),
             V("reward_to_go", 1.0, single_step_kl=True), V(est.PER_TOKEN_REWARD)]
    mixed = [v._replace(teacher_mix=0.2) for v in plain] + [plain[1]._replace(teacher_mix=0.6)]
    rows = opd_exact.bias_table(sfn, sp, tfn, tp, plain + mixed, **sizes)
    on_policy = {r["estimator"] + str(r["discount"]) + str(r["single_step_kl"]): r
                 for r in rows[:len(plain)]}
    for row in rows[len(plain):]:
      ref = on_policy[row["estimator"] + str(row["discount"]) + str(row["single_step_kl"])]
      self.assertAlmostEqual(row["relative_error"], ref["relative_error"], places=9, msg=row)
      self.assertLess(row["theory_error"], EXACT_TOL, msg=row)
    # The means agree as vectors, not only in their distance to ∇KL.
    got, want = jax.jit(lambda s, t: (
        opd_exact.variant_gradient_moments(sfn, s, tfn, t, mixed[-1], **sizes).mean,
        moments_lib.opd_gradient_moments(sfn, s, tfn, t, plain[1].estimator, **sizes,
                                         discount=plain[1].discount).mean))(sp, tp)
    self.assertLess(float(oracle.relative_error(got, want)), EXACT_TOL)

  def test_token_weights_are_biased_and_less_so_as_alpha_shrinks(self):
    variants = [V(e, 1.0, teacher_mix=a, mix_weight="token")
                for a in (0.0, 0.02, 0.2, 0.6) for e in ("kl_to_go", "rao_blackwell")]
    rows = _table("v3l3", True, variants)
    errors = {(r["estimator"], r["teacher_mix"]): r["relative_error"] for r in rows}
    for e in ("kl_to_go", "rao_blackwell"):
      self.assertLess(errors[(e, 0.0)], EXACT_TOL)  # α = 0: the student's own samples.
      self.assertGreater(errors[(e, 0.2)], 1e-2)
      self.assertLess(errors[(e, 0.02)], errors[(e, 0.2)])
      self.assertLess(errors[(e, 0.2)], errors[(e, 0.6)])


  def test_baselines_stay_unbiased_under_mixing(self):
    # A baseline b(c_t) carries ρ_t under sequence weights (leave-one-out per unit
    # weight over pairs of mixture samples; a fixed EMA vector): the mean is ∇KL.
    (sfn, sp, tfn, tp), sizes = _setting("v2l4", True)
    exact = oracle.exact_opd_kl_grad(sfn, sp, tfn, tp, **sizes)
    ema_L = jnp.asarray([0.7, -0.3, 1.1, 0.4])
    cases = []
    for weight, estimator, single in (("sequence", "kl_to_go_baseline", False),
                                      ("sequence", "rao_blackwell", False),
                                      ("sequence", "reward_to_go_baseline", True),
                                      ("token", "rao_blackwell", False)):
      for baseline in ("none", "leave_one_out", "ema"):
        if not (baseline == "none" and estimator.endswith("_baseline")):
          cases.append(V(estimator, single_step_kl=single, teacher_mix=0.3, mix_weight=weight,
                         baseline=baseline))
    # One program for every case.
    means = jax.jit(lambda s, t: [opd_exact.variant_gradient_moments(
        sfn, s, tfn, t, v, **sizes, ema_L=ema_L).mean for v in cases])(sp, tp)
    by_case = dict(zip(cases, means))
    for v, mean in by_case.items():
      err = float(oracle.relative_error(mean, exact))
      if v.mix_weight == "sequence":
        self.assertLess(err, EXACT_TOL, msg=v)
      else:  # Biased, but by the same amount with or without a baseline.
        self.assertGreater(err, 1e-2)
        unbaselined = by_case[v._replace(baseline="none")]
        self.assertLess(float(oracle.relative_error(mean, unbaselined)), EXACT_TOL)


class ImportanceWeightTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_weights_match_numpy(self):
    rng = np.random.default_rng(0)
    logp = np.log(rng.uniform(0.05, 1, size=5))
    logq = np.log(rng.uniform(0.05, 1, size=5))
    mask = np.array([1, 1, 1, 0, 0], np.float64)
    alpha = 0.3
    w = np.where(mask > 0, np.exp(logp) / ((1 - alpha) * np.exp(logp) + alpha * np.exp(logq)),
                 1.0)
    before, through = self.variant(functools.partial(
        opd.importance_weights, teacher_mix=alpha, mix_weight="sequence"))(logp, logq, mask)
    np.testing.assert_allclose(through, np.cumprod(w), rtol=1e-5)
    np.testing.assert_allclose(before, np.cumprod(np.concatenate([[1.0], w[:-1]])), rtol=1e-5)
    before, through = self.variant(functools.partial(
        opd.importance_weights, teacher_mix=alpha, mix_weight="token"))(logp, logq, mask)
    np.testing.assert_allclose(through, w, rtol=1e-5)
    np.testing.assert_array_equal(before, 1.0)
    before, through = opd.importance_weights(logp, logq, mask, 0.0)
    np.testing.assert_allclose(through, 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_row_gradient_moments_match_numpy(self):
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=3), "b": rng.normal(size=())}
    x = rng.normal(size=(7, 3))
    y = rng.normal(size=(7,))
    loss = lambda p, x_r, y_r: (jnp.dot(p["w"], x_r) + p["b"] - y_r) ** 2  # noqa: E731
    norm, variance = self.variant(functools.partial(opd_exact.row_gradient_moments, loss))(
        params, (x, y))
    resid = x @ params["w"] + params["b"] - y
    grads = np.concatenate([2 * resid[:, None], 2 * resid[:, None] * x], axis=1)  # (b, w)
    np.testing.assert_allclose(norm, np.linalg.norm(grads.mean(0)), rtol=1e-5)
    np.testing.assert_allclose(variance, np.sum(grads.var(0, ddof=1)), rtol=1e-5)

  def test_bad_options_are_named(self):
    for kwargs, pattern in ((dict(single_step_kl=True), "single_step_kl"),
                            (dict(teacher_mix=1.0), "teacher_mix"),
                            (dict(teacher_mix=0.2, mix_weight="trajectory"), "mix_weight")):
      with self.assertRaisesRegex(ValueError, pattern):
        opd.check_options("kl_to_go", **kwargs)
    with self.assertRaisesRegex(ValueError, "trajectory"):
      opd.check_options("trajectory", teacher_mix=0.2)


# ---------------------------------------------------------------------------
# A real Transformer student and teacher (float32 logits, sums in float64).

PROMPT = np.array([[3, 4]], np.int32)
TF_VOCAB, TF_LENGTH = vocab.NUM_RESERVED + 2, 3


def _transformer(d_model, num_latents, seed, unembed_scale, eos_bias):
  model = model_lib.LatentTransformer(model_lib.ModelConfig(
      vocab_size=TF_VOCAB, num_latents=num_latents, max_len=PROMPT.shape[1] + TF_LENGTH,
      d_model=d_model, num_heads=2, num_layers=1, d_ff=2 * d_model))
  params = model_lib.init_params(model, jax.random.PRNGKey(seed))
  params["unembed"]["kernel"] = unembed_scale * params["unembed"]["kernel"]
  params["unembed"]["bias"] = params["unembed"]["bias"].at[vocab.EOS].add(eos_bias)

  def fn(p, tokens_NxL):
    n = tokens_NxL.shape[0]
    return model_lib.teacher_forced_logits(
        model, p, jnp.repeat(jnp.asarray(PROMPT), n, axis=0), tokens_NxL,
        jnp.zeros((n,), jnp.int32)).astype(jnp.float64)

  return fn, params


class TransformerTest(X64):

  @pytest.mark.slow
  def test_variants_on_a_transformer(self):
    sfn, sp = _transformer(8, 1, 0, 1.5, 2.5)
    tfn, tp = _transformer(16, 1, 1, 3.0, 0.0)
    variants = [V("rao_blackwell", g) for g in (0.0, 0.5, 1.0)]
    variants += [V("reward_to_go", 1.0, single_step_kl=True),
                 V("kl_to_go", 1.0, teacher_mix=0.3),
                 V("kl_to_go", 1.0, teacher_mix=0.3, mix_weight="token")]
    rows = opd_exact.bias_table(sfn, sp, tfn, tp, variants, TF_VOCAB, TF_LENGTH,
                                eos_id=vocab.EOS, pad_id=vocab.PAD)
    for row in rows:
      exact = row["discount"] == 1.0 and row["mix_weight"] == "sequence"
      if "theory_error" in row:
        self.assertLess(row["theory_error"], 1e-4, msg=row)
      if exact:
        self.assertLess(row["relative_error"], 1e-4, msg=row)
      else:
        self.assertGreater(row["relative_error"], 1e-2, msg=row)


if __name__ == "__main__":
  absltest.main()
