"""Prefix rollouts: L tokens for every latent at once, KV-cached, in one XLA program.

``sample`` draws ``y_{1:L} ~ p_θ(· | x, z)`` for a batch with one
``jax.lax.scan`` over time over a cached ``decode_step``; ``sample_latents``
``vmap``s it over the K latents, so the K·L sequential steps of a rollout
compile into a single program (DESIGN.md §5.1, §10). ``score_latents`` is the
teacher-forced counterpart: every rollout scored under every latent in one
vmapped pass, as the sequence-level estimators need.

EOS ends a sequence through a mask: the EOS token itself is valid (it is
sampled and scored); later positions hold PAD, have log-probability 0 and
mask False.

Sampling is at temperature 1 by default. Any other temperature samples from
(and reports log-probabilities of) the tempered distribution, which changes
the objective: estimators built on such samples are biased for the
temperature-1 KL.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from latentdiv import model as model_lib
from latentdiv import vocab


class Rollout(NamedTuple):
  """Sampled continuations.

  Attributes:
    tokens: [..., L] int32; PAD after the first EOS.
    logp: [..., L] float32, log-probability of each sampled token under the
      sampling distribution; 0 where ``mask`` is False.
    mask: [..., L] bool, True up to and including the first EOS.
    logprobs: [..., L, V] float32 full next-token log-distributions at every
      step (``None`` unless ``return_logprobs=True``).
  """

  tokens: jax.Array
  logp: jax.Array
  mask: jax.Array
  logprobs: jax.Array | None = None


@functools.partial(jax.jit, static_argnames=("model", "length", "return_logprobs", "greedy"))
def sample(model: model_lib.LatentTransformer, params, prompt_BxP: jax.Array,
           latent_B: jax.Array, key: chex.PRNGKey, length: int,
           temperature: float = 1.0, return_logprobs: bool = False,
           greedy: bool = False) -> Rollout:
  """Samples ``length`` tokens per row from p_θ(· | x, z), cached and scanned.

  Args:
    model: the graph definition (static).
    params: parameter pytree.
    prompt_BxP: int prompts.
    latent_B: the latent of each row.
    key: PRNG key.
    length: L, the number of tokens to draw (static).
    temperature: softmax temperature (1 = the model's distribution).
    return_logprobs: also return the [B, L, V] log-distributions.
    greedy: take the argmax token instead of sampling (static; ``logp`` is
      then the log-probability of the argmax under the model).

  Returns:
    A ``Rollout`` with leaves [B, L] (and [B, L, V]).
  """
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}.")
  # The last sampled token is never fed back, so [x, BOS, y_1..y_{L-1}] must fit.
  model_lib._check_inputs(model, prompt_BxP, latent_B, length)  # pylint: disable=protected-access
  prompt_len = prompt_BxP.shape[1]
  logits, cache = model_lib.prefill(model, params, prompt_BxP, latent_B)
  done = jnp.zeros(prompt_BxP.shape[:1], bool)

  def step(carry, t):
    logits_BxV, cache, done = carry
    logprobs = jax.nn.log_softmax(logits_BxV / temperature, axis=-1)
    if greedy:
      token = jnp.argmax(logprobs, axis=-1)
    else:
      token = jax.random.categorical(jax.random.fold_in(key, t), logprobs, axis=-1)
    valid = jnp.logical_not(done)
    token = jnp.where(valid, token, vocab.PAD).astype(jnp.int32)
    logp = jnp.where(valid, jnp.take_along_axis(logprobs, token[:, None], -1)[:, 0], 0.0)
    done = jnp.logical_or(done, token == vocab.EOS)
    # Position of y_t is P + t (x at 0..P-1, BOS at P, y_1 at P+1, ...).
    # The step after the last sample is skipped by clamping: its output is unused.
    position = jnp.minimum(prompt_len + 1 + t, model.config.max_len - 1)
    next_logits, cache = model_lib.decode_step(model, params, cache, token, latent_B,
                                               position)
    out = (token, logp, valid, logprobs if return_logprobs else None)
    return (next_logits, cache, done), out

  _, (tokens, logp, mask, logprobs) = jax.lax.scan(
      step, (logits, cache, done), jnp.arange(length))
  swap = lambda a: None if a is None else jnp.moveaxis(a, 0, 1)  # noqa: E731
  return Rollout(swap(tokens), swap(logp), swap(mask), swap(logprobs))


def sample_latents(model: model_lib.LatentTransformer, params, prompt_BxP: jax.Array,
                   key: chex.PRNGKey, length: int, temperature: float = 1.0,
                   return_logprobs: bool = False, greedy: bool = False) -> Rollout:
  """One rollout per (example, latent): ``sample`` vmapped over the K latents.

  Returns:
    A ``Rollout`` with leaves [B, K, L] (and [B, K, L, V]); latent k's rollout
    uses an independent key.
  """
  num_latents = model.config.num_latents
  batch = prompt_BxP.shape[0]
  latents_K = jnp.arange(num_latents)
  keys_K = jax.random.split(key, num_latents)

  def one_latent(latent, k):
    return sample(model, params, prompt_BxP, jnp.full((batch,), latent, jnp.int32), k,
                  length, temperature, return_logprobs, greedy)

  rollout = jax.vmap(one_latent)(latents_K, keys_K)
  return jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), rollout)


def score_latents(model: model_lib.LatentTransformer, params, prompt_BxP: jax.Array,
                  tokens_BxNxL: jax.Array) -> jax.Array:
  """Teacher-forced logits of N continuations per example under all K latents.

  Args:
    model: the graph definition.
    params: parameter pytree.
    prompt_BxP: int prompts.
    tokens_BxNxL: continuations (e.g. one rollout per latent, N = K).

  Returns:
    logits [B, N, K, L, V]: ``[b, n, j]`` scores continuation n of example b
    under latent j. One pass vmapped over n and j.
  """
  chex.assert_rank(tokens_BxNxL, 3, custom_message="tokens must be [batch, N, length]")
  batch = prompt_BxP.shape[0]
  chex.assert_axis_dimension(tokens_BxNxL, 0, batch)

  def under_latent(tokens_BxL, latent):
    return model_lib.teacher_forced_logits(
        model, params, prompt_BxP, tokens_BxL, jnp.full((batch,), latent, jnp.int32))

  latents_K = jnp.arange(model.config.num_latents)
  per_rollout = jax.vmap(under_latent, in_axes=(None, 0), out_axes=1)  # over j
  logits = jax.vmap(per_rollout, in_axes=(1, None), out_axes=1)(tokens_BxNxL, latents_K)
  return logits
