"""The bounded sequence-level mutual information I(Z; Y | x) and its estimators (DESIGN.md §5.6).

With a uniform prior over the K latents and ``p̄ = (1/K) Σ_j p_j``::

    I(x) = (1/K) Σ_k E_{y~p_k} [ log p_k(y|x) − log p̄(y|x) ]        0 ≤ I ≤ log K
         = log K + (1/K) Σ_k E_{y~p_k} [ log π(k | x, y) ]

(the generalised JSD of the K sequence distributions; π the exact posterior
over latents). Unlike the pairwise KL of §5.1 it saturates once the latents
are distinguishable, so it never rewards a latent for moving further away.

Per-token decomposition of one rollout ``y ~ p_k``, with the prefix
posteriors ``w_j(t) = p_j(y_<t) / Σ_m p_m(y_<t)`` (``w_j(1) = 1/K``)::

    p̄(v | y_<t) = Σ_j w_j(t) p_j(v | c_t)                  (the posterior-weighted mixture)
    r_t  = log p_k(y_t|c_t) − log p̄(y_t|y_<t)             (Σ_t r_t = log p_k(y) − log p̄(y))
    KL_t = KL(p_k(·|c_t) ‖ p̄(·|y_<t))                     (exact over V)

These are the :class:`estimators.PerTokenTerms` of the pair (score p_k,
target p̄): the whole estimator family of §5.3 applies unchanged
(``estimators.policy_gradient``) with p̄ held fixed. The gradient (every
latent rolled out, weighted 1/K; the pathwise term sums to ∇Σ_y p̄(y) = 0)::

    ∇I = (1/K) Σ_k E_{y~p_k} [ Σ_t A_t ∇ log p_k(y_t|c_t) ]

``rao_blackwell`` replaces the current step by ∇KL_t through p_k only.
Keeping the pathwise term ``−Σ_t log p̄(y_t|y_<t)`` (live through every
latent and through the posteriors) is unbiased too (``pathwise=True``).

Functions are written for ONE rollout and batched with ``jax.vmap``
(:func:`mixture_terms`), except :func:`rollout_terms`, which scores the K
rollouts of a batch under every latent with memory linear in K (DESIGN.md
§10): one target latent at a time, the mixture over V accumulated without
gradient.

References:
  DESIGN.md §5.6, §5.3, §7; Cover & Thomas (2006) §2.4 (I as a generalised
  JSD); Barber & Agakov (2003), the posterior form of I.
"""

from __future__ import annotations

import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from latentdiv import estimators
from latentdiv import model as model_lib

Array = chex.Array


def posterior_log_weights(logp_KxL: Array, mask_L: Array) -> Array:
  """Prefix posteriors ``log w_j(t) = log p_j(y_<t) − log Σ_m p_m(y_<t)`` (uniform prior).

  Args:
    logp_KxL: [K, L] ``log p_j(y_t | c_t)`` of one rollout under every latent.
    mask_L: [L] 1 at scored positions (positions after EOS add nothing).

  Returns:
    [K, L] log-weights, ``logsumexp`` over K equal to 0 at every t; column 0
    is ``−log K``. Differentiable in ``logp_KxL``.

  References:
    DESIGN.md §5.6.
  """
  chex.assert_rank([logp_KxL, mask_L], [2, 1], custom_message="arguments: logp_KxL, mask_L",
                   exception_type=ValueError)
  scored = logp_KxL * mask_L.astype(logp_KxL.dtype)[None, :]
  prefix = jnp.cumsum(scored, axis=-1) - scored  # Σ_{t'<t}: exclusive.
  return jax.nn.log_softmax(prefix, axis=0)


