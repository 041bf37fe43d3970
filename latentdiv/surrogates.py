"""Single-rollout surrogate losses, built on ``estimators.policy_gradient``.

The batched primitive :func:`latentdiv.estimators.policy_gradient` is what the
objectives, the oracle and the diagnostics call; the functions here are its
one-sequence forms, for users who score one rollout at a time (and for the
tests, which check them against independent NumPy references):

* :func:`per_token_coefficients` — ``A_t = R_t − b_t`` of one sequence;
* :func:`sequence_kl_surrogate` (and ``_from_logits``) — a LOSS whose gradient
  estimates ``−∇KL(p_i(y) ‖ p_j(y))`` for one rollout ``y ~ p_i`` (minimise it
  to push latents apart);
* :func:`opd_surrogate` — on-policy distillation: a LOSS whose gradient
  estimates ``+∇KL(π_θ ‖ q)`` for one student response.

References:
  DESIGN.md §5.2–§5.4, §6; Williams (1992).
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from latentdiv import baselines
from latentdiv import checks
from latentdiv import estimators

Array = chex.Array




def _baseline_t(estimator: str, baseline_t: Optional[Array],
                mask_t: Array) -> Array:
  """A validated [L] baseline of one sequence: 0 for None, no gradient, masked."""
  dtype = jnp.result_type(mask_t.dtype, jnp.float32)
  if baseline_t is None:
    return jnp.zeros(mask_t.shape, dtype)
  estimators.check_combination(estimator, baselines.JSD)
  baseline_t = jnp.asarray(baseline_t)
  if baseline_t.ndim == 0:
    baseline_t = jnp.broadcast_to(baseline_t, mask_t.shape)
  chex.assert_shape(baseline_t, mask_t.shape,
                    custom_message="baseline_t must be a scalar or [L]",
                    exception_type=ValueError)
  return jax.lax.stop_gradient(baseline_t) * mask_t.astype(baseline_t.dtype)


def per_token_coefficients(estimator: str, r_t: Array, kl_t: Array, mask_t: Array,
                           baseline_t: Optional[Array] = None) -> Array:
  """Per-token coefficients ``A_t = R_t − b_t`` of DESIGN.md §5.3.

  ``R_t`` is :func:`estimator_returns`; ``b_t = 0`` when ``baseline_t`` is
  None. No gradient (r_t, kl_t and the baseline are stop-gradiented); 0 at
  masked positions.

  Args:
    estimator: a name in :data:`estimators.ALL_ESTIMATORS`.
    r_t: [L] sampled-token log-ratios.
    kl_t: [L] exact per-step KLs at the visited contexts.
    mask_t: [L] 1 at scored positions.
    baseline_t: None, a scalar, or [L] baseline ``b(c_t)``; only accepted by
      the baselined estimators. It must not depend on y_t or later tokens.

  Returns:
    [L] coefficients A_t.

  Raises:
    ValueError: unknown estimator, or a baseline given to an estimator that
      takes none (use its ``*_baseline`` variant).

  References:
    DESIGN.md §5.3, §5.4.
  """
  returns_t = estimators.estimator_returns(estimator, r_t, kl_t, mask_t)
  return returns_t - _baseline_t(estimator, baseline_t, mask_t).astype(
      returns_t.dtype)


def sequence_kl_surrogate(estimator: str, logp_score_t: Array, logp_target_t: Array,
                          kl_t: Array, mask_t: Array,
                          baseline_t: Optional[Array] = None,
                          pathwise: bool = True) -> Array:
  """Surrogate LOSS of one rollout whose gradient estimates ``−∇D``.

  ``S = −policy_gradient(...).loss`` for ``D = KL(p_i(y) ‖ p_j(y))`` and one
  rollout ``y ~ p_i`` (DESIGN.md §5.2)::

    (i)–(v), per_token_reward:  S = −Σ_t sg(A_t) log p_i(y_t|c_t) + Σ_t log p_j(y_t|c_t)
    rao_blackwell:              S = −Σ_t KL_t − Σ_t sg(A_t) log p_i(y_t|c_t)

  Minimising S maximises D. For rao_blackwell ``kl_t`` must carry the
  gradient through both p_i and p_j; ``pathwise`` has no effect there (to
  drop the target's gradient, stop it inside kl_t, as
  :func:`sequence_kl_surrogate_from_logits` does with ``pathwise=False``).

  Args:
    estimator: a name in :data:`estimators.ALL_ESTIMATORS`.
    logp_score_t: [L] ``log p_i(y_t|c_t)`` (with gradient).
    logp_target_t: [L] ``log p_j(y_t|c_t)`` (with gradient).
    kl_t: [L] exact ``KL(p_i(·|c_t) ‖ p_j(·|c_t))``.
    mask_t: [L] 1 at scored positions.
    baseline_t: optional scalar or [L] baseline (baselined estimators only).
    pathwise: include the pathwise term ``Σ_t log p_j(y_t|c_t)``.

  Returns:
    Scalar surrogate loss for this sequence.

  Raises:
    ValueError: unknown estimator, mismatched shapes or misplaced baseline.

  References:
    DESIGN.md §5.2, §5.3.
  """
  estimators.check_variant(estimator)
  names = "logp_score_t, logp_target_t, kl_t, mask_t"
  checks.assert_rank([logp_score_t, logp_target_t, kl_t, mask_t], 1, names)
  checks.assert_equal_shape([logp_score_t, logp_target_t, kl_t, mask_t], names)
  terms = estimators.PerTokenTerms(logp_score_t, logp_target_t, kl_t)
  baseline_t = _baseline_t(estimator, baseline_t, mask_t)
  return -estimators.sequence_policy_gradient(estimator, terms, mask_t, baseline_t,
                                    pathwise).loss


def sequence_kl_surrogate_from_logits(estimator: str, logits_score_LxV: Array,
                                      logits_target_LxV: Array, tokens_L: Array,
                                      mask_t: Array,
                                      baseline_t: Optional[Array] = None,
                                      pathwise: bool = True) -> Array:
  """:func:`sequence_kl_surrogate` computed from the two models' logits.

  Gradient estimate of ``−∇ KL(p_i(y) ‖ p_j(y))`` for one rollout y ~ p_i.
  With ``pathwise=False`` the target logits are stop-gradiented everywhere
  (also inside KL_t), i.e. p_j is treated as a constant q = sg(p_j), for every
  estimator including rao_blackwell.

  Args:
    estimator: a name in :data:`estimators.ALL_ESTIMATORS`.
    logits_score_LxV: [L, V] logits of p_i at the rollout's contexts.
    logits_target_LxV: [L, V] logits of p_j at the same contexts.
    tokens_L: [L] int rollout tokens.
    mask_t: [L] 1 at scored positions.
    baseline_t: optional scalar or [L] baseline (baselined estimators only).
    pathwise: differentiate through the target p_j.

  Returns:
    Scalar surrogate loss.

  References:
    DESIGN.md §5.2, §5.3.
  """
  if not pathwise:
    logits_target_LxV = jax.lax.stop_gradient(logits_target_LxV)
  terms = estimators.per_token_terms(logits_score_LxV, logits_target_LxV, tokens_L)
  return sequence_kl_surrogate(estimator, *terms, mask_t,
                               baseline_t=baseline_t, pathwise=pathwise)


def opd_surrogate(estimator: str, student_logits_LxV: Array,
                  teacher_logits_LxV: Array, tokens_L: Array, mask_t: Array,
                  baseline_t: Optional[Array] = None) -> Array:
  """On-policy distillation LOSS: gradient estimates ``+∇ KL(π_θ ‖ q)``.

  Minimise it. For a response y ~ π_θ (student) and a frozen teacher q it is
  ``policy_gradient(..., pathwise=False).loss`` on the terms of ``(π, sg(q))``::

    L_opd = Σ_t sg(A_t) log π(y_t|c_t)                  (i)–(v)
          = Σ_t KL_t + Σ_t sg(A_t) log π(y_t|c_t)        rao_blackwell

  with ``r_t = log π(y_t|c_t) − log q(y_t|c_t)``. The teacher logits are
  stop-gradiented here, so the teacher receives no gradient even when it
  shares parameters with the student (e.g. a latent model at a fixed latent).

  Args:
    estimator: a name in :data:`estimators.ALL_ESTIMATORS` (``per_token_reward`` is the
      biased r_t-only reward several peers use).
    student_logits_LxV: [L, V] student logits at the response's contexts.
    teacher_logits_LxV: [L, V] teacher logits at the same contexts.
    tokens_L: [L] int response tokens sampled from the student.
    mask_t: [L] 1 up to and including EOS, 0 after (KL_t = 0 there).
    baseline_t: optional scalar or [L] baseline (baselined estimators only).

  Returns:
    Scalar loss for this response.

  Raises:
    ValueError: unknown estimator, mismatched shapes or misplaced baseline.

  References:
    DESIGN.md §6, §5.3.
  """
  names = "student_logits_LxV, teacher_logits_LxV, tokens_L"
  checks.assert_rank([student_logits_LxV, teacher_logits_LxV, tokens_L], [2, 2, 1],
               names)
  checks.assert_equal_shape([student_logits_LxV, teacher_logits_LxV], names)
  return -sequence_kl_surrogate_from_logits(
      estimator, student_logits_LxV,
      jax.lax.stop_gradient(teacher_logits_LxV), tokens_L, mask_t,
      baseline_t=baseline_t, pathwise=False)
