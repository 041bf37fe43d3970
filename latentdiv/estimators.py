"""Policy-gradient estimators of the gradient of a sequence-level KL.

Everything here is written for ONE sequence of ``L`` positions and batched by
the caller with ``jax.vmap`` (rlax style). Two uses share the code:

* **inter-latent KL** (DESIGN.md §5): ``D_ij = KL(p_i(y|x) ‖ p_j(y|x))`` on a
  rollout ``y ~ p_i``; both distributions depend on θ and D_ij is MAXIMISED.
  :func:`sequence_kl_surrogate` is a loss (to minimise) whose gradient is an
  unbiased estimate of ``−∇D_ij``.
* **on-policy distillation** (DESIGN.md §6): ``KL(π_θ ‖ q)`` with a frozen
  teacher q, MINIMISED. :func:`opd_surrogate` is a loss (to minimise) whose
  gradient is an unbiased estimate of ``+∇KL(π_θ ‖ q)``. It takes logits and
  stops the teacher's gradient itself, so the sign and the frozen teacher
  cannot be got wrong by the caller.

Notation (DESIGN.md §2, §5.3), for the scored ("score") distribution p and the
target distribution q at the visited contexts ``c_t = (x, y_<t)``::

    r_t  = log p(y_t|c_t) − log q(y_t|c_t)                  (sampled token)
    KL_t = Σ_v p(v|c_t) (log p(v|c_t) − log q(v|c_t))       (exact over V)

The per-token coefficients ``A_t`` (Theorem 1 of seed 002, plus
Rao-Blackwellisation) are:

==========================  ==============================================
name                        A_t
==========================  ==============================================
``trajectory``              Σ_{t'=1..L} r_t'
``reward_to_go``            Σ_{t'≥t} r_t'
``reward_to_go_baseline``   Σ_{t'≥t} r_t' − b(c_t)
``kl_to_go``                r_t + Σ_{t'>t} KL_t'
``kl_to_go_baseline``       r_t + Σ_{t'>t} KL_t' − b(c_t)
``rao_blackwell``           Σ_{t'>t} KL_t' − b(c_t)  (plus the ∇KL_t term)
``per_token_reward``        r_t   — BIASED, kept only as a comparison
==========================  ==============================================

A baseline ``b(c_t)`` may depend on x and y_<t (and on anything independent of
the rollout, e.g. other rollouts or an EMA) but NEVER on y_t or later tokens of
the same rollout; otherwise the estimator is biased (the oracle in
``latentdiv/oracle.py`` detects it).

Masks: ``mask_t`` is 1 at scored positions (the first L tokens; up to and
including EOS) and 0 after; masked positions contribute nothing to returns,
coefficients or losses.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

Array = chex.Array

TRAJECTORY = "trajectory"
REWARD_TO_GO = "reward_to_go"
REWARD_TO_GO_BASELINE = "reward_to_go_baseline"
KL_TO_GO = "kl_to_go"
KL_TO_GO_BASELINE = "kl_to_go_baseline"
RAO_BLACKWELL = "rao_blackwell"
PER_TOKEN_REWARD = "per_token_reward"

ESTIMATORS = (
    TRAJECTORY,
    REWARD_TO_GO,
    REWARD_TO_GO_BASELINE,
    KL_TO_GO,
    KL_TO_GO_BASELINE,
    RAO_BLACKWELL,
)
"""The unbiased estimators of DESIGN.md §5.3, in the table's order."""

BIASED_ESTIMATORS = (PER_TOKEN_REWARD,)
"""Deliberately biased comparison coefficients (not estimators of ∇D)."""

ALL_ESTIMATORS = ESTIMATORS + BIASED_ESTIMATORS
"""Every name accepted by the functions of this module."""

BASELINED_ESTIMATORS = (REWARD_TO_GO_BASELINE, KL_TO_GO_BASELINE, RAO_BLACKWELL)
"""Estimators that subtract a baseline ``b(c_t)`` (``None`` means b = 0)."""


