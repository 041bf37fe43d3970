"""Evaluation metrics for latent strategies (DESIGN.md §3, §9).

Pure ``jax.numpy`` functions: they run jitted on device (sizes such as ``S``
and ``K`` are static Python ints) or eagerly on host arrays (NumPy inputs are
accepted and jax arrays are returned; wrap in ``np.asarray`` to log them).

Sequences follow ``latentdiv.vocab``: an output is a row of T tokens ending at
its first EOS; what follows the first EOS is ignored. Strategy matches use the
convention ``-1`` for "matches no valid output" (an invalid sample).

Shapes: B examples, K latents, S hidden strategies, T output length, L rollout
length.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from latentdiv import logprobs
from latentdiv import mutual_information
from latentdiv import vocab

NMI_NORMALIZATIONS = ("arithmetic", "geometric", "min", "max")


# ------------------------------------------------------------- sequences


def sequences_equal_up_to_eos(sample_T: jax.Array, reference_T: jax.Array,
                              eos: int = vocab.EOS) -> jax.Array:
  """Whether ``sample`` equals ``reference`` up to and including the reference's first EOS.

  ``eq = ∀ t ≤ t_eos(reference): sample_t = reference_t``. The sample must
  therefore end with EOS at the same place (the reference has no EOS before
  it); tokens after it are ignored in both. With no EOS in the reference all
  T positions are compared. The relation is symmetric.

  Args:
    sample_T: [..., T] int tokens.
    reference_T: [..., T] int tokens (same shape).
    eos: the end-of-sequence id.

  Returns:
    [...] bool.

  References:
    DESIGN.md §9 (validity, exact match).
  """
  chex.assert_equal_shape([sample_T, reference_T],
                          custom_message="sample and reference must have the same shape")
  same = (sample_T == reference_T) | ~logprobs.mask_through_eos(reference_T, eos)
  return jnp.all(same, axis=-1)


def exact_match(pred_BxT: jax.Array, target_BxT: jax.Array,
                eos: int = vocab.EOS) -> jax.Array:
  """Per-example exact match of a prediction with its reference, up to EOS.

  ``em_b = sequences_equal_up_to_eos(pred_b, target_b)``; its mean is the
  exact-match rate.

  Args:
    pred_BxT: [B, T] int predicted tokens.
    target_BxT: [B, T] int references.
    eos: the end-of-sequence id.

  Returns:
    [B] bool.

  References:
    DESIGN.md §9 (RAML: exact match).
  """
  chex.assert_rank(pred_BxT, 2, custom_message="pred must be [batch, length]")
  chex.assert_rank(target_BxT, 2, custom_message="target must be [batch, length]")
  if pred_BxT.shape != target_BxT.shape:
    raise ValueError(f"pred shape {pred_BxT.shape} != target shape {target_BxT.shape}.")
  return sequences_equal_up_to_eos(pred_BxT, target_BxT, eos)


# ------------------------------------------------------------ strategies


def match_strategies(samples_BxKxT: jax.Array, valid_outputs_BxSxT: jax.Array,
                     eos: int = vocab.EOS) -> jax.Array:
  """Index of the valid output each sample reproduces, −1 if none.

  ``m_{b,k} = min{s : sequences_equal_up_to_eos(y_{b,k}, v_{b,s})}``, −1 if
  the set is empty (the smallest s if several valid outputs coincide).

  Args:
    samples_BxKxT: [B, K] samples of T tokens, one per latent (K may differ from S).
    valid_outputs_BxSxT: [B, S, T] the valid outputs of each example.
    eos: the end-of-sequence id.

  Returns:
    [B, K] int32 in {−1, 0..S−1}.

  References:
    DESIGN.md §9 (per-latent validity, strategy coverage).
  """
  chex.assert_rank(samples_BxKxT, 3, custom_message="samples must be [batch, K, length]")
  chex.assert_rank(valid_outputs_BxSxT, 3,
                   custom_message="valid_outputs must be [batch, S, length]")
  b, _, t = samples_BxKxT.shape
  if valid_outputs_BxSxT.shape[0] != b or valid_outputs_BxSxT.shape[2] != t:
    raise ValueError(
        f"samples {samples_BxKxT.shape} and valid_outputs {valid_outputs_BxSxT.shape} "
        "must agree on batch (axis 0) and length (axis 2).")
  valid = jnp.asarray(valid_outputs_BxSxT)
  compared_Bx1xSxT = logprobs.mask_through_eos(valid, eos)[:, None, :, :]
  same_BxKxSxT = jnp.asarray(samples_BxKxT)[:, :, None, :] == valid[:, None, :, :]
  equal_BxKxS = jnp.all(same_BxKxSxT | ~compared_Bx1xSxT, axis=-1)
  first = jnp.argmax(equal_BxKxS, axis=-1).astype(jnp.int32)
  return jnp.where(equal_BxKxS.any(axis=-1), first, -1)


def per_latent_validity(matches_BxK: jax.Array) -> jax.Array:
  """Share of each latent's samples that reproduce some valid output.

  ``validity_k = (1/B) Σ_b [m_{b,k} ≥ 0]``.

  Args:
    matches_BxK: [B, K] int from ``match_strategies``.

  Returns:
    [K] float32.

  References:
    DESIGN.md §9.
  """
  chex.assert_rank(matches_BxK, 2, custom_message="matches must be [batch, K]")
  return jnp.mean(matches_BxK >= 0, axis=0, dtype=jnp.float32)


def per_example_coverage(matches_BxK: jax.Array, num_strategies: int) -> jax.Array:
  """Mean over examples of the share of the S strategies some latent reproduces.

  ``cov_x = (1/B) Σ_b |{m_{b,k} : k, m_{b,k} ≥ 0}| / S``. Unlike
  :func:`strategy_coverage` it does not ask a latent to pick the same
  strategy index for every x: a labelling that depends on x (as valid a
  decomposition of the data when the strategy index is not identifiable)
  still covers every strategy of every example.

  Args:
    matches_BxK: [B, K] int from :func:`match_strategies` (−1 = invalid).
    num_strategies: S.

  Returns:
    Scalar in [0, min(K, S)/S].

  References:
    DESIGN.md §9.
  """
  chex.assert_rank(matches_BxK, 2, custom_message="matches_BxK must be [batch, K]")
  hits_BxKxS = jax.nn.one_hot(matches_BxK, num_strategies, dtype=jnp.float32)  # −1 → zeros.
  return jnp.mean(jnp.max(hits_BxKxS, axis=1))


def latent_strategy_counts(matches_BxK: jax.Array, num_strategies: int) -> jax.Array:
  """How often each latent produced each strategy.

  ``n_{k,s} = Σ_b [m_{b,k} = s]`` (invalid samples count nowhere).

  Args:
    matches_BxK: [B, K] int in {−1, 0..S−1}.
    num_strategies: S.

  Returns:
    [K, S] int32.

  References:
    DESIGN.md §9.
  """
  chex.assert_rank(matches_BxK, 2, custom_message="matches must be [batch, K]")
  _check_positive_int(num_strategies, "num_strategies")
  return jax.nn.one_hot(matches_BxK, num_strategies, dtype=jnp.int32).sum(axis=0)


def confusion(matches_BxK: jax.Array, num_strategies: int,
              over_valid: bool = False) -> jax.Array:
  """Latent × strategy confusion matrix, normalised per latent (for plots).

  ``C_{k,s} = n_{k,s} / B`` (rows sum to the latent's validity; the invalid
  share is ``1 − Σ_s C_{k,s}``), or with ``over_valid=True``
  ``C_{k,s} = n_{k,s} / Σ_s' n_{k,s'}`` (rows sum to 1; a row with no valid
  sample is 0).

  Args:
    matches_BxK: [B, K] int in {−1, 0..S−1}.
    num_strategies: S.
    over_valid: normalise by the latent's valid samples instead of all B.

  Returns:
    [K, S] float32.

  References:
    DESIGN.md §9.
  """
  counts = latent_strategy_counts(matches_BxK, num_strategies).astype(jnp.float32)
  if over_valid:
    total = counts.sum(axis=1, keepdims=True)
    return jnp.where(total > 0, counts / jnp.maximum(total, 1.0), 0.0)
  return counts / matches_BxK.shape[0]


class Coverage(NamedTuple):
  """Result of ``strategy_coverage``.

  Attributes:
    coverage: scalar float32, share of the S strategies that some latent recovers.
    assignment: [K] int32, the strategy latent k recovers, −1 if none.
  """

  coverage: jax.Array
  assignment: jax.Array


def strategy_coverage(matches_BxK: jax.Array, num_strategies: int,
                      threshold: float = 0.5) -> Coverage:
  """How many hidden strategies the K latents recover.

  Latent k *recovers* strategy ``a_k = argmax_s n_{k,s}`` (smallest s on ties)
  if that strategy's share of **all** B of its samples, invalid ones included,
  is at least the threshold: ``n_{k,a_k} / B ≥ threshold``; otherwise
  ``a_k = −1``. Coverage is ``|{a_k : a_k ≥ 0}| / S``, the fraction of
  strategies that are the dominant strategy of at least one latent. It is at
  most ``min(K, S)/S``; several latents may recover the same strategy. With
  ``threshold > 0.5`` a latent has at most one dominant strategy by
  construction; with lower thresholds the argmax breaks the tie.

  Args:
    matches_BxK: [B, K] int in {−1, 0..S−1}.
    num_strategies: S.
    threshold: minimum share, in (0, 1].

  Returns:
    ``Coverage(coverage [], assignment [K])``.

  References:
    DESIGN.md §9 (strategy coverage).
  """
  chex.assert_rank(matches_BxK, 2, custom_message="matches must be [batch, K]")
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
  counts = latent_strategy_counts(matches_BxK, num_strategies)
  best = jnp.argmax(counts, axis=1).astype(jnp.int32)
  share = jnp.max(counts, axis=1) / matches_BxK.shape[0]
  assignment = jnp.where(share >= threshold, best, -1)
  covered = jnp.any(assignment[:, None] == jnp.arange(num_strategies)[None, :], axis=0)
  return Coverage(coverage=jnp.mean(covered, dtype=jnp.float32), assignment=assignment)


def _entropy(p: jax.Array) -> jax.Array:
  """−Σ p log p with 0 log 0 = 0."""
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def latent_strategy_nmi(matches_BxK: jax.Array, num_strategies: int,
                        normalization: str = "arithmetic") -> jax.Array:
  """Normalised mutual information between latent and matched strategy.

  Over the N valid samples (``m_{b,k} ≥ 0``), with the empirical joint
  ``P(z=k, s) = n_{k,s} / N`` and its marginals ``P(z)``, ``P(s)``:

      I = Σ_{k,s} P(k,s) log( P(k,s) / (P(k) P(s)) ),
      NMI = I / norm,  norm = (H(Z) + H(S))/2       ("arithmetic", sklearn's default)
                              sqrt(H(Z) H(S))       ("geometric")
                              min(H(Z), H(S))       ("min")
                              max(H(Z), H(S))       ("max")

  NMI ∈ [0, 1]; it is 1 when latent and strategy determine each other (a
  one-to-one assignment, K = S) and 0 when they are independent. Degenerate
  cases return 0: no valid sample, or ``norm = 0`` (e.g. a single strategy
  and a single latent among the valid samples — where sklearn would return 1).
  Note that H(Z) is the entropy of the latents *among valid samples*.

  Args:
    matches_BxK: [B, K] int in {−1, 0..S−1}.
    num_strategies: S.
    normalization: one of ``NMI_NORMALIZATIONS``.

  Returns:
    Scalar float32.

  References:
    DESIGN.md §9; Vinh, Epps & Bailey (2010), "Information theoretic measures
    for clusterings comparison".
  """
  if normalization not in NMI_NORMALIZATIONS:
    raise ValueError(
        f"normalization must be one of {NMI_NORMALIZATIONS}, got {normalization!r}.")
  counts = latent_strategy_counts(matches_BxK, num_strategies).astype(jnp.float32)
  total = counts.sum()
  joint = counts / jnp.maximum(total, 1.0)
  p_z = joint.sum(axis=1)
  p_s = joint.sum(axis=0)
  independent = p_z[:, None] * p_s[None, :]
  ratio = jnp.where(joint > 0, joint / jnp.where(joint > 0, independent, 1.0), 1.0)
  mutual_info = jnp.maximum(jnp.sum(joint * jnp.log(ratio)), 0.0)
  h_z, h_s = _entropy(p_z), _entropy(p_s)
  norm = {
      "arithmetic": lambda: 0.5 * (h_z + h_s),
      "geometric": lambda: jnp.sqrt(h_z * h_s),
      "min": lambda: jnp.minimum(h_z, h_s),
      "max": lambda: jnp.maximum(h_z, h_s),
  }[normalization]()
  ok = (total > 0) & (norm > 0)
  return jnp.where(ok, mutual_info / jnp.where(ok, norm, 1.0), 0.0)


def latent_usage(winners_B: jax.Array, num_latents: int) -> jax.Array:
  """Share of examples each latent wins (the hard-EM responsibility argmax).

  ``u_k = (1/B) Σ_b [k̂_b = k]``, ``k̂_b = argmax_k sg(ℓ_k)``; ``u`` far from
  uniform is the first sign of collapse onto few latents.

  Args:
    winners_B: [B] int in {0..K−1}.
    num_latents: K.

  Returns:
    [K] float32, sums to 1.

  References:
    DESIGN.md §3.
  """
  chex.assert_rank(winners_B, 1, custom_message="winners must be [batch]")
  _check_positive_int(num_latents, "num_latents")
  return jax.nn.one_hot(winners_B, num_latents, dtype=jnp.float32).mean(axis=0)


# ------------------------------------------------------- sequence-level KL


class SequenceKL(NamedTuple):
  """Monte-Carlo sequence-level KL between latents (``mc_sequence_kl``).

  Attributes:
    pairwise: [K, K] float32, ``D̂_ij`` (diagonal 0).
    pairwise_stderr: [K, K] float32, standard error of ``D̂_ij`` over examples.
    mean: scalar, the mean of ``D̂_ij`` over the K(K−1) pairs i ≠ j.
    stderr: scalar, its standard error over examples.
  """

  pairwise: jax.Array
  pairwise_stderr: jax.Array
  mean: jax.Array
  stderr: jax.Array


def _mean_and_stderr(x_B: jax.Array, axis: int = 0):
  n = x_B.shape[axis]
  mean = jnp.mean(x_B, axis=axis)
  return mean, jnp.std(x_B, axis=axis, ddof=1) / jnp.sqrt(n)


def mc_sequence_kl(logp_BxKxKxL: jax.Array, mask_BxKxL: jax.Array) -> SequenceKL:
  """Monte-Carlo estimate of ``D_ij = KL(p_i(y|x) ‖ p_j(y|x))`` from rollouts of p_i.

  With one rollout ``y^{(b,i)} ~ p_i(·|x_b)`` per example and latent, scored
  under every latent j, ``logp[b,i,j,t] = log p_j(y^{(b,i)}_t | c_t)``:

      R_{b,i,j} = Σ_t mask[b,i,t] (logp[b,i,i,t] − logp[b,i,j,t]),
      D̂_ij = (1/B) Σ_b R_{b,i,j},   se_ij = std_b(R_{b,i,j}) / sqrt(B)   (ddof 1).

  The scalar is ``D̄ = (1/B) Σ_b m_b`` with ``m_b`` the mean of ``R_{b,i,j}``
  over i ≠ j; its standard error is taken over the per-example means ``m_b``
  (so it accounts for the correlation between pairs that share an example).
  With K = 1 there is no pair and the scalar and its error are 0.
  The estimate is unbiased for ``E_x D_ij`` when the rollouts are sampled at
  temperature 1 up to EOS (mask 0 after it) or up to a fixed length L.

  Args:
    logp_BxKxKxL: [B, K, K, L] float log-probabilities of the rollout tokens
      (axis 1: the latent that sampled, axis 2: the latent that scores).
    mask_BxKxL: [B, K, L] valid rollout positions (bool or float).

  Returns:
    ``SequenceKL`` (float32, or float64 under x64 inputs).

  Raises:
    ValueError: inconsistent shapes or B < 2 (no standard error).

  References:
    DESIGN.md §5.1, §9.
  """
  chex.assert_rank(logp_BxKxKxL, 4, custom_message="logp must be [batch, K, K, length]")
  chex.assert_rank(mask_BxKxL, 3, custom_message="mask must be [batch, K, length]")
  b, k, k2, length = logp_BxKxKxL.shape
  if k != k2:
    raise ValueError(f"logp must be [batch, K, K, length], got {logp_BxKxKxL.shape}.")
  if mask_BxKxL.shape != (b, k, length):
    raise ValueError(f"mask shape {mask_BxKxL.shape} != {(b, k, length)} (from logp).")
  if b < 2:
    raise ValueError(f"need batch >= 2 for a standard error, got batch={b}.")
  logp = jnp.asarray(logp_BxKxKxL)
  mask = jnp.asarray(mask_BxKxL).astype(logp.dtype)
  own_BxKx1xL = jnp.diagonal(logp, axis1=1, axis2=2).transpose(0, 2, 1)[:, :, None, :]
  returns_BxKxK = jnp.sum((own_BxKx1xL - logp) * mask[:, :, None, :], axis=-1)
  pairwise, pairwise_stderr = _mean_and_stderr(returns_BxKxK)
  off_diagonal = 1.0 - jnp.eye(k, dtype=logp.dtype)
  num_pairs = max(k * (k - 1), 1)  # K = 1: no pair, the scalar is 0
  per_example_B = jnp.sum(returns_BxKxK * off_diagonal[None], axis=(1, 2)) / num_pairs
  mean, stderr = _mean_and_stderr(per_example_B)
  return SequenceKL(pairwise=pairwise, pairwise_stderr=pairwise_stderr,
                    mean=mean, stderr=stderr)


def mc_mutual_information(logp_BxKxKxL: jax.Array, mask_BxKxL: jax.Array):
  """Monte-Carlo ``I(Z; Y | x)`` (uniform prior) from one rollout per (example, latent).

  With ``logp[b,i,j,t] = log p_j(y^{(b,i)}_t | c_t)`` as in :func:`mc_sequence_kl`::

      R_{b,i} = log p_i(y^{(b,i)}) − log (1/K) Σ_j p_j(y^{(b,i)})  ≤ log K,

  ``Î = (1/B) Σ_b (1/K) Σ_i R_{b,i}`` and its standard error over examples
  (``mutual_information.monte_carlo_mi``). Unbiased for ``E_x I`` at
  temperature 1; 0 for K = 1.

  Args:
    logp_BxKxKxL: [B, K, K, L] log-probabilities of the rollout tokens.
    mask_BxKxL: [B, K, L] valid rollout positions.

  Returns:
    (mean, stderr) scalars.

  References:
    DESIGN.md §5.6, §9.
  """
  chex.assert_rank([logp_BxKxKxL, mask_BxKxL], [4, 3],
                   custom_message="arguments: logp_BxKxKxL, mask_BxKxL")
  k = logp_BxKxKxL.shape[1]
  seq = jnp.sum(logp_BxKxKxL * jnp.asarray(mask_BxKxL, logp_BxKxKxL.dtype)[:, :, None, :],
                axis=-1)  # [B, i, j]
  own = jnp.diagonal(seq, axis1=1, axis2=2)
  log_ratio = own - (jax.nn.logsumexp(seq, axis=-1) - jnp.log(k))
  return mutual_information.monte_carlo_mi(log_ratio[..., None])


def dead_latents(usage_K: jax.Array, validity_K: jax.Array, min_validity: float = 0.5):
  """Number of dead latents: usage 0 (wins no example) or validity below ``min_validity``.

  A latent that wins nothing under hard-EM is moved by the divergence terms
  alone and typically leaves the data (DESIGN.md §5.7).
  """
  dead = (jnp.asarray(usage_K) <= 0.0) | (jnp.asarray(validity_K) < min_validity)
  return jnp.sum(dead.astype(jnp.int32))


def confidence_interval(mean: jax.Array, stderr: jax.Array,
                        level: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Normal-approximation confidence interval ``mean ± z·stderr``.

  ``z = Φ⁻¹((1 + level)/2)`` (1.96 for 0.95).

  Args:
    mean: any shape.
    stderr: same shape as ``mean`` (or broadcastable scalar).
    level: coverage probability in (0, 1).

  Returns:
    ``(low, high)``.

  References:
    DESIGN.md §6 (Monte-Carlo KL with a confidence interval).
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level!r}.")
  mean, stderr = jnp.asarray(mean), jnp.asarray(stderr)
  z = jax.scipy.special.ndtri(jnp.asarray((1.0 + level) / 2.0, mean.dtype))
  return mean - z * stderr, mean + z * stderr


def _check_positive_int(value, name):
  if not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
