"""Divergences between next-token distributions, computed stably from logits.

Everything here is a pure function of arrays (no model): the K-way
Jensen–Shannon divergence between the K latents' next-token distributions and
its token-weighted average (DESIGN.md §4), the two-distribution generalised
JSD_β with its forward/reverse KL limits (§4, §5.4), and TRL's GKD loss built
on it (§6).

Numerics. Distributions enter as logits and are turned into log-probabilities
with ``jax.nn.log_softmax``; mixtures are formed in log space with
``logsumexp``/``logaddexp``; a KL is ``Σ_v exp(log p_v) (log p_v − log q_v)``,
where ``log p_v`` is finite for finite logits, so a probability that underflows
to 0 contributes ``0 · finite = 0`` — never ``0 · log 0``. Values and gradients
stay finite for logits of magnitude 1e4 and for fully masked rows. Logits must
be finite: mask vocabulary entries with a large negative number (e.g. −1e9),
not with −inf.

Shapes: K latents, T positions, V vocabulary, B batch. Masks are ``[..., T]``
arrays, bool or numeric; non-zero means "valid position" (PAD positions are
masked, DESIGN.md §3; token ids in ``latentdiv.vocab``).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTINGS = ("uniform", "prefix", "divergence")

# Denominator floor of ``weighted_mean``: with non-negative weights Σ w is
# either 0 (then the numerator is 0 too and the mean is defined as 0) or >= the
# smallest positive weight, which callers keep far above this.
_TINY = 1e-30


# ---------------------------------------------------------------------------
# Argument checks.


def _check_beta(beta) -> None:
  if isinstance(beta, numbers.Real) and not 0.0 <= float(beta) <= 1.0:
    raise ValueError(f"beta must lie in [0, 1], got {beta!r}.")


def _check_temperature(temperature, name: str = "temperature") -> None:
  if isinstance(temperature, numbers.Real) and not float(temperature) > 0.0:
    raise ValueError(f"{name} must be > 0, got {temperature!r}.")


def _as_float_mask(mask: chex.Array, dtype) -> chex.Array:
  """A {0,1} float mask from a bool or numeric mask (non-zero = valid)."""
  return (jnp.asarray(mask) != 0).astype(dtype)


# ---------------------------------------------------------------------------
# Single-distribution quantities and KL.


def _kl_from_log_probs(log_p: chex.Array, log_q: chex.Array, axis: int = -1) -> chex.Array:
  """Σ_v p_v (log p_v − log q_v) from finite log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis)


def kl_from_logits(p_logits: chex.Array, q_logits: chex.Array, axis: int = -1) -> chex.Array:
  """Exact KL divergence KL(P ‖ Q) between two categorical distributions.

  ``KL(P ‖ Q) = Σ_v P(v) (log P(v) − log Q(v))``, ``P = softmax(p_logits)``,
  ``Q = softmax(q_logits)``, summed over the whole vocabulary (no sampling),
  elementwise over the other axes.

  Args:
    p_logits: ``[..., V]`` logits of P (the distribution the expectation is under).
    q_logits: ``[..., V]`` logits of Q, same shape as ``p_logits``.
    axis: the vocabulary axis.

  Returns:
    ``[...]`` KL values (>= 0 up to rounding), the dtype of the logits.

  References:
    DESIGN.md §2 ("exact over the vocabulary"), §5.3 (``KL_t``).
  """
  chex.assert_equal_shape(
      [p_logits, q_logits], custom_message="p_logits and q_logits must have the same shape")
  log_p = jax.nn.log_softmax(p_logits, axis=axis)
  log_q = jax.nn.log_softmax(q_logits, axis=axis)
  return _kl_from_log_probs(log_p, log_q, axis=axis)


def entropy_from_logits(logits: chex.Array, axis: int = -1) -> chex.Array:
  """Shannon entropy H(P) = −Σ_v P(v) log P(v), P = softmax(logits).

  Args:
    logits: ``[..., V]`` logits.
    axis: the vocabulary axis.

  Returns:
    ``[...]`` entropies in nats, in ``[0, log V]``.

  References:
    DESIGN.md §4.
  """
  log_p = jax.nn.log_softmax(logits, axis=axis)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=axis)


