"""On-policy distillation losses: pure functions of student and teacher logits (DESIGN.md §6).

Written for groups of responses and batched by the caller; the objective that
runs them in a train step is ``latentdiv.objectives.distillation``.

* :func:`opd_loss` — the OPD surrogate through ``estimators.policy_gradient``
  (no pathwise term: the teacher is frozen); its gradient estimates
  ``+∇ KL(π_θ ‖ q)`` for the unbiased estimators, with the practitioners'
  variants (discount, length normalisation, MiniLLM's single-step term,
  teacher-mixed sampling with its importance weights) as options
  (DESIGN.md §6.4);
* :func:`seq_kd_loss` — sequence-level KD (Kim & Rush 2016);
* :func:`gkd_loss` — TRL's GKD loss, the teacher-forced JSD_β (Agarwal et al. 2024);
* :func:`sequence_reverse_kl` and :func:`reverse_kl_summary` — the
  Monte-Carlo sequence reverse KL with its confidence interval.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from latentdiv import baselines
from latentdiv import divergences
from latentdiv import estimators
from latentdiv import logprobs
from latentdiv import metrics as metrics_lib

GKD_REDUCTIONS = ("batchmean", "sum", "mean", "none")
"""The reductions of :func:`gkd_loss` (TRL's names)."""

BASELINES = ("none", "leave_one_out", "ema")
"""The baselines of OPD (``baselines.BASELINES`` less the inter-latent ``jsd``)."""


def sequence_reverse_kl(student_logits_BxLxV, teacher_logits_BxLxV, tokens_BxL, mask_BxL):
  """Per-response log-ratio ``R = Σ_t mask_t (log π(y_t|c_t) − log q(y_t|c_t))``, no gradient.

  For y ~ π (temperature 1, up to EOS), ``E[R] = KL(π(·|x) ‖ q(·|x))``: the
  Monte-Carlo estimate of the sequence reverse KL (DESIGN.md §6).

  Args:
    student_logits_BxLxV / teacher_logits_BxLxV: [B, L, V] logits at the responses' contexts.
    tokens_BxL: [B, L] int responses.
    mask_BxL: [B, L] 1 up to and including EOS.

  Returns:
    [B] log-ratios R.
  """
  chex.assert_rank([student_logits_BxLxV, teacher_logits_BxLxV, tokens_BxL, mask_BxL],
                   [3, 3, 2, 2])
  chex.assert_equal_shape([student_logits_BxLxV, teacher_logits_BxLxV])
  chex.assert_equal_shape([tokens_BxL, mask_BxL])
  sg = jax.lax.stop_gradient
  r_t = (logprobs.token_log_probs(sg(student_logits_BxLxV), tokens_BxL)
         - logprobs.token_log_probs(sg(teacher_logits_BxLxV), tokens_BxL))
  return jnp.sum(r_t * mask_BxL.astype(r_t.dtype), axis=-1)


MIX_WEIGHTS = ("sequence", "token")
"""Importance weights of teacher-mixed sampling (:func:`importance_weights`)."""

SINGLE_STEP_ESTIMATORS = (estimators.REWARD_TO_GO, estimators.REWARD_TO_GO_BASELINE)
"""Estimators whose current step ``single_step_kl`` replaces by the exact ``∇KL_t``."""


class OPDLoss(NamedTuple):
  """Output of :func:`opd_loss`: the mean surrogate and, per [G, N(, L)], what it came from."""

  loss: jax.Array
  returns: jax.Array
  baseline: jax.Array
  reverse_kl: jax.Array


def check_options(estimator: str, discount=1.0, length_normalize: bool = False,
                  single_step_kl: bool = False, teacher_mix=0.0,
                  mix_weight: str = "sequence") -> None:
  """ValueError unless the practitioners' variants (DESIGN.md §6.4) apply to ``estimator``.

  ``discount`` and ``length_normalize`` as ``estimators.check_variant``;
  ``single_step_kl`` only for :data:`SINGLE_STEP_ESTIMATORS` (for ``kl_to_go``
  it would be ``rao_blackwell``); ``teacher_mix`` = α ∈ [0, 1), not with
  ``trajectory`` (its past rewards have mean zero only under the student's
  own next-token distribution); ``mix_weight`` in :data:`MIX_WEIGHTS`.
  """
  estimators.check_variant(estimator, discount, length_normalize)
  if not isinstance(single_step_kl, bool):
    raise ValueError(f"single_step_kl must be True or False, got {single_step_kl!r}.")
  if single_step_kl and estimator not in SINGLE_STEP_ESTIMATORS:
    raise ValueError(
        f"single_step_kl applies to {SINGLE_STEP_ESTIMATORS} (the current step of "
        f"kl_to_go made exact is rao_blackwell), not {estimator!r}.")
  if isinstance(teacher_mix, bool) or not isinstance(teacher_mix, (int, float)) or not (
      0.0 <= teacher_mix < 1.0):
    raise ValueError(f"teacher_mix must be a number in [0, 1), got {teacher_mix!r}.")
  if mix_weight not in MIX_WEIGHTS:
    raise ValueError(f"mix_weight must be one of {MIX_WEIGHTS}, got {mix_weight!r}.")
  if teacher_mix > 0 and estimator == estimators.TRAJECTORY:
    raise ValueError(
        "teacher_mix > 0 needs a to-go estimator, not 'trajectory': its past rewards "
        "average to zero only under the student's own next-token distribution.")


def mixture_log_probs(logp_t, logq_t, teacher_mix):
  """``log p̃(y_t|c_t)`` of the mixture ``p̃ = α·q + (1−α)·π`` at the sampled tokens.

  Args:
    logp_t: [...] ``log π(y_t|c_t)``.
    logq_t: [...] ``log q(y_t|c_t)``.
    teacher_mix: α ∈ [0, 1).

  Returns:
    [...] ``log((1−α) π(y_t|c_t) + α q(y_t|c_t))``.

  References:
    DESIGN.md §6.4; Gu et al. (2024), MiniLLM, teacher-mixed sampling.
  """
  if teacher_mix == 0:
    return logp_t
  return jnp.logaddexp(jnp.log1p(-teacher_mix) + logp_t, jnp.log(teacher_mix) + logq_t)


def importance_weights(logp_L, logq_L, mask_L, teacher_mix, mix_weight: str = "sequence"):
  """Weights that turn an estimator on mixture samples into one on student samples.

  With the per-token ratios ``w_t = π(y_t|c_t) / p̃(y_t|c_t)`` (1 at masked
  positions) and ``ρ_t = Π_{u≤t} w_u`` (``ρ_0 = 1``)::

    "sequence": through_t = ρ_t,  before_t = ρ_{t−1}   (E_p̃[ρ_t h(y_≤t)] = E_π[h])
    "token":    through_t = w_t,  before_t = 1         (MiniLLM's approximation)

  Args:
    logp_L: [L] ``log π(y_t|c_t)`` (stop-gradiented here).
    logq_L: [L] ``log q(y_t|c_t)``.
    mask_L: [L] 1 at scored positions.
    teacher_mix: α ∈ [0, 1).
    mix_weight: one of :data:`MIX_WEIGHTS`.

  Returns:
    ``(before_L, through_L)``, no gradient.

  References:
    DESIGN.md §6.4.
  """
  sg = jax.lax.stop_gradient
  m = mask_L.astype(logp_L.dtype)
  log_w = sg(logp_L - mixture_log_probs(logp_L, logq_L, teacher_mix)) * m
  if mix_weight == "token":
    return jnp.ones_like(log_w), jnp.exp(log_w)
  log_rho = jnp.cumsum(log_w)
  return jnp.exp(log_rho - log_w), jnp.exp(log_rho)


def _weighted_terms(terms: estimators.PerTokenTerms, mask_L, teacher_mix, mix_weight,
                    single_step_kl):
  """Per-token terms whose ``policy_gradient`` is the mixed / single-step variant (one rollout).

  Values and gradients, with ``(b_t, ρ_t)`` = :func:`importance_weights`:

  * ``"sequence"``: ``r_t → ρ_t r_t``, ``KL_t → b_t KL_t`` (value and gradient),
    score unchanged — every piece of the coefficient carries the weight of the
    tokens it depends on;
  * ``"token"``: values unchanged, the score's gradient scaled by ``w_t``
    (``logp`` keeps its value, so ``r_t`` does too);
  * ``single_step_kl``: ``KL_t`` is replaced by a term whose VALUE is the
    (weighted) ``r_t`` and whose GRADIENT is the (weighted) ``∇KL_t``, to be
    run through ``rao_blackwell``: the exact current step plus the sampled
    rewards to go from t + 1.

  Returns:
    ``(terms, through_L)`` with ``through_L`` the weights of a baseline at t.
  """
  sg = jax.lax.stop_gradient
  logp, logq, kl = terms
  before, through = importance_weights(logp, logq, mask_L, teacher_mix, mix_weight)
  r = sg(logp - logq)
  if mix_weight == "token":
    score_w, value_w = through, jnp.ones_like(through)
  else:
    score_w, value_w = jnp.ones_like(through), through
  logp_new = score_w * logp + sg((1.0 - score_w) * logp)  # value logp, gradient w·∇logp
  logq_new = sg(logp - value_w * r)  # so that logp_new − logq_new = value_w · r
  kl_w = before if mix_weight == "sequence" else jnp.ones_like(before)
  kl_new = kl_w * kl
  if single_step_kl:
    kl_new = kl_w * (kl - sg(kl)) + value_w * r
  return estimators.PerTokenTerms(logp_new, logq_new, kl_new), through


def opd_loss(student_logits_GxNxLxV, teacher_logits_GxNxLxV, tokens_GxNxL, mask_GxNxL,
             estimator: str, baseline: str = "none", ema_L=None, discount=1.0,
             length_normalize: bool = False, single_step_kl: bool = False,
             teacher_mix=0.0, mix_weight: str = "sequence") -> OPDLoss:
  """OPD loss on G groups of N responses: its gradient estimates ``+∇KL(π ‖ q)``.

  ``loss = (1/GN) Σ_{g,n} policy_gradient(estimator, π, sg(q), y^(g,n), b).loss``
  without the pathwise term (DESIGN.md §5.3, §6). Baselines: ``none``;
  ``leave_one_out`` over the N responses of a group (N ≥ 2); ``ema`` the
  given per-position ``ema_L``.

  The practitioners' variants (DESIGN.md §6.4): ``discount`` γ and
  ``length_normalize`` on the future terms; ``single_step_kl`` (MiniLLM's
  single-step decomposition: the current step of ``reward_to_go`` replaced by
  the exact ``∇KL_t``); and, for responses drawn from the mixture
  ``α·q + (1−α)·π`` (``teacher_mix`` = α > 0), the importance weights
  ``mix_weight``: ``"sequence"`` keeps each variant's expectation equal to its
  on-policy one (unbiased at γ = 1), ``"token"`` is MiniLLM's per-token ratio
  (biased). With α = 0 and no single step this is the plain estimator.

  Args:
    student_logits_GxNxLxV: [G, N, L, V] student logits (with gradient).
    teacher_logits_GxNxLxV: [G, N, L, V] teacher logits (stop-gradiented here).
    tokens_GxNxL: [G, N, L] int responses, from the student (α = 0) or the mixture.
    mask_GxNxL: [G, N, L] 1 up to and including EOS.
    estimator: a name in ``estimators.ALL_ESTIMATORS`` (static).
    baseline: one of :data:`BASELINES` (static).
    ema_L: [L] EMA baseline (required for ``'ema'``).
    discount: γ on the future terms (1 = unbiased).
    length_normalize: MiniLLM's normalisation of the future terms.
    single_step_kl: exact current step for :data:`SINGLE_STEP_ESTIMATORS`.
    teacher_mix: α ∈ [0, 1), the teacher's share of the sampling mixture.
    mix_weight: one of :data:`MIX_WEIGHTS`.

  Returns:
    :class:`OPDLoss` (``returns``/``baseline`` [G, N, L]; ``reverse_kl`` [G, N],
    the importance-weighted ``Σ_t ρ_t r_t``, unbiased for the sequence KL).

  Raises:
    ValueError: unknown estimator/baseline, a baseline for an estimator that
      takes none, N < 2 with leave-one-out, ``ema_L`` missing, or a variant
      that does not apply (:func:`check_options`).
  """
  chex.assert_rank([student_logits_GxNxLxV, teacher_logits_GxNxLxV, tokens_GxNxL,
                    mask_GxNxL], [4, 4, 3, 3])
  chex.assert_equal_shape([student_logits_GxNxLxV, teacher_logits_GxNxLxV])
  chex.assert_equal_shape([tokens_GxNxL, mask_GxNxL])
  if baseline not in BASELINES:
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}.")
  estimators.check_combination(estimator, baseline)
  check_options(estimator, discount, length_normalize, single_step_kl, teacher_mix,
                mix_weight)
  if baseline == "ema" and ema_L is None:
    raise ValueError("baseline='ema' needs ema_L, the [L] EMA of the returns.")
  over_gn = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731
  terms = over_gn(estimators.per_token_terms)(
      student_logits_GxNxLxV, jax.lax.stop_gradient(teacher_logits_GxNxLxV), tokens_GxNxL)
  _, rho = over_gn(functools.partial(importance_weights, teacher_mix=teacher_mix))(
      terms.logp_score_t, terms.logp_target_t, mask_GxNxL)
  r_t = jax.lax.stop_gradient(terms.logp_score_t - terms.logp_target_t)
  reverse_kl = jnp.sum(rho * r_t * mask_GxNxL.astype(r_t.dtype), axis=-1)
  through = jnp.ones_like(rho)
  if teacher_mix > 0 or single_step_kl:
    terms, through = over_gn(functools.partial(
        _weighted_terms, teacher_mix=teacher_mix, mix_weight=mix_weight,
        single_step_kl=single_step_kl))(terms, mask_GxNxL)
  pg_estimator = estimators.RAO_BLACKWELL if single_step_kl else estimator
  variant = dict(pathwise=False, discount=discount, length_normalize=length_normalize)
  value = None
  if baseline == "ema":
    chex.assert_shape(ema_L, tokens_GxNxL.shape[-1:])
    value = jnp.broadcast_to(ema_L, tokens_GxNxL.shape)
  if teacher_mix > 0 and mix_weight == "sequence" and baseline != "none":
    # A baseline b(c_t) multiplies the score of y_t: it carries the weight ρ_t.
    # Leave-one-out averages the other responses' returns per unit weight.
    if baseline == "leave_one_out":
      returns = over_gn(functools.partial(
          estimators.estimator_returns, pg_estimator, discount=discount,
          length_normalize=length_normalize))(
              jax.lax.stop_gradient(terms.logp_score_t - terms.logp_target_t),
              jax.lax.stop_gradient(terms.kl_t), mask_GxNxL)
      value = jax.vmap(baselines.leave_one_out_baseline)(returns / through, mask_GxNxL)
    value, baseline = value * through, "ema"  # a caller-given value from here on.
  pg_fn = functools.partial(estimators.policy_gradient, pg_estimator, baseline=baseline,
                            **variant)
  if value is not None:
    pg = jax.vmap(lambda t, m, v: pg_fn(t, m, baseline_value=v))(terms, mask_GxNxL, value)
  else:
    pg = jax.vmap(pg_fn)(terms, mask_GxNxL)
  return OPDLoss(loss=jnp.mean(pg.loss), returns=pg.returns, baseline=pg.baseline,
                 reverse_kl=reverse_kl)


