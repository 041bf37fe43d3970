"""Exponentiated payoff distributions over output sequences: the Hamming sampler (DESIGN.md §8).

The payoff distribution of a reference ``y*`` is ``q(y | y*; τ) ∝ exp(r(y, y*)/τ)``
(Norouzi et al. 2016). For the Hamming reward ``r = −d_H(y, y*)`` over the
editable positions it is sampled exactly (``sample_hamming``): the number of
edits e follows

    P(e) ∝ C(n, e) (V'−1)^e exp(−e/τ),   e = 0..n      ("exact"),

a Binomial(n, ρ/(1+ρ)) with per-token odds ``ρ = (V'−1) e^(−1/τ)``. The public
implementations (Norouzi's reference code and those derived from it) multiply
the count by ``(V'−1)^(−e/τ)``: the exact payoff distribution at effective
temperature ``τ/(1 + ln(V'−1))``, a Binomial(n, ρ/(1+ρ)) with
``ρ = (V'−1)^(1−1/τ) e^(−1/τ)`` ("rescaled"). **The τ values reported in the
paper (0.6–0.95) refer to "rescaled"**; with "exact" and a large alphabet those
τ edit almost every position. (The reference code writes the vocabulary size V
where we write V'−1, the number of alternatives per position.)

Tokens follow ``latentdiv/vocab.py``: an output is a row of ``T`` tokens —
content tokens, then ``EOS`` (a real, scored token), then ``PAD`` (0). The
*alphabet* is the set of content tokens samples may use, given either as an id
range ``(lo, hi)`` (tokens ``lo..hi-1``; ``V' = hi − lo``) or as a boolean
mask ``[V]`` array over the vocabulary (``V' = mask.sum()``; a Python tuple or
list is always read as ``(lo, hi)``). The edit-distance sampler is in
``latentdiv.edits``; RAML's losses on top of both in ``latentdiv.raml``.

References:
  Norouzi, Bengio, Chen, Jaitly, Schuster, Wu, Schuurmans (2016), "Reward
  Augmented Maximum Likelihood for Neural Structured Prediction", NeurIPS.
  DESIGN.md §8.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import chex
import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, logsumexp


Array = chex.Array
Numeric = chex.Numeric
# ``(lo, hi)`` id range (tokens lo..hi-1) or a boolean mask ``[V]``.
Alphabet = Union[Tuple[Numeric, Numeric], Sequence[Numeric], Array]

CONVENTIONS = ("exact", "rescaled")

NEG_INF = -jnp.inf


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def check_option(name: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(
        f"Unknown {name} {value!r}; allowed values are {', '.join(map(repr, allowed))}.")


def float_dtype():
  return jnp.result_type(float)


def log_binom(n: Array, k: Array) -> Array:
  """log C(n, k) elementwise; −inf where k < 0 or k > n (n, k integer-valued floats)."""
  valid = (k >= 0) & (k <= n)
  n_s = jnp.maximum(n, 0.0)
  k_s = jnp.clip(k, 0.0, n_s)
  value = gammaln(n_s + 1.0) - gammaln(k_s + 1.0) - gammaln(n_s - k_s + 1.0)
  value = jnp.where((k == 0) | (k == n), 0.0, value)  # exact at the ends.
  return jnp.where(valid, value, NEG_INF)


def static_int(value, name: str) -> int:
  try:
    return int(value)
  except (TypeError, jax.errors.ConcretizationTypeError) as err:
    raise ValueError(
        f"{name} is traced; pass a static maximum (max_length / max_edits) "
        "so the output shape is fixed.") from err


class AlphabetOps(NamedTuple):
  size: Array                 # V', int scalar.
  index_to_token: callable    # [..] int in [0, V') -> token ids.
  token_to_index: callable    # token ids -> [..] int rank in the alphabet.
  contains: callable          # token ids -> bool.


def alphabet_ops(alphabet: Alphabet) -> AlphabetOps:
  """Uniform interface over an id range ``(lo, hi)`` or a boolean mask ``[V]``."""
  if isinstance(alphabet, (tuple, list)):
    if len(alphabet) != 2:
      raise ValueError(
          f"alphabet given as a sequence must be (lo, hi); got {len(alphabet)} items.")
    lo = jnp.asarray(alphabet[0], jnp.int32)
    hi = jnp.asarray(alphabet[1], jnp.int32)
    return AlphabetOps(
        size=jnp.maximum(hi - lo, 0),
        index_to_token=lambda idx: (lo + idx).astype(jnp.int32),
        token_to_index=lambda tok: (tok - lo).astype(jnp.int32),
        contains=lambda tok: (tok >= lo) & (tok < hi))
  mask = jnp.asarray(alphabet)
  chex.assert_rank(mask, 1, custom_message="alphabet mask must be [V].")
  mask = mask.astype(bool)
  v = mask.shape[0]
  ids = jnp.nonzero(mask, size=v, fill_value=0)[0].astype(jnp.int32)
  ranks = jnp.cumsum(mask.astype(jnp.int32)) - 1

  def _clip(tok):
    return jnp.clip(tok, 0, v - 1)

  return AlphabetOps(
      size=jnp.sum(mask.astype(jnp.int32)),
      index_to_token=lambda idx: ids[jnp.clip(idx, 0, v - 1)],
      token_to_index=lambda tok: ranks[_clip(tok)],
      contains=lambda tok: (tok >= 0) & (tok < v) & mask[_clip(tok)])


def alphabet_size(alphabet: Alphabet) -> Array:
  """Number of tokens V' in an alphabet (``hi − lo`` or ``mask.sum()``).

  Args:
    alphabet: ``(lo, hi)`` id range or boolean mask ``[V]``.

  Returns:
    int32 scalar V'.
  """
  return alphabet_ops(alphabet).size


# ---------------------------------------------------------------------------
# Hamming payoff distribution.
# ---------------------------------------------------------------------------


def hamming_log_odds(alphabet_size: Numeric, tau: Numeric, convention: str) -> Array:
  """Per-position log-odds log ρ of an edit under the Hamming payoff distribution.

      exact:     log ρ = log(V'−1) − 1/τ
      rescaled:  log ρ = (1 − 1/τ)·log(V'−1) − 1/τ
                       = log(V'−1) − (1 + log(V'−1))/τ

  The number of edits over n positions is Binomial(n, ρ/(1+ρ)). ``V' < 2``
  (no alternative token) or ``τ = 0`` give ``log ρ = −inf`` (no edits).

  Args:
    alphabet_size: scalar V' (number of allowed content tokens).
    tau: scalar temperature τ ≥ 0.
    convention: ``"exact"`` or ``"rescaled"`` (see module docstring).

  Returns:
    Float scalar log ρ.

  References:
    DESIGN.md §8; Norouzi et al. (2016) §3.
  """
  check_option("convention", convention, CONVENTIONS)
  dtype = float_dtype()
  v = jnp.asarray(alphabet_size, dtype)
  tau = jnp.asarray(tau, dtype)
  chex.assert_rank([v, tau], 0)
  log_alt = jnp.log(jnp.maximum(v - 1.0, 1.0))
  if convention == "exact":
    log_odds = log_alt - 1.0 / tau
  else:
    log_odds = log_alt - (1.0 + log_alt) / tau
  return jnp.where(v < 2.0, NEG_INF, log_odds)


def effective_temperature(alphabet_size: Numeric, tau: Numeric, convention: str) -> Array:
  """Temperature at which the exact payoff distribution equals the given convention.

      exact: τ_eff = τ;     rescaled: τ_eff = τ / (1 + ln(V'−1)).

  So that ``q(y | y*) ∝ exp(−d_H(y, y*) / τ_eff)`` under either convention.

  Args:
    alphabet_size: scalar V' ≥ 2.
    tau: scalar τ.
    convention: ``"exact"`` or ``"rescaled"``.

  Returns:
    Float scalar τ_eff.

  References:
    DESIGN.md §8 (temperature convention).
  """
  check_option("convention", convention, CONVENTIONS)
  dtype = float_dtype()
  tau = jnp.asarray(tau, dtype)
  if convention == "exact":
    return tau
  v = jnp.asarray(alphabet_size, dtype)
  return tau / (1.0 + jnp.log(jnp.maximum(v - 1.0, 1.0)))


def log_edit_count_pmf(length: Numeric,
                       alphabet_size: Numeric,
                       tau: Numeric,
                       convention: str,
                       max_length: Optional[int] = None) -> Array:
  """Log-pmf of the number of edits e of the Hamming payoff distribution.

      exact:     P(e) ∝ C(n, e) (V'−1)^e exp(−e/τ)
      rescaled:  P(e) ∝ C(n, e) (V'−1)^e exp(−e/τ) (V'−1)^(−e/τ)
                     = Binomial(n, ρ/(1+ρ)),  ρ = (V'−1)^(1−1/τ) e^(−1/τ)

  for e = 0..n, computed in log space (gammaln + logsumexp normalisation);
  finite and normalised for n up to several thousands and τ down to 0.01
  (τ = 0 gives P(0) = 1, maximum likelihood). The paper's τ (0.6–0.95) are
  "rescaled".

  Args:
    length: n, number of editable positions; an int, or a traced int scalar
      (per-row length) when ``max_length`` is given.
    alphabet_size: V', scalar.
    tau: τ ≥ 0, scalar.
    convention: ``"exact"`` or ``"rescaled"``.
    max_length: static maximum of n (the output has ``max_length + 1``
      entries; e > n get −inf). Defaults to ``length`` (must then be static).

  Returns:
    Float ``[max_length + 1]`` log P(e), e = 0..max_length.

  References:
    DESIGN.md §8; Norouzi et al. (2016) §3 (stratified sampling).
  """
  check_option("convention", convention, CONVENTIONS)
  if max_length is None:
    max_length = static_int(length, "length")
  dtype = float_dtype()
  n = jnp.asarray(length, dtype)
  chex.assert_rank(n, 0, custom_message="length must be a scalar.")
  e = jnp.arange(max_length + 1, dtype=dtype)
  log_odds = hamming_log_odds(alphabet_size, tau, convention)
  # Binomial form e·log p + (n−e)·log(1−p), p = σ(log ρ): small magnitudes
  # near the mode keep float32 accurate; logsumexp removes residual error.
  log_p = jax.nn.log_sigmoid(log_odds)
  log_not_p = jax.nn.log_sigmoid(-log_odds)
  term = (jnp.where(e == 0, 0.0, e * log_p)
          + jnp.where(n - e <= 0, 0.0, jnp.maximum(n - e, 0.0) * log_not_p))
  log_pmf = log_binom(n, e) + term
  return log_pmf - logsumexp(log_pmf)


def hamming_distance(a_T: Array, b_T: Array, mask_T: Optional[Array] = None) -> Array:
  """Hamming distance ``d_H(a, b) = Σ_t mask_t [a_t ≠ b_t]``.

  Args:
    a_T: int tokens ``[T]``.
    b_T: int tokens ``[T]``.
    mask_T: optional bool ``[T]`` of positions to compare (default all).

  Returns:
    int32 scalar.
  """
  chex.assert_rank([a_T, b_T], 1)
  chex.assert_equal_shape([a_T, b_T])
  diff = a_T != b_T
  if mask_T is not None:
    chex.assert_equal_shape([a_T, mask_T])
    diff = diff & mask_T.astype(bool)
  return jnp.sum(diff.astype(jnp.int32))


def shift_to_different(draw: Array, tokens: Array, ops: AlphabetOps) -> Array:
  """Maps draws uniform in {0..V'−2} to tokens uniform among those ≠ ``tokens``."""
  draw = draw.astype(jnp.int32)
  idx = draw + (draw >= ops.token_to_index(tokens)).astype(jnp.int32)
  return ops.index_to_token(idx)


def _different_tokens(key: chex.PRNGKey, tokens: Array, ops: AlphabetOps) -> Array:
  """For each token, a uniformly drawn DIFFERENT token of the alphabet."""
  draw = jax.random.randint(key, tokens.shape, 0, jnp.maximum(ops.size - 1, 1))
  return shift_to_different(draw, tokens, ops)


def sample_hamming(key: chex.PRNGKey,
                   target_T: Array,
                   mask_T: Array,
                   alphabet: Alphabet,
                   tau: Numeric,
                   convention: str) -> Tuple[Array, Array]:
  """Exact sample of the Hamming payoff distribution ``q(y|y*) ∝ exp(−d_H(y,y*)/τ_eff)``.

  Stratified sampling: draw ``e ~ P(e)`` (``log_edit_count_pmf`` over the
  ``n = Σ mask`` editable positions), choose e distinct editable positions
  uniformly (uniform random keys, ranked), replace each by a uniformly drawn
  *different* token of the alphabet. Positions outside ``mask_T`` (EOS, PAD)
  are copied. Every y with ``d_H(y, y*) = e`` then has probability
  ``P(e) / (C(n,e)(V'−1)^e)``, which is q exactly (``τ_eff`` per
  ``effective_temperature``).

  Args:
    key: PRNG key.
    target_T: int tokens ``[T]`` (y*); tokens under ``mask_T`` must be in
      the alphabet.
    mask_T: bool ``[T]``, editable positions (e.g. ``logprobs.content_mask``).
    alphabet: ``(lo, hi)`` id range or bool mask ``[V]``.
    tau: scalar τ ≥ 0 (τ = 0 returns y*).
    convention: ``"exact"`` or ``"rescaled"``.

  Returns:
    ``(sample_T, num_edits)``: int32 ``[T]`` and int32 scalar e = d_H(y, y*).

  References:
    DESIGN.md §8; Norouzi et al. (2016) §3.
  """
  check_option("convention", convention, CONVENTIONS)
  chex.assert_rank([target_T, mask_T], 1)
  chex.assert_equal_shape([target_T, mask_T])
  ops = alphabet_ops(alphabet)
  target_T = target_T.astype(jnp.int32)
  mask_T = mask_T.astype(bool)
  t_max = target_T.shape[0]
  n = jnp.sum(mask_T.astype(jnp.int32))
  k_e, k_pos, k_tok = jax.random.split(key, 3)
  log_pmf = log_edit_count_pmf(n, ops.size, tau, convention, max_length=t_max)
  num_edits = jax.random.categorical(k_e, log_pmf).astype(jnp.int32)
  # e distinct positions uniformly among the editable ones: rank iid uniform
  # keys; non-editable positions get keys above every editable one.
  u = jax.random.uniform(k_pos, (t_max,))
  u = jnp.where(mask_T, u, 2.0)
  ranks = jnp.argsort(jnp.argsort(u))
  chosen = (ranks < num_edits) & mask_T
  replacement = _different_tokens(k_tok, target_T, ops)
  sample_T = jnp.where(chosen, replacement, target_T)
  return sample_T, num_edits


def hamming_log_prob(sample_T: Array,
                     target_T: Array,
                     mask_T: Array,
                     alphabet: Alphabet,
                     tau: Numeric,
                     convention: str) -> Array:
  """Exact log q_hamming(y | y*) of a sequence under the Hamming sampler.

      log q(y|y*) = log P(e) − log C(n, e) − e·log(V'−1),   e = d_H(y, y*)

  over the n editable positions; ``−inf`` if y differs from y* outside the
  mask or uses a token outside the alphabet at an edited position. Equals
  ``−e/τ_eff − n·log(1 + ρ)``.

  Args:
    sample_T: int tokens ``[T]`` (y).
    target_T: int tokens ``[T]`` (y*).
    mask_T: bool ``[T]`` editable positions.
    alphabet: ``(lo, hi)`` or bool mask ``[V]``.
    tau: scalar τ.
    convention: ``"exact"`` or ``"rescaled"``.

  Returns:
    Float scalar log q.

  References:
    DESIGN.md §8 (proposal density for importance sampling).
  """
  check_option("convention", convention, CONVENTIONS)
  chex.assert_rank([sample_T, target_T, mask_T], 1)
  chex.assert_equal_shape([sample_T, target_T, mask_T])
  ops = alphabet_ops(alphabet)
  mask_T = mask_T.astype(bool)
  t_max = target_T.shape[0]
  dtype = float_dtype()
  diff = sample_T != target_T
  e = jnp.sum((diff & mask_T).astype(jnp.int32))
  n = jnp.sum(mask_T.astype(jnp.int32))
  log_pmf = log_edit_count_pmf(n, ops.size, tau, convention, max_length=t_max)
  e_f = e.astype(dtype)
  log_alt = jnp.log(jnp.maximum(ops.size.astype(dtype) - 1.0, 1.0))
  log_q = log_pmf[e] - log_binom(n.astype(dtype), e_f) - jnp.where(e == 0, 0.0, e_f * log_alt)
  possible = (~jnp.any(diff & ~mask_T)) & jnp.all(~(diff & mask_T) | ops.contains(sample_T))
  return jnp.where(possible, log_q, NEG_INF)