# ---------------------------------------------------------------------------
# K-way JSD (DESIGN.md §4).


def multi_jsd(logits: chex.Array, latent_axis: int = 0) -> chex.Array:
  """K-way generalised Jensen–Shannon divergence with uniform weights.

  ``JSD = H(M) − (1/K) Σ_k H(P_k) = (1/K) Σ_k KL(P_k ‖ M)``,
  ``M = (1/K) Σ_k P_k``, with ``P_k = softmax(logits[k])`` over the last axis.
  ``log M = logsumexp_k(log P_k) − log K``; the value is computed in the
  (algebraically identical) mean-KL-to-the-mixture form, a sum of
  non-negative terms. ``0 <= JSD <= log K`` (up to rounding).

  Args:
    logits: ``[..., V]`` logits with the K latents along ``latent_axis``
      (e.g. ``[K, T, V]`` with ``latent_axis=0``). The last axis is the
      vocabulary and cannot be the latent axis.
    latent_axis: the axis holding the K distributions being compared.

  Returns:
    The JSD for every position: ``logits.shape`` without ``latent_axis`` and
    without the vocabulary axis (``[T]`` for ``[K, T, V]`` input).

  References:
    DESIGN.md §4; Lin (1991), "Divergence measures based on the Shannon entropy".
  """
  ndim = jnp.ndim(logits)
  if ndim < 2:
    raise ValueError(f"logits must have rank >= 2 ([..., K, ..., V]), got shape {jnp.shape(logits)}.")
  latent_axis = latent_axis % ndim
  if latent_axis == ndim - 1:
    raise ValueError("latent_axis must not be the last (vocabulary) axis of logits.")
  num_latents = logits.shape[latent_axis]
  log_p = jax.nn.log_softmax(logits, axis=-1)
  log_m = jax.nn.logsumexp(log_p, axis=latent_axis, keepdims=True) - math.log(num_latents)
  kl_k = _kl_from_log_probs(log_p, log_m, axis=-1)  # [..K..], KL(P_k ‖ M)
  return jnp.mean(kl_k, axis=latent_axis)


# ---------------------------------------------------------------------------
# Two-distribution generalised JSD_β (DESIGN.md §4) and GKD (§6).


def _log_weights(beta, dtype):
  """(log β, log(1−β)) with −inf at the endpoints and no log(0) evaluated."""
  beta = jnp.asarray(beta, dtype)
  log_beta = jnp.where(beta > 0, jnp.log(jnp.where(beta > 0, beta, 1.0)), -jnp.inf)
  log_1mbeta = jnp.where(beta < 1, jnp.log1p(-jnp.where(beta < 1, beta, 0.0)), -jnp.inf)
  return log_beta, log_1mbeta


def _generalized_jsd_from_log_probs(log_p, log_q, beta, axis=-1):
  """β KL(P‖M) + (1−β) KL(Q‖M) from log-probabilities (see ``generalized_jsd``)."""
  beta = jnp.asarray(beta, log_p.dtype)
  # β enters log M only through a stop-gradient: the omitted term of dJSD/dβ
  # is −Σ_v M_v ∂log M_v/∂β = −∂(Σ_v M_v)/∂β = 0 identically, so the
  # β-gradient stays exact, and no 1/β (= inf at β = 0) is ever formed.
  log_beta, log_1mbeta = _log_weights(jax.lax.stop_gradient(beta), log_p.dtype)
  log_m = jnp.logaddexp(log_p + log_beta, log_q + log_1mbeta)
  kl_p_m = _kl_from_log_probs(log_p, log_m, axis=axis)
  kl_q_m = _kl_from_log_probs(log_q, log_m, axis=axis)
  return beta * kl_p_m + (1.0 - beta) * kl_q_m


