"""The practitioners' OPD variants measured exactly by enumeration (DESIGN.md §6.4, §7).

Two independent routes to the expected gradient of each variant of
``opd.opd_loss`` (discount γ, length normalisation, MiniLLM's single-step
term, teacher-mixed sampling with its importance weights):

* :func:`variant_gradient_moments` runs the library's own loss on every
  response y of the enumeration, weighted by its exact probability under the
  sampling distribution (the student π, or the mixture ``α·q + (1−α)·π``):
  ``E g = Σ_y p̃(y) ∇ opd_loss(y)``, never by sampling;
* :func:`future_decomposition` splits the exact gradient of ``KL(π ‖ q)``
  into the current-step part and the future pieces, computed from the
  oracle's enumeration without the estimator code::

    ∇KL = C + Σ_{t<t'} F[t, t'],   C = E_π[Σ_t m_t ∇KL_t(c_t)],
                                   F[t, t'] = E_π[m_t' KL_t'(c_t') ∇log π(y_t|c_t)]

  and :func:`predicted_mean` gives what theory says a variant's mean is:
  ``C + Σ_{t<t'} W[t, t'] F[t, t']`` with ``W = γ^{t'−t}`` (divided by the
  ``L − t`` positions after t with length normalisation, fixed-length
  responses). ``W ≡ 1`` is the exact gradient; the bias is
  ``Σ_{t<t'} (W[t, t'] − 1) F[t, t']``, zero at γ = 1.

:func:`bias_table` reports the relative error and the cosine of each
variant's mean against the exact ``∇KL(π ‖ q)`` (``experiments/opd_bias.py``
writes them to ``docs/RESULTS.md``). :func:`row_gradient_moments` is the
Monte-Carlo counterpart for a model too large to enumerate: the sample mean
and variance of per-response gradients the caller has drawn.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
from jax import flatten_util
import jax.numpy as jnp

from latentdiv import estimators
from latentdiv import moments as moments_lib
from latentdiv import opd
from latentdiv import oracle

PyTree = Any
ModelFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, tokens_NxL) -> logits_NxLxV.


class Variant(NamedTuple):
  """An OPD estimator with the practitioners' options (``opd.opd_loss``'s arguments)."""

  estimator: str
  discount: float = 1.0
  length_normalize: bool = False
  single_step_kl: bool = False
  teacher_mix: float = 0.0
  mix_weight: str = "sequence"
  baseline: str = "none"  # 'leave_one_out': pairs of responses; 'ema': a given [L] value.

  def options(self) -> dict:
    return dict(discount=self.discount, length_normalize=self.length_normalize,
                single_step_kl=self.single_step_kl, teacher_mix=self.teacher_mix,
                mix_weight=self.mix_weight)


def sampling_fn(student_fn: ModelFn, teacher_fn: ModelFn, teacher_params: PyTree,
                teacher_mix: float) -> ModelFn:
  """``(params, tokens) -> log p̃`` of the mixture ``α·q + (1−α)·π`` (π itself at α = 0)."""

  def fn(params, tokens_NxL):
    logp = jax.nn.log_softmax(student_fn(params, tokens_NxL), axis=-1)
    if teacher_mix == 0:
      return logp
    logq = jax.nn.log_softmax(teacher_fn(teacher_params, tokens_NxL), axis=-1)
    return opd.mixture_log_probs(logp, logq, teacher_mix)

  return fn


def variant_gradient_moments(student_fn: ModelFn, student_params: PyTree,
                             teacher_fn: ModelFn, teacher_params: PyTree, variant: Variant,
                             vocab_size: int, length: int, eos_id: Optional[int] = None,
                             pad_id: int = 0, chunk_size: int = 4096,
                             ema_L=None) -> moments_lib.Moments:
  """Exact mean and total variance of ``∇ opd.opd_loss`` on one group of the sampler.

  ``E g = Σ_y p̃(y) g(y)``, ``Var g = Σ_y p̃(y) ‖g(y) − E g‖²`` over all ``V^L``
  responses (EOS-truncated ones once), with ``p̃`` the student (α = 0) or the
  teacher mixture, and ``g(y) = ∇_student opd_loss(π, sg(q), y, **variant)``.
  With ``variant.baseline = 'leave_one_out'`` the items are all pairs of
  independent responses (N = 2); with ``'ema'`` the baseline is ``ema_L``.

  Args:
    student_fn: ``(params, tokens_NxL) -> logits_NxLxV`` of the student π.
    student_params: its parameters (the gradient is taken w.r.t. these).
    teacher_fn: same signature, the frozen teacher q.
    teacher_params: its parameters.
    variant: the :class:`Variant`.
    vocab_size: V.
    length: L.
    eos_id: optional EOS id (positions after EOS masked).
    pad_id: filler after EOS.
    chunk_size: responses per vmapped chunk.
    ema_L: [L] the value of an ``'ema'`` baseline (held fixed).

  Returns:
    ``moments.Moments`` (mean like ``student_params``).

  References:
    DESIGN.md §6.4, §7.
  """
  opd.check_options(variant.estimator, **variant.options())
  frozen = jax.lax.stop_gradient(teacher_params)
  group_size = 2 if variant.baseline == "leave_one_out" else 1
  support = moments_lib.sequence_support(
      sampling_fn(student_fn, teacher_fn, frozen, variant.teacher_mix), student_params,
      vocab_size, length, group_size, eos_id, pad_id)

  def grad_fn(tokens_NxL, mask_NxL):  # one item: N = group_size responses.
    def loss(params):
      s = student_fn(params, tokens_NxL)[None]
      t = teacher_fn(frozen, tokens_NxL)[None]
      return opd.opd_loss(s, t, tokens_NxL[None], mask_NxL[None], variant.estimator,
                          variant.baseline, ema_L, **variant.options()).loss
    return flatten_util.ravel_pytree(jax.grad(loss)(student_params))[0][None, None]

  unravel = flatten_util.ravel_pytree(student_params)[1]
  m = moments_lib.support_moments(grad_fn, support, chunk_size=chunk_size)
  return moments_lib.Moments(unravel(m.mean[0]), m.m2[0] / m.weight[0])


class Decomposition(NamedTuple):
  """:func:`future_decomposition`: flat [P] current part and [L, L, P] future pieces."""

  current: jax.Array  # C = E_π[Σ_t m_t ∇KL_t(c_t)].
  future: jax.Array  # F[t, t'] = E_π[m_t' KL_t' ∇log π(y_t|c_t)] for t < t', else 0.


def future_decomposition(student_fn: ModelFn, student_params: PyTree, teacher_fn: ModelFn,
                         teacher_params: PyTree, vocab_size: int, length: int,
                         eos_id: Optional[int] = None, pad_id: int = 0) -> Decomposition:
  """The exact gradient of ``KL(π ‖ q)`` split by how far ahead each term looks.

  From the oracle's enumeration and ``jax`` derivatives only (not the
  estimator code): with the exact ``π(y)``, the per-step
  ``KL_t(c_t) = Σ_v π(v|c_t) (log π − log q)(v|c_t)``, the masks ``m_t`` and
  the scores ``s_t = ∇log π(y_t|c_t)``::

    C       = Σ_y π(y) Σ_t m_t ∇KL_t(c_t)          (contexts held fixed)
    F[t,t'] = Σ_y π(y) m_t' KL_t'(c_t') m_t s_t    (t < t')

  ``C + Σ_{t<t'} F[t, t']`` is ``∇KL(π ‖ q)`` (DESIGN.md §5.3 (c), (e)).

  Args:
    As :func:`variant_gradient_moments`, without the variant.

  Returns:
    :class:`Decomposition` (flattened like ``ravel_pytree(student_params)``).

  References:
    DESIGN.md §6.4, §7.
  """
  tokens = oracle.all_sequences(vocab_size, length)
  mask, canonical = oracle.truncation_mask(tokens, eos_id, pad_id)
  frozen = jax.lax.stop_gradient(teacher_params)
  flat, unravel = flatten_util.ravel_pytree(student_params)
  logq = jax.nn.log_softmax(teacher_fn(frozen, tokens), axis=-1)

  def step_terms(flat_params):  # [N, L] log π(y_t|c_t) and KL_t, both live.
    logp = jax.nn.log_softmax(student_fn(unravel(flat_params), tokens), axis=-1)
    logp_t = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return logp_t, jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)

  logp_t, kl_t = step_terms(flat)
  m = mask.astype(logp_t.dtype)
  prob = jnp.where(canonical, jnp.exp(jnp.sum(logp_t * m, axis=-1)), 0.0)  # [N]
  scores, kl_grads = jax.jacrev(step_terms)(flat)  # [N, L, P] each.
  current = jnp.einsum("n,nt,ntp->p", prob, m, kl_grads)
  after = jnp.triu(jnp.ones((length, length), logp_t.dtype), k=1)  # t < t'
  future = jnp.einsum("n,nt,nu,nu,tu,ntp->tup", prob, m, m, kl_t, after, scores)
  return Decomposition(current, future)


def future_weights(length: int, discount=1.0, length_normalize: bool = False) -> jax.Array:
  """``W[t, t']`` of the future piece ``F[t, t']`` in a variant's mean (fixed-length responses).

  ``W = γ^{t'−t}``, divided by ``L − 1 − t`` (the positions after t) with
  ``length_normalize``; 0 for ``t' ≤ t``.
  """
  t = jnp.arange(length)
  gap = t[None, :] - t[:, None]
  weights = jnp.where(gap > 0, jnp.power(discount, jnp.maximum(gap, 0)), 0.0)
  if length_normalize:
    weights = weights / jnp.maximum(length - 1 - t, 1)[:, None]
  return weights


def predicted_mean(decomposition: Decomposition, discount=1.0,
                   length_normalize: bool = False) -> jax.Array:
  """Theory's mean of a discounted / normalised variant: ``C + Σ W[t, t'] F[t, t']`` (flat [P])."""
  weights = future_weights(decomposition.future.shape[0], discount, length_normalize)
  return decomposition.current + jnp.einsum("tu,tup->p",
                                            weights.astype(decomposition.future.dtype),
                                            decomposition.future)


def cosine(a_tree: PyTree, b_tree: PyTree) -> jax.Array:
  """``<a, b> / (‖a‖ ‖b‖)`` over two same-structure pytrees (flattened)."""
  a = flatten_util.ravel_pytree(a_tree)[0]
  b = flatten_util.ravel_pytree(b_tree)[0]
  return jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b),
                                     jnp.finfo(a.dtype).tiny)


