"""Sequence rewards r(y, y*) with no exact payoff sampler, for importance-sampled RAML (DESIGN.md §8.4).

Each reward takes one sample and one reference as token rows ``[T]`` (content,
then EOS, then PAD; ``latentdiv/vocab.py``) and returns a float scalar; batch
with ``jax.vmap``. Only the content tokens (before the first EOS) are compared.

* ``negative_edit_distance`` — ``r = −d_E(y, y*)``, the Levenshtein distance
  computed exactly (``edits.edit_distance``);
* ``sentence_bleu`` — a smoothed sentence BLEU on token n-grams (Papineni et
  al. 2002), in [0, 1].

``REWARDS`` maps the names used by ``raml.sample_importance_targets`` to them.

References:
  Norouzi et al. (2016), "Reward Augmented Maximum Likelihood for Neural
  Structured Prediction", NeurIPS. DESIGN.md §8.4.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from latentdiv import edits
from latentdiv import logprobs


def _content_length(tokens_T: jax.Array) -> jax.Array:
  return jnp.sum(logprobs.content_mask(tokens_T).astype(jnp.int32))


def negative_edit_distance(sample_T: jax.Array, target_T: jax.Array) -> jax.Array:
  """``r(y, y*) = −d_E(y, y*)`` over the contents (the exact Levenshtein distance).

  Args:
    sample_T: int tokens ``[T]`` (y).
    target_T: int tokens ``[T']`` (y*).

  Returns:
    Float scalar ≤ 0.

  References:
    DESIGN.md §8.3–§8.4; Wagner & Fischer (1974).
  """
  chex.assert_rank([sample_T, target_T], 1)
  distance = edits.edit_distance(sample_T, _content_length(sample_T), target_T,
                                 _content_length(target_T))
  return -distance.astype(jnp.result_type(float))


def _ngram_windows(tokens_T: jax.Array, order: int) -> jax.Array:
  """[T − n + 1, n] the n-grams starting at each position (n = order, static)."""
  t = tokens_T.shape[0]
  return jnp.stack([tokens_T[k:t - order + 1 + k] for k in range(order)], axis=-1)


def clipped_ngram_matches(sample_T: jax.Array, sample_len: jax.Array, target_T: jax.Array,
                          target_len: jax.Array, order: int) -> tuple[jax.Array, jax.Array]:
  """BLEU's clipped n-gram matches and the sample's n-gram count, for one order n.

      matches = Σ_g min(c_y(g), c_{y*}(g)),   total = max(|y| − n + 1, 0)

  over the n-grams g of the sample's first ``sample_len`` tokens; computed
  position-wise as ``Σ_i min(c_y(g_i), c_{y*}(g_i)) / c_y(g_i)``.

  Args:
    sample_T: int tokens ``[T]``.
    sample_len: int scalar, the sample's content length.
    target_T: int tokens ``[T']``.
    target_len: int scalar, the reference's content length.
    order: n (static).

  Returns:
    ``(matches, total)`` float scalars.

  References:
    Papineni, Roukos, Ward, Zhu (2002), "BLEU: a Method for Automatic
    Evaluation of Machine Translation", ACL (modified n-gram precision).
  """
  dtype = jnp.result_type(float)
  if sample_T.shape[0] < order or target_T.shape[0] < order:
    return jnp.zeros((), dtype), jnp.zeros((), dtype)
  hyp, ref = _ngram_windows(sample_T, order), _ngram_windows(target_T, order)
  hyp_valid = jnp.arange(hyp.shape[0]) + order <= sample_len
  ref_valid = jnp.arange(ref.shape[0]) + order <= target_len
  same_hyp = jnp.all(hyp[:, None, :] == hyp[None, :, :], axis=-1) & hyp_valid[None, :]
  in_ref = jnp.all(hyp[:, None, :] == ref[None, :, :], axis=-1) & ref_valid[None, :]
  count_hyp = jnp.sum(same_hyp, axis=1).astype(dtype)
  count_ref = jnp.sum(in_ref, axis=1).astype(dtype)
  share = jnp.minimum(count_hyp, count_ref) / jnp.maximum(count_hyp, 1.0)
  matches = jnp.sum(jnp.where(hyp_valid, share, 0.0))
  total = jnp.maximum(sample_len - order + 1, 0).astype(dtype)
  return matches, total


def sentence_bleu(sample_T: jax.Array, target_T: jax.Array, max_order: int = 4) -> jax.Array:
  """Smoothed sentence BLEU of a sample against one reference, on token ids, in [0, 1].

      BLEU = BP · exp((1/N) Σ_{n=1..N} log p_n),   BP = min(1, exp(1 − |y*|/|y|)),
      p_1 = m_1 / t_1,   p_n = (m_n + 1) / (t_n + 1) for n ≥ 2

  (m_n clipped matches, t_n sample n-grams; the add-one smoothing of orders
  ≥ 2 of Lin & Och 2004, as in sacrebleu's ``smooth_method='add-k'``, k = 1).
  0 for an empty sample or no unigram match.

  Args:
    sample_T: int tokens ``[T]`` (y).
    target_T: int tokens ``[T']`` (y*).
    max_order: N (static).

  Returns:
    Float scalar in [0, 1].

  References:
    Papineni et al. (2002); Lin & Och (2004), "ORANGE: a Method for
    Evaluating Automatic Evaluation Metrics for Machine Translation", COLING.
  """
  chex.assert_rank([sample_T, target_T], 1)
  c, r = _content_length(sample_T), _content_length(target_T)
  log_precision = []
  for n in range(1, max_order + 1):
    matches, total = clipped_ngram_matches(sample_T, c, target_T, r, n)
    if n > 1:
      matches, total = matches + 1.0, total + 1.0
    log_precision.append(jnp.log(jnp.maximum(matches, 1e-30)) - jnp.log(jnp.maximum(total, 1.0)))
  c_f, r_f = c.astype(jnp.result_type(float)), r.astype(jnp.result_type(float))
  log_bp = jnp.minimum(0.0, 1.0 - r_f / jnp.maximum(c_f, 1.0))
  matches_1, _ = clipped_ngram_matches(sample_T, c, target_T, r, 1)
  bleu = jnp.exp(log_bp + jnp.mean(jnp.stack(log_precision)))
  return jnp.where((c > 0) & (matches_1 > 0), bleu, 0.0)


REWARDS = {"edit": negative_edit_distance, "bleu": sentence_bleu}