def generalized_jsd(p_logits: chex.Array, q_logits: chex.Array, beta,
                    temperature=1.0) -> chex.Array:
  """Generalised Jensen–Shannon divergence JSD_β(P, Q), continuous in β.

  ``JSD_β(P, Q) = β KL(P ‖ M) + (1−β) KL(Q ‖ M)``, ``M = β P + (1−β) Q``,
  with ``P = softmax(p_logits / temperature)``, ``Q = softmax(q_logits /
  temperature)``. ``log M = logaddexp(log β + log P, log(1−β) + log Q)``.

  β = ½ is the symmetric JSD (in ``[0, log 2]``). The definition is kept at
  the endpoints: JSD_0 = JSD_1 = 0 exactly, with finite gradients, and
  ``JSD_β/β → KL(P‖Q)`` as β → 0, ``JSD_β/(1−β) → KL(Q‖P)`` as β → 1. Those
  two KLs are ``forward_kl`` and ``reverse_kl``. (TRL's GKD instead switches
  to the plain KLs at exactly β = 0 and β = 1 — a discontinuity; see
  ``opd.gkd_loss``.) In GKD-style distillation P is the teacher, Q the student.

  Args:
    p_logits: ``[..., V]`` logits of P.
    q_logits: ``[..., V]`` logits of Q, same shape.
    beta: mixing weight in ``[0, 1]`` (Python float or scalar array; its
      gradient is exact, including at the endpoints).
    temperature: > 0; both logits are divided by it first.

  Returns:
    ``[...]`` JSD_β values, in ``[0, h(β)]`` with h the binary entropy.

  References:
    DESIGN.md §4, §5.4, §6; Agarwal et al. (2024), "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes", Eq. (1).
  """
  chex.assert_equal_shape(
      [p_logits, q_logits], custom_message="p_logits and q_logits must have the same shape")
  _check_beta(beta)
  _check_temperature(temperature)
  log_p = jax.nn.log_softmax(p_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(q_logits / temperature, axis=-1)
  return _generalized_jsd_from_log_probs(log_p, log_q, beta)


def forward_kl(p_logits: chex.Array, q_logits: chex.Array, temperature=1.0) -> chex.Array:
  """Forward KL(P ‖ Q), the β → 0 limit of JSD_β(P, Q)/β.

  With P the teacher and Q the student (GKD), this is the mass-covering
  distillation loss ``Σ_v P(v) log(P(v)/Q(v))``.

  Args:
    p_logits: ``[..., V]`` logits of P.
    q_logits: ``[..., V]`` logits of Q, same shape.
    temperature: > 0; both logits are divided by it first.

  Returns:
    ``[...]`` KL(P ‖ Q).

  References:
    DESIGN.md §4.
  """
  _check_temperature(temperature)
  return kl_from_logits(p_logits / temperature, q_logits / temperature)


def reverse_kl(p_logits: chex.Array, q_logits: chex.Array, temperature=1.0) -> chex.Array:
  """Reverse KL(Q ‖ P), the β → 1 limit of JSD_β(P, Q)/(1−β).

  With P the teacher and Q the student (GKD), this is the mode-seeking
  distillation loss ``Σ_v Q(v) log(Q(v)/P(v))``.

  Args:
    p_logits: ``[..., V]`` logits of P.
    q_logits: ``[..., V]`` logits of Q, same shape.
    temperature: > 0; both logits are divided by it first.

  Returns:
    ``[...]`` KL(Q ‖ P).

  References:
    DESIGN.md §4, §6.
  """
  return forward_kl(q_logits, p_logits, temperature)


# ---------------------------------------------------------------------------
# Token weighting and the token-weighted JSD (DESIGN.md §4).


def token_weights(kind: str, mask_T: chex.Array, jsd_T: chex.Array | None = None,
                  prefix_len=None, weight_temperature=0.1) -> chex.Array:
  """Non-negative token weights w_t for the token-weighted JSD Ĵ.

  Kinds (all zero at masked positions; all stop-gradient):

  * ``"uniform"``: ``w_t = 1`` at valid tokens.
  * ``"prefix"``: ``w_t = 1`` at the first ``prefix_len`` valid tokens (the
    rollout prefix L of DESIGN.md §5), 0 after.
  * ``"divergence"``: emphasises strategy-sensitive positions, where the
    latents disagree: ``w_t = n · softmax_t(JSD_t / weight_temperature)`` over the
    valid positions (over the first ``prefix_len`` of them if given), n their
    number — so the weights average 1 over valid tokens like ``"uniform"``,
    tend to it as weight_temperature → ∞, and concentrate on the most divergent
    position as weight_temperature → 0. With JSD ∈ [0, log K], the default 0.1 gives
    ratios up to K^10 between positions. The weights go through
    ``jax.lax.stop_gradient``: Ĵ's gradient is that of a fixed weighted mean,
    so the model cannot raise Ĵ by moving weight rather than divergence.

  Args:
    kind: one of ``WEIGHTINGS``.
    mask_T: ``[..., T]`` mask, non-zero = valid position.
    jsd_T: ``[..., T]`` per-position divergences (required for
      ``"divergence"``).
    prefix_len: L, required for ``"prefix"``, optional for ``"divergence"``
      (int or integer scalar array).
    weight_temperature: > 0, the softmax temperature over POSITIONS of
      ``"divergence"`` (not a temperature of the model's logits).

  Returns:
    ``[..., T]`` weights of the mask's shape, float (the dtype of ``jsd_T``,
    else float32).

  References:
    DESIGN.md §4 (token-weighted JSD), §5.4 (JSD control variate over the
    first L positions).
  """
  if kind not in WEIGHTINGS:
    raise ValueError(f"kind must be one of {WEIGHTINGS}, got {kind!r}.")
  if jnp.ndim(mask_T) < 1:
    raise ValueError(f"mask_T must have rank >= 1 ([..., T]), got shape {jnp.shape(mask_T)}.")
  dtype = jnp.result_type(jsd_T) if jsd_T is not None else jnp.float32
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  valid = _as_float_mask(mask_T, dtype)
  if kind == "prefix" and prefix_len is None:
    raise ValueError("prefix_len is required for kind='prefix'.")
  if prefix_len is not None:
    if isinstance(prefix_len, numbers.Integral) and prefix_len < 0:
      raise ValueError(f"prefix_len must be >= 0, got {prefix_len!r}.")
    # Position of each valid token among the valid tokens, 1-based.
    rank_t = jnp.cumsum(valid, axis=-1)
    valid = valid * (rank_t <= jnp.asarray(prefix_len).astype(dtype)).astype(dtype)
  if kind in ("uniform", "prefix"):
    return valid
  # kind == "divergence"
  if jsd_T is None:
    raise ValueError("jsd_T is required for kind='divergence'.")
  chex.assert_equal_shape([mask_T, jsd_T], custom_message="mask_T and jsd_T must have the same shape")
  _check_temperature(weight_temperature, "weight_temperature")
  is_valid = valid > 0
  z = jnp.where(is_valid, jsd_T / weight_temperature, 0.0)
  z_max = jnp.max(jnp.where(is_valid, z, -jnp.inf), axis=-1, keepdims=True)
  z_max = jnp.where(jnp.isfinite(z_max), z_max, 0.0)
  e = jnp.where(is_valid, jnp.exp(z - z_max), 0.0)
  num_valid = jnp.sum(valid, axis=-1, keepdims=True)
  weights = num_valid * e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), _TINY)
  return jax.lax.stop_gradient(weights)