def _assert_rank(arrays, rank, names: str) -> None:
  chex.assert_rank(arrays, rank, custom_message=f"arguments: {names}",
                   exception_type=ValueError)


def _assert_equal_shape(arrays, names: str) -> None:
  chex.assert_equal_shape(arrays, custom_message=f"arguments: {names}",
                          exception_type=ValueError)


def _check_estimator(estimator: str) -> None:
  if estimator not in ALL_ESTIMATORS:
    raise ValueError(
        f"Unknown estimator {estimator!r}; allowed: {ALL_ESTIMATORS}.")


def uses_baseline(estimator: str) -> bool:
  """Whether ``estimator`` subtracts a baseline (DESIGN.md §5.3).

  Args:
    estimator: a name in :data:`ALL_ESTIMATORS`.

  Returns:
    True for the names in :data:`BASELINED_ESTIMATORS`.

  Raises:
    ValueError: unknown name.
  """
  _check_estimator(estimator)
  return estimator in BASELINED_ESTIMATORS


def reverse_cumsum(x_t: Array) -> Array:
  """Sum to go along the last axis: ``out_t = Σ_{t'≥t} x_t'``.

  Args:
    x_t: [..., L] values.

  Returns:
    [..., L] suffix sums (no Python loop; one cumsum).

  References:
    DESIGN.md §5.3 (reward-to-go, KL-to-go).
  """
  return jnp.flip(jnp.cumsum(jnp.flip(x_t, axis=-1), axis=-1), axis=-1)


def _check_per_token(r_t, kl_t, mask_t):
  _assert_rank([r_t, kl_t, mask_t], 1, "r_t, kl_t, mask_t")
  _assert_equal_shape([r_t, kl_t, mask_t], "r_t, kl_t, mask_t")


def estimator_returns(estimator: str, r_t: Array, kl_t: Array,
                      mask_t: Array) -> Array:
  """The coefficient ``A_t`` of an estimator before any baseline.

  This is also the quantity a baseline ``b(c_t)`` of that estimator should
  approximate (its conditional mean given c_t minimises the variance among
  constant-in-y_t baselines), and what :func:`leave_one_out_baseline` averages
  over the other rollouts::

    trajectory               R     = Σ_{t'} r_t'                   (same ∀t)
    reward_to_go(_baseline)  G_t   = Σ_{t'≥t} r_t'        ≈ E[G_t|c_t] = V(c_t)
    kl_to_go(_baseline)      r_t + Σ_{t'>t} KL_t'         ≈ E[·|c_t]  = V(c_t)
    rao_blackwell            Σ_{t'>t} KL_t'               ≈ V(c_t) − KL_t
    per_token_reward         r_t                          (biased)

  where ``V(c_t) = E[Σ_{t'≥t} KL_t' | c_t]`` is the expected KL to go from c_t.
  Inputs are stop-gradiented; masked positions are 0.

  Args:
    estimator: a name in :data:`ALL_ESTIMATORS`.
    r_t: [L] log-ratios ``log p(y_t|c_t) − log q(y_t|c_t)`` at the sampled
      tokens.
    kl_t: [L] exact per-step ``KL(p(·|c_t) ‖ q(·|c_t))``.
    mask_t: [L] 1 at scored positions, 0 elsewhere (bool or float).

  Returns:
    [L] returns, zero at masked positions, no gradient.

  Raises:
    ValueError: unknown estimator.

  References:
    DESIGN.md §5.3, §5.4; seed 002 Theorem 1.
  """
  _check_estimator(estimator)
  _check_per_token(r_t, kl_t, mask_t)
  mask_t = mask_t.astype(r_t.dtype)
  r_t = jax.lax.stop_gradient(r_t) * mask_t
  kl_t = jax.lax.stop_gradient(kl_t).astype(r_t.dtype) * mask_t
  kl_after_t = reverse_cumsum(kl_t) - kl_t  # Σ_{t'>t} KL_t'.
  if estimator == TRAJECTORY:
    returns_t = jnp.broadcast_to(jnp.sum(r_t), r_t.shape)
  elif estimator in (REWARD_TO_GO, REWARD_TO_GO_BASELINE):
    returns_t = reverse_cumsum(r_t)
  elif estimator in (KL_TO_GO, KL_TO_GO_BASELINE):
    returns_t = r_t + kl_after_t
  elif estimator == RAO_BLACKWELL:
    returns_t = kl_after_t
  else:  # PER_TOKEN_REWARD
    returns_t = r_t
  return returns_t * mask_t


