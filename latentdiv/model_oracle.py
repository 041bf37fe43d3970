"""The latent-conditioned Transformer in the oracle's terms (DESIGN.md §7).

The oracle (``latentdiv/oracle.py``, ``latentdiv/moments.py``) works on a
``logits_fn(params, tokens_NxL, latent)`` and enumerates every sequence of a
tiny vocabulary. These adapters make the real model one: the Transformer at
a fixed prompt, in float64, with the outputs it can actually emit, and its
rollouts grouped per (prompt, latent). The estimator diagnostics
(``latentdiv/diagnostics.py``) and the exactness tests use them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from latentdiv import model as model_lib
from latentdiv import oracle
from latentdiv import sampling
from latentdiv import vocab

Array = chex.Array
PyTree = Any


def make_logits_fn(model: model_lib.LatentTransformer, prompt_P: Array):
  """The model at a fixed prompt as an oracle ``logits_fn(params, tokens_NxL, latent)``.

  Row t of the logits is the next-token distribution of y_t given
  (x, y_<t, z) with x = ``prompt_P`` (teacher forced), as ``latentdiv.oracle``
  expects.

  References:
    DESIGN.md §7.
  """
  chex.assert_rank(prompt_P, 1, custom_message="argument: prompt_P",
                   exception_type=ValueError)

  def logits_fn(params, tokens_NxL, latent):
    n = tokens_NxL.shape[0]
    prompt = jnp.broadcast_to(prompt_P[None, :], (n, prompt_P.shape[0]))
    return model_lib.teacher_forced_logits(model, params, prompt, tokens_NxL,
                                           jnp.full((n,), latent, jnp.int32))

  return logits_fn


def to_float64(model: model_lib.LatentTransformer, params: PyTree):
  """A float64 copy of the model and its parameters (use inside ``jax.enable_x64``).

  The Transformer still rounds its attention weights and output logits to
  float32 (``latentdiv/model.py``); the exact gradient and the estimators see
  the same rounded function, so they agree to ~1e-7 relative.
  """
  cfg = dataclasses.replace(model.config, dtype="float64")
  return (model_lib.LatentTransformer(cfg),
          jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params))


def exact_sequences(vocab_size: int, length: int):
  """Every output the model can emit: canonical EOS-truncated, no PAD/BOS before EOS.

  The rows of ``oracle.all_sequences`` left out have probability exactly 0
  under the Transformer (it never emits PAD or BOS; non-canonical rows are
  not outputs).

  Returns:
    (tokens [N, L] int32, mask [N, L] float32, index [N] rows in
    ``oracle.all_sequences``).
  """
  tokens = np.asarray(oracle.all_sequences(vocab_size, length))
  mask, canonical = map(np.asarray, oracle.truncation_mask(
      jnp.asarray(tokens), eos_id=vocab.EOS, pad_id=vocab.PAD))
  never = np.isin(tokens, [vocab.PAD, vocab.BOS]) & (mask > 0)
  index = np.flatnonzero(canonical & ~never.any(axis=-1))
  return jnp.asarray(tokens[index]), jnp.asarray(mask[index]), jnp.asarray(index)


def num_exact_sequences(alphabet_size: int, length: int) -> int:
  """How many outputs exact mode enumerates: ``Σ_{k<L} A^k + A^L``."""
  return sum(alphabet_size**k for k in range(length)) + alphabet_size**length


def sample_rollouts(model, params, prompts_BxP: Array, key: Array, length: int, num: int):
  """(tokens [B, K, num, L], mask [B, K, num, L]): ``sampling.sample`` per (prompt, latent)."""
  batch, prompt_len = prompts_BxP.shape
  k = model.config.num_latents
  prompts = jnp.broadcast_to(prompts_BxP[:, None, None, :], (batch, k, num, prompt_len))
  latents = jnp.broadcast_to(jnp.arange(k)[None, :, None], (batch, k, num))
  rollout = sampling.sample(model, params, prompts.reshape(-1, prompt_len),
                            latents.reshape(-1), key, length)
  shape = (batch, k, num, length)
  return rollout.tokens.reshape(shape), rollout.mask.reshape(shape)