def bias_table(student_fn: ModelFn, student_params: PyTree, teacher_fn: ModelFn,
               teacher_params: PyTree, variants: Sequence[Variant], vocab_size: int,
               length: int, eos_id: Optional[int] = None, pad_id: int = 0) -> list[dict]:
  """Relative error, cosine and variance of each variant's exact mean against ``∇KL(π ‖ q)``.

  Returns:
    One dict per variant: its fields, ``relative_error`` ``‖E g − ∇KL‖/‖∇KL‖``,
    ``cosine`` ``cos(E g, ∇KL)``, ``variance`` (total, one response) and, for
    on-policy variants without length normalisation (or fixed-length
    responses), ``theory_error`` ``‖E g − predicted_mean‖/‖∇KL‖``.
  """
  exact = oracle.exact_opd_kl_grad(student_fn, student_params, teacher_fn, teacher_params,
                                   vocab_size, length, eos_id, pad_id)
  exact_flat = flatten_util.ravel_pytree(exact)[0]
  decomposition = future_decomposition(student_fn, student_params, teacher_fn,
                                       teacher_params, vocab_size, length, eos_id, pad_id)
  rows = []
  norm = jnp.linalg.norm(exact_flat)
  # One program for all the variants (they differ only in static options).
  all_moments = jax.jit(lambda sp, tp: [variant_gradient_moments(
      student_fn, sp, teacher_fn, tp, v, vocab_size, length, eos_id, pad_id)
                                        for v in variants])(student_params, teacher_params)
  for variant, moments in zip(variants, all_moments):
    mean = flatten_util.ravel_pytree(moments.mean)[0]
    row = dict(variant._asdict(), relative_error=float(jnp.linalg.norm(mean - exact_flat) / norm),
               cosine=float(cosine(mean, exact_flat)), variance=float(moments.variance))
    if (variant.teacher_mix == 0 or variant.mix_weight == "sequence") and (
        eos_id is None or not variant.length_normalize):
      # The per-token reward is every to-go form at γ = 0.
      discount = 0.0 if variant.estimator == estimators.PER_TOKEN_REWARD else variant.discount
      predicted = predicted_mean(decomposition, discount, variant.length_normalize)
      row["theory_error"] = float(jnp.linalg.norm(mean - predicted) / norm)
    rows.append(row)
  return rows


