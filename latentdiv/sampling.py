"""Prefix rollouts: L tokens for every latent at once, KV-cached, in one XLA program.

``sample`` draws ``y_{1:L} ~ p_θ(· | x, z)`` for a batch with a
``jax.lax.scan`` over time over a cached ``decode_step`` (a few scans, one per
length of the KV cache: ``cache_schedule``); ``sample_latents`` ``vmap``s it
over the K latents, so the K·L sequential steps of a rollout compile into a
single program (DESIGN.md §5.1, §10). ``sample_mixture`` draws from the
token-level mixture of a student and a teacher, both cached (MiniLLM's
teacher-mixed sampling, §6.4). ``score_latents`` is the
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


# The shortest KV cache the sampler allocates (positions); see ``cache_schedule``.
MIN_CACHE_LEN = 64


def cache_schedule(prompt_len: int, length: int,
                   min_cache_len: int = MIN_CACHE_LEN) -> tuple[tuple[int, int, int], ...]:
  """The sampler's decode steps in chunks, each with the KV-cache length it attends over.

  A rollout of L tokens feeds y_1..y_{L−1} back (decode step t writes y_{t+1}
  at position P + 1 + t, t = 0..L−2; the last token is never fed back), so
  the cache needs P + L positions at the end but only P + 2 + t at step t. A
  decode step attends over every position of the cache it is given, so the
  sampler keeps the cache short and lengthens it between chunks: the first
  chunk's cache has ``max(P + 2, min_cache_len)`` positions, each next one
  twice the last, all capped at P + L (and P + L at once where fewer than
  ``min_cache_len / 2`` positions would remain for a last chunk), and a chunk
  runs the steps whose positions fit. A step then attends over at most about
  twice the positions it needs (or ``min_cache_len``), in about
  log₂((P + L) / min_cache_len) + 1 chunks, instead of over all P + L at
  every step: the cost of a token no longer grows with L through attention to
  positions not yet written (DESIGN.md §10).

  Args:
    prompt_len: P.
    length: L ≥ 1.
    min_cache_len: the shortest cache (a floor that keeps short rollouts in
      one chunk: a chunk costs a compiled loop and one copy of the cache).

  Returns:
    ``((start, stop, cache_len), ...)``: chunk c runs decode steps
    ``start ≤ t < stop`` in a cache of ``cache_len`` positions; the chunks
    cover t = 0..L−2 in order (none when L = 1).
  """
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}.")
  total = prompt_len + length  # Positions ever written: x, BOS, y_1..y_{L-1}.
  cache_len = min(total, max(prompt_len + 2, min_cache_len))
  chunks, start = [], 0
  while start < length - 1:
    if total - cache_len < min_cache_len // 2:
      cache_len = total  # Rather than a last chunk of a few steps.
    stop = min(length - 1, cache_len - prompt_len - 1)
    chunks.append((start, stop, cache_len))
    start, cache_len = stop, min(total, 2 * cache_len)
  return tuple(chunks)


@functools.partial(jax.jit, static_argnames=("model", "length", "return_logprobs", "greedy",
                                             "min_cache_len"))
def sample(model: model_lib.LatentTransformer, params, prompt_BxP: jax.Array,
           latent_B: jax.Array, key: chex.PRNGKey, length: int,
           temperature: float = 1.0, return_logprobs: bool = False,
           greedy: bool = False, min_cache_len: int = MIN_CACHE_LEN) -> Rollout:
  """Samples ``length`` tokens per row from p_θ(· | x, z), cached and scanned.

  The L − 1 decode steps run as one ``lax.scan`` per chunk of
  ``cache_schedule``, the KV cache lengthened between chunks (so a step
  attends over at most about twice the positions written); token t is drawn
  with ``jax.random.fold_in(key, t)``.

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
    min_cache_len: the first chunk's cache floor (static; see
      ``cache_schedule``). It changes how the work is chunked, not what is
      drawn: the tokens depend on it only through float rounding.

  Returns:
    A ``Rollout`` with leaves [B, L] (and [B, L, V]).
  """
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}.")
  # The last sampled token is never fed back, so [x, BOS, y_1..y_{L-1}] must fit.
  model_lib._check_inputs(model, prompt_BxP, latent_B, length)  # pylint: disable=protected-access
  prompt_len = prompt_BxP.shape[1]
  chunks = cache_schedule(prompt_len, length, min_cache_len)
  state = model_lib.prefill(model, params, prompt_BxP, latent_B,
                            cache_len=chunks[0][2] if chunks else prompt_len + 1)

  def log_dist(state):
    return jax.nn.log_softmax(state[0] / temperature, axis=-1)

  def advance(state, token, position):
    return model_lib.decode_step(model, params, state[1], token, latent_B, position)

  def grow(state, cache_len):
    return state[0], model_lib.grow_cache(model.config, state[1], cache_len)

  return _decode(state, log_dist, advance, grow, chunks, prompt_len, key, length,
                 return_logprobs, greedy)


def _decode(state, log_dist, advance, grow, chunks, prompt_len, key, length,
            return_logprobs, greedy) -> Rollout:
  """The decode steps shared by :func:`sample` and :func:`sample_mixture`.

  ``log_dist(state) -> [B, V]`` is the next-token log-distribution,
  ``advance(state, token_B, position) -> state`` feeds the drawn token back
  and ``grow(state, cache_len) -> state`` lengthens the KV cache(s) between
  the chunks of ``cache_schedule``. Token t is drawn with ``fold_in(key, t)``;
  the last one is never fed back.
  """
  done = jnp.zeros(log_dist(state).shape[:1], bool)

  def draw(state, done, t):
    """Token t: (outputs of step t, the new done flags)."""
    logprobs = log_dist(state)
    if greedy:
      token = jnp.argmax(logprobs, axis=-1)
    else:
      token = jax.random.categorical(jax.random.fold_in(key, t), logprobs, axis=-1)
    valid = jnp.logical_not(done)
    token = jnp.where(valid, token, vocab.PAD).astype(jnp.int32)
    logp = jnp.where(valid, jnp.take_along_axis(logprobs, token[:, None], -1)[:, 0], 0.0)
    out = (token, logp, valid, logprobs if return_logprobs else None)
    return out, jnp.logical_or(done, token == vocab.EOS)

  def step(carry, t):
    state, done = carry
    out, done = draw(state, done, t)
    # Position of y_{t+1} is P + 1 + t (x at 0..P-1, BOS at P, y_1 at P+1, ...).
    return (advance(state, out[0], prompt_len + 1 + t), done), out

  carry, outs = (state, done), []
  for start, stop, cache_len in chunks:
    carry = (grow(carry[0], cache_len), carry[1])
    carry, out = jax.lax.scan(step, carry, jnp.arange(start, stop))
    outs.append(out)
  # The last token: drawn from the last step's distribution and never fed back.
  last, _ = draw(carry[0], carry[1], length - 1)
  outs.append(jax.tree_util.tree_map(lambda a: a[None], last))
  tokens, logp, mask, logprobs = (
      None if parts[0] is None else jnp.concatenate(parts, axis=0) for parts in zip(*outs))
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
  prompt_len = prompt_BxP.shape[1]
  chunks = cache_schedule(prompt_len, length)
  first = chunks[0][2] if chunks else prompt_len + 1
  state = (model_lib.prefill(student, student_params, prompt_BxP, student_latent_B,
                             cache_len=first),
           model_lib.prefill(teacher, teacher_params, prompt_BxP, teacher_latent_B,
                             cache_len=first))
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

  def grow(state, cache_len):
    (s_logits, s_cache), (t_logits, t_cache) = state
    return ((s_logits, model_lib.grow_cache(student.config, s_cache, cache_len)),
            (t_logits, model_lib.grow_cache(teacher.config, t_cache, cache_len)))

  return _decode(state, log_dist, advance, grow, chunks, prompt_len, key, length, False,
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
