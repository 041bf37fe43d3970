"""The sequence-level inter-latent KL objective of a train step (DESIGN.md §5).

For every example x and ordered latent pair (i, j), i ≠ j,

    D_ij = KL(p_i(y_{1:L} | x) ‖ p_j(y_{1:L} | x)),

estimated from prefix rollouts and maximised with the policy-gradient
estimators of ``latentdiv.estimators``. One step:

1. **rollouts** — N rollouts of L tokens per (example, latent): one
   ``lax.scan`` over L, vmapped over the K latents, KV-cached
   (``sampling.sample_latents``);
2. **scoring** — every rollout under all K latents in one teacher-forced pass
   vmapped over K (``sampling.score_latents``), giving p_i and p_j at the
   rollout's contexts for every pair;
3. **estimator** — per pair and rollout, ``estimators.sequence_kl_surrogate``
   (score term + pathwise term, or the Rao-Blackwellised form), with the
   configured baseline; the surrogate is averaged over pairs and rollouts.

Pairs: all K(K−1) ordered pairs, or ``num_pairs`` drawn uniformly without
replacement per example (an unbiased estimate of the all-pairs mean; all pairs
are scored anyway, the scoring pass is one vmapped call).

Baselines (§5.4): ``none``; ``leave_one_out`` over the N ≥ 2 rollouts of the
same (x, i, j); ``ema`` — a per-position EMA of the returns, carried in the
train state and updated after the step; ``jsd`` — the control variate
``b_t = c · Σ_{t'≥t} w_t' JSD_t'(i, j)`` over the first L positions of the
teacher-forced DATA y* (independent of the sample), with c fitted online from
EMA moments (``estimators.fit_control_variate_coefficient``) and used from the
state *before* this step's update, so the baseline is independent of the sample.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from latentdiv import divergences
from latentdiv import estimators
from latentdiv import sampling


class SeqPGTerms(NamedTuple):
  """What the sequence-level term contributes to a train step.

  Attributes:
    surrogate: scalar loss; its gradient estimates −∇ mean_{x,(i,j)} D_ij.
    metrics: scalars to log (``seq_kl`` = the Monte-Carlo mean of D over
      pairs, ``seq_kl_stderr``, ``baseline_explained_variance``, ...).
    extra: the updated estimator state (EMA baseline, control-variate fit).
  """

  surrogate: jax.Array
  metrics: dict
  extra: dict


def init_state(config) -> dict:
  """Estimator state carried in ``TrainState.extra``."""
  baseline = config.seq_pg.baseline
  if baseline == "ema":
    return dict(ema=jnp.zeros((config.seq_pg.rollout_len,), jnp.float32))
  if baseline == "jsd":
    return dict(cv=estimators.init_control_variate_state())
  return {}


def pair_weights(key, batch_size: int, num_latents: int, num_pairs: int) -> jax.Array:
  """[B, K, K] weights of the ordered pairs entering the objective, summing to 1 per example.

  ``num_pairs = 0`` uses all K(K−1) off-diagonal pairs; otherwise ``num_pairs``
  of them drawn uniformly without replacement per example.
  """
  off_diagonal = 1.0 - jnp.eye(num_latents)
  total = num_latents * (num_latents - 1)
  if num_pairs == 0 or num_pairs == total:
    return jnp.broadcast_to(off_diagonal / total, (batch_size, num_latents, num_latents))
  scores = jax.random.uniform(key, (batch_size, num_latents, num_latents))
  scores = jnp.where(off_diagonal[None] > 0, scores, -1.0)
  flat = scores.reshape(batch_size, -1)
  threshold = jnp.sort(flat, axis=-1)[:, -num_pairs][:, None]
  chosen = (flat >= threshold).astype(jnp.float32).reshape(scores.shape)
  return chosen / num_pairs


def seq_pg_terms(setup, params, batch, key, extra: dict, tf_logits_BxKxTxV) -> SeqPGTerms:
  """Rollouts, scoring and the estimator surrogate for one batch.

  Args:
    setup: ``train.Setup`` (model, config).
    params: model parameters (differentiated).
    batch: ``tasks.Batch``.
    key: PRNG key of this step.
    extra: estimator state from ``init_state``.
    tf_logits_BxKxTxV: teacher-forced logits on the data (stop-gradient), used
      by the JSD control variate.

  Returns:
    ``SeqPGTerms``.
  """
  cfg = setup.config.seq_pg
  model = setup.model
  num_latents = model.config.num_latents
  rollout_len, num_rollouts = cfg.rollout_len, cfg.num_rollouts
  batch_size = batch.prompt.shape[0]
  rollout_key, pair_key = jax.random.split(key)

  # 1. N rollouts per (example, latent), all in one scan vmapped over K.
  prompt_BN = jnp.repeat(batch.prompt, num_rollouts, axis=0)
  rollout = sampling.sample_latents(model, jax.lax.stop_gradient(params), prompt_BN,
                                    rollout_key, rollout_len)
  # 2. Score rollout i under every latent j: logits [BN, i, j, L, V].
  logits = sampling.score_latents(model, params, prompt_BN, rollout.tokens)
  logits_score = jnp.broadcast_to(
      jnp.diagonal(logits, axis1=1, axis2=2).transpose(0, 3, 1, 2)[:, :, None],
      logits.shape)  # p_i at rollout i's contexts, repeated over j.
  tokens = jnp.broadcast_to(rollout.tokens[:, :, None], logits.shape[:-1])
  mask = jnp.broadcast_to(rollout.mask[:, :, None], logits.shape[:-1])
  over_pairs = lambda f: jax.vmap(jax.vmap(jax.vmap(f)))  # noqa: E731  (BN, i, j)
  terms = over_pairs(estimators.per_token_terms)(logits_score, logits, tokens)

  # Regroup [BN, ...] as [B, N, ...] then [B, i, j, N, L].
  def regroup(a):
    a = a.reshape((batch_size, num_rollouts) + a.shape[1:])
    return jnp.moveaxis(a, 1, 3)

  logp_score, logp_target, kl_t = map(regroup, terms)
  mask = regroup(mask)
  maskf = mask.astype(jnp.float32)
  r_t = jax.lax.stop_gradient(logp_score - logp_target) * maskf
  returns = jax.vmap(jax.vmap(jax.vmap(jax.vmap(
      functools.partial(estimators.estimator_returns, cfg.estimator)))))(
          r_t, jax.lax.stop_gradient(kl_t), mask)

  # 3. Baselines (never a function of this rollout's own tokens).
  new_extra = dict(extra)
  baseline = None
  if cfg.baseline == "leave_one_out":
    baseline = jax.vmap(jax.vmap(jax.vmap(estimators.leave_one_out_baseline)))(returns, mask)
  elif cfg.baseline == "ema":
    baseline = jnp.broadcast_to(extra["ema"], returns.shape)
    step_mean = jnp.sum(returns * maskf, axis=(0, 1, 2, 3)) / jnp.maximum(
        jnp.sum(maskf, axis=(0, 1, 2, 3)), 1.0)
    new_extra["ema"] = estimators.ema_update(extra["ema"], step_mean, cfg.ema_decay)
  elif cfg.baseline == "jsd":
    pairwise = jax.vmap(functools.partial(
        divergences.pairwise_token_jsd, weighting="prefix", prefix_len=rollout_len))(
            tf_logits_BxKxTxV, batch.target_mask)
    jsd_to_go = divergences.jsd_to_go(pairwise.jsd_t, pairwise.weights_t)[..., :rollout_len]
    jsd_to_go = jnp.broadcast_to(jsd_to_go[:, :, :, None], returns.shape)
    c = estimators.control_variate_coefficient(extra["cv"], cfg.ema_decay)
    baseline = estimators.jsd_control_variate(c, jsd_to_go)
    new_extra["cv"], _ = estimators.fit_control_variate_coefficient(
        extra["cv"], returns, jsd_to_go, cfg.ema_decay, mask=maskf)

  surrogate_fn = functools.partial(estimators.sequence_kl_surrogate, cfg.estimator)
  per_rollout = jax.vmap(jax.vmap(jax.vmap(jax.vmap(surrogate_fn))))
  if baseline is None:
    surrogates = per_rollout(logp_score, logp_target, kl_t, mask)
  else:
    surrogates = per_rollout(logp_score, logp_target, kl_t, mask, baseline)
  weights = pair_weights(pair_key, batch_size, num_latents, cfg.num_pairs)  # [B, K, K]
  surrogate = jnp.sum(weights * jnp.mean(surrogates, axis=-1)) / batch_size

  # Diagnostics: D̂ per example (mean over pairs and rollouts of R = Σ_t r_t).
  all_pairs = pair_weights(pair_key, batch_size, num_latents, 0)
  d_hat = jnp.sum(all_pairs * jnp.mean(jnp.sum(r_t, axis=-1), axis=-1), axis=(1, 2))
  metrics = dict(
      seq_kl=jnp.mean(d_hat),
      seq_kl_stderr=jnp.std(d_hat) / jnp.sqrt(batch_size),
      pg_surrogate=surrogate,
      rollout_len_mean=jnp.mean(jnp.sum(rollout.mask, axis=-1)),
  )
  if baseline is not None:
    metrics["baseline_explained_variance"] = estimators.explained_variance(
        returns, baseline, maskf)
  return SeqPGTerms(surrogate, metrics, new_extra)