def seq_kd_loss(student_logits_BxLxV, tokens_BxL, mask_BxL) -> jax.Array:
  """Sequence-level KD (Kim & Rush 2016): ``−(1/B) Σ_b log π(y_b | x_b)`` on teacher samples.

  Its gradient is an unbiased estimate of ``∇ KL(q ‖ π)`` (DESIGN.md §6).

  Args:
    student_logits_BxLxV: [B, L, V] student logits at the samples' contexts.
    tokens_BxL: [B, L] int teacher samples.
    mask_BxL: [B, L] 1 up to and including EOS.

  Returns:
    Scalar loss.
  """
  chex.assert_rank([student_logits_BxLxV, tokens_BxL, mask_BxL], [3, 2, 2])
  return -jnp.mean(jax.vmap(logprobs.sequence_log_likelihood)(
      student_logits_BxLxV, tokens_BxL.astype(jnp.int32), mask_BxL))


def gkd_loss(student_logits_BxTxV: chex.Array, teacher_logits_BxTxV: chex.Array,
             labels_mask_BxT: chex.Array | None = None, beta=0.5, temperature=1.0,
             reduction: str = "batchmean") -> chex.Array:
  """TRL's GKD loss: teacher-forced generalised JSD_β(teacher, student).

  Per token: ``JSD_β(P, Q)`` with P = teacher, Q = student (see
  ``divergences.generalized_jsd``), ``M = β P + (1−β) Q``. β → 0 approaches the forward
  KL(teacher ‖ student), β → 1 the reverse KL(student ‖ teacher) (after
  division by β, resp. 1−β). Reductions follow TRL's
  ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels,
  beta, temperature, reduction)``, whose per-element divergence has shape
  ``[tokens, V]``:

  * ``"batchmean"``: with a mask, Σ over valid tokens / number of valid tokens
    (TRL: ``jsd.sum() / mask.sum()``); all-masked gives 0 here (TRL: NaN).
    Without a mask, Σ / B (TRL: ``jsd.sum() / jsd.size(0)``).
  * ``"sum"``: Σ over valid tokens.
  * ``"mean"``: Σ / (number of valid tokens · V) — TRL's ``jsd.mean()`` over
    the ``[tokens, V]`` elements, so it also divides by V; without a mask,
    Σ / (B·T·V).
  * ``"none"``: the per-token ``[B, T]`` divergences with masked positions set
    to 0. (TRL returns the per-vocabulary-entry terms of the valid tokens,
    a data-dependent shape; summing them over V gives these values.)

  Differences from TRL, on purpose: (1) β = 0 and β = 1 are *not* special
  cases — the loss is continuous in β and is 0 at both ends (DESIGN.md §4);
  TRL returns the plain KLs there, use ``divergences.forward_kl``/``reverse_kl`` for
  those. (2) A boolean/0-1 mask replaces TRL's ``labels != -100``; pass
  ``labels != -100`` to reproduce it. (3) TRL's ``compute_loss`` calls the
  function without ``temperature`` (it then only affects sampling); here it
  is applied as given.

  Args:
    student_logits_BxTxV: ``[B, T, V]`` student logits (Q); gradients flow here.
    teacher_logits_BxTxV: ``[B, T, V]`` teacher logits (P); same shape. Wrap
      in ``jax.lax.stop_gradient`` for a frozen teacher.
    labels_mask_BxT: ``[B, T]`` mask, non-zero = scored token, or ``None``
      (every token scored, TRL's ``labels=None``).
    beta: mixing weight in ``[0, 1]``.
    temperature: > 0; both logits are divided by it first.
    reduction: one of ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``.

  Returns:
    A scalar, or ``[B, T]`` for ``reduction="none"``.

  References:
    DESIGN.md §6; Agarwal et al. (2024), GKD, Eq. (1); TRL
    ``trl/trainer/gkd_trainer.py`` (now ``trl/experimental/gkd``).
  """
  if reduction not in GKD_REDUCTIONS:
    raise ValueError(f"reduction must be one of {GKD_REDUCTIONS}, got {reduction!r}.")
  chex.assert_rank(student_logits_BxTxV, 3,
                   custom_message="student_logits_BxTxV must be [batch, time, vocab]")
  chex.assert_equal_shape(
      [student_logits_BxTxV, teacher_logits_BxTxV],
      custom_message="student_logits_BxTxV and teacher_logits_BxTxV must have the same shape")
  batch, time, vocab = student_logits_BxTxV.shape
  if labels_mask_BxT is not None:
    chex.assert_shape(labels_mask_BxT, (batch, time),
                      custom_message="labels_mask_BxT must be [batch, time] of the logits")
  jsd_BxT = divergences.generalized_jsd(teacher_logits_BxTxV, student_logits_BxTxV, beta, temperature)
  if labels_mask_BxT is None:
    per_token = jsd_BxT
    num_tokens = jnp.asarray(batch * time, jsd_BxT.dtype)
    batchmean_denominator = jnp.asarray(batch, jsd_BxT.dtype)
  else:
    mask = (jnp.asarray(labels_mask_BxT) != 0).astype(jsd_BxT.dtype)
    per_token = jnp.where(mask > 0, jsd_BxT, 0.0)
    num_tokens = jnp.sum(mask)
    batchmean_denominator = jnp.maximum(num_tokens, 1.0)
  if reduction == "none":
    return per_token
  total = jnp.sum(per_token)
  if reduction == "sum":
    return total
  if reduction == "batchmean":
    return total / batchmean_denominator
  return total / jnp.maximum(num_tokens * vocab, 1.0)  # "mean"