def per_token_coefficients(estimator: str,
                           r_t: Array,
                           kl_t: Array,
                           mask_t: Array,
                           baseline_t: Optional[Array] = None) -> Array:
  """Per-token coefficients ``A_t`` of the table in DESIGN.md §5.3.

  ``A_t = estimator_returns(estimator, r_t, kl_t, mask_t) − b_t`` for the
  estimators in :data:`BASELINED_ESTIMATORS` (``b_t = 0`` when ``baseline_t``
  is None), and the returns alone for the others. The result carries no
  gradient (r_t, kl_t and the baseline are stop-gradiented) and is 0 at masked
  positions.

  Args:
    estimator: a name in :data:`ALL_ESTIMATORS`.
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
    DESIGN.md §5.3, §5.4; seed 002 Theorem 1.
  """
  returns_t = estimator_returns(estimator, r_t, kl_t, mask_t)
  if baseline_t is None:
    return returns_t
  if estimator not in BASELINED_ESTIMATORS:
    raise ValueError(
        f"Estimator {estimator!r} takes no baseline; estimators with a "
        f"baseline: {BASELINED_ESTIMATORS}.")
  baseline_t = jnp.asarray(baseline_t)
  if baseline_t.ndim == 0:
    baseline_t = jnp.broadcast_to(baseline_t, r_t.shape)
  chex.assert_shape(baseline_t, r_t.shape,
                    custom_message="baseline_t must be a scalar or [L]",
                    exception_type=ValueError)
  baseline_t = jax.lax.stop_gradient(baseline_t).astype(returns_t.dtype)
  return (returns_t - baseline_t) * mask_t.astype(returns_t.dtype)


def sequence_kl_surrogate(estimator: str,
                          logp_score_t: Array,
                          logp_target_t: Array,
                          kl_t: Array,
                          mask_t: Array,
                          baseline_t: Optional[Array] = None,
                          pathwise: bool = True) -> Array:
  """Surrogate LOSS whose gradient is an unbiased estimate of ``−∇D``.

  For ``D = KL(p_i(y) ‖ p_j(y))`` and one rollout ``y ~ p_i`` (a constant)::

    estimators (i)–(v), per_token_reward:
      S = − Σ_t sg(A_t) log p_i(y_t|c_t)  +  Σ_t log p_j(y_t|c_t)
                                              └─ pathwise term, if pathwise
    rao_blackwell:
      S = − Σ_t KL_t  −  Σ_t sg(A_t) log p_i(y_t|c_t),   A_t = Σ_{t'>t} KL_t' − b_t

  with ``r_t = sg(log p_i(y_t|c_t) − log p_j(y_t|c_t))``. Minimising S
  maximises D. For rao_blackwell ``kl_t`` must carry the gradient through both
  p_i and p_j (it replaces the sampled current-step and pathwise terms by
  their exact conditional expectations); ``pathwise`` has no effect there:
  to drop the target's gradient, stop it inside kl_t (as
  :func:`sequence_kl_surrogate_from_logits` does with ``pathwise=False``).

  Args:
    estimator: a name in :data:`ALL_ESTIMATORS`.
    logp_score_t: [L] ``log p_i(y_t|c_t)`` (with gradient).
    logp_target_t: [L] ``log p_j(y_t|c_t)`` (with gradient).
    kl_t: [L] exact ``KL(p_i(·|c_t) ‖ p_j(·|c_t))`` (with gradient; only used
      with gradient by rao_blackwell).
    mask_t: [L] 1 at scored positions.
    baseline_t: optional scalar or [L] baseline (baselined estimators only).
    pathwise: include the pathwise term ``Σ_t log p_j(y_t|c_t)`` (needed when
      p_j depends on θ, as for the inter-latent KL).

  Returns:
    Scalar surrogate loss for this sequence.

  Raises:
    ValueError: unknown estimator or misplaced baseline.

  References:
    DESIGN.md §5.2, §5.3.
  """
  _check_estimator(estimator)
  names = "logp_score_t, logp_target_t, kl_t, mask_t"
  _assert_rank([logp_score_t, logp_target_t, kl_t, mask_t], 1, names)
  _assert_equal_shape([logp_score_t, logp_target_t, kl_t, mask_t], names)
  mask_t = mask_t.astype(logp_score_t.dtype)
  r_t = jax.lax.stop_gradient(logp_score_t - logp_target_t)
  coeff_t = per_token_coefficients(estimator, r_t, kl_t, mask_t, baseline_t)
  score_term = -jnp.sum(coeff_t * logp_score_t * mask_t)
  if estimator == RAO_BLACKWELL:
    return -jnp.sum(kl_t * mask_t) + score_term
  if pathwise:
    return score_term + jnp.sum(logp_target_t * mask_t)
  return score_term


