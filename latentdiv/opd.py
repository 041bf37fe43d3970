"""On-policy distillation losses: pure functions of student and teacher logits (DESIGN.md §6).

Written for groups of responses and batched by the caller; the objective that
runs them in a train step is ``latentdiv.objectives.distillation``.

* :func:`opd_loss` — the OPD surrogate through ``estimators.policy_gradient``
  (no pathwise term: the teacher is frozen); its gradient estimates
  ``+∇ KL(π_θ ‖ q)`` for the unbiased estimators, with the practitioners'
  variants (discount, length normalisation) as options;
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


class OPDLoss(NamedTuple):
  """Output of :func:`opd_loss`: the mean surrogate and, per [G, N(, L)], what it came from."""

  loss: jax.Array
  returns: jax.Array
  baseline: jax.Array
  reverse_kl: jax.Array


def opd_loss(student_logits_GxNxLxV, teacher_logits_GxNxLxV, tokens_GxNxL, mask_GxNxL,
             estimator: str, baseline: str = "none", ema_L=None, discount=1.0,
             length_normalize: bool = False) -> OPDLoss:
  """OPD loss on G groups of N student responses: its gradient estimates ``+∇KL(π ‖ q)``.

  ``loss = (1/GN) Σ_{g,n} policy_gradient(estimator, π, sg(q), y^(g,n), b).loss``
  without the pathwise term (DESIGN.md §5.3, §6). Baselines: ``none``;
  ``leave_one_out`` over the N responses of a group (N ≥ 2); ``ema`` the
  given per-position ``ema_L``.

  Args:
    student_logits_GxNxLxV: [G, N, L, V] student logits (with gradient).
    teacher_logits_GxNxLxV: [G, N, L, V] teacher logits (stop-gradiented here).
    tokens_GxNxL: [G, N, L] int responses sampled from the student.
    mask_GxNxL: [G, N, L] 1 up to and including EOS.
    estimator: a name in ``estimators.ALL_ESTIMATORS`` (static).
    baseline: one of :data:`BASELINES` (static).
    ema_L: [L] EMA baseline (required for ``'ema'``).
    discount: γ on the future terms (1 = unbiased; DESIGN.md §6.4).
    length_normalize: MiniLLM's normalisation of the future terms.

  Returns:
    :class:`OPDLoss` (``returns``/``baseline`` [G, N, L], ``reverse_kl`` [G, N]).

  Raises:
    ValueError: unknown estimator/baseline, a baseline for an estimator that
      takes none, N < 2 with leave-one-out, or ``ema_L`` missing.
  """
  chex.assert_rank([student_logits_GxNxLxV, teacher_logits_GxNxLxV, tokens_GxNxL,
                    mask_GxNxL], [4, 4, 3, 3])
  chex.assert_equal_shape([student_logits_GxNxLxV, teacher_logits_GxNxLxV])
  chex.assert_equal_shape([tokens_GxNxL, mask_GxNxL])
  if baseline not in BASELINES:
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}.")
  estimators.check_combination(estimator, baseline)
  if baseline == "ema" and ema_L is None:
    raise ValueError("baseline='ema' needs ema_L, the [L] EMA of the returns.")
  over_gn = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731
  terms = over_gn(estimators.per_token_terms)(
      student_logits_GxNxLxV, jax.lax.stop_gradient(teacher_logits_GxNxLxV), tokens_GxNxL)
  pg_fn = functools.partial(estimators.policy_gradient, estimator, baseline=baseline,
                            pathwise=False, discount=discount,
                            length_normalize=length_normalize)
  if baseline == "ema":
    chex.assert_shape(ema_L, tokens_GxNxL.shape[-1:])
    pg = jax.vmap(lambda t, m: pg_fn(t, m, baseline_value=ema_L))(terms, mask_GxNxL)
  else:
    pg = jax.vmap(pg_fn)(terms, mask_GxNxL)
  return OPDLoss(loss=jnp.mean(pg.loss), returns=pg.returns, baseline=pg.baseline,
                 reverse_kl=jnp.sum(pg.r_t, axis=-1))


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
