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
  state = model_lib.prefill(model, params, prompt_BxP, latent_B)

  def log_dist(state):
    return jax.nn.log_softmax(state[0] / temperature, axis=-1)

  def advance(state, token, position):
    return model_lib.decode_step(model, params, state[1], token, latent_B, position)

  return _decode(state, log_dist, advance, prompt_BxP.shape, model.config.max_len, key,
                 length, return_logprobs, greedy)


def _decode(state, log_dist, advance, prompt_shape, max_len, key, length,
            return_logprobs, greedy) -> Rollout:
  """The scan over L decode steps shared by :func:`sample` and :func:`sample_mixture`.

  ``log_dist(state) -> [B, V]`` is the next-token log-distribution and
  ``advance(state, token_B, position) -> state`` feeds the drawn token back.
  """
  batch, prompt_len = prompt_shape
  done = jnp.zeros((batch,), bool)

  def step(carry, t):
    state, done = carry
    logprobs = log_dist(state)
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
    position = jnp.minimum(prompt_len + 1 + t, max_len - 1)
    state = advance(state, token, position)
    out = (token, logp, valid, logprobs if return_logprobs else None)
    return (state, done), out

  _, (tokens, logp, mask, logprobs) = jax.lax.scan(step, (state, done), jnp.arange(length))
  swap = lambda a: None if a is None else jnp.moveaxis(a, 0, 1)  # noqa: E731
  return Rollout(swap(tokens), swap(logp), swap(mask), swap(logprobs))


@functools.partial(jax.jit, static_argnames=("student", "teacher", "length"))
def sample_mixture(student: model_lib.LatentTransformer, student_params,
                   teacher: model_lib.LatentTransformer, teacher_params,
                   prompt_BxP: jax.Array, student_latent_B: jax.Array,
                   teacher_latent_B: jax.Array, key: chex.PRNGKey, length: int,
                   teacher_mix, temperature: float = 1.0) -> Rollout:
  """Samples from the token-level mixture ``p̃ = α·q + (1−α)·π``, both models cached.

  At every step the next token is drawn from
  ``p̃(·|c_t) = α q(·|c_t) + (1−α) π(·|c_t)`` (each at ``temperature``) and fed
  back to both decoders: MiniLLM's teacher-mixed sampling (DESIGN.md §6.4).
  ``α = 0`` draws the same tokens as :func:`sample` of the student with the
  same key.

  Args:
    student, teacher: graph definitions (static), same vocabulary.
    student_params, teacher_params: their parameters.
    prompt_BxP: int prompts.
    student_latent_B, teacher_latent_B: each row's latent under each model.
    key: PRNG key.
    length: L (static).
    teacher_mix: α ∈ [0, 1].
    temperature: softmax temperature of both models.

  Returns:
    A ``Rollout`` with leaves [B, L]; ``logp`` is ``log p̃(y_t|c_t)``.

  References:
    Gu et al. (2024), MiniLLM; DESIGN.md §6.4.
  """
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}.")
  if student.config.vocab_size != teacher.config.vocab_size:
    raise ValueError("student and teacher must share the vocabulary, got V = "
                     f"{student.config.vocab_size} and {teacher.config.vocab_size}.")
  model_lib._check_inputs(student, prompt_BxP, student_latent_B, length)  # pylint: disable=protected-access
  model_lib._check_inputs(teacher, prompt_BxP, teacher_latent_B, length)  # pylint: disable=protected-access
  state = (model_lib.prefill(student, student_params, prompt_BxP, student_latent_B),
           model_lib.prefill(teacher, teacher_params, prompt_BxP, teacher_latent_B))
  alpha = jnp.asarray(teacher_mix, jnp.float32)

  def log_dist(state):
    logp = jax.nn.log_softmax(state[0][0] / temperature, axis=-1)
    logq = jax.nn.log_softmax(state[1][0] / temperature, axis=-1)
    return jnp.logaddexp(jnp.log1p(-alpha) + logp, jnp.log(alpha) + logq)

  def advance(state, token, position):
    (_, s_cache), (_, t_cache) = state
    return (model_lib.decode_step(student, student_params, s_cache, token, student_latent_B,
                                  position),
            model_lib.decode_step(teacher, teacher_params, t_cache, token, teacher_latent_B,
                                  position))

  max_len = min(student.config.max_len, teacher.config.max_len)
  return _decode(state, log_dist, advance, prompt_BxP.shape, max_len, key, length, False,
                 False)


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