def mixture_terms(logits_KxLxV: Array, tokens_L: Array, mask_L: Array,
                  latent) -> estimators.PerTokenTerms:
  """The per-token terms of one rollout of latent ``k`` against the mixture p̄.

  Holds all K next-token distributions of the rollout at once ([K, L, V]):
  the reference implementation, and what the oracle differentiates.
  :func:`rollout_terms` computes the same numbers for a batch with memory
  linear in K.

  Args:
    logits_KxLxV: [K, L, V] next-token logits of every latent j at the
      rollout's contexts ``c_t = (x, y_<t)``.
    tokens_L: [L] int rollout tokens (drawn from latent ``latent``).
    mask_L: [L] 1 at scored positions.
    latent: k, the rollout's own latent (int or scalar array).

  Returns:
    ``estimators.PerTokenTerms`` of three [L] arrays:
    ``logp_score_t = log p_k(y_t|c_t)``;
    ``logp_target_t = log p̄(y_t|y_<t)``, differentiable through every latent
    and the posteriors (what the pathwise term differentiates);
    ``kl_t = KL(p_k(·|c_t) ‖ sg(p̄(·|y_<t)))``, differentiable through p_k only.

  References:
    DESIGN.md §5.6.
  """
  chex.assert_rank([logits_KxLxV, tokens_L, mask_L], [3, 1, 1],
                   custom_message="arguments: logits_KxLxV, tokens_L, mask_L",
                   exception_type=ValueError)
  chex.assert_equal_shape_prefix([logits_KxLxV[0], tokens_L, mask_L], 1,
                                 custom_message="arguments: logits_KxLxV, tokens_L, mask_L",
                                 exception_type=ValueError)
  logq_KxLxV = jax.nn.log_softmax(logits_KxLxV, axis=-1)
  index = jnp.broadcast_to(tokens_L.astype(jnp.int32)[None, :, None], logq_KxLxV.shape[:2] + (1,))
  logp_KxL = jnp.take_along_axis(logq_KxLxV, index, axis=-1)[..., 0]
  logw_KxL = posterior_log_weights(logp_KxL, mask_L)
  logp_target_t = jax.nn.logsumexp(logw_KxL + logp_KxL, axis=0)
  log_mix_LxV = jax.lax.stop_gradient(
      jax.nn.logsumexp(logw_KxL[:, :, None] + logq_KxLxV, axis=0))
  own_LxV = logq_KxLxV[latent]
  kl_t = jnp.sum(jnp.exp(own_LxV) * (own_LxV - log_mix_LxV), axis=-1)
  return estimators.PerTokenTerms(logp_KxL[latent], logp_target_t, kl_t)


def policy_gradient(estimator: str, terms: estimators.PerTokenTerms, mask_NxL: Array, *,
                    baseline: str = "none", baseline_value: Optional[Array] = None,
                    pathwise: bool = False) -> estimators.PolicyGradient:
  """Per-rollout losses whose gradients estimate K × the latent-k part of ``+∇I``.

  For N rollouts ``yⁿ ~ p_k`` of one (x, k) and their :func:`mixture_terms`::

    loss[n] = estimators.policy_gradient(estimator, (log p_k, sg log p̄, KL_t)).loss[n]
              − pathwise · Σ_t log p̄(y_t|y_<t)

  so that ``(1/K) Σ_k E ∇loss = ∇I`` for every unbiased estimator of §5.3,
  with or without the pathwise term. Maximise I by minimising ``−mean(loss)``.

  Args:
    estimator: a name in ``estimators.ALL_ESTIMATORS``.
    terms: ``PerTokenTerms`` of three [N, L] arrays (:func:`mixture_terms`).
    mask_NxL: [N, L] 1 at scored positions.
    baseline, baseline_value: as ``estimators.policy_gradient``.
    pathwise: add the pathwise term through p̄ (live through every latent).

  Returns:
    ``estimators.PolicyGradient`` (loss [N]; returns, baseline, r_t [N, L]).

  References:
    DESIGN.md §5.6, §5.3–§5.4.
  """
  fixed = estimators.PerTokenTerms(terms.logp_score_t, jax.lax.stop_gradient(terms.logp_target_t),
                                   terms.kl_t)
  pg = estimators.policy_gradient(estimator, fixed, mask_NxL, baseline=baseline,
                                  baseline_value=baseline_value, pathwise=False)
  if pathwise:
    maskf = mask_NxL.astype(terms.logp_target_t.dtype)
    pg = pg._replace(loss=pg.loss - jnp.sum(terms.logp_target_t * maskf, axis=-1))
  return pg


