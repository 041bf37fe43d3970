"""On-policy distillation losses: pure functions of student and teacher logits (DESIGN.md §6).

Written for groups of responses and batched by the caller; the objective that
runs them in a train step is ``latentdiv.objectives.distillation``.

* :func:`opd_loss` — the OPD surrogate through ``estimators.policy_gradient``
  (no pathwise term: the teacher is frozen); its gradient estimates
  ``+∇ KL(π_θ ‖ q)`` for the unbiased estimators, with the practitioners'
  variants (discount, length normalisation) as options;
* :func:`seq_kd_loss` — sequence-level KD (Kim & Rush 2016);
* :func:`sequence_reverse_kl` and :func:`reverse_kl_summary` — the
  Monte-Carlo sequence reverse KL with its confidence interval.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from latentdiv import estimators
from latentdiv import logprobs
from latentdiv import metrics as metrics_lib

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