def row_gradient_moments(row_loss_fn: Callable[..., jax.Array], params: PyTree,
                         rows: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Sample moments of per-row gradients: ``(‖mean‖, total variance)``.

  ``g_b = ∇_params row_loss_fn(params, *row_b)`` for each of the B rows
  (``jax.vmap`` over the leading axis of every array in ``rows``);
  ``mean = (1/B) Σ_b g_b`` and the unbiased total variance
  ``Σ_b ‖g_b − mean‖² / (B − 1)`` (one response's estimator).

  Args:
    row_loss_fn: ``(params, *row) -> scalar`` the loss of one response.
    params: the parameters.
    rows: arrays with a leading axis B ≥ 2 (e.g. prompts, tokens, masks).

  Returns:
    ``(norm_of_mean, variance)`` scalars.

  References:
    DESIGN.md §5.4, §6.4 (variance of the estimators).
  """
  grads = jax.vmap(lambda *row: flatten_util.ravel_pytree(
      jax.grad(row_loss_fn)(params, *row))[0])(*rows)
  m = moments_lib.weighted_moments(grads[:, None, :], jnp.ones(grads.shape[:1] + (1,),
                                                              grads.dtype))
  return jnp.linalg.norm(m.mean[0]), m.m2[0] / (grads.shape[0] - 1)
