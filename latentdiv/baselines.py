"""TEMPORARY SHIM (replaced by the estimators-redesign branch)."""
import functools
from typing import NamedTuple
import jax, jax.numpy as jnp
from latentdiv import estimators as _est
from latentdiv.estimators import (leave_one_out_baseline, ema_update, jsd_control_variate,
  ControlVariateState, init_control_variate_state, control_variate_coefficient,
  fit_control_variate_coefficient, explained_variance)
BASELINES = ("none", "leave_one_out", "ema", "jsd")

class PolicyGradient(NamedTuple):
  loss: jax.Array
  returns: jax.Array
  baseline: jax.Array
  r_t: jax.Array

def policy_gradient(estimator, terms, mask_NxL, *, baseline="none", baseline_value=None, pathwise=True):
  maskf = mask_NxL.astype(terms.kl_t.dtype)
  r_t = jax.lax.stop_gradient(terms.logp_score_t - terms.logp_target_t) * maskf
  returns = jax.vmap(functools.partial(_est.estimator_returns, estimator))(r_t, jax.lax.stop_gradient(terms.kl_t), mask_NxL)
  if baseline == "none":
    base = jnp.zeros_like(returns)
  elif baseline == "leave_one_out":
    base = leave_one_out_baseline(returns, maskf) * maskf
  else:
    base = jnp.broadcast_to(baseline_value, returns.shape) * maskf
  f = functools.partial(_est.sequence_kl_surrogate, estimator, pathwise=pathwise)
  if baseline == "none":
    s = jax.vmap(f)(terms.logp_score_t, terms.logp_target_t, terms.kl_t, mask_NxL)
  else:
    s = jax.vmap(f)(terms.logp_score_t, terms.logp_target_t, terms.kl_t, mask_NxL, base)
  return PolicyGradient(-s, returns, base, r_t)

_est.policy_gradient = policy_gradient
_est.PolicyGradient = PolicyGradient