def weighted_mean(values_T: chex.Array, weights_T: chex.Array) -> chex.Array:
  """Weighted mean over the last axis, 0 where all weights are 0.

  ``mean = Σ_t w_t v_t / max(Σ_t w_t, tiny)``; positions with ``w_t = 0``
  contribute exactly 0 whatever ``v_t`` holds (even inf/NaN), with zero
  gradient.

  Args:
    values_T: ``[..., T]`` values.
    weights_T: ``[..., T]`` non-negative weights, same shape.

  Returns:
    ``[...]`` weighted means.

  References:
    DESIGN.md §4 (``Ĵ = Σ_t w_t JSD_t / Σ_t w_t``).
  """
  chex.assert_equal_shape([values_T, weights_T],
                          custom_message="values_T and weights_T must have the same shape")
  weights_T = weights_T.astype(jnp.result_type(values_T, weights_T))
  active = weights_T > 0
  safe_values = jnp.where(active, values_T, 0.0)
  numerator = jnp.sum(jnp.where(active, weights_T * safe_values, 0.0), axis=-1)
  return numerator / jnp.maximum(jnp.sum(weights_T, axis=-1), _TINY)


def jsd_to_go(jsd_T: chex.Array, weights_T: chex.Array) -> chex.Array:
  """Weighted divergence to go, ``Σ_{t' >= t} w_t' JSD_t'`` along the last axis.

  Times a fitted scalar c this is the per-position JSD control variate
  ``b(c_t) = c · Σ_{t'>=t} w_t' JSD_t'`` of the to-go estimators; computed on
  the teacher-forced data prefix, it does not depend on the sample.

  Args:
    jsd_T: ``[..., T]`` per-position divergences (e.g. ``jsd_t`` of
      ``pairwise_token_jsd``, ``[K, K, T]``).
    weights_T: ``[..., T]`` token weights, same shape.

  Returns:
    ``[..., T]`` reverse cumulative sums (unnormalised).

  References:
    DESIGN.md §5.4.
  """
  chex.assert_equal_shape([jsd_T, weights_T], custom_message="jsd_T and weights_T must have the same shape")
  terms = jnp.where(weights_T > 0, weights_T * jsd_T, 0.0)
  return jax.lax.cumsum(terms, axis=terms.ndim - 1, reverse=True)


