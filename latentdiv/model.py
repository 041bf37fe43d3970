"""A latent-conditioned decoder-only Transformer p_θ(y | x, z) with an explicit KV cache.

The model reads ``[x_1..x_P, BOS, y_1..y_{T-1}]`` and predicts ``y_1..y_T``; a
learned embedding of the discrete latent ``z ∈ {0..K-1}`` is added to every
position, so every layer sees which strategy it is asked for (DESIGN.md §1, §3).

The Flax module is only the graph definition. Everything a caller uses is a pure
function of an explicit parameter pytree and, for decoding, an explicit
preallocated cache pytree (``KVCache``) updated with ``dynamic_update_slice``:

* ``teacher_forced_logits(model, params, prompt, target, latent)`` — all T
  next-token distributions of a batch in one pass;
* ``prefill(...)`` and ``decode_step(...)`` — cached incremental decoding, the
  building blocks of ``latentdiv.sampling``; ``grow_cache`` lengthens a cache
  (a decode step attends over the whole cache it is given, so a sampler can
  keep it only as long as the positions written so far need, DESIGN.md §10).

These compose with ``jax.jit``, ``jax.lax.scan`` and ``jax.vmap`` (over the K
latents, say) and nothing else is needed: no mutable collections, no cache
that grows by concatenation.

Shapes: B batch, P prompt length, T target length, S a chunk of positions, M
the cache length (at most ``config.max_len``), H heads, D head size, V
vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latentdiv import vocab


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of ``LatentTransformer`` (hashable: usable as a static arg).

  Attributes:
    vocab_size: V, including the reserved ids of ``latentdiv.vocab``.
    num_latents: K, the number of values of the discrete latent z.
    max_len: M, the longest ``[prompt, BOS, target]`` sequence the model sees
      (learned position embeddings and the KV cache have this length).
    d_model: width of the residual stream.
    num_heads: attention heads; must divide ``d_model``.
    num_layers: Transformer blocks.
    d_ff: hidden width of the MLP.
    dtype: compute dtype (``"float32"`` or ``"bfloat16"``); parameters and the
      returned logits stay float32.
  """

  vocab_size: int
  num_latents: int
  max_len: int
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  d_ff: int = 256
  dtype: str = "float32"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def validate(self) -> None:
    """Raises ValueError naming the first inconsistent field."""
    for name in ("vocab_size", "num_latents", "max_len", "d_model", "num_heads",
                 "num_layers", "d_ff"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}.")
    if self.vocab_size <= vocab.NUM_RESERVED:
      raise ValueError(
          f"model.vocab_size must exceed the {vocab.NUM_RESERVED} reserved ids "
          f"(PAD, BOS, EOS), got {self.vocab_size}.")
    if self.d_model % self.num_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} must divide "
          f"model.d_model={self.d_model}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(
          f"model.dtype must be one of ('float32', 'bfloat16'), got {self.dtype!r}.")


# Logit of tokens the model never emits (PAD, BOS).
NEVER_LOGIT = -1e9


class KVCache(NamedTuple):
  """Preallocated keys and values of every layer, written in place by position.

  Attributes:
    k: per layer (a tuple of ``num_layers`` arrays), [B, H, M, D] keys:
      positions along M, each head's [M, D] block contiguous, as the
      attention dot reads it. One buffer per layer, so that a decode step
      updates each in place and attends over it without copying.
    v: per layer, [B, H, M, D] values.
    key_valid: [B, M] bool, True where a non-PAD token has been written.
  """

  k: jax.Array
  v: jax.Array
  key_valid: jax.Array


def _check_cache_len(config: ModelConfig, length: int) -> int:
  length = config.max_len if length is None else length
  if not 0 < length <= config.max_len:
    raise ValueError(f"cache length must lie in [1, model.max_len = {config.max_len}], "
                     f"got {length}.")
  return length


