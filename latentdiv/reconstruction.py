"""Reconstruction objectives of a latent-conditioned model (DESIGN.md §3).

Given data ``(x, y*)`` the K teacher-forced log-likelihoods
``ℓ_k = log p_k(y* | x)`` are computed in one pass vmapped over k (PAD
positions masked, ``sequence_log_likelihood``). Two objectives turn them into a
loss:

* **hard-EM** (the default; "multiple-choice learning", the hMoEup recipe of
  Shen et al. 2019): ``L_rec = −ℓ_{k̂}``, ``k̂ = argmax_k sg(ℓ_k)`` — only the
  latent that explains the example best is trained on it.
* **soft-EM / marginal likelihood** under a uniform prior over z:
  ``L_rec = −logsumexp_k ℓ_k + log K = −log (1/K) Σ_k p_k(y* | x)``.
* **relaxed winner-take-all** (Rupprecht et al. 2017): the winner gets a
  share 1 − ε of the example, every other latent ε/(K−1), so a latent that
  wins nothing is still pulled towards the data (DESIGN.md §5.7).
* **annealed EM**: the latents are weighted by tempered responsibilities
  ``softmax_k(ℓ_k / τ)`` (stop-gradient), τ annealed from 1 (soft-EM's
  gradient) to 0 (hard-EM) over a schedule (deterministic annealing, Ueda &
  Nakano 1998).

Responsibilities (which latent explains an example) should be computed from a
forward pass *without dropout* (Shen et al. 2019 switch dropout off in the
E-step); that is the caller's business — the functions here only see ℓ.
Mixtures of this kind are known to collapse onto one component ("rich get
richer": the latent that wins early is trained more, so it keeps winning);
``latent_usage`` — the share of examples each latent wins — is the first sign
of it and should be logged every step.

Shapes: B batch, K latents, T positions, V vocabulary. The functions are
written for one sequence or one batch; batch/latents with ``jax.vmap``.

References:
  Shen, Ott, Auli, Ranzato (2019), "Mixture Models for Diverse Machine
  Translation: Tricks of the Trade", ICML (hMoEup: hard mixture, uniform prior,
  shared parameters, online responsibilities).
  Guzman-Rivera, Batra, Kohli (2012), "Multiple Choice Learning".
  Rupprecht, Laina, DiPietro, Baust, Tombari, Navab, Hager (2017), "Learning
  in an Uncertain World: Representing Ambiguity Through Multiple Hypotheses",
  ICCV (relaxed winner-take-all).
  Ueda & Nakano (1998), "Deterministic annealing EM algorithm", Neural Networks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

RECONSTRUCTION_KINDS = ("hard_em", "soft_em", "relaxed_wta", "annealed_em")


def _check_loglik(loglik_BxK):
  chex.assert_rank(loglik_BxK, 2, custom_message="loglik_BxK must be [batch, latents]")


def hard_em_loss(loglik_BxK: chex.Array) -> tuple[chex.Array, chex.Array]:
  """Hard-EM (multiple-choice) reconstruction loss.

  ``L_rec = (1/B) Σ_b −ℓ_{b, k̂_b}``, ``k̂_b = argmax_k sg(ℓ_{b,k})``: the
  gradient reaches only the winning latent of each example (ties go to the
  lowest index).

  Args:
    loglik_BxK: ``[B, K]`` log-likelihoods ``log p_k(y*_b | x_b)``.

  Returns:
    ``(loss, winners_B)``: the scalar loss and the ``[B]`` int32 winning latents.

  References:
    DESIGN.md §3; Shen et al. (2019), hMoEup.
  """
  _check_loglik(loglik_BxK)
  winners_B = jnp.argmax(jax.lax.stop_gradient(loglik_BxK), axis=-1).astype(jnp.int32)
  chosen_B = jnp.take_along_axis(loglik_BxK, winners_B[:, None], axis=-1)[:, 0]
  return -jnp.mean(chosen_B), winners_B


def soft_em_loss(loglik_BxK: chex.Array) -> chex.Array:
  """Soft-EM / marginal-likelihood loss under a uniform prior over the K latents.

  ``L_rec = (1/B) Σ_b [−logsumexp_k ℓ_{b,k} + log K] = −(1/B) Σ_b log
  ((1/K) Σ_k p_k(y*_b | x_b))``. Its gradient weighs each latent by its
  responsibility.

  Args:
    loglik_BxK: ``[B, K]`` log-likelihoods.

  Returns:
    The scalar loss.

  References:
    DESIGN.md §3; Shen et al. (2019).
  """
  _check_loglik(loglik_BxK)
  num_latents = loglik_BxK.shape[-1]
  return jnp.mean(-jax.nn.logsumexp(loglik_BxK, axis=-1) + math.log(num_latents))


def responsibilities(loglik_BxK: chex.Array) -> chex.Array:
  """Posterior over latents under a uniform prior, gradient stopped.

  ``r_{b,k} = softmax_k(sg(ℓ_{b,k})) = p(z=k | x_b, y*_b)``. Compute ℓ without
  dropout for this.

  Args:
    loglik_BxK: ``[B, K]`` log-likelihoods.

  Returns:
    ``[B, K]`` responsibilities, rows summing to 1.

  References:
    DESIGN.md §3.
  """
  _check_loglik(loglik_BxK)
  return jax.nn.softmax(jax.lax.stop_gradient(loglik_BxK), axis=-1)


def latent_usage(loglik_BxK: chex.Array) -> chex.Array:
  """Share of the examples each latent wins (its hard-EM assignment rate).

  ``u_k = (1/B) Σ_b 1[argmax_j ℓ_{b,j} = k]``. A latent whose share drifts
  to 0 is collapsing ("rich get richer").

  Args:
    loglik_BxK: ``[B, K]`` log-likelihoods.

  Returns:
    ``[K]`` shares summing to 1 (no gradient).

  References:
    DESIGN.md §3.
  """
  _check_loglik(loglik_BxK)
  num_latents = loglik_BxK.shape[-1]
  winners_B = jnp.argmax(jax.lax.stop_gradient(loglik_BxK), axis=-1)
  dtype = loglik_BxK.dtype if jnp.issubdtype(loglik_BxK.dtype, jnp.floating) else jnp.float32
  return jnp.mean(jax.nn.one_hot(winners_B, num_latents, dtype=dtype), axis=0)


def relaxed_wta_loss(loglik_BxK: chex.Array, epsilon) -> tuple[chex.Array, chex.Array]:
  """Relaxed winner-take-all: ``−[(1−ε) ℓ_{k̂} + ε/(K−1) Σ_{k≠k̂} ℓ_k]``, averaged over B.

  ε = 0 is hard-EM; ε = (K−1)/K weights every latent equally. The small
  share of the non-winners keeps a latent that wins no example on the data
  instead of leaving it to the divergence terms alone (DESIGN.md §5.7).

  Args:
    loglik_BxK: ``[B, K]`` log-likelihoods.
    epsilon: share of the non-winners, in [0, 1).

  Returns:
    ``(loss, winners_B)``.

  References:
    DESIGN.md §5.7; Rupprecht et al. (2017).
  """
  _check_loglik(loglik_BxK)
  num_latents = loglik_BxK.shape[-1]
  winners_B = jnp.argmax(jax.lax.stop_gradient(loglik_BxK), axis=-1).astype(jnp.int32)
  onehot = jax.nn.one_hot(winners_B, num_latents, dtype=loglik_BxK.dtype)
  others = epsilon / max(num_latents - 1, 1)
  weights = onehot * (1.0 - epsilon) + (1.0 - onehot) * others
  return -jnp.mean(jnp.sum(weights * loglik_BxK, axis=-1)), winners_B


def annealed_em_loss(loglik_BxK: chex.Array, temperature) -> chex.Array:
  """Annealed EM: ``−(1/B) Σ_b Σ_k sg(softmax_k(ℓ_{b,k} / τ)) ℓ_{b,k}``.

  At τ = 1 its gradient is soft-EM's (the marginal likelihood's); as τ → 0 the
  weights become the hard-EM assignment (τ ≤ 1e-3 is treated as 0: the
  argmax, ties to the lowest index).

  Args:
    loglik_BxK: ``[B, K]`` log-likelihoods.
    temperature: τ ≥ 0 (a scalar, may be traced).

  Returns:
    The scalar loss (a surrogate: its value is the responsibility-weighted NLL).

  References:
    DESIGN.md §5.7; Ueda & Nakano (1998).
  """
  _check_loglik(loglik_BxK)
  ll = jax.lax.stop_gradient(loglik_BxK)
  tau = jnp.asarray(temperature, ll.dtype)
  hard = jax.nn.one_hot(jnp.argmax(ll, axis=-1), ll.shape[-1], dtype=ll.dtype)
  soft = jax.nn.softmax(ll / jnp.maximum(tau, 1e-3), axis=-1)
  weights = jnp.where(tau <= 1e-3, hard, soft)
  return -jnp.mean(jnp.sum(weights * loglik_BxK, axis=-1))


def annealing_temperature(step, anneal_steps: int):
  """τ(step) = max(1 − step / anneal_steps, 0): 1 at step 0, hard-EM from ``anneal_steps`` on."""
  return jnp.clip(1.0 - step / max(anneal_steps, 1), 0.0, 1.0)


class ReconstructionOutput(NamedTuple):
  """Output of ``reconstruction_loss``.

  Attributes:
    loss: scalar L_rec.
    winners: ``[B]`` int32 argmax latents k̂ (the hard-EM assignments).
    responsibilities: ``[B, K]`` posterior over latents (stop-gradient).
    usage: ``[K]`` share of examples each latent wins.
  """
  loss: chex.Array
  winners: chex.Array
  responsibilities: chex.Array
  usage: chex.Array


def reconstruction_loss(kind: str, loglik_BxK: chex.Array, *, epsilon=0.05,
                        temperature=1.0) -> ReconstructionOutput:
  """Reconstruction loss by name, with the diagnostics to log.

  ``"hard_em"``: ``hard_em_loss``; ``"soft_em"``: ``soft_em_loss``;
  ``"relaxed_wta"``: ``relaxed_wta_loss`` with ``epsilon``;
  ``"annealed_em"``: ``annealed_em_loss`` at ``temperature``. The winners,
  responsibilities and usage are returned for all.

  Args:
    kind: one of ``RECONSTRUCTION_KINDS`` (static under jit).
    loglik_BxK: ``[B, K]`` log-likelihoods.
    epsilon: the non-winners' share of ``relaxed_wta``.
    temperature: the responsibilities' temperature of ``annealed_em``.

  Returns:
    ``ReconstructionOutput(loss, winners [B], responsibilities [B, K], usage [K])``.

  References:
    DESIGN.md §3.
  """
  if kind not in RECONSTRUCTION_KINDS:
    raise ValueError(f"kind must be one of {RECONSTRUCTION_KINDS}, got {kind!r}.")
  winners_B = jnp.argmax(jax.lax.stop_gradient(loglik_BxK), axis=-1).astype(jnp.int32)
  if kind == "hard_em":
    loss, winners_B = hard_em_loss(loglik_BxK)
  elif kind == "relaxed_wta":
    loss, winners_B = relaxed_wta_loss(loglik_BxK, epsilon)
  elif kind == "annealed_em":
    loss = annealed_em_loss(loglik_BxK, temperature)
  else:
    loss = soft_em_loss(loglik_BxK)
  return ReconstructionOutput(loss, winners_B, responsibilities(loglik_BxK), latent_usage(loglik_BxK))