class TokenJSD(NamedTuple):
  """Output of ``token_jsd`` for one example.

  Attributes:
    value: scalar Ĵ = Σ_t w_t JSD_t / Σ_t w_t.
    jsd_t: ``[T]`` K-way JSD per position (0 at masked positions).
    weights_t: ``[T]`` the (stop-gradient) weights w_t.
  """
  value: chex.Array
  jsd_t: chex.Array
  weights_t: chex.Array


class PairwiseTokenJSD(NamedTuple):
  """Output of ``pairwise_token_jsd`` for one example.

  Attributes:
    value: ``[K, K]`` token-weighted symmetric JSD for every latent pair
      (symmetric, zero diagonal).
    jsd_t: ``[K, K, T]`` per-position symmetric JSD (0 on the diagonal and at
      masked positions).
    weights_t: ``[K, K, T]`` the (stop-gradient) weights of each pair.
  """
  value: chex.Array
  jsd_t: chex.Array
  weights_t: chex.Array


def _check_latent_logits(logits_KxTxV, mask_T):
  chex.assert_rank(logits_KxTxV, 3, custom_message="logits_KxTxV must be [latents, time, vocab]")
  chex.assert_rank(mask_T, 1, custom_message="mask_T must be [time]")
  chex.assert_axis_dimension(logits_KxTxV, 1, mask_T.shape[0],
                             custom_message="logits_KxTxV.shape[1] must equal len(mask_T)")


def token_jsd(logits_KxTxV: chex.Array, mask_T: chex.Array, weighting: str = "uniform",
              prefix_len=None, weight_temperature=0.1) -> TokenJSD:
  """Token-weighted K-way JSD Ĵ of one teacher-forced example.

  ``JSD_t = H(M_t) − (1/K) Σ_k H(P_{k,t})`` at every position (``multi_jsd``),
  then ``Ĵ = Σ_t w_t JSD_t / Σ_t w_t`` with ``w = token_weights(weighting,
  mask_T, JSD, prefix_len, weight_temperature)``. The training loss uses
  ``L_rec − λ_jsd · Ĵ``. An example with no valid position gives Ĵ = 0 with
  zero gradient.

  Batch with vmap, the string option bound first::

    fn = functools.partial(token_jsd, weighting="prefix", prefix_len=L)
    out = jax.vmap(fn)(logits_BxKxTxV, mask_BxT)  # out.value: [B]

  Args:
    logits_KxTxV: ``[K, T, V]`` teacher-forced logits of the K latents.
    mask_T: ``[T]`` mask, non-zero = valid position.
    weighting: one of ``WEIGHTINGS`` (see ``token_weights``).
    prefix_len: L for ``"prefix"`` (and optionally ``"divergence"``).
    weight_temperature: softmax temperature over positions of the ``"divergence"``
      weighting (not a logits temperature).

  Returns:
    ``TokenJSD(value [], jsd_t [T], weights_t [T])``.

  References:
    DESIGN.md §4.
  """
  _check_latent_logits(logits_KxTxV, mask_T)
  valid = jnp.asarray(mask_T) != 0
  jsd_t = jnp.where(valid, multi_jsd(logits_KxTxV, latent_axis=0), 0.0)
  weights_t = token_weights(weighting, mask_T, jsd_t, prefix_len, weight_temperature)
  return TokenJSD(weighted_mean(jsd_t, weights_t), jsd_t, weights_t)


