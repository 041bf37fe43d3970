"""Exact and sample moments of the gradient estimators (DESIGN.md §7).

An estimator g is evaluated on every item of a finite :class:`Support` — a
group of N sequences (N = 1, or N = 2 for the leave-one-out baseline) with a
weight ``w_m`` — and its first two moments are accumulated::

    E g   = Σ_m w_m g_m / Σ_m w_m
    Var g = Σ_m w_m ‖g_m − E g‖² / Σ_m w_m          (total variance, a scalar)

On the oracle's enumeration (``latentdiv/oracle.py``) with w = the exact
probabilities these are the exact moments, so unbiasedness is proven, not
hoped for: the mean must equal the exact gradient of ``oracle.exact_kl``. On
samples with w = 1 they are sample moments (``m2 / (n − 1)`` is the unbiased
variance). The gradients are those of the library's own primitive,
``estimators.policy_gradient`` (:func:`policy_gradient_estimates`), never a
re-implementation.

Sign conventions (the estimators' surrogates are LOSSES):

* :func:`estimator_gradient_moments` → mean ≈ ``−∇D_ij`` (D is maximised);
* :func:`opd_gradient_moments` → mean ≈ ``+∇KL(π‖q)`` (KL is minimised);
* ``mi_moments.mi_gradient_moments`` → mean ≈ ``−∇I(Z; Y|x)`` (I is maximised).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import chex
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from latentdiv import baselines
from latentdiv import estimators as est
from latentdiv import oracle

Array = chex.Array
PyTree = Any
LogitsFn = oracle.LogitsFn
ModelFn = Callable[[PyTree, Array], Array]  # (params, tokens_NxL) -> logits_NxLxV.


class Moments(NamedTuple):
  """Exact first two moments of a vector-valued estimator g."""
  mean: PyTree  # Σ_m w_m g_m / Σ_m w_m, same structure as g.
  variance: Array  # Σ_m w_m ‖g_m − mean‖² / Σ_m w_m (total variance, scalar).


class WeightedMoments(NamedTuple):
  """Weighted moments of C vector-valued estimators (mergeable).

  ``m2 / weight`` is the exact variance when the weights are probabilities;
  ``m2 / (weight − 1)`` the unbiased sample variance when they are 1.
  """
  weight: Array  # [C] W = Σ_m w_m.
  mean: Array  # [C, P] Σ_m w_m g_m / W.
  m2: Array  # [C] Σ_m w_m ‖g_m − mean‖².
  cos_sum: Array  # [C] Σ_m w_m cos(g_m, ref) (0 without a reference).


class Support(NamedTuple):
  """Items on which an estimator is evaluated: groups of N sequences."""
  tokens: Array  # [S, L] int sequences.
  mask: Array  # [S, L] 1 at scored positions.
  index: Array  # [M, N] int rows of ``tokens`` forming each item.
  weight: Array  # [M] weight of each item (probability, or 1 for a sample).


def weighted_moments(g_NxCxP: Array, w_NxC: Array,
                     ref_P: Optional[Array] = None) -> WeightedMoments:
  """:class:`WeightedMoments` of N weighted estimates of C estimators.

  Args:
    g_NxCxP: [N, C, P] estimates.
    w_NxC: [N, C] non-negative weights (0 = absent).
    ref_P: optional [P] reference direction of the cosines.

  Returns:
    :class:`WeightedMoments`.

  Raises:
    ValueError: mismatched shapes.

  References:
    DESIGN.md §7.
  """
  msg = "arguments: g_NxCxP, w_NxC"
  chex.assert_rank([g_NxCxP, w_NxC], [3, 2], custom_message=msg,
                   exception_type=ValueError)
  chex.assert_equal_shape_prefix([g_NxCxP, w_NxC], 2, custom_message=msg,
                                 exception_type=ValueError)
  w_NxC = w_NxC.astype(g_NxCxP.dtype)
  tiny = jnp.finfo(g_NxCxP.dtype).tiny
  weight_C = jnp.sum(w_NxC, axis=0)
  mean_CxP = jnp.einsum("nc,ncp->cp", w_NxC, g_NxCxP) / jnp.maximum(
      weight_C, tiny)[:, None]
  m2_C = jnp.einsum("nc,nc->c", w_NxC,
                    jnp.sum((g_NxCxP - mean_CxP[None]) ** 2, axis=-1))
  if ref_P is None:
    cos_C = jnp.zeros_like(weight_C)
  else:
    norms_NxC = jnp.linalg.norm(g_NxCxP, axis=-1) * jnp.linalg.norm(ref_P)
    cos_NxC = jnp.einsum("ncp,p->nc", g_NxCxP, ref_P) / jnp.maximum(norms_NxC, tiny)
    cos_C = jnp.einsum("nc,nc->c", w_NxC, cos_NxC)
  return WeightedMoments(weight_C, mean_CxP, m2_C, cos_C)


def merge_moments(a: WeightedMoments, b: WeightedMoments) -> WeightedMoments:
  """Moments of the union of two weighted sets (Chan et al.'s parallel update).

  ``W = W_a + W_b``, ``mean = mean_a + (W_b/W) δ``,
  ``m2 = m2_a + m2_b + ‖δ‖² W_a W_b / W`` with ``δ = mean_b − mean_a``: no
  ``E‖g‖² − ‖E g‖²`` cancellation.

  References:
    Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm
    for computing sample variances".
  """
  tiny = jnp.finfo(a.mean.dtype).tiny
  weight = a.weight + b.weight
  frac_b = jnp.where(weight > 0, b.weight / jnp.maximum(weight, tiny), 0.0)
  delta = b.mean - a.mean
  return WeightedMoments(
      weight, a.mean + frac_b[:, None] * delta,
      a.m2 + b.m2 + jnp.sum(delta**2, axis=-1) * a.weight * frac_b,
      a.cos_sum + b.cos_sum)


def support_moments(fn: Callable[[Array, Array], Array], support: Support,
                    ref_P: Optional[Array] = None, chunk_size: int = 4096,
                    estimate_weights_KxC: Optional[Array] = None) -> WeightedMoments:
  """Weighted moments of the estimates ``fn`` makes on every item of a support.

  ``fn(tokens_NxL, mask_NxL) -> [K, C, P]`` gives K estimates of each of C
  estimators per item (K = 1 usually); estimate k of estimator c on item m
  has weight ``support.weight[m] · estimate_weights_KxC[k, c]`` (default 1).
  ``fn`` runs on all items at once (``jax.vmap``) when they fit in one chunk;
  otherwise a ``lax.scan`` runs over chunks of ``chunk_size`` items (the last
  padded with zero-weight copies of a real item), merging their moments
  (:func:`merge_moments`). Traceable: jit it from outside.

  Args:
    fn: the estimates of one item.
    support: :class:`Support`.
    ref_P: optional [P] reference direction of the cosines.
    chunk_size: items per vmapped chunk (memory: chunk_size·K·C estimates).
    estimate_weights_KxC: optional [K, C] weight of each estimate of an item.

  Returns:
    :class:`WeightedMoments` of the C estimators.

  References:
    DESIGN.md §7.
  """
  tokens, mask, index, weight = support
  num = index.shape[0]
  chunk = max(1, min(chunk_size, num))

  def chunk_moments(index_BxN, weight_B):
    g = jax.vmap(fn)(tokens[index_BxN], mask[index_BxN])  # [B, K, C, P]
    b, k, c, p = g.shape
    factors = (jnp.ones((k, c), weight_B.dtype) if estimate_weights_KxC is None
               else jnp.asarray(estimate_weights_KxC, weight_B.dtype))
    w = weight_B[:, None, None] * factors[None]
    return weighted_moments(g.reshape(b * k, c, p), w.reshape(b * k, c), ref_P)

  if num <= chunk:
    return chunk_moments(jnp.asarray(index), jnp.asarray(weight))
  num_chunks = -(-num // chunk)
  item = np.minimum(np.arange(num_chunks * chunk), num - 1)
  valid = jnp.asarray(np.arange(num_chunks * chunk) < num)
  rows = jnp.asarray(index)[item].reshape((num_chunks, chunk) + index.shape[1:])
  weights = jnp.where(valid, jnp.asarray(weight)[item], 0.0).reshape(num_chunks, chunk)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(chunk_moments, rows[0], weights[0]))

  def step(total, xs):
    return merge_moments(total, chunk_moments(*xs)), None

  return jax.lax.scan(step, zeros, (rows, weights))[0]


def sequence_support(fn: ModelFn, params: PyTree, vocab_size: int, length: int,
                     group_size: int = 1, eos_id: Optional[int] = None,
                     pad_id: int = 0) -> Support:
  """Every group of N sequences with its exact probability under ``fn``.

  Items are all (V^L)^N ordered N-tuples of :func:`oracle.all_sequences`,
  weighted by ``Π_n p(yⁿ)`` (0 for non-canonical EOS-truncated rows); N = 2
  enumerates the pairs of i.i.d. rollouts a leave-one-out baseline needs.

  Args:
    fn: ``(params, tokens_NxL) -> logits_NxLxV`` of the sampling distribution.
    params: its parameters (the probabilities are stop-gradiented).
    vocab_size: V.
    length: L.
    group_size: N.
    eos_id: optional EOS id (see ``oracle.truncation_mask``).
    pad_id: filler after EOS.

  Returns:
    :class:`Support` with M = (V^L)^N items.

  Raises:
    ValueError: (V^L)^N above ``oracle.MAX_SEQUENCES``.

  References:
    DESIGN.md §5.4, §7.
  """
  num = oracle.num_sequences(vocab_size, length, group_size)
  tokens = oracle.all_sequences(vocab_size, length)
  mask, _ = oracle.truncation_mask(tokens, eos_id, pad_id)
  prob = jnp.exp(jax.lax.stop_gradient(oracle.exact_sequence_logprobs(
      lambda p, y, _: fn(p, y), params, None, vocab_size, length, eos_id,
      pad_id)))
  index = np.stack(np.unravel_index(np.arange(num**group_size),
                                    (num,) * group_size), axis=-1)
  return Support(tokens, mask, index, jnp.prod(prob[index], axis=-1))


def policy_gradient_estimates(score_fn: ModelFn, target_fn: ModelFn, params: PyTree,
                              tokens_NxL: Array, mask_NxL: Array,
                              combos: Sequence[tuple[str, str]],
                              values_CxNxL: Optional[Array] = None,
                              pathwise: bool = True, discount=1.0,
                              length_normalize: bool = False) -> Array:
  """Flattened gradients of each rollout's ``policy_gradient`` loss.

  For N rollouts of one group and each (estimator, baseline) combination c::

    g[n, c] = ∇_θ estimators.policy_gradient(c, terms, mask,
                                            baseline_value=values[c]).loss[n]

  with the terms of ``p = score_fn(θ)`` and ``q = target_fn(θ)`` at the
  rollouts. For a baseline that does not couple the rollouts g[n, c] is the
  one-rollout estimate of ``+∇KL(p ‖ q)`` on rollout n; with
  ``leave_one_out`` the group's estimate is ``mean_n g[n, c]``. As the
  baselines carry no gradient, ``loss[n]`` depends on θ only through row n's
  logits: the per-combination cotangents of the logits come from one forward
  pass, and each row's VJP is shared by the combinations (vmapped over their
  cotangents).

  Args:
    score_fn: ``(params, tokens_NxL) -> logits_NxLxV`` of p (the sampler);
      rows must not interact (a teacher-forced batch).
    target_fn: same for q (stop its gradient for a frozen teacher).
    params: parameters θ.
    tokens_NxL: [N, L] rollouts of one group.
    mask_NxL: [N, L] their masks.
    combos: C pairs (estimator, baseline) of names.
    values_CxNxL: [C, N, L] the values of ``ema`` / ``jsd`` baselines (rows
      of the other combinations are ignored).
    pathwise: differentiate through q (else q's logits are stop-gradiented).
    discount, length_normalize: the variants of ``estimators.policy_gradient``
      (applied to every combination).

  Returns:
    [N, C, P] gradients, flattened like ``ravel_pytree(params)``.

  References:
    DESIGN.md §5.2–§5.4, §6.
  """

  def total_loss(c, logits_p, logits_q):
    estimator, baseline = combos[c]
    if not pathwise:
      logits_q = jax.lax.stop_gradient(logits_q)
    terms = jax.vmap(est.per_token_terms)(logits_p, logits_q, tokens_NxL)
    value = (values_CxNxL[c] if baseline in baselines.GIVEN_BASELINES
             else None)
    return jnp.sum(est.policy_gradient(
        estimator, terms, mask_NxL, baseline=baseline, baseline_value=value,
        pathwise=pathwise, discount=discount, length_normalize=length_normalize).loss)

  logits = (score_fn(params, tokens_NxL), target_fn(params, tokens_NxL))
  cots = [jax.grad(functools.partial(total_loss, c), argnums=(0, 1))(*logits)
          for c in range(len(combos))]
  cot_p, cot_q = (jnp.stack(a, axis=1) for a in zip(*cots))  # [N, C, L, V].

  def row_gradients(tokens_L, cot_p_CxLxV, cot_q_CxLxV):
    _, vjp = jax.vjp(lambda p: (score_fn(p, tokens_L[None]),
                                target_fn(p, tokens_L[None])), params)
    grads = jax.vmap(lambda a, b: vjp((a[None], b[None]))[0])(cot_p_CxLxV,
                                                               cot_q_CxLxV)
    return jax.vmap(lambda g: flatten_util.ravel_pytree(g)[0])(grads)

  return jax.vmap(row_gradients)(tokens_NxL, cot_p, cot_q)


def flat_moments(flat_fn, support: Support, example: PyTree, chunk_size: int) -> Moments:
  """:class:`Moments` of a ``[1, 1, P]``-valued ``flat_fn`` on ``support``, the mean
  unflattened like ``example`` (a pytree of P leaves in all, e.g. the parameters)."""
  unravel = flatten_util.ravel_pytree(example)[1]
  m = support_moments(flat_fn, support, chunk_size=chunk_size)
  return Moments(unravel(m.mean[0]), m.m2[0] / m.weight[0])


def _tree_moments(grad_fn, fn, params, vocab_size, length, group_size, eos_id,
                  pad_id, chunk_size):
  support = sequence_support(fn, params, vocab_size, length, group_size,
                             eos_id, pad_id)
  squeeze = (lambda a: a[0]) if group_size == 1 else (lambda a: a)
  item_fn = lambda y, m: grad_fn(squeeze(y), squeeze(m))  # noqa: E731
  example = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(item_fn, support.tokens[:group_size],
                     support.mask[:group_size]))
  flat_fn = lambda y, m: flatten_util.ravel_pytree(item_fn(y, m))[0][None, None]  # noqa: E731
  return flat_moments(flat_fn, support, example, chunk_size)


def estimator_moments(per_sequence_grad_fn: Callable, logits_fn: LogitsFn,
                      params: PyTree, i: Any, vocab_size: int, length: int,
                      eos_id: Optional[int] = None, pad_id: int = 0,
                      chunk_size: int = 4096) -> Moments:
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
    chunk_size: sequences per vmapped chunk.

  Returns:
    :class:`Moments`.

  References:
    DESIGN.md §7.
  """
  return _tree_moments(per_sequence_grad_fn, oracle.bind(logits_fn, i), params,
                       vocab_size, length, 1, eos_id, pad_id, chunk_size)


def pair_estimator_moments(per_pair_grad_fn: Callable, logits_fn: LogitsFn,
                           params: PyTree, i: Any, vocab_size: int, length: int,
                           eos_id: Optional[int] = None, pad_id: int = 0,
                           chunk_size: int = 4096) -> Moments:
  """Exact moments of an estimator of N = 2 i.i.d. rollouts, y, y' ~ p_i.

  ``mean = Σ_{y,y'} p_i(y) p_i(y') g(y, y')`` and the total variance
  ``Σ_{y,y'} p_i(y) p_i(y') ‖g(y, y') − mean‖²`` over all (V^L)² pairs, in
  chunks of ``chunk_size`` pairs (:func:`support_moments`).

  Args and Returns as :func:`estimator_moments`, with
  ``per_pair_grad_fn: (tokens_2xL, mask_2xL) -> pytree`` and ``chunk_size``
  pairs per vmapped chunk (memory: chunk_size gradients).

  Raises:
    ValueError: (V^L)² above ``oracle.MAX_SEQUENCES``.

  References:
    DESIGN.md §5.4 (leave-one-out), §7.
  """
  return _tree_moments(per_pair_grad_fn, oracle.bind(logits_fn, i), params,
                       vocab_size, length, 2, eos_id, pad_id, chunk_size)


def resolve_baseline(estimator: str, baseline: Optional[str],
                     baseline_fn: Optional[Callable]) -> tuple[str, int]:
  """``(baseline, group size)`` of a moments call, checked.

  The default baseline is ``none``, or ``jsd`` (a caller-given value) when a
  ``baseline_fn`` is given; ``leave_one_out`` needs groups of N = 2 rollouts.

  Raises:
    ValueError: an invalid estimator × baseline combination, or a
      ``baseline_fn`` given for a baseline whose value is not the caller's
      (or missing for one whose value is).
  """
  if baseline is None:
    baseline = baselines.NONE if baseline_fn is None else baselines.JSD
  est.check_combination(estimator, baseline)
  if (baseline_fn is None) == (baseline in baselines.GIVEN_BASELINES):
    raise ValueError(
        f"baseline_fn gives the value of the baselines "
        f"{baselines.GIVEN_BASELINES} and only of those; got "
        f"baseline={baseline!r} and baseline_fn={baseline_fn!r}.")
  return baseline, 2 if baseline == baselines.LEAVE_ONE_OUT else 1


def _policy_gradient_moments(score_fn, target_fn, params, estimator, vocab_size,
                             length, baseline, baseline_fn, pathwise, sign,
                             eos_id, pad_id, chunk_size, discount=1.0,
                             length_normalize=False):
  """Moments of ``sign · g`` with g from :func:`policy_gradient_estimates`."""
  baseline, group_size = resolve_baseline(estimator, baseline, baseline_fn)
  support = sequence_support(score_fn, params, vocab_size, length, group_size,
                             eos_id, pad_id)

  def flat_fn(tokens_NxL, mask_NxL):
    values = None
    if baseline_fn is not None:
      frozen = jax.lax.stop_gradient(params)
      terms = jax.vmap(est.per_token_terms)(score_fn(frozen, tokens_NxL),
                                            target_fn(frozen, tokens_NxL),
                                            tokens_NxL)
      m = mask_NxL.astype(terms.kl_t.dtype)
      r = (terms.logp_score_t - terms.logp_target_t) * m
      values = jax.vmap(lambda y, r_t, kl_t, m_t, mask_t: jnp.broadcast_to(
          baseline_fn(y, r_t, kl_t, mask_t), m_t.shape).astype(m_t.dtype))(
              tokens_NxL, r, terms.kl_t * m, m, mask_NxL)[None]
    return sign * jnp.mean(policy_gradient_estimates(
        score_fn, target_fn, params, tokens_NxL, mask_NxL,
        ((estimator, baseline),), values, pathwise, discount, length_normalize),
        axis=0, keepdims=True)

  return flat_moments(flat_fn, support, params, chunk_size)


def estimator_gradient_moments(logits_fn: LogitsFn, params: PyTree, i: Any, j: Any,
                               estimator: str, vocab_size: int, length: int,
                               baseline_fn: Optional[Callable] = None,
                               pathwise: bool = True, eos_id: Optional[int] = None,
                               pad_id: int = 0, *, baseline: Optional[str] = None,
                               chunk_size: int = 4096) -> Moments:
  """Exact moments of the inter-latent KL gradient estimator.

  ``g(y) = −∇_params (1/N) Σ_n policy_gradient(...).loss[n]`` — the gradient
  of the surrogate LOSS ``surrogates.sequence_kl_surrogate`` — on rollouts
  of latent i scored against latent j. For an unbiased estimator
  ``mean == −oracle.exact_kl_grad(...)``. With ``baseline='leave_one_out'``
  the items are all pairs of rollouts (N = 2).

  Args:
    logits_fn: ``(params, tokens_NxL, latent) -> logits_NxLxV``.
    params: model parameters.
    i: sampling latent.
    j: target latent.
    estimator: a name in ``estimators.ALL_ESTIMATORS``.
    vocab_size: V.
    length: L.
    baseline_fn: optional ``(tokens_L, r_t, kl_t, mask_t) -> b_t`` ([L] or
      scalar), the value of a caller-given baseline; r_t and kl_t are the
      rollout's (gradient-free) log-ratios and per-step KLs, so a
      mis-specified baseline that looks at y_t (e.g. ``b_t = r_t``) can be
      expressed — and is detected as biased.
    pathwise: differentiate through p_j (the inter-latent objective needs it).
    eos_id: optional EOS id.
    pad_id: filler after EOS.
    baseline: a name in ``baselines.BASELINES``; default ``none``, or
      ``jsd`` (a caller-given value) when ``baseline_fn`` is given.
    chunk_size: items per vmapped chunk.

  Returns:
    :class:`Moments` of the surrogate's gradient.

  Raises:
    ValueError: an invalid estimator × baseline combination.

  References:
    DESIGN.md §5.2–§5.4, §7.
  """
  return _policy_gradient_moments(
      oracle.bind(logits_fn, i), oracle.bind(logits_fn, j), params, estimator,
      vocab_size, length, baseline, baseline_fn, pathwise, -1.0, eos_id,
      pad_id, chunk_size)


def leave_one_out_gradient_moments(logits_fn: LogitsFn, params: PyTree, i: Any,
                                   j: Any, estimator: str, vocab_size: int,
                                   length: int, pathwise: bool = True,
                                   eos_id: Optional[int] = None, pad_id: int = 0,
                                   chunk_size: int = 4096) -> Moments:
  """:func:`estimator_gradient_moments` with the N = 2 leave-one-out baseline.

  ``g(y¹, y²) = ∇ ½ Σ_n S(yⁿ; b = R(y^{3−n}))`` over all (V^L)² pairs;
  unbiased: mean == −exact_kl_grad.

  Raises:
    ValueError: ``estimator`` takes no baseline.

  References:
    DESIGN.md §5.4, §7.
  """
  return estimator_gradient_moments(
      logits_fn, params, i, j, estimator, vocab_size, length,
      pathwise=pathwise, eos_id=eos_id, pad_id=pad_id,
      baseline=baselines.LEAVE_ONE_OUT, chunk_size=chunk_size)


def opd_gradient_moments(student_fn: ModelFn, student_params: PyTree,
                         teacher_fn: ModelFn, teacher_params: PyTree, estimator: str,
                         vocab_size: int, length: int,
                         baseline_fn: Optional[Callable] = None,
                         eos_id: Optional[int] = None, pad_id: int = 0, *,
                         baseline: Optional[str] = None,
                         chunk_size: int = 4096, discount=1.0,
                         length_normalize: bool = False) -> Moments:
  """Exact moments of the OPD estimator (``surrogates.opd_surrogate``).

  ``g(y) = ∇_student policy_gradient(..., pathwise=False).loss`` on student
  responses y ~ π against the stop-gradiented teacher q. For an unbiased
  estimator ``mean == +oracle.exact_opd_kl_grad(...)`` (the OPD loss is
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
    baseline: see :func:`estimator_gradient_moments`.
    chunk_size: items per vmapped chunk.
    discount, length_normalize: the practitioners' variants of
      ``estimators.policy_gradient`` (biased unless 1 and False; DESIGN.md §6.4).

  Returns:
    :class:`Moments` of the OPD loss gradient w.r.t. the student.

  References:
    DESIGN.md §6, §7.
  """
  teacher = lambda p, y: jax.lax.stop_gradient(teacher_fn(teacher_params, y))  # noqa: E731
  return _policy_gradient_moments(
      student_fn, teacher, student_params, estimator, vocab_size, length,
      baseline, baseline_fn, False, 1.0, eos_id, pad_id, chunk_size, discount,
      length_normalize)
