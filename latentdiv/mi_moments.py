"""Exact moments of the mutual-information gradient estimators (DESIGN.md §5.6, §7).

One draw of the estimator of ``∇I(Z; Y | x)`` picks a latent ``k ~ U`` and a
rollout ``y ~ p_k`` (two rollouts of the same k for leave-one-out), scores it
under all K latents (``mutual_information.mixture_terms``) and runs the
library's own ``mutual_information.policy_gradient``. Here every draw is
enumerated with its exact probability (:func:`mi_support`) and the moments
are accumulated by the engine of ``latentdiv.moments``: the mean must equal
``−oracle.exact_mutual_information_grad`` (the surrogates are losses).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from latentdiv import moments
from latentdiv import mutual_information as mi
from latentdiv import oracle

PyTree = moments.PyTree
LogitsFn = moments.LogitsFn


def mi_support(logits_fn: LogitsFn, params: PyTree, num_latents: int, vocab_size: int,
               length: int, group_size: int = 1, eos_id: Optional[int] = None,
               pad_id: int = 0) -> moments.Support:
  """Every (latent k, group of N rollouts of p_k) with probability ``(1/K) Π_n p_k(yⁿ)``.

  One draw of the mutual-information estimator picks ``k ~ U{0..K−1}`` and
  rolls out ``y ~ p_k``. The support's token rows are ``[k, y_1..y_L]``
  (the latent in column 0, so one estimator function sees it; the mask's
  column 0 is 0), one block of ``moments.sequence_support`` per latent.

  Returns:
    ``moments.Support`` with K·(V^L)^N items over rows of length L + 1.

  References:
    DESIGN.md §5.6, §7.
  """
  blocks, offset = [], 0
  for k in range(num_latents):
    s = moments.sequence_support(oracle.bind(logits_fn, k), params, vocab_size, length,
                         group_size, eos_id, pad_id)
    rows = s.tokens.shape[0]
    blocks.append((jnp.concatenate([jnp.full((rows, 1), k, s.tokens.dtype), s.tokens], 1),
                   jnp.concatenate([jnp.zeros((rows, 1), s.mask.dtype), s.mask], 1),
                   np.asarray(s.index) + offset, s.weight / num_latents))
    offset += rows
  tokens, mask, index, weight = zip(*blocks)
  return moments.Support(jnp.concatenate(tokens), jnp.concatenate(mask), np.concatenate(index),
                 jnp.concatenate(weight))


def mi_gradient_moments(logits_fn: LogitsFn, params: PyTree, num_latents: int,
                        estimator: str, vocab_size: int, length: int, *,
                        baseline: Optional[str] = None,
                        baseline_fn: Optional[Callable] = None, pathwise: bool = False,
                        eos_id: Optional[int] = None, pad_id: int = 0,
                        chunk_size: int = 4096) -> moments.Moments:
  """Exact moments of the mutual-information gradient estimator (one draw k ~ U, y ~ p_k).

  ``g(k, y) = −∇_params mean_n mutual_information.policy_gradient(...).loss[n]``
  on the :func:`mutual_information.mixture_terms` of rollouts of latent k
  scored under all K latents: the gradient of the surrogate LOSS, so for an
  unbiased estimator ``mean == −oracle.exact_mutual_information_grad(...)``.
  The variance is the total variance of one draw: over the latent as well as
  the rollout (N = 2 rollouts of the same k for ``leave_one_out``).

  Args:
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: model parameters.
    num_latents: K.
    estimator: a name in ``estimators.ALL_ESTIMATORS``.
    vocab_size: V.
    length: L.
    baseline: a name in ``baselines.BASELINES`` (default ``none``, or
      ``jsd`` when ``baseline_fn`` is given).
    baseline_fn: optional ``(tokens_L, r_t, kl_t, mask_t) -> b_t`` for a
      caller-given baseline (its r_t and kl_t are the MI ones, no gradient).
    pathwise: keep the pathwise term through p̄.
    eos_id: optional EOS id.
    pad_id: filler after EOS.
    chunk_size: items per vmapped chunk.

  Returns:
    ``moments.Moments`` of the surrogate loss's gradient.

  Raises:
    ValueError: an invalid estimator × baseline combination.

  References:
    DESIGN.md §5.6, §7.
  """
  baseline, group_size = moments.resolve_baseline(estimator, baseline, baseline_fn)
  support = mi_support(logits_fn, params, num_latents, vocab_size, length, group_size,
                       eos_id, pad_id)

  def terms_of(p, latent, tokens_NxL, mask_NxL):
    logits = jnp.stack([logits_fn(p, tokens_NxL, j) for j in range(num_latents)], axis=1)
    return jax.vmap(mi.mixture_terms, (0, 0, 0, None))(logits, tokens_NxL, mask_NxL, latent)

  def flat_fn(rows_NxL1, mask_NxL1):
    latent, tokens, mask = rows_NxL1[0, 0], rows_NxL1[:, 1:], mask_NxL1[:, 1:]
    values = None
    if baseline_fn is not None:
      t = terms_of(jax.lax.stop_gradient(params), latent, tokens, mask)
      m = mask.astype(t.kl_t.dtype)
      r = (t.logp_score_t - t.logp_target_t) * m
      values = jax.vmap(lambda y, r_t, kl_t, m_t, mask_t: jnp.broadcast_to(
          baseline_fn(y, r_t, kl_t, mask_t), m_t.shape).astype(m_t.dtype))(
              tokens, r, t.kl_t * m, m, mask)

    def loss(p):
      pg = mi.policy_gradient(estimator, terms_of(p, latent, tokens, mask), mask,
                              baseline=baseline, baseline_value=values, pathwise=pathwise)
      return -jnp.mean(pg.loss)

    return flatten_util.ravel_pytree(jax.grad(loss)(params))[0][None, None]

  return moments.flat_moments(flat_fn, support, params, chunk_size)