class PerTokenTerms(NamedTuple):
  """Per-token quantities of one sequence under two distributions."""
  logp_score_t: Array  # [L] log p(y_t | c_t).
  logp_target_t: Array  # [L] log q(y_t | c_t).
  kl_t: Array  # [L] KL(p(·|c_t) ‖ q(·|c_t)), exact over the vocabulary.


def per_token_terms(logits_score_LxV: Array, logits_target_LxV: Array,
                    tokens_L: Array) -> PerTokenTerms:
  """Sampled-token log-probs and exact per-step KLs from logits.

  ``logp_t = log_softmax(logits_t)[y_t]`` and
  ``KL_t = Σ_v p(v|c_t)(log p(v|c_t) − log q(v|c_t))``, computed from
  log-softmax (no ``log(0)``). Differentiable in both logits.

  Args:
    logits_score_LxV: [L, V] next-token logits of p at c_1..c_L.
    logits_target_LxV: [L, V] next-token logits of q at the same contexts.
    tokens_L: [L] int sampled tokens y_1..y_L.

  Returns:
    :class:`PerTokenTerms` of three [L] arrays.

  References:
    DESIGN.md §5.3 (KL_t).
  """
  names = "logits_score_LxV, logits_target_LxV, tokens_L"
  _assert_rank([logits_score_LxV, logits_target_LxV, tokens_L], [2, 2, 1],
               names)
  _assert_equal_shape([logits_score_LxV, logits_target_LxV], names)
  chex.assert_equal_shape_prefix([logits_score_LxV, tokens_L], 1,
                                 custom_message=f"arguments: {names}",
                                 exception_type=ValueError)
  logp_LxV = jax.nn.log_softmax(logits_score_LxV, axis=-1)
  logq_LxV = jax.nn.log_softmax(logits_target_LxV, axis=-1)
  tokens_L1 = tokens_L[:, None].astype(jnp.int32)
  logp_t = jnp.take_along_axis(logp_LxV, tokens_L1, axis=-1)[:, 0]
  logq_t = jnp.take_along_axis(logq_LxV, tokens_L1, axis=-1)[:, 0]
  kl_t = jnp.sum(jnp.exp(logp_LxV) * (logp_LxV - logq_LxV), axis=-1)
  return PerTokenTerms(logp_t, logq_t, kl_t)