def pairwise_token_jsd(logits_KxTxV: chex.Array, mask_T: chex.Array, weighting: str = "uniform",
                       prefix_len=None, weight_temperature=0.1) -> PairwiseTokenJSD:
  """Token-weighted symmetric JSD between every pair of latents of one example.

  ``JSD_t(i, j) = JSD_½(P_{i,t}, P_{j,t})`` (``generalized_jsd`` at β = ½),
  ``Ĵ(i, j) = Σ_t w_t(i,j) JSD_t(i,j) / Σ_t w_t(i,j)``. For ``"uniform"`` and
  ``"prefix"`` the weights are shared by all pairs; for ``"divergence"`` each
  pair is weighted by its own ``JSD_t(i, j)``. ``Ĵ_L(x, i, j)`` with
  ``weighting="prefix", prefix_len=L`` is the JSD control variate of
  DESIGN.md §5.4; its per-position form ``c · Σ_{t'>=t} w_t' JSD_t'`` is
  ``jsd_to_go(out.jsd_t, out.weights_t)``. The JSD is symmetric, so it is
  computed for the K(K−1)/2 unordered pairs i < j only and mirrored: time and
  memory O(K(K−1)/2 · T · V), against O(K² T V) for every ordered pair.

  Args:
    logits_KxTxV: ``[K, T, V]`` teacher-forced logits of the K latents.
    mask_T: ``[T]`` mask, non-zero = valid position.
    weighting: one of ``WEIGHTINGS`` (see ``token_weights``).
    prefix_len: L for ``"prefix"`` (and optionally ``"divergence"``).
    weight_temperature: softmax temperature over positions of the ``"divergence"``
      weighting (not a logits temperature).

  Returns:
    ``PairwiseTokenJSD(value [K, K], jsd_t [K, K, T], weights_t [K, K, T])``;
    ``value`` is symmetric with an exactly zero diagonal.

  References:
    DESIGN.md §4, §5.4.
  """
  _check_latent_logits(logits_KxTxV, mask_T)
  num_latents, time, _ = logits_KxTxV.shape
  log_p = jax.nn.log_softmax(logits_KxTxV, axis=-1)
  first, second = np.triu_indices(num_latents, k=1)  # The pairs i < j (static).
  jsd_pt = _generalized_jsd_from_log_probs(log_p[first], log_p[second], 0.5)  # [pairs, T]
  jsd_kkt = jnp.zeros((num_latents, num_latents, time), jsd_pt.dtype)
  jsd_kkt = jsd_kkt.at[first, second].set(jsd_pt).at[second, first].set(jsd_pt)
  off_diagonal = ~jnp.eye(num_latents, dtype=bool)
  valid = jnp.asarray(mask_T) != 0
  jsd_kkt = jnp.where(valid[None, None, :], jsd_kkt, 0.0)
  mask_kkt = jnp.broadcast_to(jnp.asarray(mask_T)[None, None, :], (num_latents, num_latents, time))
  weights_kkt = token_weights(weighting, mask_kkt, jsd_kkt, prefix_len, weight_temperature)
  value_kk = jnp.where(off_diagonal, weighted_mean(jsd_kkt, weights_kkt), 0.0)
  return PairwiseTokenJSD(value_kk, jsd_kkt, weights_kkt)