def reverse_kl_summary(reverse_kl_BxK: jax.Array, level: float = 0.95) -> dict:
  """Mean, standard error and confidence interval of a Monte-Carlo sequence KL.

  ``m_b = (1/K) Σ_k R[b, k]``, ``mean = (1/B) Σ_b m_b``, ``stderr = std_b(m_b)
  / sqrt(B)`` (ddof 1), ``ci = mean ± z·stderr`` (``metrics.confidence_interval``).
  Per latent likewise.

  Args:
    reverse_kl_BxK: [B, K] log-ratios (B ≥ 2).
    level: confidence level.

  Returns:
    dict with ``reverse_kl``, ``reverse_kl_stderr``, ``reverse_kl_ci_low``,
    ``reverse_kl_ci_high`` and ``reverse_kl_per_latent(_stderr)`` ([K]).
  """
  chex.assert_rank(reverse_kl_BxK, 2)
  num = reverse_kl_BxK.shape[0]
  if num < 2:
    raise ValueError(f"reverse_kl_BxK needs >= 2 rows for a standard error, got {num}.")
  per_prompt = jnp.mean(reverse_kl_BxK, axis=1)
  mean, stderr = jnp.mean(per_prompt), jnp.std(per_prompt, ddof=1) / jnp.sqrt(num)
  low, high = metrics_lib.confidence_interval(mean, stderr, level)
  return dict(reverse_kl=mean, reverse_kl_stderr=stderr, reverse_kl_ci_low=low,
              reverse_kl_ci_high=high, reverse_kl_per_latent=jnp.mean(reverse_kl_BxK, axis=0),
              reverse_kl_per_latent_stderr=jnp.std(reverse_kl_BxK, axis=0, ddof=1)
              / jnp.sqrt(num))
