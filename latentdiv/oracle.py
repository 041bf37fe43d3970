"""Exact-enumeration correctness oracle for the sequence-KL estimators.

For a tiny vocabulary V and length L every one of the V^L sequences can be
enumerated, so the distribution of a model over sequences, the sequence KL,
its gradient, and the exact mean and variance of any per-sequence gradient
estimator are computed exactly — by running the library's own surrogate code
(``latentdiv/estimators.py``) on all sequences at once, never by sampling
(DESIGN.md §7).

Models are pure functions. An inter-latent model is
``logits_fn(params, tokens_NxL, latent) -> logits_NxLxV`` where
``logits[:, t]`` are the next-token logits of y_t given y_<t (teacher forced;
the function closes over the prompt x). OPD takes a student and a teacher
``fn(params, tokens_NxL) -> logits_NxLxV`` (bind a latent model's latent with a
lambda). Any Flax model fits after ``lambda p, y, k: model.apply(p, x, y, k)``.

Tokens are the model's raw ids 0..V−1; the oracle enumerates all of them.
With ``eos_id`` given, an output ends at its first EOS (EOS itself is scored);
the positions after it are masked (``KL_t = 0`` there) and every truncated
sequence is counted exactly once: only its canonical representative, with
``pad_id`` at every position after EOS, gets weight, and its probability is
the product of the scored steps. Models must be causal (logits at t depend on
y_<t only), so the filler never changes a scored position.

Sign conventions (the estimators' surrogates are LOSSES):

* :func:`estimator_gradient_moments` → mean ≈ ``−∇D_ij`` (D is maximised);
* :func:`opd_gradient_moments` → mean ≈ ``+∇KL(π‖q)`` (KL is minimised).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from latentdiv import estimators as est

Array = chex.Array
PyTree = Any
LogitsFn = Callable[[PyTree, Array, Any], Array]

MAX_SEQUENCES = 1 << 20


class Moments(NamedTuple):
  """Exact first two moments of a vector-valued estimator g(y)."""
  mean: PyTree  # Σ_y p(y) g(y), same structure as g.
  variance: Array  # Σ_y p(y) ‖g(y) − mean‖² (total variance, a scalar).


# ----------------------------------------------------------------------------
# Enumeration.
# ----------------------------------------------------------------------------


def _check_sizes(vocab_size: int, length: int, pairs: bool = False) -> int:
  if vocab_size < 2 or length < 1:
    raise ValueError(
        f"Need vocab_size >= 2 and length >= 1; got {vocab_size}, {length}.")
  num = vocab_size**length
  if (num * num if pairs else num) > MAX_SEQUENCES:
    raise ValueError(
        f"V^L = {vocab_size}^{length} = {num} sequences is too many to "
        f"enumerate{' in pairs' if pairs else ''} (limit {MAX_SEQUENCES}).")
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
  num = _check_sizes(vocab_size, length)
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


def truncation_mask(tokens_NxL: Array,
                    eos_id: Optional[int] = None,
                    pad_id: int = 0):
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


def _probabilities(fn, params, tokens, mask, canonical):
  """Exact p(y) of every row; 0 for non-canonical rows."""
  logp = _sequence_log_probs(fn, params, tokens, mask)
  return jnp.where(canonical, jnp.exp(logp), 0.0)


def _bind(logits_fn, latent):
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
  logp = _step_log_probs(_bind(logits_fn, latent), params, tokens)
  chex.assert_shape(logp, (tokens.shape[0], length, vocab_size),
                    custom_message="logits_fn's vocabulary must be V",
                    exception_type=ValueError)
  return logp


def exact_sequence_logprobs(logits_fn: LogitsFn,
                            params: PyTree,
                            latent: Any,
                            vocab_size: int,
                            length: int,
                            eos_id: Optional[int] = None,
                            pad_id: int = 0) -> Array:
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
  logp = _sequence_log_probs(_bind(logits_fn, latent), params, tokens, mask)
  return jnp.where(canonical, logp, -jnp.inf)


def _exact_kl(fn_p, params_p, fn_q, params_q, vocab_size, length, eos_id,
              pad_id):
  tokens, mask, canonical = _enumerate(vocab_size, length, eos_id, pad_id)
  logp = _sequence_log_probs(fn_p, params_p, tokens, mask)
  logq = _sequence_log_probs(fn_q, params_q, tokens, mask)
  prob = jnp.where(canonical, jnp.exp(logp), 0.0)
  return jnp.sum(prob * (logp - logq))


def exact_kl(logits_fn: LogitsFn,
             params: PyTree,
             i: Any,
             j: Any,
             vocab_size: int,
             length: int,
             eos_id: Optional[int] = None,
             pad_id: int = 0) -> Array:
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
  return _exact_kl(_bind(logits_fn, i), params, _bind(logits_fn, j), params,
                   vocab_size, length, eos_id, pad_id)


def exact_kl_grad(logits_fn: LogitsFn,
                  params: PyTree,
                  i: Any,
                  j: Any,
                  vocab_size: int,
                  length: int,
                  eos_id: Optional[int] = None,
                  pad_id: int = 0) -> PyTree:
  """``∇_params D_ij`` by ``jax.grad`` through the enumeration.

  Args:
    See :func:`exact_kl`.

  Returns:
    Pytree like params: the exact gradient ∇D_ij (through both p_i and p_j).

  References:
    DESIGN.md §5.2, §7.
  """
  return jax.grad(lambda p: exact_kl(logits_fn, p, i, j, vocab_size, length,
                                     eos_id, pad_id))(params)


def exact_opd_kl(student_fn: Callable,
                 student_params: PyTree,
                 teacher_fn: Callable,
                 teacher_params: PyTree,
                 vocab_size: int,
                 length: int,
                 eos_id: Optional[int] = None,
                 pad_id: int = 0) -> Array:
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


def exact_opd_kl_grad(student_fn: Callable,
                      student_params: PyTree,
                      teacher_fn: Callable,
                      teacher_params: PyTree,
                      vocab_size: int,
                      length: int,
                      eos_id: Optional[int] = None,
                      pad_id: int = 0) -> PyTree:
  """``∇_student KL(π ‖ q)`` by ``jax.grad`` through the enumeration.

  Args:
    See :func:`exact_opd_kl`.

  Returns:
    Pytree like student_params.

  References:
    DESIGN.md §6, §7.
  """
  return jax.grad(lambda p: exact_opd_kl(student_fn, p, teacher_fn,
                                         teacher_params, vocab_size, length,
                                         eos_id, pad_id))(student_params)


# ----------------------------------------------------------------------------
# Exact moments of estimators.
# ----------------------------------------------------------------------------


def _tree_vdot(weights_N, tree_N):
  return jax.tree.map(
      lambda x: jnp.tensordot(weights_N.astype(x.dtype), x, axes=1), tree_N)


def _tree_sq_dist(tree_N, mean):
  """[N] squared global distance of each row of tree_N to mean."""
  leaves = jax.tree.map(
      lambda x, m: jnp.sum((x - m[None]).reshape(x.shape[0], -1)**2, axis=-1),
      tree_N, mean)
  return sum(jax.tree.leaves(leaves))


def _moments(per_sequence_grad_fn, fn, params, vocab_size, length, eos_id,
             pad_id):
  tokens, mask, canonical = _enumerate(vocab_size, length, eos_id, pad_id)
  prob = jax.lax.stop_gradient(
      _probabilities(fn, params, tokens, mask, canonical))
  grads = jax.vmap(per_sequence_grad_fn)(tokens, mask)
  mean = _tree_vdot(prob, grads)
  sq = _tree_sq_dist(grads, mean)
  variance = jnp.sum(prob.astype(sq.dtype) * sq)
  return Moments(mean, variance)


def estimator_moments(per_sequence_grad_fn: Callable,
                      logits_fn: LogitsFn,
                      params: PyTree,
                      i: Any,
                      vocab_size: int,
                      length: int,
                      eos_id: Optional[int] = None,
                      pad_id: int = 0) -> Moments:
  """Exact mean and total variance of an estimator g(y), y ~ p_i.

  ``mean = Σ_y p_i(y) g(y)``,
  ``variance = Σ_y p_i(y) ‖g(y) − mean‖² = Σ_y p_i(y)‖g(y)‖² − ‖mean‖²``,
  with g evaluated on all sequences at once (``jax.vmap``), not sampled.

  Args:
    per_sequence_grad_fn: ``(tokens_L, mask_L) -> pytree`` the estimator for
      one sequence (e.g. ``jax.grad`` of a surrogate loss).
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: parameters of the sampling distribution p_i.
    i: sampling latent.
    vocab_size: V.
    length: L.
    eos_id: optional EOS id.
    pad_id: filler after EOS.

  Returns:
    :class:`Moments`.

  References:
    DESIGN.md §7.
  """
  return _moments(per_sequence_grad_fn, _bind(logits_fn, i), params,
                  vocab_size, length, eos_id, pad_id)


def _baseline_from_fn(baseline_fn, logits_p_LxV, logits_q_LxV, tokens_L,
                      mask_L):
  if baseline_fn is None:
    return None
  terms = est.per_token_terms(
      jax.lax.stop_gradient(logits_p_LxV), jax.lax.stop_gradient(logits_q_LxV),
      tokens_L)
  mask = mask_L.astype(terms.kl_t.dtype)
  r_t = (terms.logp_score_t - terms.logp_target_t) * mask
  return baseline_fn(tokens_L, r_t, terms.kl_t * mask, mask_L)


def estimator_gradient_moments(logits_fn: LogitsFn,
                               params: PyTree,
                               i: Any,
                               j: Any,
                               estimator: str,
                               vocab_size: int,
                               length: int,
                               baseline_fn: Optional[Callable] = None,
                               pathwise: bool = True,
                               eos_id: Optional[int] = None,
                               pad_id: int = 0) -> Moments:
  """Exact moments of the library's inter-latent KL gradient estimator.

  ``g(y) = ∇_params`` of
  :func:`latentdiv.estimators.sequence_kl_surrogate_from_logits` on rollout y
  of latent i scored against latent j. The surrogate is a loss, so for an
  unbiased estimator ``mean == −exact_kl_grad(...)``.

  Args:
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: model parameters.
    i: sampling latent.
    j: target latent.
    estimator: a name in ``estimators.ALL_ESTIMATORS``.
    vocab_size: V.
    length: L.
    baseline_fn: optional ``(tokens_L, r_t, kl_t, mask_t) -> b_t`` ([L] or
      scalar); r_t and kl_t are the rollout's (gradient-free) log-ratios and
      per-step KLs, so a mis-specified baseline that looks at y_t (e.g.
      ``b_t = r_t``) can be expressed — and is detected as biased.
    pathwise: differentiate through p_j (the inter-latent objective needs it).
    eos_id: optional EOS id.
    pad_id: filler after EOS.

  Returns:
    :class:`Moments` of the surrogate's gradient.

  References:
    DESIGN.md §5.2, §5.3, §7.
  """

  def grad_fn(tokens_L, mask_L):

    def loss(p):
      logits_i = logits_fn(p, tokens_L[None], i)[0]
      logits_j = logits_fn(p, tokens_L[None], j)[0]
      baseline_t = _baseline_from_fn(baseline_fn, logits_i, logits_j,
                                     tokens_L, mask_L)
      return est.sequence_kl_surrogate_from_logits(
          estimator, logits_i, logits_j, tokens_L, mask_L, baseline_t,
          pathwise)

    return jax.grad(loss)(params)

  return estimator_moments(grad_fn, logits_fn, params, i, vocab_size, length,
                           eos_id, pad_id)


def opd_gradient_moments(student_fn: Callable,
                         student_params: PyTree,
                         teacher_fn: Callable,
                         teacher_params: PyTree,
                         estimator: str,
                         vocab_size: int,
                         length: int,
                         baseline_fn: Optional[Callable] = None,
                         eos_id: Optional[int] = None,
                         pad_id: int = 0) -> Moments:
  """Exact moments of the OPD estimator :func:`estimators.opd_surrogate`.

  ``g(y) = ∇_student`` of the OPD loss on a student response y ~ π. For an
  unbiased estimator ``mean == +exact_opd_kl_grad(...)`` (the OPD loss is
  minimised).

  Args:
    student_fn: ``(params, tokens_NxL) -> logits_NxLxV`` of the student π.
    student_params: its parameters (the gradient is taken w.r.t. these).
    teacher_fn: same signature, the frozen teacher q.
    teacher_params: its parameters.
    estimator: a name in ``estimators.ALL_ESTIMATORS``.
    vocab_size: V.
    length: L.
    baseline_fn: optional ``(tokens_L, r_t, kl_t, mask_t) -> b_t``.
    eos_id: optional EOS id (positions after EOS masked, KL_t = 0 there).
    pad_id: filler after EOS.

  Returns:
    :class:`Moments` of the OPD loss gradient w.r.t. the student.

  References:
    DESIGN.md §6, §7.
  """

  def grad_fn(tokens_L, mask_L):

    def loss(p):
      logits_s = student_fn(p, tokens_L[None])[0]
      logits_t = teacher_fn(teacher_params, tokens_L[None])[0]
      baseline_t = _baseline_from_fn(baseline_fn, logits_s, logits_t,
                                     tokens_L, mask_L)
      return est.opd_surrogate(estimator, logits_s, logits_t, tokens_L,
                               mask_L, baseline_t)

    return jax.grad(loss)(student_params)

  return _moments(grad_fn, student_fn, student_params, vocab_size, length,
                  eos_id, pad_id)


def pair_estimator_moments(per_pair_grad_fn: Callable,
                           logits_fn: LogitsFn,
                           params: PyTree,
                           i: Any,
                           vocab_size: int,
                           length: int,
                           eos_id: Optional[int] = None,
                           pad_id: int = 0,
                           chunk_size: int = 4096) -> Moments:
  """Exact moments of an estimator of N = 2 i.i.d. rollouts, y, y' ~ p_i.

  ``mean = Σ_{y,y'} p_i(y) p_i(y') g(y, y')`` and the total variance
  ``Σ_{y,y'} p_i(y) p_i(y') ‖g(y, y') − mean‖²`` over all (V^L)² pairs. When
  the pairs fit in one chunk, g is evaluated once on all of them (``vmap``);
  otherwise a ``lax.scan`` runs over chunks of ``chunk_size`` pairs, twice
  (mean, then variance), holding one chunk's gradients at a time.

  Args:
    per_pair_grad_fn: ``(tokens_2xL, mask_2xL) -> pytree``.
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: parameters of the sampling distribution.
    i: sampling latent.
    vocab_size: V.
    length: L.
    eos_id: optional EOS id.
    pad_id: filler after EOS.
    chunk_size: pairs per vmapped chunk (memory: chunk_size gradients).

  Returns:
    :class:`Moments`.

  Raises:
    ValueError: (V^L)² above ``MAX_SEQUENCES``.

  References:
    DESIGN.md §5.4 (leave-one-out), §7.
  """
  num = _check_sizes(vocab_size, length, pairs=True)
  tokens, mask, canonical = _enumerate(vocab_size, length, eos_id, pad_id)
  prob = jax.lax.stop_gradient(
      _probabilities(_bind(logits_fn, i), params, tokens, mask, canonical))
  num_pairs = num * num
  chunk_size = max(1, min(chunk_size, num_pairs))
  num_chunks = -(-num_pairs // chunk_size)
  pair = np.arange(num_chunks * chunk_size)
  valid = jnp.asarray(pair < num_pairs).reshape(num_chunks, chunk_size)
  pair = np.minimum(pair, num_pairs - 1)
  first = jnp.asarray((pair // num).reshape(num_chunks, chunk_size))
  second = jnp.asarray((pair % num).reshape(num_chunks, chunk_size))

  def chunk_grads(a, b, ok):
    toks = jnp.stack([tokens[a], tokens[b]], axis=1)  # [C, 2, L]
    msks = jnp.stack([mask[a], mask[b]], axis=1)
    grads = jax.vmap(per_pair_grad_fn)(toks, msks)
    weight = jnp.where(ok, prob[a] * prob[b], 0.0)
    return grads, weight

  def weighted_sq_dist(grads, weight, mean):
    sq = _tree_sq_dist(grads, mean)
    return jnp.sum(weight.astype(sq.dtype) * sq)

  if num_chunks == 1:
    grads, weight = chunk_grads(first[0], second[0], valid[0])
    mean = _tree_vdot(weight, grads)
    return Moments(mean, weighted_sq_dist(grads, weight, mean))

  def mean_step(carry, xs):
    grads, weight = chunk_grads(*xs)
    return jax.tree.map(jnp.add, carry, _tree_vdot(weight, grads)), None

  zeros = jax.tree.map(
      lambda x: jnp.zeros(x.shape[1:], x.dtype),
      jax.eval_shape(lambda: chunk_grads(first[0], second[0], valid[0])[0]))
  mean, _ = jax.lax.scan(mean_step, zeros, (first, second, valid))

  def var_step(carry, xs):
    return carry + weighted_sq_dist(*chunk_grads(*xs), mean), None

  var0 = jnp.zeros((), jax.tree.leaves(zeros)[0].dtype)
  variance, _ = jax.lax.scan(var_step, var0, (first, second, valid))
  return Moments(mean, variance)


def leave_one_out_gradient_moments(logits_fn: LogitsFn,
                                   params: PyTree,
                                   i: Any,
                                   j: Any,
                                   estimator: str,
                                   vocab_size: int,
                                   length: int,
                                   pathwise: bool = True,
                                   eos_id: Optional[int] = None,
                                   pad_id: int = 0,
                                   chunk_size: int = 4096) -> Moments:
  """Exact moments of a baselined estimator with the N = 2 leave-one-out mean.

  Two rollouts y¹, y² ~ p_i; each is baselined by the other's returns
  (:func:`estimators.leave_one_out_baseline` on
  :func:`estimators.estimator_returns`) and the estimator is the mean of the
  two surrogates' gradients::

    g(y¹, y²) = ∇ ½ Σ_n S(yⁿ; b = R(y^{3−n}))

  Unbiased: mean == −exact_kl_grad. Enumerates (V^L)² pairs.

  Args:
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: model parameters.
    i: sampling latent.
    j: target latent.
    estimator: a name in ``estimators.BASELINED_ESTIMATORS`` (others raise).
    vocab_size: V.
    length: L.
    pathwise: differentiate through p_j.
    eos_id: optional EOS id.
    pad_id: filler after EOS.
    chunk_size: pairs per vmapped chunk.

  Returns:
    :class:`Moments` of the gradient of the mean surrogate.

  References:
    DESIGN.md §5.4, §7.
  """
  if not est.uses_baseline(estimator):
    raise ValueError(
        f"Estimator {estimator!r} takes no baseline; estimators with a "
        f"baseline: {est.BASELINED_ESTIMATORS}.")

  def grad_fn(tokens_2xL, mask_2xL):

    def loss(p):
      logits_i = logits_fn(p, tokens_2xL, i)
      logits_j = logits_fn(p, tokens_2xL, j)
      terms = jax.vmap(est.per_token_terms)(
          jax.lax.stop_gradient(logits_i), jax.lax.stop_gradient(logits_j),
          tokens_2xL)
      returns = jax.vmap(est.estimator_returns, in_axes=(None, 0, 0, 0))(
          estimator, terms.logp_score_t - terms.logp_target_t, terms.kl_t,
          mask_2xL)
      baseline = est.leave_one_out_baseline(returns, mask_2xL)
      surrogate = jax.vmap(
          lambda a, b, y, m, bl: est.sequence_kl_surrogate_from_logits(
              estimator, a, b, y, m, bl, pathwise))(logits_i, logits_j,
                                                    tokens_2xL, mask_2xL,
                                                    baseline)
      return jnp.mean(surrogate)

    return jax.grad(loss)(params)

  return pair_estimator_moments(grad_fn, logits_fn, params, i, vocab_size,
                                length, eos_id, pad_id, chunk_size)


# ----------------------------------------------------------------------------
# Sampling and small helpers.
# ----------------------------------------------------------------------------


def sample_sequences(key: Array,
                     logits_fn: LogitsFn,
                     params: PyTree,
                     latent: Any,
                     vocab_size: int,
                     length: int,
                     num_samples: int,
                     eos_id: Optional[int] = None,
                     pad_id: int = 0):
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


def init_tabular_params(key: Array,
                        num_latents: int,
                        vocab_size: int,
                        length: int,
                        scale: float = 1.0,
                        dtype=None) -> Array:
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
  _check_sizes(vocab_size, length)
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
