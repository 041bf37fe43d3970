"""Baselines of the policy-gradient estimators (DESIGN.md §5.4).

A baseline ``b(c_t)`` is subtracted from an estimator's return ``R_t`` (the
coefficient of ``∇ log p(y_t|c_t)``); it leaves the estimator unbiased as long
as it does not depend on y_t or later tokens of the same rollout, because
``E_{y_t ~ p(·|c_t)}[∇ log p(y_t|c_t)] = 0`` (Williams 1992; Greensmith,
Bartlett & Baxter 2004). The variance-minimising baseline among those is close
to ``E[R_t | c_t]``, which every baseline here approximates:

=================  ==========================================================
name               b(c_t)
=================  ==========================================================
``none``           0
``leave_one_out``  mean return of the OTHER rollouts of the same (x, i[, j]) at
                   position t (needs N ≥ 2 rollouts per group)
``ema``            an exponential moving average of the per-position mean
                   return, carried in the train state (constant within a step)
``jsd``            the control variate ``c · Σ_{t'≥t} w_t' JSD_t'`` computed on
                   the teacher-forced DATA (independent of the sample), with
                   ``c = Cov(R, Ĵ) / Var(Ĵ)`` fitted online from EMA moments
=================  ==========================================================

``leave_one_out`` is computed from the returns by
:func:`latentdiv.estimators.policy_gradient`; ``ema`` and ``jsd`` are values
the caller supplies (from :func:`ema_update` / :func:`jsd_control_variate`).
Everything here is stop-gradient.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from latentdiv import checks

Array = chex.Array

NONE = "none"
LEAVE_ONE_OUT = "leave_one_out"
EMA = "ema"
JSD = "jsd"

BASELINES = (NONE, LEAVE_ONE_OUT, EMA, JSD)
"""Every baseline name (DESIGN.md §5.4)."""

GIVEN_BASELINES = (EMA, JSD)
"""Baselines whose value the caller supplies (``baseline_value``)."""



def check_baseline(baseline: str) -> None:
  """Raises ValueError unless ``baseline`` is in :data:`BASELINES`."""
  if baseline not in BASELINES:
    raise ValueError(f"Unknown baseline {baseline!r}; allowed: {BASELINES}.")


def leave_one_out_baseline(returns_NxL: Array, mask_NxL: Array) -> Array:
  """Per-position leave-one-out mean of the other rollouts' returns.

  For N rollouts of the same (x, i[, j])::

    b[n, t] = Σ_{m≠n} mask[m,t] R[m,t] / Σ_{m≠n} mask[m,t]   (0 if no m)

  b[n] depends only on the other rollouts, which are independent of rollout
  n, so the estimator stays unbiased. No gradient.

  Args:
    returns_NxL: [N, L] returns (``estimators.estimator_returns``) of N
      rollouts.
    mask_NxL: [N, L] 1 at scored positions.

  Returns:
    [N, L] baselines.

  Raises:
    ValueError: N < 2, or the shapes differ.

  References:
    DESIGN.md §5.4; Greensmith, Bartlett & Baxter (2004).
  """
  chex.assert_rank([returns_NxL, mask_NxL], 2,
                   custom_message="arguments: returns_NxL, mask_NxL",
                   exception_type=ValueError)
  checks.assert_equal_shape([returns_NxL, mask_NxL], "returns_NxL, mask_NxL")
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


def position_mean(returns_NxL: Array, weights_NxL: Array) -> Array:
  """Weighted mean return at each position, over all leading axes.

  ``m_t = Σ_n w[n,t] R[n,t] / Σ_n w[n,t]`` (0 where ``Σ_n w[n,t] = 0``): the
  value an ``ema`` baseline tends to (with w = the mask), or its exact value
  (with w = mask × the rollouts' probabilities). No gradient.

  Args:
    returns_NxL: [..., L] returns.
    weights_NxL: same shape, non-negative weights (e.g. the mask).

  Returns:
    [L] per-position means.

  References:
    DESIGN.md §5.4 (ema).
  """
  checks.assert_equal_shape([returns_NxL, weights_NxL], "returns_NxL, weights_NxL")
  returns = jax.lax.stop_gradient(returns_NxL)
  w = weights_NxL.astype(returns.dtype)
  axes = tuple(range(returns.ndim - 1))
  total = jnp.sum(w, axis=axes)
  return jnp.sum(w * returns, axis=axes) / jnp.where(total > 0, total, 1.0)


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
  checks.assert_equal_shape([ema, value], "ema, value")
  value = jax.lax.stop_gradient(value)
  return decay * ema + (1.0 - decay) * value


def jsd_control_variate(c: Array, jsd_to_go_t: Array) -> Array:
  """JSD control-variate baseline ``b_t = c · J_t``.

  ``J_t = Σ_{t'≥t} w_t' JSD_t'`` is the token-weighted pairwise JSD to go,
  computed under teacher forcing on the data y* (so independent of the
  sample); for the trajectory form pass the scalar Ĵ_L. No gradient.

  Args:
    c: scalar coefficient (e.g. from :func:`control_variate_coefficient`).
    jsd_to_go_t: [L] (or any shape) JSD to go.

  Returns:
    Baseline with the shape of ``jsd_to_go_t``.

  Raises:
    ValueError: c is not a scalar.

  References:
    DESIGN.md §4, §5.4.
  """
  chex.assert_rank(c, 0, custom_message="arguments: c",
                   exception_type=ValueError)
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
  (masked) means of R, Ĵ, RĴ, Ĵ² to debiased EMAs (normalised by
  ``max(Σ mask, 1)``); with decay 0 the result is the batch's own
  least-squares coefficient.

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

  Raises:
    ValueError: the shapes differ.

  References:
    DESIGN.md §5.4.
  """
  checks.assert_equal_shape([returns, jsd_values], "returns, jsd_values")
  if mask is None:
    mask = jnp.ones(returns.shape, state.mean_r.dtype)
  checks.assert_equal_shape([returns, mask], "returns, mask")
  dtype = state.mean_r.dtype
  r = jax.lax.stop_gradient(returns).astype(dtype)
  j = jax.lax.stop_gradient(jsd_values).astype(dtype)
  w = mask.astype(dtype)
  total = jnp.maximum(jnp.sum(w), 1.0)
  mean = lambda x: jnp.sum(w * x) / total  # noqa: E731
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

  Raises:
    ValueError: the shapes differ.

  References:
    DESIGN.md §5.4 (the diagnostics report the variance removed).
  """
  returns, baseline = jnp.asarray(returns), jnp.asarray(baseline)
  checks.assert_equal_shape([returns, baseline], "returns, baseline")
  if mask is None:
    mask = jnp.ones(returns.shape, returns.dtype)
  checks.assert_equal_shape([returns, mask], "returns, mask")
  w = mask.astype(returns.dtype)
  total = jnp.maximum(jnp.sum(w), 1.0)

  def var(x):
    m = jnp.sum(w * x) / total
    return jnp.sum(w * (x - m)**2) / total

  var_r = var(returns)
  resid = var(returns - baseline)
  return jnp.where(var_r > 0, 1.0 - resid / jnp.where(var_r > 0, var_r, 1.0),
                   0.0)


def fitted_constants(returns_ExMxNxL: Array, mask_MxNxL: Array, weights_MxN: Array,
                       jsd_to_go_MxL: Array):
  """The converged ``ema`` baseline and the least-squares JSD control-variate coefficient.

  What an online ``ema`` baseline and the online control-variate fit tend to,
  computed at once from (exactly or Monte-Carlo) weighted rollouts: the
  estimator diagnostics use them to report the best these baselines can do.

  Over M cells, N weighted rollouts each and the L positions::

    ema_e[t] = Σ_{m,n} w_mn mask_mnt R^e_mnt / Σ_{m,n} w_mn mask_mnt
    c_e      = Cov(R^e, J) / Var(J)   (weights w_mn mask_mnt)

  (``baselines.position_mean`` and one update at decay 0 of
  ``baselines.fit_control_variate_coefficient``).

  Args:
    returns_ExMxNxL: [E, M, N, L] returns of E estimators.
    mask_MxNxL: [M, N, L] masks.
    weights_MxN: [M, N] rollout weights (probabilities, or 1).
    jsd_to_go_MxL: [M, L] J_t of each cell.

  Returns:
    (ema [E, L], c [E]).

  References:
    DESIGN.md §5.4.
  """
  chex.assert_rank([returns_ExMxNxL, mask_MxNxL, weights_MxN, jsd_to_go_MxL],
                   [4, 3, 2, 2], exception_type=ValueError)
  w = weights_MxN[:, :, None] * mask_MxNxL.astype(weights_MxN.dtype)
  jsd = jnp.broadcast_to(jsd_to_go_MxL[:, None, :], mask_MxNxL.shape)
  state = init_control_variate_state(returns_ExMxNxL.dtype)
  ema = jnp.stack([position_mean(r, w) for r in returns_ExMxNxL])
  c = jnp.stack([fit_control_variate_coefficient(
      state, r, jsd, 0.0, mask=w)[1] for r in returns_ExMxNxL])
  return ema, c
