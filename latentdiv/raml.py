"""Reward-augmented maximum likelihood (RAML) and token-level label smoothing.

RAML (Norouzi et al., 2016) trains on samples from the *exponentiated payoff
distribution* of a reference output ``y*``

    q(y | y*; τ) ∝ exp(r(y, y*) / τ),

    L_RAML = −E_{y ~ q(·|y*; τ)} [log p_θ(y | x)] ≈ −(1/N) Σ_n log p_θ(y⁽ⁿ⁾ | x),

instead of on ``y*`` alone (τ → 0 recovers maximum likelihood). The payoff
samplers are in ``latentdiv.payoff`` (Hamming, exact) and ``latentdiv.edits``
(edit distance, approximate); this module batches them for the train step
(``sample_raml_targets``) and holds the losses, as pure JAX functions with
fixed shapes. Nothing
here depends on the model: losses take per-sample sequence log-likelihoods or
logits.

Tokens follow ``latentdiv/vocab.py``: an output is a row of ``T`` tokens —
content tokens, then ``EOS`` (a real, scored token), then ``PAD`` (0). The
*alphabet* is the set of content tokens samples may use, given either as an id
range ``(lo, hi)`` (tokens ``lo..hi-1``; ``V' = hi − lo``) or as a boolean
mask ``[V]`` array over the vocabulary (``V' = mask.sum()``; a Python tuple or
list is always read as ``(lo, hi)``). Content tokens of a
target at editable positions must belong to the alphabet.

Samplers (DESIGN.md §8):

* **Hamming** reward ``r = −d_H(y, y*)`` over the editable positions: exact
  stratified sampling (``sample_hamming``). The number of edits e follows

      P(e) ∝ C(n, e) (V'−1)^e exp(−e/τ),   e = 0..n      ("exact"),

  i.e. a Binomial(n, ρ/(1+ρ)) with per-token odds ``ρ = (V'−1) e^(−1/τ)``.
  The public implementations (Norouzi's reference code and those derived
  from it) multiply the count by ``(V'−1)^(−e/τ)``; this is the exact payoff
  distribution at effective temperature ``τ/(1 + ln(V'−1))``, a
  Binomial(n, ρ/(1+ρ)) with ``ρ = (V'−1)^(1−1/τ) e^(−1/τ)`` ("rescaled").
  **The τ values reported in the paper (0.6–0.95) refer to "rescaled"**; with
  "exact" and a large alphabet those τ edit almost every position.
  (The reference code writes the vocabulary size V where we write V'−1, the
  number of alternatives per position; with V'−1 the rescaled distribution is
  exactly the payoff distribution at the effective temperature.)
* **Edit distance** (approximate, ``sample_edit``): see its docstring.
* **Arbitrary rewards**: self-normalised importance sampling with the Hamming
  sampler as proposal (``sample_importance_targets``: ``hamming_log_prob``,
  ``importance_weights``, ``effective_sample_size``; rewards in
  ``latentdiv.rewards``: the exact edit distance, a sentence BLEU).

Label smoothing (the token-level baseline the seed relates RAML to) and the
distillation view ``KL(q ‖ p_θ)`` are at the end of the file.

References:
  Norouzi, Bengio, Chen, Jaitly, Schuster, Wu, Schuurmans (2016), "Reward
  Augmented Maximum Likelihood for Neural Structured Prediction", NeurIPS.
  DESIGN.md §8.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from latentdiv import edits
from latentdiv import payoff
from latentdiv import rewards as rewards_lib
from latentdiv.payoff import Alphabet, Array, CONVENTIONS, NEG_INF, Numeric  # noqa: F401

REWARDS = ("hamming", "edit")
# Rewards with no exact sampler, by self-normalised importance sampling with the
# Hamming proposal: "<name>_is" for each reward of ``rewards.REWARDS``.
IMPORTANCE_REWARDS = tuple(f"{name}_is" for name in rewards_lib.REWARDS)
PRIORS = ("uniform", "unigram")

# ---------------------------------------------------------------------------
# Batched sampling for the train step.
# ---------------------------------------------------------------------------


class RamlSamples(NamedTuple):
  """Output of ``sample_raml_targets``.

  Attributes:
    tokens: int32 ``[B, N, T]`` sampled outputs (EOS/PAD conventions kept).
    num_edits: int32 ``[B, N]`` drawn number of edits (= Hamming distance for
      "hamming"; an upper bound on the edit distance for "edit").
  """
  tokens: Array
  num_edits: Array


def sample_raml_targets(key: chex.PRNGKey,
                        targets_BxT: Array,
                        mask_BxT: Array,
                        n_samples: int,
                        alphabet: Alphabet,
                        tau: Numeric,
                        convention: str,
                        reward: str = "hamming",
                        max_edits: Optional[int] = None) -> RamlSamples:
  """N RAML samples per target, vmapped over the batch and the samples.

      y⁽ᵇ'ⁿ⁾ ~ q(· | y*_b; τ),   b = 1..B, n = 1..N

  Pure and fixed-shape (no Python loop over examples): call it inside the
  jitted train step with ``n_samples``, ``convention``, ``reward`` and
  ``max_edits`` static.

  Args:
    key: PRNG key.
    targets_BxT: int tokens ``[B, T]``.
    mask_BxT: bool ``[B, T]`` editable positions (``editable_mask`` per row).
      For ``"edit"`` the content must be a prefix and ``length = Σ_t mask``;
      the sample gets EOS after its content.
    n_samples: static N.
    alphabet: ``(lo, hi)`` or bool mask ``[V]``.
    tau: scalar τ.
    convention: ``"exact"`` or ``"rescaled"``.
    reward: ``"hamming"`` (exact, ``sample_hamming``) or ``"edit"``
      (approximate, ``sample_edit``).
    max_edits: static, ``"edit"`` only (default T).

  Returns:
    ``RamlSamples(tokens [B, N, T], num_edits [B, N])``.

  References:
    DESIGN.md §8.
  """
  payoff.check_option("reward", reward, REWARDS)
  payoff.check_option("convention", convention, CONVENTIONS)
  chex.assert_rank([targets_BxT, mask_BxT], 2)
  chex.assert_equal_shape([targets_BxT, mask_BxT])
  b = targets_BxT.shape[0]
  keys = jax.random.split(key, (b, n_samples))

  if reward == "hamming":
    def one(k, target_T, mask_T):
      return payoff.sample_hamming(k, target_T, mask_T, alphabet, tau, convention)
  else:
    def one(k, target_T, mask_T):
      out = edits.sample_edit(k, target_T, jnp.sum(mask_T.astype(jnp.int32)), alphabet, tau,
                        convention, max_edits=max_edits, append_eos=True)
      return out.tokens, out.num_edits

  per_example = jax.vmap(one, in_axes=(0, None, None))
  tokens, num_edits = jax.vmap(per_example)(keys, targets_BxT, mask_BxT)
  return RamlSamples(tokens=tokens, num_edits=num_edits)


class ImportanceSamples(NamedTuple):
  """Output of ``sample_importance_targets``.

  Attributes:
    tokens: int32 ``[B, N, T]`` samples of the Hamming proposal.
    weights: float ``[B, N]`` self-normalised importance weights (rows sum to 1).
    ess: float ``[B]`` Kish effective sample size ``1/Σ_n w_n²`` of each row, in [1, N].
  """
  tokens: Array
  weights: Array
  ess: Array


def sample_importance_targets(key: chex.PRNGKey,
                              targets_BxT: Array,
                              mask_BxT: Array,
                              n_samples: int,
                              alphabet: Alphabet,
                              tau: Numeric,
                              convention: str,
                              reward: str,
                              proposal_tau: Optional[Numeric] = None) -> ImportanceSamples:
  """N weighted samples per target for a reward with no exact sampler (Hamming proposal).

      y⁽ⁿ⁾ ~ q_H(· | y*; τ_prop),   w_n ∝ exp(r(y⁽ⁿ⁾, y*)/τ_eff − log q_H(y⁽ⁿ⁾ | y*))

  so that ``Σ_n w_n f(y⁽ⁿ⁾)`` estimates ``E_{q_r}[f]`` for the payoff
  distribution ``q_r(y) ∝ exp(r(y, y*)/τ_eff)`` restricted to the proposal's
  support (outputs of y*'s length that differ from it only at editable
  positions). ``τ_eff = effective_temperature(V', τ, convention)``, so a τ
  means the same for every reward (with ``r = −d_H`` the weights are uniform).
  Pure and fixed-shape: call inside the jitted step with ``n_samples``,
  ``convention`` and ``reward`` static.

  Args:
    key: PRNG key.
    targets_BxT: int tokens ``[B, T]``.
    mask_BxT: bool ``[B, T]`` editable positions.
    n_samples: static N (N = 1 gives weight 1: no correction).
    alphabet: ``(lo, hi)`` or bool mask ``[V]``.
    tau: scalar τ of the target payoff distribution.
    convention: ``"exact"`` or ``"rescaled"`` (for τ_eff and the proposal).
    reward: a name in ``IMPORTANCE_REWARDS``: ``"edit_is"`` (``r = −d_E``,
      exact) or ``"bleu_is"`` (sentence BLEU), ``rewards.REWARDS``.
    proposal_tau: the proposal's τ (default τ).

  Returns:
    ``ImportanceSamples(tokens [B, N, T], weights [B, N], ess [B])``.

  References:
    DESIGN.md §8.4; Norouzi et al. (2016) §3; Kish (1965).
  """
  payoff.check_option("reward", reward, IMPORTANCE_REWARDS)
  payoff.check_option("convention", convention, CONVENTIONS)
  proposal_tau = tau if proposal_tau is None else proposal_tau
  tokens = sample_raml_targets(key, targets_BxT, mask_BxT, n_samples, alphabet, proposal_tau,
                               convention).tokens
  log_q = jax.vmap(jax.vmap(payoff.hamming_log_prob, (0, None, None, None, None, None)),
                   (0, 0, 0, None, None, None))(tokens, targets_BxT, mask_BxT, alphabet,
                                                proposal_tau, convention)
  reward_fn = rewards_lib.REWARDS[reward[:-len("_is")]]
  r = jax.vmap(jax.vmap(reward_fn, (0, None)))(tokens, targets_BxT)
  tau_eff = payoff.effective_temperature(payoff.alphabet_size(alphabet), tau, convention)
  weights = jax.vmap(importance_weights, (0, 0, None))(r, log_q, tau_eff)
  return ImportanceSamples(tokens=tokens, weights=weights,
                           ess=jax.vmap(effective_sample_size)(weights))


# ---------------------------------------------------------------------------
# Losses, importance weights, distillation view.
# ---------------------------------------------------------------------------


def raml_loss(log_likelihoods_N: Array,
              weights_N: Optional[Array] = None,
              mask_N: Optional[Array] = None) -> Array:
  """RAML loss of one example from the sequence log-likelihoods of its N samples.

      L = −(1/N) Σ_n log p_θ(y⁽ⁿ⁾ | x)          (samples from q; weights_N=None)
      L = −Σ_n sg(w_n) log p_θ(y⁽ⁿ⁾ | x)        (self-normalised IS weights)

  Batch with ``jax.vmap`` and average over examples. τ → 0 (every sample is
  y*) is maximum likelihood.

  Args:
    log_likelihoods_N: float ``[N]`` log p_θ(y⁽ⁿ⁾ | x).
    weights_N: optional float ``[N]`` normalised weights (``importance_weights``);
      gradients are stopped through them.
    mask_N: optional bool ``[N]`` of samples to use (unweighted form: the mean
      is over the valid samples; weighted form: masked samples get weight 0).

  Returns:
    Float scalar loss (0 if no sample is valid).

  References:
    DESIGN.md §8; Norouzi et al. (2016) eq. (8).
  """
  chex.assert_rank(log_likelihoods_N, 1, custom_message="log_likelihoods_N must be [N]")
  ll = log_likelihoods_N
  valid = jnp.ones(ll.shape, bool) if mask_N is None else mask_N.astype(bool)
  chex.assert_equal_shape([ll, valid], custom_message="arguments: log_likelihoods_N, mask_N")
  if weights_N is None:
    count = jnp.sum(valid.astype(ll.dtype))
    return -jnp.sum(jnp.where(valid, ll, 0.0)) / jnp.maximum(count, 1.0)
  chex.assert_equal_shape([ll, weights_N],
                          custom_message="arguments: log_likelihoods_N, weights_N")
  w = jax.lax.stop_gradient(weights_N)
  return -jnp.sum(jnp.where(valid, w * ll, 0.0))


def importance_weights(rewards_N: Array,
                       log_proposal_N: Array,
                       tau: Numeric,
                       mask_N: Optional[Array] = None) -> Array:
  """Self-normalised importance weights for the payoff distribution of any reward.

      w_n = exp(r_n/τ − log q_prop(y_n)) / Σ_m exp(r_m/τ − log q_prop(y_m))

  (a softmax in log space), for samples ``y_n ~ q_prop`` — typically the
  Hamming sampler, with ``log q_prop`` from ``hamming_log_prob`` — and a task
  reward ``r(y, y*)`` (e.g. −edit distance, BLEU). ``Σ_n w_n f(y_n)`` then
  estimates ``E_{q_r}[f]`` for ``q_r(y) ∝ exp(r(y, y*)/τ)`` (consistent,
  biased for finite N).

  Args:
    rewards_N: float ``[N]`` rewards r(y_n, y*).
    log_proposal_N: float ``[N]`` log q_prop(y_n | y*).
    tau: scalar τ > 0 of the target payoff distribution.
    mask_N: optional bool ``[N]`` valid samples (others get weight 0).

  Returns:
    Float ``[N]`` weights, non-negative, summing to 1 (all zeros if no sample
    is valid).

  References:
    DESIGN.md §8 (arbitrary task rewards); Norouzi et al. (2016) §3.
  """
  chex.assert_rank([rewards_N, log_proposal_N], 1)
  chex.assert_equal_shape([rewards_N, log_proposal_N])
  dtype = jnp.result_type(rewards_N.dtype, log_proposal_N.dtype, payoff.float_dtype())
  valid = jnp.ones(rewards_N.shape, bool) if mask_N is None else mask_N.astype(bool)
  chex.assert_equal_shape([rewards_N, valid])
  log_w = rewards_N.astype(dtype) / jnp.asarray(tau, dtype) - log_proposal_N.astype(dtype)
  log_w = jnp.where(valid, log_w, NEG_INF)
  log_norm = logsumexp(log_w)
  ok = valid & jnp.isfinite(log_norm)
  return jnp.where(ok, jnp.exp(log_w - jnp.where(jnp.isfinite(log_norm), log_norm, 0.0)), 0.0)


def effective_sample_size(weights_N: Array) -> Array:
  """Kish effective sample size ``1 / Σ_n w_n²`` of normalised weights.

  Args:
    weights_N: float ``[N]``, non-negative, summing to 1.

  Returns:
    Float scalar in [1, N] (0 for all-zero weights).
  """
  chex.assert_rank(weights_N, 1)
  s = jnp.sum(weights_N ** 2)
  return jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)


def kl_payoff_to_model(log_q_N: Array,
                       log_p_N: Array,
                       weights_N: Optional[Array] = None,
                       mask_N: Optional[Array] = None) -> Array:
  """Monte-Carlo estimate of the distillation view ``KL(q ‖ p_θ)``.

      KL(q ‖ p_θ) = E_{y~q}[log q(y|y*) − log p_θ(y|x)] ≈ (1/N) Σ_n (log q_n − log p_n)

  from samples of q (e.g. ``sample_hamming`` with ``hamming_log_prob``), or
  ``Σ_n w_n (log q_n − log p_n)`` with self-normalised weights when the
  samples come from a proposal. Minimising RAML's loss minimises this KL
  (q does not depend on θ).

  Args:
    log_q_N: float ``[N]`` exact log q(y_n | y*).
    log_p_N: float ``[N]`` log p_θ(y_n | x).
    weights_N: optional float ``[N]`` normalised weights.
    mask_N: optional bool ``[N]`` valid samples.

  Returns:
    Float scalar estimate (unbiased without weights).

  References:
    DESIGN.md §8; Norouzi et al. (2016) §3 (RAML as KL(q ‖ p_θ)).
  """
  chex.assert_rank([log_q_N, log_p_N], 1)
  chex.assert_equal_shape([log_q_N, log_p_N])
  diff = log_q_N - log_p_N
  valid = jnp.ones(diff.shape, bool) if mask_N is None else mask_N.astype(bool)
  chex.assert_equal_shape([diff, valid])
  if weights_N is None:
    count = jnp.sum(valid.astype(diff.dtype))
    return jnp.sum(jnp.where(valid, diff, 0.0)) / jnp.maximum(count, 1.0)
  chex.assert_equal_shape([diff, weights_N])
  return jnp.sum(jnp.where(valid, weights_N * diff, 0.0))


def smoothing_prior(vocab_size: int,
                    prior: str = "uniform",
                    alphabet: Optional[Alphabet] = None,
                    unigram: Optional[Array] = None) -> Array:
  """Prior π over the vocabulary used by label smoothing.

      uniform:  π_v = [v ∈ A] / |A|   (A = alphabet; all V tokens if None)
      unigram:  π_v = u_v / Σ_w u_w   (u = given unigram counts/probabilities)

  Args:
    vocab_size: static V.
    prior: ``"uniform"`` or ``"unigram"``.
    alphabet: optional ``(lo, hi)`` or bool mask ``[V]`` for ``"uniform"``.
    unigram: float ``[V]`` non-negative, required for ``"unigram"``.

  Returns:
    Float ``[V]`` probabilities.

  References:
    DESIGN.md §8; Szegedy et al. (2016) (label smoothing).
  """
  payoff.check_option("prior", prior, PRIORS)
  dtype = payoff.float_dtype()
  if prior == "uniform":
    if alphabet is None:
      return jnp.full((vocab_size,), 1.0 / vocab_size, dtype)
    ops = payoff.alphabet_ops(alphabet)
    inside = ops.contains(jnp.arange(vocab_size)).astype(dtype)
    return inside / jnp.maximum(jnp.sum(inside), 1.0)
  if unigram is None:
    raise ValueError("prior='unigram' needs the unigram vector [V].")
  unigram = jnp.asarray(unigram, dtype)
  chex.assert_shape(unigram, (vocab_size,), custom_message="unigram must be [V].")
  return unigram / jnp.sum(unigram)


def label_smoothing_targets(targets_T: Array,
                            vocab_size: int,
                            epsilon: Numeric,
                            prior: str = "uniform",
                            alphabet: Optional[Alphabet] = None,
                            unigram: Optional[Array] = None) -> Array:
  """Token-level smoothed targets ``(1 − ε)·onehot(y_t) + ε·π``.

  Args:
    targets_T: int ``[T]``.
    vocab_size: static V.
    epsilon: scalar ε ∈ [0, 1].
    prior: ``"uniform"`` (over ``alphabet``, default all V) or ``"unigram"``.
    alphabet: see ``smoothing_prior``.
    unigram: see ``smoothing_prior``.

  Returns:
    Float ``[T, V]``, rows summing to 1.

  References:
    DESIGN.md §8 (the baseline RAML relates to).
  """
  chex.assert_rank(targets_T, 1)
  pi_V = smoothing_prior(vocab_size, prior, alphabet, unigram)
  eps = jnp.asarray(epsilon, pi_V.dtype)
  onehot = jax.nn.one_hot(targets_T, vocab_size, dtype=pi_V.dtype)
  return (1.0 - eps) * onehot + eps * pi_V[None, :]


def label_smoothing_loss(logits_TxV: Array,
                         targets_T: Array,
                         mask_T: Array,
                         epsilon: Numeric,
                         prior: str = "uniform",
                         alphabet: Optional[Alphabet] = None,
                         unigram: Optional[Array] = None) -> Array:
  """Cross-entropy to the smoothed targets, in closed form, summed over valid positions.

      L = −Σ_t mask_t [ (1 − ε) log p_t(y_t) + ε Σ_v π_v log p_t(v) ]

  (terms with π_v = 0 are dropped, so logits of −inf outside the prior's
  support are fine). ε = 0 is the sequence NLL.

  Args:
    logits_TxV: float ``[T, V]``.
    targets_T: int ``[T]``.
    mask_T: bool/float ``[T]`` scored positions.
    epsilon: scalar ε.
    prior: ``"uniform"`` or ``"unigram"`` (see ``smoothing_prior``).
    alphabet: see ``smoothing_prior``.
    unigram: see ``smoothing_prior``.

  Returns:
    Float scalar (per-sequence sum; 0 for an all-padding row).

  References:
    DESIGN.md §8; Norouzi et al. (2016) §4 (relation to label smoothing).
  """
  names = "arguments: logits_TxV, targets_T, mask_T"
  chex.assert_rank([logits_TxV, targets_T, mask_T], [2, 1, 1], custom_message=names)
  chex.assert_equal_shape([targets_T, mask_T], custom_message=names)
  chex.assert_equal_shape_prefix([logits_TxV, targets_T], 1, custom_message=names)
  v = logits_TxV.shape[-1]
  pi_V = smoothing_prior(v, prior, alphabet, unigram)
  log_probs = jax.nn.log_softmax(logits_TxV, axis=-1)
  eps = jnp.asarray(epsilon, log_probs.dtype)
  token_lp = jnp.take_along_axis(log_probs, targets_T[:, None].astype(jnp.int32), axis=-1)[:, 0]
  prior_lp = jnp.sum(jnp.where(pi_V[None, :] > 0, pi_V[None, :] * log_probs, 0.0), axis=-1)
  # ε = 1 drops the target term (0·log 0 would be NaN for a −inf logit).
  target_term = jnp.where(eps < 1.0, (1.0 - eps) * token_lp, 0.0)
  per_token = -(target_term + eps * prior_lp)
  return jnp.sum(jnp.where(mask_T.astype(bool), per_token, 0.0))