def init_cache(config: ModelConfig, batch_size: int, length: int | None = None) -> KVCache:
  """An empty cache for ``batch_size`` sequences of ``length`` positions (default ``config.max_len``)."""
  length = _check_cache_len(config, length)
  shape = (batch_size, config.num_heads, length, config.head_dim)
  dtype = jnp.dtype(config.dtype)
  return KVCache(
      k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
      v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
      key_valid=jnp.zeros((batch_size, length), bool))


def grow_cache(config: ModelConfig, cache: KVCache, length: int) -> KVCache:
  """``cache`` padded to ``length`` positions (the new ones empty: zero, not valid).

  One copy of the cache. Decoding from the padded cache gives the same
  distributions as from the shorter one: the new positions are masked out of
  attention until written (their softmax weight is exactly 0).
  """
  length = _check_cache_len(config, length)
  old = cache.key_valid.shape[1]
  if length < old:
    raise ValueError(f"grow_cache cannot shrink a cache of {old} positions to {length}.")
  pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, length - old), (0, 0)))  # noqa: E731
  return KVCache(tuple(map(pad, cache.k)), tuple(map(pad, cache.v)),
                 jnp.pad(cache.key_valid, ((0, 0), (0, length - old))))


class _Block(nn.Module):
  """Pre-LayerNorm block: causal self-attention then a GELU MLP."""

  config: ModelConfig

  @nn.compact
  def __call__(self, h_BxSxd, positions_S, key_valid_BxM, kv_cache, offset):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dense = lambda n, name: nn.DenseGeneral(  # noqa: E731
        n, dtype=dtype, param_dtype=jnp.float32, name=name)
    x = nn.LayerNorm(dtype=dtype, name="ln_attn")(h_BxSxd)
    # Queries, keys and values from one matmul (one [d, 3d] weight): on a
    # decode step of a few hundred rows, one wide matmul runs closer to the
    # machine's peak than three narrow ones.
    qkv = dense((3, cfg.num_heads, cfg.head_dim), "qkv")(x)  # [B, S, 3, H, D]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if kv_cache is None:
      keys = jnp.swapaxes(k, 1, 2)  # [B, H, S, D]
      values = jnp.swapaxes(v, 1, 2)
      key_positions = positions_S
      new_cache = None
    else:
      # Write this chunk's keys and values into the layer's own cache buffer
      # in place (a dynamic-update-slice at position ``offset``) and attend
      # over that buffer directly. (A cache stacked over layers would need a
      # slice per layer and a stack back: copies of the whole cache at every
      # decode step, which made rollouts quadratic in their length.)
      cache_k, cache_v = kv_cache
      start = (0, 0, offset, 0)
      keys = jax.lax.dynamic_update_slice(
          cache_k, jnp.swapaxes(k, 1, 2).astype(cache_k.dtype), start)  # [B, H, M, D]
      values = jax.lax.dynamic_update_slice(
          cache_v, jnp.swapaxes(v, 1, 2).astype(cache_v.dtype), start)
      key_positions = jnp.arange(cache_k.shape[2])
      new_cache = (keys, values)
    # Causal and padding mask, [B, S, keys].
    mask = (key_positions[None, :] <= positions_S[:, None])[None]
    mask = jnp.logical_and(mask, key_valid_BxM[:, None, :])
    scores = jnp.einsum("bshd,bhmd->bhsm", q, keys.astype(dtype))
    scores = scores.astype(jnp.float32) / jnp.sqrt(cfg.head_dim).astype(jnp.float32)
    # A large finite negative (not -inf) keeps fully masked rows finite.
    scores = jnp.where(mask[:, None], scores, -1e30)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    attn = jnp.einsum("bhsm,bhmd->bshd", weights, values.astype(dtype))
    h = h_BxSxd + nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), dtype=dtype, param_dtype=jnp.float32,
        name="out")(attn)
    x = nn.LayerNorm(dtype=dtype, name="ln_mlp")(h)
    x = nn.gelu(dense(cfg.d_ff, "mlp_in")(x))
    h = h + dense(cfg.d_model, "mlp_out")(x)
    return h, new_cache


