"""The sequence-level inter-latent term: prefix rollouts, K×K scoring, policy gradient (DESIGN.md §5).

Two divergences (``Settings.kind``), both estimated from prefix rollouts and
MAXIMISED with the policy-gradient estimators of ``latentdiv.estimators``:

* ``kl`` — for every example x and ordered latent pair (i, j), i ≠ j,
  ``D_ij = KL(p_i(y_{1:L} | x) ‖ p_j(y_{1:L} | x))`` (§5.1; unbounded);
* ``mi`` — the mutual information ``I(Z; Y_{1:L} | x)`` under a uniform prior
  over the latents (§5.6; bounded by log K), whose per-token terms compare
  rollout k with the posterior-weighted mixture of all latents
  (``latentdiv.mutual_information``).

One call:

1. **rollouts** — N rollouts of L tokens per (example, latent): one
   ``lax.scan`` over L, vmapped over the K latents, KV-cached
   (``sampling.sample_latents``);
2. **scoring** — every rollout under all K latents, teacher forced, one
   (pair of) latent(s) at a time so that memory grows linearly in K
   (:func:`pair_terms` for ``kl``, ``mutual_information.rollout_terms`` for
   ``mi``; DESIGN.md §10), reduced to the per-token terms at the rollout's
   contexts;
3. **estimator** — per (example, pair) group of N rollouts (``kl``) or per
   (example, latent) group (``mi``), ``estimators.policy_gradient`` (score
   term + pathwise term, or the Rao-Blackwellised form) with the chosen
   baseline; the surrogate is averaged over pairs (latents) and rollouts.

Pairs: all K(K−1) ordered pairs, or ``num_pairs`` drawn uniformly without
replacement per example (an unbiased estimate of the all-pairs mean).

Baselines (DESIGN.md §5.4, names in ``latentdiv.baselines``): ``none``;
``leave_one_out`` over the N ≥ 2 rollouts of the same (x, i, j); ``ema`` — a
per-position EMA of the returns carried in the train state; ``jsd`` — the
control variate ``b_t = c · Σ_{t'≥t} w_t' JSD_t'`` over the first L
positions of the teacher-forced DATA y* (independent of the sample) — the
pairwise JSD of (i, j) for ``kl``, the K-way JSD for ``mi`` — with c fitted
online from EMA moments and used from the state before this step's update.

Everything the term needs is an explicit argument (no config object):
``Settings`` holds the static choices.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from latentdiv import baselines
from latentdiv import divergences
from latentdiv import estimators
from latentdiv import model as model_lib
from latentdiv import mutual_information
from latentdiv import sampling

KINDS = ("kl", "mi")
"""The sequence-level divergences offered: pairwise KL (§5.1), mutual information (§5.6)."""


class Settings(NamedTuple):
  """The static choices of the sequence-level term.

  Attributes:
    estimator: a name in ``estimators.ESTIMATORS`` (DESIGN.md §5.3).
    baseline: a name in ``baselines.BASELINES`` (DESIGN.md §5.4).
    rollout_len: L, tokens per rollout.
    num_rollouts: N rollouts per (example, latent); leave_one_out needs N ≥ 2.
    num_pairs: ordered pairs per example; 0 = all K(K−1) (``kl`` only).
    ema_decay: decay of the ``ema`` baseline and of the control-variate fit.
    kind: the divergence, one of ``KINDS``.
    pathwise: ``mi`` only: keep the pathwise term through the mixture
      (unbiased either way; ``kl`` always differentiates through p_j).
  """

  estimator: str = estimators.RAO_BLACKWELL
  baseline: str = "none"
  rollout_len: int = 4
  num_rollouts: int = 1
  num_pairs: int = 0
  ema_decay: float = 0.9
  kind: str = "kl"
  pathwise: bool = False


class SequenceTerm(NamedTuple):
  """What the sequence-level term contributes to a step.

  Attributes:
    surrogate: scalar loss; its gradient estimates −∇ mean_{x,(i,j)} D_ij.
    metrics: scalars to log (``seq_kl`` = the Monte-Carlo mean of D over
      pairs, or ``seq_mi`` = the Monte-Carlo I; their ``_stderr``,
      ``baseline_explained_variance``, ...).
    extra: the updated estimator state (EMA baseline, control-variate fit).
  """

  surrogate: jax.Array
  metrics: dict
  extra: dict


def init_state(settings: Settings) -> dict:
  """Estimator state carried in ``TrainState.extra``."""
  if settings.baseline == "ema":
    return dict(ema=jnp.zeros((settings.rollout_len,), jnp.float32))
  if settings.baseline == "jsd":
    return dict(cv=baselines.init_control_variate_state())
  return {}


def weight_at(step: jax.Array, weight: float, warmup_steps: int, ramp_steps: int) -> jax.Array:
  """λ · ramp: 0 for ``warmup_steps``, then linear to λ over ``ramp_steps`` (DESIGN.md §5.5)."""
  ramp = jnp.clip((step - warmup_steps + 1) / max(ramp_steps, 1), 0.0, 1.0)
  return jnp.where(step < warmup_steps, 0.0, weight * ramp)


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


def pair_terms(model, params, prompt_BxP: jax.Array,
               tokens_BxKxL: jax.Array) -> estimators.PerTokenTerms:
  """Per-token terms of every rollout i under every latent j, [B, i, j, L] each.

  ``logp_score[b, i, j, t] = log p_i(y_t^i | c_t)`` (the rollout's own
  latent), ``logp_target[b, i, j, t] = log p_j(y_t^i | c_t)`` and
  ``kl[b, i, j, t] = KL(p_i(·|c_t) ‖ p_j(·|c_t))`` at rollout i's contexts,
  all differentiable in ``params``. The rollouts are scored under their own
  latents in one pass; then a ``lax.map`` over the K² ordered pairs (i, j)
  scores the B rollouts of latent i under latent j and reduces them to the
  three per-token terms, rematerialised in the backward pass
  (``jax.checkpoint``). Live at once: the own-latent logits ``[B·K, L, V]``
  and, in the backward pass, their accumulated cotangent, plus one pair's
  ``[B, L, V]`` intermediates: about five ``[B·K, L, V]`` float32 buffers
  in all, forward and backward (XLA's memory analysis at K = 4 and 8),
  instead of the ``[B, K, K, L, V]`` of scoring every pair at once, so
  memory grows linearly in K at any vocabulary size.

  Args:
    model: the ``LatentTransformer``.
    params: its parameters.
    prompt_BxP: [B, P] int prompts.
    tokens_BxKxL: [B, K, L] int rollouts, rollout i drawn under latent i.

  Returns:
    ``estimators.PerTokenTerms`` of three [B, K, K, L] arrays.

  References:
    DESIGN.md §5.1, §5.3, §10.
  """
  batch, num_latents, length = tokens_BxKxL.shape
  if num_latents != model.config.num_latents:
    raise ValueError(f"tokens_BxKxL must hold one rollout per latent (K = "
                     f"{model.config.num_latents}), got shape {tokens_BxKxL.shape}.")
  tokens_KxBxL = jnp.moveaxis(tokens_BxKxL, 1, 0)
  latents_K = jnp.arange(num_latents, dtype=jnp.int32)
  score_logits = model_lib.teacher_forced_logits(  # p_i at rollout i, rows (i, b).
      model, params, jnp.tile(prompt_BxP, (num_latents, 1)),
      tokens_KxBxL.reshape(num_latents * batch, length), jnp.repeat(latents_K, batch))
  score_KxBxLxV = score_logits.reshape(num_latents, batch, length, -1)

  @jax.checkpoint
  def under_pair(pair):
    i, j = pair // num_latents, pair % num_latents
    tokens_BxL = tokens_KxBxL[i]
    target_logits = model_lib.teacher_forced_logits(
        model, params, prompt_BxP, tokens_BxL, jnp.full((batch,), j, jnp.int32))
    return jax.vmap(estimators.per_token_terms)(score_KxBxLxV[i], target_logits, tokens_BxL)

  terms = jax.lax.map(under_pair, jnp.arange(num_latents * num_latents))  # each [i·j, B, L]
  return estimators.PerTokenTerms(*(
      jnp.moveaxis(a.reshape(num_latents, num_latents, batch, length), 2, 0) for a in terms))


def _jsd_to_go(data_logits_BxKxTxV, data_mask_BxT, rollout_len):
  """[B, K, K, L] data-side ``Σ_{t'≥t} w_t' JSD_t'(i, j)`` over the first L positions."""
  pairwise = jax.vmap(functools.partial(
      divergences.pairwise_token_jsd, weighting="prefix", prefix_len=rollout_len))(
          data_logits_BxKxTxV, data_mask_BxT)
  return divergences.jsd_to_go(pairwise.jsd_t, pairwise.weights_t)[..., :rollout_len]


def _multi_jsd_to_go(data_logits_BxKxTxV, data_mask_BxT, rollout_len):
  """[B, L] data-side ``Σ_{t'≥t} w_t' JSD_t'`` of the K-way token JSD over the first L positions."""
  jsd = jax.vmap(functools.partial(divergences.token_jsd, weighting="prefix",
                                   prefix_len=rollout_len))(data_logits_BxKxTxV, data_mask_BxT)
  return divergences.jsd_to_go(jsd.jsd_t, jsd.weights_t)[..., :rollout_len]


def sequence_term(model, params, prompt_BxP: jax.Array, key: jax.Array, extra: dict,
                  settings: Settings, data_logits_BxKxTxV: jax.Array | None = None,
                  data_mask_BxT: jax.Array | None = None) -> SequenceTerm:
  """Rollouts, K×K scoring and the estimator surrogate for one batch of prompts.

  Args:
    model: the ``LatentTransformer``.
    params: its parameters (differentiated).
    prompt_BxP: [B, P] int prompts.
    key: PRNG key of this step.
    extra: estimator state from :func:`init_state`.
    settings: :class:`Settings`.
    data_logits_BxKxTxV: teacher-forced logits of every latent on the data
      (stop-gradient); needed by the ``jsd`` control variate only.
    data_mask_BxT: the data's mask; with ``data_logits_BxKxTxV``.

  Returns:
    :class:`SequenceTerm`.

  Raises:
    ValueError: an unknown kind, or the ``jsd`` baseline without data logits.

  References:
    DESIGN.md §5.1–5.6.
  """
  if settings.kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {settings.kind!r}.")
  if settings.baseline == "jsd" and (data_logits_BxKxTxV is None or data_mask_BxT is None):
    raise ValueError("baseline='jsd' needs data_logits_BxKxTxV and data_mask_BxT.")
  if settings.kind == "mi" and settings.num_pairs:
    raise ValueError("num_pairs applies to kind 'kl' only (the mutual information uses "
                     f"every latent), got {settings.num_pairs}.")
  num_latents = model.config.num_latents
  length, num_rollouts = settings.rollout_len, settings.num_rollouts
  batch_size = prompt_BxP.shape[0]
  is_kl = settings.kind == "kl"
  rollout_key, pair_key = jax.random.split(key)

  # 1. N rollouts per (example, latent), all in one scan vmapped over K.
  prompt_BN = jnp.repeat(prompt_BxP, num_rollouts, axis=0)
  rollout = sampling.sample_latents(model, jax.lax.stop_gradient(params), prompt_BN,
                                    rollout_key, length)
  # 2. Score rollout i under every latent j, one target latent at a time
  #    (memory linear in K, DESIGN.md §10): per-token terms [BN, i, j, L] of
  #    every pair (kl), or [BN, k, L] against the posterior mixture (mi).
  if is_kl:
    terms = pair_terms(model, params, prompt_BN, rollout.tokens)
    mask = jnp.broadcast_to(rollout.mask[:, :, None], terms.kl_t.shape)
  else:
    terms = mutual_information.rollout_terms(model, params, prompt_BN, rollout.tokens,
                                             rollout.mask, settings.pathwise)
    mask = rollout.mask

  # Regroup [BN, ...] as [B, ..., N, L]: one group of N rollouts per (x, i, j) or (x, k).
  def regroup(a):
    a = a.reshape((batch_size, num_rollouts) + a.shape[1:])
    return jnp.moveaxis(a, 1, -2)

  terms = estimators.PerTokenTerms(*map(regroup, terms))
  mask = regroup(mask)
  maskf = mask.astype(jnp.float32)
  # The baselines' statistics leave out the i = j groups of kl (their returns are 0).
  stats_mask = maskf * (1.0 - jnp.eye(num_latents))[None, :, :, None, None] if is_kl else maskf

  # 3. The baseline's value where it is external to the group (never a
  #    function of the group's own tokens), then the estimator per group.
  new_extra = dict(extra)
  value = None
  if settings.baseline == "ema":
    value = jnp.broadcast_to(extra["ema"], maskf.shape)
  elif settings.baseline == "jsd":
    if is_kl:
      jsd_to_go = _jsd_to_go(data_logits_BxKxTxV, data_mask_BxT, length)[:, :, :, None]
    else:
      jsd_to_go = _multi_jsd_to_go(data_logits_BxKxTxV, data_mask_BxT, length)[:, None, None]
    jsd_to_go = jnp.broadcast_to(jsd_to_go, maskf.shape)
    c = baselines.control_variate_coefficient(extra["cv"], settings.ema_decay)
    value = baselines.jsd_control_variate(c, jsd_to_go)
  if is_kl:
    pg_fn = functools.partial(estimators.policy_gradient, settings.estimator,
                              baseline=settings.baseline, pathwise=True)
  else:
    pg_fn = functools.partial(mutual_information.policy_gradient, settings.estimator,
                              baseline=settings.baseline, pathwise=settings.pathwise)
  over_groups = pg_fn
  for _ in range(maskf.ndim - 2):  # (B, i, j) or (B, k)
    over_groups = jax.vmap(over_groups)
  if value is None:
    pg = over_groups(terms, mask)
  else:
    pg = over_groups(terms, mask, baseline_value=value)
  if settings.baseline == "ema":
    axes = tuple(range(maskf.ndim - 1))
    step_mean = jnp.sum(pg.returns * stats_mask, axis=axes) / jnp.maximum(
        jnp.sum(stats_mask, axis=axes), 1.0)
    new_extra["ema"] = baselines.ema_update(extra["ema"], step_mean, settings.ema_decay)
  elif settings.baseline == "jsd":
    new_extra["cv"], _ = baselines.fit_control_variate_coefficient(
        extra["cv"], pg.returns, jsd_to_go, settings.ema_decay, mask=stats_mask)

  log_ratio = jnp.sum(pg.r_t, axis=-1)  # Σ_t r_t per rollout: its mean is D_ij (or I).
  if is_kl:
    # pg.loss estimates +∇D per rollout; the term maximises D: minimise −D̂.
    weights = pair_weights(pair_key, batch_size, num_latents, settings.num_pairs)  # [B, K, K]
    surrogate = -jnp.sum(weights * jnp.mean(pg.loss, axis=-1)) / batch_size
    # D̂ per example: the mean over pairs and rollouts of R = Σ_t r_t.
    all_pairs = pair_weights(pair_key, batch_size, num_latents, 0)
    d_hat = jnp.sum(all_pairs * jnp.mean(log_ratio, axis=-1), axis=(1, 2))
    metrics = dict(seq_kl=jnp.mean(d_hat),
                   seq_kl_stderr=jnp.std(d_hat) / jnp.sqrt(batch_size))
  else:
    # (1/K) Σ_k E ∇loss_k = ∇I: minimise −Î.
    surrogate = -jnp.mean(pg.loss)
    mi_hat, mi_stderr = mutual_information.monte_carlo_mi(log_ratio)
    metrics = dict(seq_mi=mi_hat, seq_mi_stderr=mi_stderr)
  metrics.update(pg_surrogate=surrogate,
                 rollout_len_mean=jnp.mean(jnp.sum(rollout.mask, axis=-1)))
  if settings.baseline != "none":
    metrics["baseline_explained_variance"] = baselines.explained_variance(
        pg.returns, pg.baseline, stats_mask)
  return SequenceTerm(surrogate, metrics, new_extra)
