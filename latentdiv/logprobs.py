"""One primitive per quantity: token log-probabilities, sequence log-likelihoods, EOS masks.

Every loss, estimator, metric and sampler in latentdiv that needs one of these
calls the function here (rlax's ``distributions.softmax().logprob`` plays the
same role there). Token ids are arguments with the project's values
(``latentdiv.vocab``) as defaults, so a user with another vocabulary can call
them with their own ids.

Conventions (DESIGN.md §2): an output row ``y = (y_1..y_T)`` ends at its first
EOS, which is a real, scored token; positions after it hold PAD and are
masked. Logits at position t predict y_t (teacher forcing, DESIGN.md §3).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from latentdiv import vocab

Array = chex.Array


def token_log_probs(logits_xV: Array, tokens: Array) -> Array:
  """``log softmax(logits)[y]``: the log-probability of each given token.

  Args:
    logits_xV: ``[..., V]`` next-token logits (any leading shape).
    tokens: ``[...]`` integer token ids, the leading shape of ``logits_xV``.

  Returns:
    ``[...]`` log-probabilities, the dtype of the logits (differentiable in
    the logits).

  Raises:
    ValueError: the shapes do not line up.

  References:
    DESIGN.md §2–3.
  """
  if logits_xV.shape[:-1] != tokens.shape:
    raise ValueError(
        f"token_log_probs: logits_xV.shape[:-1] = {logits_xV.shape[:-1]} must equal "
        f"tokens.shape = {tokens.shape}.")
  log_p = jax.nn.log_softmax(logits_xV, axis=-1)
  return jnp.take_along_axis(log_p, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sequence_log_likelihood(logits_TxV: Array, tokens_T: Array, mask_T: Array) -> Array:
  """Masked teacher-forced log-likelihood of one sequence.

  ``ℓ = Σ_t m_t log p(y_t | c_t)`` with ``log p = log_softmax(logits)``.
  Positions with ``m_t = 0`` contribute exactly 0 whatever their token id;
  numeric masks act as weights. Batch and latents with ``jax.vmap``, e.g.
  ``jax.vmap(jax.vmap(sequence_log_likelihood, (0, None, None)))(logits_BxKxTxV,
  tokens_BxT, mask_BxT)`` → ``[B, K]``.

  Args:
    logits_TxV: ``[T, V]`` next-token logits under teacher forcing.
    tokens_T: ``[T]`` integer token ids.
    mask_T: ``[T]`` mask (bool or numeric), e.g. :func:`output_mask`.

  Returns:
    Scalar ℓ (≤ 0 for a 0/1 mask), the dtype of the logits.

  Raises:
    ValueError: wrong ranks or shapes.

  References:
    DESIGN.md §3.
  """
  names = "arguments: logits_TxV, tokens_T, mask_T"
  chex.assert_rank([logits_TxV, tokens_T, mask_T], [2, 1, 1], custom_message=names,
                   exception_type=ValueError)
  chex.assert_type(tokens_T, int, custom_message="tokens_T must hold integer token ids",
                   exception_type=ValueError)
  chex.assert_equal_shape([tokens_T, mask_T], custom_message=names,
                          exception_type=ValueError)
  chex.assert_axis_dimension(logits_TxV, 0, tokens_T.shape[0],
                             custom_message="logits_TxV.shape[0] must equal len(tokens_T)",
                             exception_type=ValueError)
  log_p_t = token_log_probs(logits_TxV, tokens_T)
  mask_T = jnp.asarray(mask_T)
  return jnp.sum(jnp.where(mask_T != 0, mask_T.astype(log_p_t.dtype) * log_p_t, 0.0))


def first_eos_index(tokens_T: Array, eos: int = vocab.EOS) -> Array:
  """Index of the first EOS along the last axis; ``T`` where there is none.

  Args:
    tokens_T: ``[..., T]`` int tokens.
    eos: the end-of-sequence id.

  Returns:
    ``[...]`` int32 indices.
  """
  is_eos = tokens_T == eos
  return jnp.where(jnp.any(is_eos, axis=-1), jnp.argmax(is_eos, axis=-1),
                   tokens_T.shape[-1]).astype(jnp.int32)


def mask_through_eos(tokens_T: Array, eos: int = vocab.EOS) -> Array:
  """True on the positions up to and including the first EOS (all of them if none).

  ``m_t = [t ≤ t_eos]``.

  Args:
    tokens_T: ``[..., T]`` int tokens.
    eos: the end-of-sequence id.

  Returns:
    ``[..., T]`` bool.
  """
  is_eos = tokens_T == eos
  # Number of EOS strictly before t: 0 exactly on the positions ≤ first EOS.
  return (jnp.cumsum(is_eos, axis=-1) - is_eos) == 0


def output_mask(tokens_T: Array, eos: int = vocab.EOS, pad: int = vocab.PAD) -> Array:
  """Scored positions of an output row: non-PAD positions up to and including EOS.

  ``m_t = [t ≤ first EOS] · [y_t ≠ PAD]`` — what every loss on an output
  (data target, RAML sample, rollout) sums over.

  Args:
    tokens_T: ``[..., T]`` int tokens.
    eos: the end-of-sequence id.
    pad: the padding id.

  Returns:
    ``[..., T]`` bool.
  """
  return mask_through_eos(tokens_T, eos) & (tokens_T != pad)


def content_mask(tokens_T: Array, eos: int = vocab.EOS,
                 first_content: int = vocab.FIRST_CONTENT) -> Array:
  """Content positions of an output row: before the first EOS and not a reserved id.

  ``m_t = [t < first EOS] · [y_t ≥ first_content]`` — the positions an
  edit-based sampler (RAML) may change and an edit distance compares; EOS
  and PAD are kept.

  Args:
    tokens_T: ``[..., T]`` int tokens.
    eos: the end-of-sequence id.
    first_content: the smallest content id (ids below it are reserved).

  Returns:
    ``[..., T]`` bool.
  """
  before_eos = jnp.cumsum(tokens_T == eos, axis=-1) == 0
  return before_eos & (tokens_T >= first_content)