class LatentTransformer(nn.Module):
  """The graph definition of p_θ(y | x, z); use the module-level pure functions."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxS, latent_B, offset=0, cache: KVCache | None = None,
               logits_from: int = 0):
    """Next-token logits for a chunk of S tokens starting at ``offset``.

    Without a cache the chunk is the whole sequence (offset must be 0). With a
    cache, the chunk's keys and values are written at ``offset`` and attention
    reads the whole cache (its positions not yet written are masked out).

    ``logits_from`` (static) skips the final LayerNorm and the unembedding of
    the chunk's first ``logits_from`` positions, whose logits a caller does
    not read (the prompt's, under teacher forcing): at a large vocabulary the
    unembedding is most of a position's FLOPs and its logits most of the
    memory.

    Returns:
      (logits [B, S − logits_from, V] float32, the updated cache or None).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    seq_len = tokens_BxS.shape[1]
    positions_S = offset + jnp.arange(seq_len)
    tok_emb = nn.Embed(cfg.vocab_size, cfg.d_model, name="token_embed")
    pos_emb = nn.Embed(cfg.max_len, cfg.d_model, name="position_embed")
    lat_emb = nn.Embed(cfg.num_latents, cfg.d_model, name="latent_embed")
    h = (tok_emb(tokens_BxS) + pos_emb(positions_S)[None]
         + lat_emb(latent_B)[:, None, :]).astype(dtype)
    chunk_valid = tokens_BxS != vocab.PAD
    if cache is None:
      key_valid = chunk_valid
    else:
      key_valid = jax.lax.dynamic_update_slice(cache.key_valid, chunk_valid, (0, offset))
    new_k, new_v = [], []
    for layer in range(cfg.num_layers):
      layer_cache = None if cache is None else (cache.k[layer], cache.v[layer])
      h, layer_cache = _Block(cfg, name=f"block_{layer}")(
          h, positions_S, key_valid, layer_cache, offset)
      if cache is not None:
        new_k.append(layer_cache[0])
        new_v.append(layer_cache[1])
    h = nn.LayerNorm(dtype=dtype, name="ln_final")(h[:, logits_from:])
    logits = nn.Dense(cfg.vocab_size, dtype=dtype, param_dtype=jnp.float32,
                      name="unembed")(h).astype(jnp.float32)
    # The model never emits PAD or BOS: pinning their logits far below the rest
    # gives them probability 0 (exactly, in float32) without a -inf.
    never = jnp.isin(jnp.arange(cfg.vocab_size), jnp.array([vocab.PAD, vocab.BOS]))
    logits = jnp.where(never[None, None, :], NEVER_LOGIT, logits)
    if cache is None:
      return logits, None
    return logits, KVCache(tuple(new_k), tuple(new_v), key_valid)


def init_params(model: LatentTransformer, key: chex.PRNGKey):
  """Initial parameter pytree of ``model`` (float32)."""
  tokens = jnp.zeros((1, model.config.max_len), jnp.int32)
  return model.init(key, tokens, jnp.zeros((1,), jnp.int32))["params"]


def decoder_inputs(prompt_BxP: jax.Array, target_BxT: jax.Array) -> jax.Array:
  """``[x, BOS, y_1..y_{T-1}]``: the inputs whose next tokens are ``y_1..y_T``."""
  bos = jnp.full((prompt_BxP.shape[0], 1), vocab.BOS, prompt_BxP.dtype)
  return jnp.concatenate([prompt_BxP, bos, target_BxT[:, :-1]], axis=1)


def _check_inputs(model, prompt_BxP, latent_B, extra_len):
  chex.assert_rank(prompt_BxP, 2, custom_message="prompt must be [batch, prompt_len]")
  chex.assert_rank(latent_B, 1, custom_message="latent must be [batch]")
  if prompt_BxP.shape[0] != latent_B.shape[0]:
    raise ValueError(
        f"prompt batch {prompt_BxP.shape[0]} != latent batch {latent_B.shape[0]}.")
  needed = prompt_BxP.shape[1] + extra_len
  if needed > model.config.max_len:
    raise ValueError(
        f"prompt_len ({prompt_BxP.shape[1]}) + output length ({extra_len}) = {needed} "
        f"exceeds model.max_len = {model.config.max_len}.")


def teacher_forced_logits(model: LatentTransformer, params, prompt_BxP: jax.Array,
                          target_BxT: jax.Array, latent_B: jax.Array) -> jax.Array:
  """Logits of ``p_θ(y_t | x, y_<t, z)`` for every t, in one pass.

  Args:
    model: the graph definition.
    params: its parameter pytree.
    prompt_BxP: int prompts x (PAD is masked out of attention).
    target_BxT: int targets y (teacher forcing feeds y_<t).
    latent_B: int latent z per row, in [0, K).

  Returns:
    logits [B, T, V], float32; row t is the distribution of y_t.
  """
  chex.assert_rank(target_BxT, 2, custom_message="target must be [batch, target_len]")
  _check_inputs(model, prompt_BxP, latent_B, target_BxT.shape[1])
  if target_BxT.shape[0] != prompt_BxP.shape[0]:
    raise ValueError(
        f"target batch {target_BxT.shape[0]} != prompt batch {prompt_BxP.shape[0]}.")
  inputs = decoder_inputs(prompt_BxP, target_BxT)
  # Only the T target positions are unembedded (the prompt's logits are never read).
  logits, _ = model.apply({"params": params}, inputs, latent_B,
                          logits_from=prompt_BxP.shape[1])
  return logits


def prefill(model: LatentTransformer, params, prompt_BxP: jax.Array,
            latent_B: jax.Array, cache_len: int | None = None) -> tuple[jax.Array, KVCache]:
  """Writes ``[x, BOS]`` into a fresh cache; returns the logits of y_1 [B, V] and the cache.

  ``cache_len`` (static): the cache's length M, at least P + 1 (default
  ``config.max_len``); ``grow_cache`` lengthens it later.
  """
  _check_inputs(model, prompt_BxP, latent_B, 1)
  prompt_len = prompt_BxP.shape[1]
  if cache_len is not None and cache_len < prompt_len + 1:
    raise ValueError(f"cache_len ({cache_len}) must hold the prompt and BOS "
                     f"({prompt_len + 1} positions).")
  bos = jnp.full((prompt_BxP.shape[0], 1), vocab.BOS, prompt_BxP.dtype)
  cache = init_cache(model.config, prompt_BxP.shape[0], cache_len)
  logits, cache = model.apply({"params": params},
                              jnp.concatenate([prompt_BxP, bos], axis=1),
                              latent_B, 0, cache, logits_from=prompt_len)
  return logits[:, -1], cache


def decode_step(model: LatentTransformer, params, cache: KVCache, token_B: jax.Array,
                latent_B: jax.Array, position) -> tuple[jax.Array, KVCache]:
  """Feeds one token per row at ``position``; returns the next-token logits [B, V] and the cache.

  Args:
    model: the graph definition.
    params: its parameter pytree.
    cache: the ``KVCache`` holding positions ``< position``; the step attends
      over all of its M positions (those not written are masked out).
    token_B: the token at ``position`` for each row.
    latent_B: the latent of each row.
    position: scalar int (may be traced), the absolute position of ``token_B``;
      must be < M (``dynamic_update_slice`` would clamp it silently).
  """
  chex.assert_rank(token_B, 1, custom_message="token must be [batch]")
  logits, cache = model.apply({"params": params}, token_B[:, None], latent_B,
                              position, cache)
  return logits[:, 0], cache