def sequence_kl_surrogate_from_logits(estimator: str,
                                      logits_score_LxV: Array,
                                      logits_target_LxV: Array,
                                      tokens_L: Array,
                                      mask_t: Array,
                                      baseline_t: Optional[Array] = None,
                                      pathwise: bool = True) -> Array:
  """:func:`sequence_kl_surrogate` computed from the two models' logits.

  Gradient estimate of ``−∇ KL(p_i(y) ‖ p_j(y))`` for one rollout y ~ p_i.
  With ``pathwise=False`` the target logits are stop-gradiented everywhere
  (also inside KL_t), i.e. p_j is treated as a constant q = sg(p_j), for every
  estimator including rao_blackwell.

  Args:
    estimator: a name in :data:`ALL_ESTIMATORS`.
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
  terms = per_token_terms(logits_score_LxV, logits_target_LxV, tokens_L)
  return sequence_kl_surrogate(estimator, terms.logp_score_t,
                               terms.logp_target_t, terms.kl_t, mask_t,
                               baseline_t=baseline_t, pathwise=pathwise)


def opd_surrogate(estimator: str,
                  student_logits_LxV: Array,
                  teacher_logits_LxV: Array,
                  tokens_L: Array,
                  mask_t: Array,
                  baseline_t: Optional[Array] = None) -> Array:
  """On-policy distillation LOSS: gradient estimates ``+∇ KL(π_θ ‖ q)``.

  Minimise it. For a response y ~ π_θ (student) and a frozen teacher q::

    L_opd = − sequence_kl_surrogate(π, sg(q), pathwise=False)
          =   Σ_t sg(A_t) log π(y_t|c_t)                  (i)–(v)
          =   Σ_t KL_t + Σ_t sg(A_t) log π(y_t|c_t)        rao_blackwell

  with ``r_t = log π(y_t|c_t) − log q(y_t|c_t)``. The teacher logits are
  stop-gradiented here, so the teacher receives no gradient even when it
  shares parameters with the student (e.g. a latent model at a fixed latent).

  Args:
    estimator: a name in :data:`ALL_ESTIMATORS` (``per_token_reward`` is the
      biased r_t-only reward several peers use).
    student_logits_LxV: [L, V] student logits at the response's contexts.
    teacher_logits_LxV: [L, V] teacher logits at the same contexts.
    tokens_L: [L] int response tokens sampled from the student.
    mask_t: [L] 1 up to and including EOS, 0 after (KL_t = 0 there).
    baseline_t: optional scalar or [L] baseline (baselined estimators only).

  Returns:
    Scalar loss for this response.

  References:
    DESIGN.md §6; seed 002 Theorem 1.
  """
  names = "student_logits_LxV, teacher_logits_LxV, tokens_L"
  _assert_rank([student_logits_LxV, teacher_logits_LxV, tokens_L], [2, 2, 1], names)
  _assert_equal_shape([student_logits_LxV, teacher_logits_LxV], names)
  return -sequence_kl_surrogate_from_logits(
      estimator,
      student_logits_LxV,
      jax.lax.stop_gradient(teacher_logits_LxV),
      tokens_L,
      mask_t,
      baseline_t=baseline_t,
      pathwise=False)


# ----------------------------------------------------------------------------
# Baselines (DESIGN.md §5.4).
# ----------------------------------------------------------------------------


def leave_one_out_baseline(returns_NxL: Array, mask_NxL: Array) -> Array:
  """Per-position leave-one-out mean of the other rollouts' returns.

  For N rollouts of the same (x, i[, j])::

    b[n, t] = Σ_{m≠n} mask[m,t] R[m,t] / Σ_{m≠n} mask[m,t]   (0 if no m)

  b[n] depends only on the other rollouts, which are independent of rollout
  n, so the estimator stays unbiased. No gradient.

  Args:
    returns_NxL: [N, L] returns (:func:`estimator_returns`) of N rollouts.
    mask_NxL: [N, L] 1 at scored positions.

  Returns:
    [N, L] baselines.

  Raises:
    ValueError: N < 2.

  References:
    DESIGN.md §5.4 (batch_mean, leave-one-out).
  """
  _assert_rank([returns_NxL, mask_NxL], 2, "returns_NxL, mask_NxL")
  _assert_equal_shape([returns_NxL, mask_NxL], "returns_NxL, mask_NxL")
  if returns_NxL.shape[0] < 2:
    raise ValueError(
        "leave_one_out_baseline needs N >= 2 rollouts per group; got "
        f"returns_NxL with shape {returns_NxL.shape}.")
  returns_NxL = jax.lax.stop_gradient(returns_NxL)
  mask_NxL = mask_NxL.astype(returns_NxL.dtype)
  total_L = jnp.sum(returns_NxL * mask_NxL, axis=0)
  count_L = jnp.sum(mask_NxL, axis=0)
  others_NxL = total_L[None, :] - returns_NxL * mask_NxL
  count_NxL = count_L[None, :] - mask_NxL
  return jnp.where(count_NxL > 0, others_NxL / jnp.maximum(count_NxL, 1.0),
                   0.0)


def ema_update(ema: Array, value: Array, decay: float) -> Array:
  """Exponential moving average ``ema ← decay·ema + (1 − decay)·value``.

  Used for the ``ema`` baseline (a scalar or per-position vector carried in
  the train state; constant within a step, hence unbiased). No gradient.

  Args:
    ema: current average (any shape).
    value: new value, same shape.
    decay: in [0, 1].

  Returns:
    Updated average, same shape.

  References:
    DESIGN.md §5.4 (ema).
  """
  _assert_equal_shape([ema, value], "ema, value")
  value = jax.lax.stop_gradient(value)
  return decay * ema + (1.0 - decay) * value


def jsd_control_variate(c: Array, jsd_to_go_t: Array) -> Array:
  """JSD control-variate baseline ``b_t = c · J_t``.

  ``J_t = Σ_{t'≥t} w_t' JSD_t'`` is the token-weighted pairwise JSD to go,
  computed under teacher forcing on the data y* (so independent of the
  sample); for the trajectory form pass the scalar Ĵ_L. No gradient.

  Args:
    c: scalar coefficient (e.g. from :func:`control_variate_coefficient`).
    jsd_to_go_t: [L] (or scalar) JSD to go.

  Returns:
    Baseline with the shape of ``jsd_to_go_t``.

  References:
    DESIGN.md §5.4; seed 000 (Variance Reduction).
  """
  _assert_rank(c, 0, "c")
  return jax.lax.stop_gradient(c * jsd_to_go_t)


class ControlVariateState(NamedTuple):
  """EMA moments for fitting ``c = Cov(R, Ĵ) / Var(Ĵ)`` online."""
  count: Array  # int32 scalar, number of updates.
  mean_r: Array  # EMA of E[R].
  mean_j: Array  # EMA of E[Ĵ].
  mean_rj: Array  # EMA of E[R Ĵ].
  mean_jj: Array  # EMA of E[Ĵ²].


def init_control_variate_state(dtype=jnp.float32) -> ControlVariateState:
  """Zero state for :func:`fit_control_variate_coefficient`.

  Args:
    dtype: float dtype of the moments.

  Returns:
    :class:`ControlVariateState` with count 0.
  """
  zero = jnp.zeros((), dtype)
  return ControlVariateState(jnp.zeros((), jnp.int32), zero, zero, zero, zero)


def control_variate_coefficient(state: ControlVariateState,
                                decay: float,
                                eps: float = 1e-6) -> Array:
  """``c = Cov(R, Ĵ) / Var(Ĵ)`` from debiased EMA moments (0 before data).

  Moments are debiased Adam-style (divided by ``1 − decay^count``), so after
  the first update they equal the first batch's moments.

  Args:
    state: :class:`ControlVariateState`.
    decay: the EMA decay used by the updates.
    eps: c = 0 when Var(Ĵ) ≤ eps·E[Ĵ²] (no usable spread in Ĵ).

  Returns:
    Scalar c, no gradient.

  References:
    DESIGN.md §5.4.
  """
  correction = 1.0 - jnp.asarray(decay, state.mean_r.dtype)**state.count
  correction = jnp.where(state.count > 0, correction, 1.0)
  mean_r = state.mean_r / correction
  mean_j = state.mean_j / correction
  cov = state.mean_rj / correction - mean_r * mean_j
  second = state.mean_jj / correction
  var = second - mean_j * mean_j
  ok = var > eps * second
  c = jnp.where(ok, cov / jnp.where(ok, var, 1.0), 0.0)
  return jax.lax.stop_gradient(c)


def fit_control_variate_coefficient(state: ControlVariateState,
                                    returns: Array,
                                    jsd_values: Array,
                                    decay: float,
                                    mask: Optional[Array] = None,
                                    eps: float = 1e-6):
  """Update the EMA moments with a batch and return the fitted c.

  ``c = Cov(R, Ĵ) / Var(Ĵ)`` is the least-squares coefficient of R on Ĵ (the
  variance-minimising control-variate coefficient). Each batch contributes its
  (masked) means of R, Ĵ, RĴ, Ĵ² to debiased EMAs.

  For strict unbiasedness compute this step's baseline with the coefficient
  of the state BEFORE the update (:func:`control_variate_coefficient`) and
  update afterwards: a c fitted on the current sample depends (weakly) on it.

  Args:
    state: :class:`ControlVariateState`.
    returns: [...] returns R (e.g. [B] trajectory or [B, L] to-go returns).
    jsd_values: same shape, the JSD control variate Ĵ paired with each R.
    decay: EMA decay in [0, 1).
    mask: optional same-shape weights (1 = use the entry).
    eps: see :func:`control_variate_coefficient`.

  Returns:
    (new_state, c) with c from the updated state.

  References:
    DESIGN.md §5.4; seed 000 (Variance Reduction).
  """
  _assert_equal_shape([returns, jsd_values], "returns, jsd_values")
  if mask is None:
    mask = jnp.ones(returns.shape, state.mean_r.dtype)
  _assert_equal_shape([returns, mask], "returns, mask")
  dtype = state.mean_r.dtype
  r = jax.lax.stop_gradient(returns).astype(dtype)
  j = jax.lax.stop_gradient(jsd_values).astype(dtype)
  w = mask.astype(dtype)
  total = jnp.maximum(jnp.sum(w), 1.0)
  mean = lambda x: jnp.sum(w * x) / total
  update = functools.partial(ema_update, decay=decay)
  new_state = ControlVariateState(
      count=state.count + 1,
      mean_r=update(state.mean_r, mean(r)),
      mean_j=update(state.mean_j, mean(j)),
      mean_rj=update(state.mean_rj, mean(r * j)),
      mean_jj=update(state.mean_jj, mean(j * j)))
  return new_state, control_variate_coefficient(new_state, decay, eps)


def explained_variance(returns: Array,
                       baseline: Array,
                       mask: Optional[Array] = None) -> Array:
  """Fraction of the returns' variance a baseline removes.

  ``EV = 1 − Var(R − b) / Var(R)`` over all (masked) entries; 1 is a perfect
  baseline, 0 a useless one, negative a harmful one. 0 when Var(R) = 0.

  Args:
    returns: [...] returns R.
    baseline: same shape, baselines b.
    mask: optional same-shape weights.

  Returns:
    Scalar explained variance.

  References:
    DESIGN.md §5.4 (the diagnostics report the variance removed).
  """
  returns, baseline = jnp.asarray(returns), jnp.asarray(baseline)
  _assert_equal_shape([returns, baseline], "returns, baseline")
  if mask is None:
    mask = jnp.ones(returns.shape, returns.dtype)
  _assert_equal_shape([returns, mask], "returns, mask")
  w = mask.astype(returns.dtype)
  total = jnp.maximum(jnp.sum(w), 1.0)

  def var(x):
    m = jnp.sum(w * x) / total
    return jnp.sum(w * (x - m)**2) / total

  var_r = var(returns)
  resid = var(returns - baseline)
  return jnp.where(var_r > 0, 1.0 - resid / jnp.where(var_r > 0, var_r, 1.0),
                   0.0)