def rollout_terms(model, params, prompt_BxP: Array, tokens_BxKxL: Array, mask_BxKxL: Array,
                  pathwise: bool = False) -> estimators.PerTokenTerms:
  """:func:`mixture_terms` of every rollout (rollout k drawn under latent k), [B, K, L] each.

  Memory linear in K at any vocabulary (DESIGN.md §10): the rollouts are
  scored under their own latents once (with gradient: ``logp_score`` and
  ``kl_t``), then under each target latent j in turn inside a ``lax.scan``
  without gradient that accumulates the unnormalised mixture
  ``logsumexp_j(log p_j(y_<t) + log p_j(·|c_t))`` over V — one ``[B·K, L, V]``
  buffer — and the tokens' ``log p_j(y_t|c_t)``. With ``pathwise`` the
  tokens' log-probabilities are recomputed with gradient by a
  ``lax.map`` over j under ``jax.checkpoint`` (``[B·K, L]`` per latent).

  Args:
    model: the ``LatentTransformer``.
    params: its parameters.
    prompt_BxP: [B, P] int prompts.
    tokens_BxKxL: [B, K, L] int rollouts.
    mask_BxKxL: [B, K, L] their masks.
    pathwise: make ``logp_target`` differentiable (else it carries no gradient).

  Returns:
    ``estimators.PerTokenTerms`` of three [B, K, L] arrays.

  References:
    DESIGN.md §5.6, §10.
  """
  batch, num_latents, length = tokens_BxKxL.shape
  if num_latents != model.config.num_latents:
    raise ValueError(f"tokens_BxKxL must hold one rollout per latent (K = "
                     f"{model.config.num_latents}), got shape {tokens_BxKxL.shape}.")
  tokens = tokens_BxKxL.reshape(batch * num_latents, length)
  mask = mask_BxKxL.reshape(batch * num_latents, length)
  prompt = jnp.repeat(prompt_BxP, num_latents, axis=0)
  own_latent = jnp.tile(jnp.arange(num_latents, dtype=jnp.int32), batch)

  def log_probs(p, j):
    logits = model_lib.teacher_forced_logits(model, p, prompt, tokens, j)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logq = jax.nn.log_softmax(logits, axis=-1)
    return logq, jnp.take_along_axis(logq, tokens[..., None], axis=-1)[..., 0]

  own_logq, own_logp = log_probs(params, own_latent)
  maskf = mask.astype(own_logp.dtype)

  frozen = jax.lax.stop_gradient(params)

  def accumulate(carry, j):
    mix, norm = carry
    logq, logp = log_probs(frozen, jnp.full_like(own_latent, j))
    scored = logp * maskf
    prefix = jnp.cumsum(scored, axis=-1) - scored  # log p_j(y_<t) [BK, L]
    mix = jnp.logaddexp(mix, prefix[..., None] + logq)
    return (mix, jnp.logaddexp(norm, prefix)), logp

  init = (jnp.full(own_logq.shape, -jnp.inf), jnp.full(own_logp.shape, -jnp.inf))
  (mix, norm), logp_KxBKxL = jax.lax.scan(accumulate, init, jnp.arange(num_latents))
  log_mix = mix - norm[..., None]  # log p̄(·|y_<t) [BK, L, V], no gradient.
  if pathwise:
    logp_KxBKxL = jax.lax.map(jax.checkpoint(lambda j: log_probs(
        params, jnp.full_like(own_latent, j))[1]), jnp.arange(num_latents))
  logw = jax.vmap(posterior_log_weights, in_axes=(1, 0), out_axes=1)(logp_KxBKxL, maskf)
  logp_target = jax.nn.logsumexp(logw + logp_KxBKxL, axis=0)
  kl = jnp.sum(jnp.exp(own_logq) * (own_logq - log_mix), axis=-1)
  shape = (batch, num_latents, length)
  return estimators.PerTokenTerms(own_logp.reshape(shape), logp_target.reshape(shape),
                                  kl.reshape(shape))


def monte_carlo_mi(log_ratio_BxKxN: Array) -> tuple[Array, Array]:
  """Monte-Carlo ``I(x)`` per prompt and its standard error over prompts.

  Each sample ``log p_k(y) − log p̄(y) = log(K · π(k|y)) ≤ log K``, so the
  estimate is bounded by log K like I itself.

  Args:
    log_ratio_BxKxN: [B, K, N] ``Σ_t r_t`` of N rollouts per (prompt, latent).

  Returns:
    (mean over prompts of the per-prompt estimate, its standard error (ddof 1)).

  References:
    DESIGN.md §5.6, §9.
  """
  chex.assert_rank(log_ratio_BxKxN, 3, custom_message="argument: log_ratio_BxKxN",
                   exception_type=ValueError)
  per_prompt = jnp.mean(log_ratio_BxKxN, axis=(1, 2))
  batch = per_prompt.shape[0]
  stderr = jnp.std(per_prompt, ddof=1) / math.sqrt(batch) if batch > 1 else jnp.zeros(())
  return jnp.mean(per_prompt), stderr
