"""Policy-gradient estimators of the gradient of a sequence-level KL.

One primitive, :func:`policy_gradient`, serves every caller (the inter-latent
KL of DESIGN.md §5, on-policy distillation of §6, the oracle of §7 and the
diagnostics). For ``D = KL(p(y) ‖ q(y))`` on rollouts ``y ~ p`` it runs the
pipeline

    per-token terms → r_t → returns R_t → baseline b_t → surrogate

and returns a LOSS per rollout whose gradient is an unbiased estimate of
``+∇D`` (REINFORCE, Williams 1992, with the coefficients below). The maths is
written for ONE sequence of ``L`` positions and batched with ``jax.vmap``
(rlax style). The inter-latent objective, which MAXIMISES D, minimises
``−mean(loss)``; OPD, which minimises ``KL(π_θ ‖ q)``, minimises
``mean(loss)`` on terms of a stop-gradiented teacher.

Notation (DESIGN.md §2, §5.3), for the sampling ("score") distribution p and
the target distribution q at the visited contexts ``c_t = (x, y_<t)``::

    r_t  = log p(y_t|c_t) − log q(y_t|c_t)                  (sampled token)
    KL_t = Σ_v p(v|c_t) (log p(v|c_t) − log q(v|c_t))       (exact over V)

The per-token coefficients ``A_t = R_t − b_t`` (DESIGN.md §5.3; ``rao_blackwell``
replaces the sampled current-step and pathwise terms by their conditional
expectations given c_t, Rao 1945 / Blackwell 1947) are:

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

A baseline ``b(c_t)`` (``latentdiv/baselines.py``, DESIGN.md §5.4) may depend
on x and y_<t (and on anything independent of the rollout, e.g. other
rollouts or an EMA) but NEVER on y_t or later tokens of the same rollout;
otherwise the estimator is biased (the oracle of DESIGN.md §7 detects it).

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

from latentdiv import baselines
from latentdiv import checks

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
"""Estimators that subtract a baseline ``b(c_t)`` (``none`` means b = 0)."""


class PerTokenTerms(NamedTuple):
  """Per-token quantities of one sequence ([L]) or of N sequences ([N, L])."""
  logp_score_t: Array  # log p(y_t | c_t).
  logp_target_t: Array  # log q(y_t | c_t).
  kl_t: Array  # KL(p(·|c_t) ‖ q(·|c_t)), exact over the vocabulary.


class PolicyGradient(NamedTuple):
  """Output of :func:`policy_gradient` for N rollouts of one group."""
  loss: Array  # [N] surrogate; its gradient is an unbiased estimate of +∇D.
  returns: Array  # [N, L] returns before the baseline, no gradient, 0 masked.
  baseline: Array  # [N, L] baseline subtracted, 0 masked and for 'none'.
  r_t: Array  # [N, L] log p(y_t|c_t) − log q(y_t|c_t), no gradient, 0 masked.




def _check_estimator(estimator: str) -> None:
  if estimator not in ALL_ESTIMATORS:
    raise ValueError(
        f"Unknown estimator {estimator!r}; allowed: {ALL_ESTIMATORS}.")


def uses_baseline(estimator: str) -> bool:
  """Whether ``estimator`` (in :data:`ALL_ESTIMATORS`) subtracts a baseline.

  True for :data:`BASELINED_ESTIMATORS` (DESIGN.md §5.3); ValueError for an
  unknown name.
  """
  _check_estimator(estimator)
  return estimator in BASELINED_ESTIMATORS


def check_combination(estimator: str, baseline: str) -> None:
  """Raises ValueError unless ``estimator`` may be used with ``baseline``.

  Every estimator (:data:`ALL_ESTIMATORS`) takes ``none``; only
  :data:`BASELINED_ESTIMATORS` take the other names of
  ``baselines.BASELINES`` (DESIGN.md §5.3, §5.4).

  Raises:
    ValueError: unknown name, or a baseline for an estimator that takes none.
  """
  _check_estimator(estimator)
  baselines.check_baseline(baseline)
  if baseline != baselines.NONE and estimator not in BASELINED_ESTIMATORS:
    raise ValueError(
        f"Estimator {estimator!r} takes no baseline; estimators with a "
        f"baseline: {BASELINED_ESTIMATORS}.")


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


def discounted_sum_to_go(x_t: Array, discount) -> Array:
  """``out_t = Σ_{t'≥t} γ^{t'−t} x_t'`` along the last axis (γ = 1: :func:`reverse_cumsum`).

  Args:
    x_t: [..., L] values.
    discount: γ ∈ [0, 1] (a Python float or a scalar array); γ = 0 gives x_t.

  Returns:
    [..., L] discounted sums to go (one [L, L] matrix product; 0^0 = 1).

  References:
    DESIGN.md §6.4 (discounted future terms).
  """
  length = x_t.shape[-1]
  t = jnp.arange(length)
  gap = t[None, :] - t[:, None]  # t' − t
  weights = jnp.where(gap >= 0, jnp.power(jnp.asarray(discount, x_t.dtype),
                                          jnp.maximum(gap, 0)), 0.0).astype(x_t.dtype)
  return jnp.einsum("st,...t->...s", weights, x_t)


def check_variant(estimator: str, discount=1.0, length_normalize: bool = False) -> None:
  """ValueError unless (``discount``, ``length_normalize``) apply to ``estimator``.

  The discount and the length normalisation act on the future terms of the
  to-go estimators (``reward_to_go*``, ``kl_to_go*``, ``rao_blackwell``);
  ``trajectory`` has no per-position future and ``per_token_reward`` none at
  all.
  """
  _check_estimator(estimator)
  if isinstance(discount, bool) or not isinstance(discount, (int, float)) or not (
      0.0 <= discount <= 1.0):
    raise ValueError(f"discount must be a number in [0, 1], got {discount!r}.")
  if (discount != 1.0 or length_normalize) and estimator in (TRAJECTORY, PER_TOKEN_REWARD):
    raise ValueError(
        f"discount < 1 and length_normalize apply to the to-go estimators "
        f"{tuple(e for e in ESTIMATORS if e != TRAJECTORY)}, not {estimator!r}.")


def estimator_returns(estimator: str, r_t: Array, kl_t: Array,
                      mask_t: Array, discount=1.0, length_normalize: bool = False) -> Array:
  """The coefficient ``A_t`` of an estimator before any baseline.

  This is also the quantity a baseline ``b(c_t)`` of that estimator should
  approximate (its conditional mean given c_t minimises the variance among
  constant-in-y_t baselines)::

    trajectory               R     = Σ_{t'} r_t'                   (same ∀t)
    reward_to_go(_baseline)  G_t   = Σ_{t'≥t} r_t'        ≈ E[G_t|c_t] = V(c_t)
    kl_to_go(_baseline)      r_t + Σ_{t'>t} KL_t'         ≈ E[·|c_t]  = V(c_t)
    rao_blackwell            Σ_{t'>t} KL_t'               ≈ V(c_t) − KL_t
    per_token_reward         r_t                          (biased)

  where ``V(c_t) = E[Σ_{t'≥t} KL_t' | c_t]`` is the expected KL to go from c_t.
  Inputs are stop-gradiented; masked positions are 0.

  The practitioners' variants (DESIGN.md §6.4) change the FUTURE part
  (t' > t) of the to-go estimators: a discount weights term t' by γ^{t'−t}
  (γ = 1: the unbiased estimator; γ = 0: the current step alone, i.e.
  ``per_token_reward`` for the ``reward_to_go``/``kl_to_go`` forms and the
  exact single-step ∇KL_t term alone for ``rao_blackwell``), and the length
  normalisation of MiniLLM divides it by the number of scored positions
  after t. Both are BIASED for ∇KL(p ‖ q) unless γ = 1 and no normalisation.

  Args:
    estimator: a name in :data:`ALL_ESTIMATORS`.
    r_t: [L] log-ratios ``log p(y_t|c_t) − log q(y_t|c_t)`` at the sampled
      tokens.
    kl_t: [L] exact per-step ``KL(p(·|c_t) ‖ q(·|c_t))``.
    mask_t: [L] 1 at scored positions, 0 elsewhere (bool or float).
    discount: γ ∈ [0, 1] on the future terms (to-go estimators only).
    length_normalize: divide the future terms by the number of scored
      positions after t (MiniLLM's normalisation; to-go estimators only).

  Returns:
    [L] returns, zero at masked positions, no gradient.

  Raises:
    ValueError: unknown estimator or mismatched shapes.

  References:
    DESIGN.md §5.3, §5.4.
  """
  check_variant(estimator, discount, length_normalize)
  checks.assert_rank([r_t, kl_t, mask_t], 1, "r_t, kl_t, mask_t")
  checks.assert_equal_shape([r_t, kl_t, mask_t], "r_t, kl_t, mask_t")
  mask_t = mask_t.astype(r_t.dtype)
  r_t = jax.lax.stop_gradient(r_t) * mask_t
  kl_t = jax.lax.stop_gradient(kl_t).astype(r_t.dtype) * mask_t

  def future(x_t):  # Σ_{t'>t} γ^{t'−t} x_t' (÷ the number of scored t' > t).
    if discount == 1.0:
      after = reverse_cumsum(x_t) - x_t
    else:
      after = discounted_sum_to_go(x_t, discount) - x_t
    if length_normalize:
      after = after / jnp.maximum(reverse_cumsum(mask_t) - mask_t, 1.0)
    return after

  kl_after_t = future(kl_t)  # Σ_{t'>t} KL_t'.
  if estimator == TRAJECTORY:
    returns_t = jnp.broadcast_to(jnp.sum(r_t), r_t.shape)
  elif estimator in (REWARD_TO_GO, REWARD_TO_GO_BASELINE):
    plain = discount == 1.0 and not length_normalize
    returns_t = reverse_cumsum(r_t) if plain else r_t + future(r_t)
  elif estimator in (KL_TO_GO, KL_TO_GO_BASELINE):
    returns_t = r_t + kl_after_t
  elif estimator == RAO_BLACKWELL:
    returns_t = kl_after_t
  else:  # PER_TOKEN_REWARD
    returns_t = r_t
  return returns_t * mask_t


def sequence_policy_gradient(estimator: str, terms: PerTokenTerms,
                              mask_t: Array, baseline_t: Array,
                              pathwise: bool, discount=1.0,
                              length_normalize: bool = False) -> PolicyGradient:
  """:func:`policy_gradient` of ONE sequence: [L] terms, mask and (validated) baseline.

  No argument checks (the callers check); :func:`policy_gradient` vmaps it
  over a group of rollouts and ``latentdiv.surrogates`` calls it for one.
  """
  logp_t, logq_t, kl_t = terms
  mask_t = mask_t.astype(logp_t.dtype)
  r_t = jax.lax.stop_gradient(logp_t - logq_t) * mask_t
  returns_t = estimator_returns(estimator, r_t, kl_t, mask_t, discount, length_normalize)
  baseline_t = jax.lax.stop_gradient(baseline_t).astype(returns_t.dtype) * mask_t
  coeff_t = returns_t - baseline_t
  loss = jnp.sum(coeff_t * logp_t * mask_t)  # Score term Σ_t sg(A_t) log p.
  if estimator == RAO_BLACKWELL:
    loss += jnp.sum(kl_t * mask_t)  # Σ_t ∇KL_t replaces r_t and the pathwise term.
  elif pathwise:
    loss -= jnp.sum(logq_t * mask_t)  # −Σ_t ∇ log q(y_t|c_t).
  return PolicyGradient(loss, returns_t, baseline_t, r_t)


def policy_gradient(estimator: str, terms: PerTokenTerms, mask_NxL: Array, *,
                    baseline: str = "none", baseline_value: Optional[Array] = None,
                    pathwise: bool = True, discount=1.0,
                    length_normalize: bool = False) -> PolicyGradient:
  """Per-rollout surrogate losses whose gradients estimate ``+∇KL(p ‖ q)``.

  For N rollouts ``yⁿ ~ p`` of the same group (prompt x, latent pair (i, j))::

    loss[n] = Σ_t sg(A_t) log p(y_t|c_t) − Σ_t log q(y_t|c_t)   (i)–(v), biased
                                            └─ pathwise term, if pathwise
    loss[n] = Σ_t KL_t + Σ_t sg(A_t) log p(y_t|c_t)             rao_blackwell

  with ``A_t = R_t − b_t`` (:func:`estimator_returns`, DESIGN.md §5.3) and
  ``E_y ∇loss = ∇KL(p(y) ‖ q(y))`` for the unbiased estimators (DESIGN.md
  §5.2). Gradients flow where ``terms`` carry them: for OPD pass terms of a
  stop-gradiented teacher (and ``pathwise=False``); for rao_blackwell
  ``kl_t`` carries the gradient through p (and q, unless stopped) and
  ``pathwise`` has no effect. Baselines (DESIGN.md §5.4):

  * ``none``: b = 0 (allowed for every estimator);
  * ``leave_one_out``: the other rollouts' mean returns
    (``baselines.leave_one_out_baseline``; needs N ≥ 2);
  * ``ema``, ``jsd``: ``baseline_value`` given by the caller, broadcastable
    to [N, L] (an [L] EMA vector, or an [N, L] control-variate value).

  Args:
    estimator: a name in :data:`ALL_ESTIMATORS`.
    terms: :class:`PerTokenTerms` of three [N, L] arrays (N ≥ 1 rollouts).
    mask_NxL: [N, L] 1 at scored positions (bool or float).
    baseline: a name in ``baselines.BASELINES``; other than ``none`` only
      for :data:`BASELINED_ESTIMATORS`.
    baseline_value: the value of an ``ema`` / ``jsd`` baseline (None
      otherwise). It must not depend on y_t or later tokens of its rollout.
    pathwise: include the pathwise term (q depends on θ: the inter-latent KL).
    discount: γ ∈ [0, 1] on the future terms (:func:`estimator_returns`;
      γ < 1 is biased).
    length_normalize: MiniLLM's normalisation of the future terms (biased).

  Returns:
    :class:`PolicyGradient` (loss [N]; returns, baseline, r_t [N, L]).

  Raises:
    ValueError: unknown estimator or baseline, a baseline for an estimator
      that takes none, a missing or superfluous or mis-shaped
      ``baseline_value``, N < 2 with ``leave_one_out``, mismatched shapes.

  References:
    DESIGN.md §5.2–§5.4, §6; Williams (1992) REINFORCE; Greensmith, Bartlett
    & Baxter (2004) for baselines.
  """
  check_combination(estimator, baseline)
  check_variant(estimator, discount, length_normalize)
  names = "terms.logp_score_t, terms.logp_target_t, terms.kl_t, mask_NxL"
  arrays = [*terms, mask_NxL]
  checks.assert_rank(arrays, 2, names)
  checks.assert_equal_shape(arrays, names)
  if (baseline_value is None) == (baseline in baselines.GIVEN_BASELINES):
    raise ValueError(
        f"baseline_value is required for baselines {baselines.GIVEN_BASELINES} "
        f"and not accepted otherwise; got baseline={baseline!r} and "
        f"baseline_value={'None' if baseline_value is None else 'an array'}.")
  dtype = jnp.result_type(terms.logp_score_t.dtype, jnp.float32)
  if baseline == baselines.LEAVE_ONE_OUT:
    r_NxL = jax.lax.stop_gradient(terms.logp_score_t - terms.logp_target_t)
    returns = jax.vmap(functools.partial(
        estimator_returns, estimator, discount=discount,
        length_normalize=length_normalize))(r_NxL, terms.kl_t, mask_NxL)
    baseline_NxL = baselines.leave_one_out_baseline(returns, mask_NxL)
  elif baseline_value is not None:
    value = jnp.asarray(baseline_value, dtype)
    try:
      shape = jnp.broadcast_shapes(value.shape, mask_NxL.shape)
    except ValueError:
      shape = None
    if shape != mask_NxL.shape:
      raise ValueError(
          f"baseline_value of shape {value.shape} does not broadcast to "
          f"mask_NxL's {mask_NxL.shape}.")
    baseline_NxL = jnp.broadcast_to(value, mask_NxL.shape)
  else:
    baseline_NxL = jnp.zeros(mask_NxL.shape, dtype)
  one = functools.partial(sequence_policy_gradient, estimator, pathwise=pathwise,
                          discount=discount, length_normalize=length_normalize)
  return jax.vmap(one)(PerTokenTerms(*terms), mask_NxL, baseline_NxL)


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

  Raises:
    ValueError: mismatched shapes.

  References:
    DESIGN.md §5.3 (KL_t).
  """
  names = "logits_score_LxV, logits_target_LxV, tokens_L"
  checks.assert_rank([logits_score_LxV, logits_target_LxV, tokens_L], [2, 2, 1],
               names)
  checks.assert_equal_shape([logits_score_LxV, logits_target_LxV], names)
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
