"""Exact-enumeration correctness oracle (DESIGN.md §7).

For a tiny vocabulary V and length L every one of the V^L sequences can be
enumerated, so the distribution of a model over sequences, the sequence KL and
its gradient are computed exactly, never by sampling. The exact mean and
variance of the library's estimators over this enumeration are in
``latentdiv/moments.py``; the oracle also draws exact samples (to check the
Monte-Carlo machinery and the rollout sampler by a chi-square test) and
provides a fully tabular model on which no estimator bias can hide.

Models are pure functions. An inter-latent model is
``logits_fn(params, tokens_NxL, latent) -> logits_NxLxV`` where
``logits[:, t]`` are the next-token logits of y_t given y_<t (teacher forced;
the function closes over the prompt x). OPD takes a student and a teacher
``fn(params, tokens_NxL) -> logits_NxLxV`` (a latent model at a fixed latent:
:func:`bind`). Any Flax model fits after ``lambda p, y, k: model.apply(p, x, y, k)``.

Tokens are the model's raw ids 0..V−1; the oracle enumerates all of them.
With ``eos_id`` given, an output ends at its first EOS (EOS itself is scored);
the positions after it are masked (``KL_t = 0`` there) and every truncated
sequence is counted exactly once: only its canonical representative, with
``pad_id`` at every position after EOS, gets weight, and its probability is
the product of the scored steps. Models must be causal (logits at t depend on
y_<t only), so the filler never changes a scored position.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = chex.Array
PyTree = Any
LogitsFn = Callable[[PyTree, Array, Any], Array]

MAX_SEQUENCES = 1 << 20
"""Most sequences (or groups of sequences) the oracle enumerates."""

# ----------------------------------------------------------------------------
# Enumeration.
# ----------------------------------------------------------------------------


def num_sequences(vocab_size: int, length: int, group_size: int = 1) -> int:
  """``V^L``, after checking that groups of ``group_size`` can be enumerated.

  Args:
    vocab_size: V ≥ 2.
    length: L ≥ 1.
    group_size: N ≥ 1; the enumeration has (V^L)^N groups of N sequences.

  Returns:
    V^L.

  Raises:
    ValueError: V < 2, L < 1, N < 1 or (V^L)^N above :data:`MAX_SEQUENCES`.

  References:
    DESIGN.md §7.
  """
  if vocab_size < 2 or length < 1 or group_size < 1:
    raise ValueError(
        f"Need vocab_size >= 2, length >= 1 and group_size >= 1; got "
        f"{vocab_size}, {length}, {group_size}.")
  num = vocab_size**length
  if num**group_size > MAX_SEQUENCES:
    groups = {1: "", 2: " in pairs"}.get(group_size,
                                         f" in groups of {group_size}")
    raise ValueError(
        f"V^L = {vocab_size}^{length} = {num} sequences is too many to "
        f"enumerate{groups} (limit {MAX_SEQUENCES}).")
  return num


def all_sequences(vocab_size: int, length: int) -> Array:
  """Every sequence of ``length`` tokens over ``vocab_size`` ids.

  Row ``n`` is the base-V expansion of n, y_1 most significant (so rows are
  in lexicographic order; :func:`sequence_index` inverts it).

  Args:
    vocab_size: V ≥ 2.
    length: L ≥ 1.

  Returns:
    [V^L, L] int32.

  Raises:
    ValueError: V < 2, L < 1 or V^L above ``MAX_SEQUENCES``.

  References:
    DESIGN.md §7.
  """
  num = num_sequences(vocab_size, length)
  digits = np.stack(
      np.unravel_index(np.arange(num), (vocab_size,) * length), axis=-1)
  return jnp.asarray(digits, jnp.int32)


def sequence_index(tokens_NxL: Array, vocab_size: int) -> Array:
  """Row of each sequence in :func:`all_sequences` (base-V number).

  ``index = Σ_t y_t V^(L−t)`` (y_1 most significant).

  Args:
    tokens_NxL: [N, L] int tokens in 0..V−1.
    vocab_size: V.

  Returns:
    [N] int32 indices.
  """
  chex.assert_rank(tokens_NxL, 2, custom_message="argument: tokens_NxL",
                   exception_type=ValueError)
  length = tokens_NxL.shape[1]
  powers_L = jnp.asarray(vocab_size**np.arange(length - 1, -1, -1), jnp.int32)
  return jnp.sum(tokens_NxL.astype(jnp.int32) * powers_L[None, :], axis=-1)


def truncation_mask(tokens_NxL: Array, eos_id: Optional[int] = None, pad_id: int = 0):
  """Scored positions and canonical representatives under EOS truncation.

  ``mask[n, t] = 1`` iff no EOS occurs strictly before t (EOS itself is
  scored). ``canonical[n]`` is True iff every unscored position holds
  ``pad_id``: each truncated sequence has exactly one canonical row. Without
  ``eos_id`` every position is scored and every row is canonical.

  Args:
    tokens_NxL: [N, L] int tokens.
    eos_id: end-of-sequence id, or None for fixed-length sequences.
    pad_id: filler id expected after EOS.

  Returns:
    (mask [N, L] float32 of 0/1, canonical [N] bool).

  References:
    DESIGN.md §6 (positions after EOS are masked), §7.
  """
  chex.assert_rank(tokens_NxL, 2, custom_message="argument: tokens_NxL",
                   exception_type=ValueError)
  if eos_id is None:
    return (jnp.ones(tokens_NxL.shape, jnp.float32),
            jnp.ones(tokens_NxL.shape[:1], bool))
  is_eos = (tokens_NxL == eos_id).astype(jnp.int32)
  eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos
  scored = eos_before == 0
  canonical = jnp.all(scored | (tokens_NxL == pad_id), axis=-1)
  return scored.astype(jnp.float32), canonical


def _step_log_probs(fn, params, tokens_NxL):
  logits_NxLxV = fn(params, tokens_NxL)
  msg = "the model's logits_NxLxV must be [N, L, V] for tokens_NxL [N, L]"
  chex.assert_rank(logits_NxLxV, 3, custom_message=msg,
                   exception_type=ValueError)
  chex.assert_equal_shape_prefix([logits_NxLxV, tokens_NxL], 2,
                                 custom_message=msg,
                                 exception_type=ValueError)
  return jax.nn.log_softmax(logits_NxLxV, axis=-1)


def _sequence_log_probs(fn, params, tokens_NxL, mask_NxL):
  """Σ_t mask_t log p(y_t|c_t) for every row (finite, differentiable)."""
  logp_NxLxV = _step_log_probs(fn, params, tokens_NxL)
  logp_NxL = jnp.take_along_axis(logp_NxLxV, tokens_NxL[..., None],
                                 axis=-1)[..., 0]
  return jnp.sum(logp_NxL * mask_NxL.astype(logp_NxL.dtype), axis=-1)


def _enumerate(vocab_size, length, eos_id, pad_id):
  tokens = all_sequences(vocab_size, length)
  mask, canonical = truncation_mask(tokens, eos_id, pad_id)
  return tokens, mask, canonical


def bind(logits_fn: LogitsFn, latent: Any) -> Callable[[PyTree, Array], Array]:
  """``(params, tokens_NxL) -> logits`` of a latent model at a fixed latent."""
  return lambda params, tokens: logits_fn(params, tokens, latent)


def exact_step_log_probs(logits_fn: LogitsFn, params: PyTree, latent: Any,
                         vocab_size: int, length: int) -> Array:
  """Full next-token log-distributions at every context of every sequence.

  Args:
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: model parameters.
    latent: latent index k.
    vocab_size: V (the model's full vocabulary).
    length: L.

  Returns:
    [V^L, L, V] ``log p_k(v | y_<t)`` for row y of :func:`all_sequences`.

  References:
    DESIGN.md §7.
  """
  tokens = all_sequences(vocab_size, length)
  logp = _step_log_probs(bind(logits_fn, latent), params, tokens)
  chex.assert_shape(logp, (tokens.shape[0], length, vocab_size),
                    custom_message="logits_fn's vocabulary must be V",
                    exception_type=ValueError)
  return logp


def exact_sequence_logprobs(logits_fn: LogitsFn, params: PyTree, latent: Any,
                            vocab_size: int, length: int,
                            eos_id: Optional[int] = None, pad_id: int = 0) -> Array:
  """``log p_k(y)`` for every sequence y of :func:`all_sequences`.

  ``log p_k(y) = Σ_t mask_t log p_k(y_t | y_<t)``; −inf for rows that are not
  the canonical representative of their EOS-truncated sequence, so
  ``logsumexp`` of the result is 0.

  Args:
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: model parameters.
    latent: latent index k.
    vocab_size: V.
    length: L.
    eos_id: optional EOS id (see :func:`truncation_mask`).
    pad_id: filler after EOS.

  Returns:
    [V^L] log-probabilities.

  References:
    DESIGN.md §7.
  """
  tokens, mask, canonical = _enumerate(vocab_size, length, eos_id, pad_id)
  logp = _sequence_log_probs(bind(logits_fn, latent), params, tokens, mask)
  return jnp.where(canonical, logp, -jnp.inf)


def _exact_kl(fn_p, params_p, fn_q, params_q, vocab_size, length, eos_id,
              pad_id):
  tokens, mask, canonical = _enumerate(vocab_size, length, eos_id, pad_id)
  logp = _sequence_log_probs(fn_p, params_p, tokens, mask)
  logq = _sequence_log_probs(fn_q, params_q, tokens, mask)
  prob = jnp.where(canonical, jnp.exp(logp), 0.0)
  return jnp.sum(prob * (logp - logq))


def exact_kl(logits_fn: LogitsFn, params: PyTree, i: Any, j: Any, vocab_size: int,
             length: int, eos_id: Optional[int] = None, pad_id: int = 0) -> Array:
  """Exact sequence-level inter-latent KL by enumeration.

  ``D_ij = Σ_y p_i(y) (log p_i(y) − log p_j(y))`` over all V^L sequences
  (canonical EOS-truncated ones when ``eos_id`` is given).

  Args:
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: model parameters.
    i: latent of the sampling distribution.
    j: latent of the target distribution.
    vocab_size: V.
    length: L.
    eos_id: optional EOS id.
    pad_id: filler after EOS.

  Returns:
    Scalar D_ij, differentiable in params.

  References:
    DESIGN.md §5.1, §7.
  """
  return _exact_kl(bind(logits_fn, i), params, bind(logits_fn, j), params,
                   vocab_size, length, eos_id, pad_id)


def exact_kl_grad(logits_fn: LogitsFn, params: PyTree, i: Any, j: Any,
                  vocab_size: int, length: int, eos_id: Optional[int] = None,
                  pad_id: int = 0) -> PyTree:
  """``∇_params D_ij`` by ``jax.grad`` through the enumeration.

  Args and References as :func:`exact_kl`; returns a pytree like params, the
  exact gradient ∇D_ij (through both p_i and p_j).

  References:
    DESIGN.md §5.2, §7.
  """
  return jax.grad(lambda p: exact_kl(logits_fn, p, i, j, vocab_size, length,
                                     eos_id, pad_id))(params)


def exact_opd_kl(student_fn: Callable, student_params: PyTree, teacher_fn: Callable,
                 teacher_params: PyTree, vocab_size: int, length: int,
                 eos_id: Optional[int] = None, pad_id: int = 0) -> Array:
  """Exact sequence reverse KL ``KL(π(y) ‖ q(y))`` of student to teacher.

  Args:
    student_fn: ``(params, tokens_NxL) -> logits_NxLxV`` of the student π.
    student_params: its parameters.
    teacher_fn: same signature, the frozen teacher q.
    teacher_params: its parameters.
    vocab_size: V.
    length: L.
    eos_id: optional EOS id (positions after EOS masked).
    pad_id: filler after EOS.

  Returns:
    Scalar KL(π ‖ q).

  References:
    DESIGN.md §6, §7.
  """
  return _exact_kl(student_fn, student_params, teacher_fn,
                   jax.lax.stop_gradient(teacher_params), vocab_size, length,
                   eos_id, pad_id)


def exact_opd_kl_grad(student_fn: Callable, student_params: PyTree,
                      teacher_fn: Callable, teacher_params: PyTree, vocab_size: int,
                      length: int, eos_id: Optional[int] = None,
                      pad_id: int = 0) -> PyTree:
  """``∇_student KL(π ‖ q)`` by ``jax.grad`` through the enumeration.

  Args as :func:`exact_opd_kl`; returns a pytree like student_params.

  References:
    DESIGN.md §6, §7.
  """
  return jax.grad(lambda p: exact_opd_kl(student_fn, p, teacher_fn,
                                         teacher_params, vocab_size, length,
                                         eos_id, pad_id))(student_params)


def exact_mutual_information(logits_fn: LogitsFn, params: PyTree, num_latents: int,
                             vocab_size: int, length: int, eos_id: Optional[int] = None,
                             pad_id: int = 0) -> Array:
  """Exact ``I(Z; Y | x)`` under a uniform prior over the K latents, by enumeration.

  ``I = (1/K) Σ_k Σ_y p_k(y) (log p_k(y) − log p̄(y))``, ``p̄ = (1/K) Σ_j p_j``,
  over all V^L sequences (canonical EOS-truncated ones when ``eos_id`` is
  given); 0 ≤ I ≤ log K.

  Args:
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: model parameters.
    num_latents: K (latents 0..K−1).
    vocab_size: V.
    length: L.
    eos_id: optional EOS id.
    pad_id: filler after EOS.

  Returns:
    Scalar I in nats, differentiable in params.

  References:
    DESIGN.md §5.6, §7.
  """
  tokens, mask, canonical = _enumerate(vocab_size, length, eos_id, pad_id)
  logp_KxS = jnp.stack([_sequence_log_probs(bind(logits_fn, k), params, tokens, mask)
                        for k in range(num_latents)])
  log_mix_S = jax.nn.logsumexp(logp_KxS, axis=0) - np.log(num_latents)
  prob_KxS = jnp.where(canonical[None], jnp.exp(logp_KxS), 0.0)
  return jnp.sum(prob_KxS * (logp_KxS - log_mix_S[None])) / num_latents


def exact_mutual_information_grad(logits_fn: LogitsFn, params: PyTree, num_latents: int,
                                  vocab_size: int, length: int, eos_id: Optional[int] = None,
                                  pad_id: int = 0) -> PyTree:
  """``∇_params I(Z; Y | x)`` by ``jax.grad`` through :func:`exact_mutual_information`.

  References:
    DESIGN.md §5.6, §7.
  """
  return jax.grad(lambda p: exact_mutual_information(
      logits_fn, p, num_latents, vocab_size, length, eos_id, pad_id))(params)


# ----------------------------------------------------------------------------
# Sampling and small helpers.
# ----------------------------------------------------------------------------


def sample_sequences(key: Array, logits_fn: LogitsFn, params: PyTree, latent: Any,
                     vocab_size: int, length: int, num_samples: int,
                     eos_id: Optional[int] = None, pad_id: int = 0):
  """Exact i.i.d. samples from p_k(y) by a categorical over the enumeration.

  Args:
    key: PRNG key.
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: model parameters.
    latent: latent k.
    vocab_size: V.
    length: L.
    num_samples: n.
    eos_id: optional EOS id (samples are canonical: pad after EOS).
    pad_id: filler after EOS.

  Returns:
    (tokens [n, L] int32, mask [n, L] float32).

  References:
    DESIGN.md §7 (Monte-Carlo checks, sampler chi-square test).
  """
  logp = jax.lax.stop_gradient(
      exact_sequence_logprobs(logits_fn, params, latent, vocab_size, length,
                              eos_id, pad_id))
  index = jax.random.categorical(key, logp, shape=(num_samples,))
  tokens = all_sequences(vocab_size, length)[index]
  mask, _ = truncation_mask(tokens, eos_id, pad_id)
  return tokens, mask


def chi_square_statistic(counts_M: Array, probs_M: Array):
  """Pearson chi-square statistic of observed counts vs exact probabilities.

  ``X² = Σ_{m: p_m>0} (O_m − n p_m)² / (n p_m)`` with ``n = Σ O_m`` and
  ``dof = #{m: p_m > 0} − 1``. Counts in cells with p_m = 0 make X² = inf.

  Args:
    counts_M: [M] observed counts (e.g. ``bincount(sequence_index(...))``).
    probs_M: [M] exact probabilities (sum 1).

  Returns:
    (statistic scalar, dof int32 scalar).

  References:
    DESIGN.md §7 (sampler check).
  """
  msg = "arguments: counts_M, probs_M"
  chex.assert_rank([counts_M, probs_M], 1, custom_message=msg,
                   exception_type=ValueError)
  chex.assert_equal_shape([counts_M, probs_M], custom_message=msg,
                          exception_type=ValueError)
  counts = counts_M.astype(probs_M.dtype)
  n = jnp.sum(counts)
  expected = n * probs_M
  positive = probs_M > 0
  terms = jnp.where(positive, (counts - expected)**2 /
                    jnp.where(positive, expected, 1.0), 0.0)
  impossible = jnp.any((~positive) & (counts > 0))
  stat = jnp.where(impossible, jnp.inf, jnp.sum(terms))
  dof = jnp.sum(positive).astype(jnp.int32) - 1
  return stat, dof


def relative_error(a_tree: PyTree, b_tree: PyTree) -> Array:
  """``‖a − b‖ / ‖b‖`` with global L2 norms over two same-structure pytrees.

  Args:
    a_tree: estimate.
    b_tree: reference (if ‖b‖ = 0 the result is ‖a − b‖ / tiny: huge unless
      a = b).

  Returns:
    Scalar relative error.
  """
  chex.assert_trees_all_equal_shapes(a_tree, b_tree,
                                     custom_message="a_tree, b_tree",
                                     exception_type=ValueError)
  diff = sum(jnp.sum((x - y)**2) for x, y in zip(
      jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))
  ref = sum(jnp.sum(y**2) for y in jax.tree.leaves(b_tree))
  tiny = jnp.finfo(jnp.result_type(ref)).tiny
  return jnp.sqrt(diff) / jnp.maximum(jnp.sqrt(ref), tiny)


# ----------------------------------------------------------------------------
# A tabular model: one logit vector per (latent, prefix).
# ----------------------------------------------------------------------------


def num_contexts(vocab_size: int, length: int) -> int:
  """Number of prefixes of length 0..L−1: ``(V^L − 1)/(V − 1)``."""
  return sum(vocab_size**t for t in range(length))


def init_tabular_params(key: Array, num_latents: int, vocab_size: int, length: int,
                        scale: float = 1.0, dtype=None) -> Array:
  """Random logit table for :func:`tabular_logits_fn`.

  Args:
    key: PRNG key.
    num_latents: K.
    vocab_size: V ≥ 2.
    length: L ≥ 1.
    scale: standard deviation of the N(0, scale²) logits.
    dtype: float dtype (default: JAX's default float, float64 under x64).

  Returns:
    [K, (V^L − 1)/(V − 1), V] logits.
  """
  num_sequences(vocab_size, length)
  shape = (num_latents, num_contexts(vocab_size, length), vocab_size)
  return scale * jax.random.normal(key, shape, dtype=dtype)


def tabular_logits_fn(params_KxCxV: Array, tokens_NxL: Array,
                      latent: Any) -> Array:
  """Teacher-forced logits of a fully tabular autoregressive model.

  ``logits[n, t] = params[latent, ctx(y_<t)]`` where
  ``ctx(y_<t) = (V^t − 1)/(V − 1) + Σ_{s<t} y_s V^(t−1−s)`` indexes every
  prefix of length t < L (the empty prefix is 0). Every distribution over
  V^L sequences is representable, so estimator bias cannot hide behind the
  model's structure.

  Args:
    params_KxCxV: [K, C, V] logits, C = (V^L − 1)/(V − 1).
    tokens_NxL: [N, L] int tokens in 0..V−1.
    latent: latent index k (int or int scalar array).

  Returns:
    [N, L, V] logits.

  Raises:
    ValueError: C does not match L = tokens_NxL.shape[1].

  References:
    DESIGN.md §7.
  """
  chex.assert_rank([params_KxCxV, tokens_NxL], [3, 2],
                   custom_message="arguments: params_KxCxV, tokens_NxL",
                   exception_type=ValueError)
  _, num_ctx, vocab_size = params_KxCxV.shape
  length = tokens_NxL.shape[1]
  if num_ctx != num_contexts(vocab_size, length):
    raise ValueError(
        f"params_KxCxV has {num_ctx} contexts but tokens of length {length} "
        f"over V={vocab_size} need {num_contexts(vocab_size, length)}.")
  t = np.arange(length)[:, None]
  s = np.arange(length)[None, :]
  weight_LxL = np.where(s < t, vocab_size**np.maximum(t - 1 - s, 0), 0)
  offset_L = np.array([num_contexts(vocab_size, k) for k in range(length)])
  code_NxL = jnp.asarray(tokens_NxL, jnp.int32) @ jnp.asarray(
      weight_LxL.T, jnp.int32)
  context_NxL = code_NxL + jnp.asarray(offset_L, jnp.int32)[None, :]
  table_CxV = params_KxCxV[latent]
  return table_CxV[context_NxL]
