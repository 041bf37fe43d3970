"""Rollout benchmark cases: the library sampler against four other decoders of the same model.

Rollouts of L tokens for B prompts (length P) under each of K latents, on the
same model, parameters, prompts and PRNG keys (the decoders draw the same
tokens, which each record checks: ``tokens_agree``, ``logp_max_diff``):

* ``sampler`` — the library's ``sampling.sample_latents`` under ``jax.jit``
  (``lax.scan`` over L, vmapped over K, KV cache lengthened in chunks by
  ``sampling.cache_schedule``);
* ``full_cache`` — the sampler's earlier design: one ``lax.scan`` of L cached
  decode steps (the last one's output unused) in a cache preallocated to the
  model's whole length M = P + 1 + L, every step attending over all M
  positions (the same decode step as ``python_loop``, scanned);
* ``python_loop`` — a jitted prefill, then a Python ``for`` loop calling a
  jitted single decode step (the same cached ``model.decode_step`` and the
  same sampling arithmetic, vmapped over K) once per token, dispatched
  asynchronously (nothing read back until the end);
* ``python_loop_donated`` — the same loop with the step's cache (and logits,
  done flags) donated, so each step updates the cache in place: the
  strongest per-token loop, differing from the sampler only by the return
  to Python between tokens;
* ``no_cache`` — a jitted ``lax.scan`` whose every step runs the model's
  teacher-forced forward over the whole fixed-length ``[P + 1 + L]`` buffer
  (prompt, BOS, the tokens so far, PAD after) and reads the logits at the
  current position: the prefix is recomputed at every step.

``experiments/bench.py`` says how the records are timed and counted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from experiments import bench_util as util
from latentdiv import model as model_lib
from latentdiv import sampling
from latentdiv import vocab

ROLLOUT_METHODS = ("sampler", "full_cache", "python_loop", "python_loop_donated", "no_cache")
ROLLOUT_PROMPT_LEN = 8  # P of the rollout cases.


VOCAB_SIZE = vocab.NUM_RESERVED + util.ALPHABET_SIZE  # V of the rollout cases.


def model_config(size: str, prompt_len: int, length: int, num_latents: int = util.NUM_LATENTS,
                 max_len: int | None = None, **overrides) -> model_lib.ModelConfig:
  """``SIZES[size]`` (with ``overrides``, e.g. ``vocab_size``) and max_len = P + 1 + L.

  ``max_len`` (the KV cache's length M) defaults to P + 1 + L, room for the
  last token; a longer one measures the cost of attending over a cache
  preallocated longer than the rollout.
  """
  fields = dict(util.SIZES[size], vocab_size=VOCAB_SIZE)
  fields.update(overrides)
  cfg = model_lib.ModelConfig(num_latents=num_latents,
                              max_len=max_len or prompt_len + 1 + length, **fields)
  cfg.validate()
  return cfg


def make_model(size: str, prompt_len: int, length: int,
               num_latents: int = util.NUM_LATENTS, seed: int = 0, **overrides):
  """(model, params) of ``model_config(...)``; parameters from ``seed``."""
  model = model_lib.LatentTransformer(
      model_config(size, prompt_len, length, num_latents, **overrides))
  init = jax.jit(functools.partial(model_lib.init_params, model))
  return model, init(jax.random.PRNGKey(seed))


def make_prompts(batch: int, prompt_len: int, seed: int = 1,
                 vocab_size: int = VOCAB_SIZE) -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, prompt_len),
                            vocab.FIRST_CONTENT, vocab_size, jnp.int32)


def rollout_flops(cfg: model_lib.ModelConfig, rows: int, prompt_len: int, length: int,
                  method: str) -> float:
  """Analytic FLOPs of ``rows`` rollouts of ``length`` tokens by ``method``."""
  if method == "sampler":
    per_row = util.sampler_rollout_flops(cfg, prompt_len, length)
  elif method in ("full_cache", "python_loop", "python_loop_donated"):
    # Prefill of [x, BOS] then one cached step per token over the whole
    # cache (the last one's output is unused but computed).
    per_row = util.cached_rollout_flops(cfg, prompt_len, length)
  elif method == "no_cache":
    per_row = length * util.forward_flops(cfg, cfg.max_len, cfg.max_len)
  else:
    raise ValueError(f"method must be one of {ROLLOUT_METHODS}, got {method!r}.")
  return rows * per_row


# ---------------------------------------------------------------- the decoders


def _sample_token(logits_BxV, done_B, key, t):
  """The sampler's per-step arithmetic (temperature 1): token, its log-prob, valid, new done."""
  logprobs = jax.nn.log_softmax(logits_BxV, axis=-1)
  token = jax.random.categorical(jax.random.fold_in(key, t), logprobs, axis=-1)
  valid = jnp.logical_not(done_B)
  token = jnp.where(valid, token, vocab.PAD).astype(jnp.int32)
  logp = jnp.where(valid, jnp.take_along_axis(logprobs, token[:, None], -1)[:, 0], 0.0)
  return token, logp, valid, jnp.logical_or(done_B, token == vocab.EOS)


@functools.partial(jax.jit, static_argnames=("model", "length"))
def sampler_rollout(model, params, prompt_BxP, key, length):
  """The library sampler (``sampling.sample_latents``) under jit: Rollout [B, K, L]."""
  return sampling.sample_latents(model, params, prompt_BxP, key, length)


def _latent_keys(model, prompt_BxP, key):
  num_latents = model.config.num_latents
  latents_KxB = jnp.broadcast_to(jnp.arange(num_latents)[:, None],
                                 (num_latents, prompt_BxP.shape[0])).astype(jnp.int32)
  return latents_KxB, jax.random.split(key, num_latents)


@functools.partial(jax.jit, static_argnames=("model",))
def _loop_prefill(model, params, prompt_BxP, key):
  latents_KxB, keys_K = _latent_keys(model, prompt_BxP, key)
  logits, cache = jax.vmap(lambda z: model_lib.prefill(model, params, prompt_BxP, z))(
      latents_KxB)
  return logits, cache, jnp.zeros(latents_KxB.shape, bool), latents_KxB, keys_K


def _loop_step_fn(model, params, prompt_len, logits_KxBxV, cache, done_KxB, latents_KxB,
                  keys_K, t):
  """One token for every (latent, row): sample from the logits, then one cached decode step."""

  def one(logits, cache, done, latent, key):
    token, logp, valid, done = _sample_token(logits, done, key, t)
    position = jnp.minimum(prompt_len + 1 + t, model.config.max_len - 1)
    next_logits, cache = model_lib.decode_step(model, params, cache, token, latent,
                                               position)
    return next_logits, cache, done, token, logp, valid

  return jax.vmap(one)(logits_KxBxV, cache, done_KxB, latents_KxB, keys_K)


_loop_step = jax.jit(_loop_step_fn, static_argnames=("model", "prompt_len"))
# The same step with the carried buffers (logits, KV cache, done flags)
# donated: the cache is then updated in place, as in the scan.
_loop_step_donated = jax.jit(_loop_step_fn, static_argnames=("model", "prompt_len"),
                             donate_argnames=("logits_KxBxV", "cache", "done_KxB"))


@functools.partial(jax.jit, static_argnames=("model", "length"))
def full_cache_rollout(model, params, prompt_BxP, key, length):
  """One scan of L decode steps in a cache of the model's whole length: Rollout [B, K, L].

  The library sampler's earlier design (the python loop's step, scanned):
  every step attends over all ``max_len`` preallocated positions, and the
  last step runs although its output is unused.
  """
  prompt_len = prompt_BxP.shape[1]
  logits, cache, done, latents, keys = _loop_prefill(model, params, prompt_BxP, key)

  def step(carry, t):
    logits, cache, done = carry
    logits, cache, done, token, logp, valid = _loop_step_fn(
        model, params, prompt_len, logits, cache, done, latents, keys, t)
    return (logits, cache, done), (token, logp, valid)

  _, outs = jax.lax.scan(step, (logits, cache, done), jnp.arange(length))
  to_bkl = lambda a: jnp.transpose(a, (2, 1, 0))  # noqa: E731  [L, K, B] -> [B, K, L]
  return sampling.Rollout(*map(to_bkl, outs))


def python_loop_rollout(model, params, prompt_BxP, key, length, donate: bool = False):
  """Per-token Python loop over a jitted decode step: Rollout [B, K, L].

  The same cached ``decode_step`` and sampling arithmetic as the library
  sampler, with the same keys, so the tokens are the sampler's. Dispatch is
  asynchronous (nothing is read back until the end). Without ``donate`` each
  step returns a new cache buffer (a functional update); with it, the cache
  buffer is donated and updated in place.
  """
  prompt_len = prompt_BxP.shape[1]
  step = _loop_step_donated if donate else _loop_step
  logits, cache, done, latents, keys = _loop_prefill(model, params, prompt_BxP, key)
  tokens, logps, valids = [], [], []
  for t in range(length):
    logits, cache, done, token, logp, valid = step(
        model, params, prompt_len, logits, cache, done, latents, keys, t)
    tokens.append(token)
    logps.append(logp)
    valids.append(valid)
  to_bkl = lambda xs: jnp.moveaxis(jnp.stack(xs, axis=-1), 0, 1)  # noqa: E731
  return sampling.Rollout(to_bkl(tokens), to_bkl(logps), to_bkl(valids))


@functools.partial(jax.jit, static_argnames=("model", "length"))
def no_cache_rollout(model, params, prompt_BxP, key, length):
  """A decoder without KV cache: each step recomputes the whole prefix. Rollout [B, K, L].

  The buffer ``[x, BOS, y_1..y_L, PAD..]`` has the model's full length M; step
  t runs the teacher-forced forward over all M positions (PAD and future
  positions are masked out of attention) and samples y_{t+1} from position
  P + t, with the sampler's arithmetic and keys.
  """
  batch, prompt_len = prompt_BxP.shape
  m = model.config.max_len
  latents_KxB, keys_K = _latent_keys(model, prompt_BxP, key)

  def one_latent(latent_B, latent_key):
    buffer = jnp.concatenate(
        [prompt_BxP, jnp.full((batch, 1), vocab.BOS, jnp.int32),
         jnp.full((batch, m - prompt_len - 1), vocab.PAD, jnp.int32)], axis=1)

    def step(carry, t):
      buffer, done = carry
      logits, _ = model.apply({"params": params}, buffer, latent_B)
      logits_t = jax.lax.dynamic_index_in_dim(logits, prompt_len + t, axis=1,
                                              keepdims=False)
      token, logp, valid, done = _sample_token(logits_t, done, latent_key, t)
      buffer = jax.lax.dynamic_update_slice(
          buffer, token[:, None], (0, jnp.minimum(prompt_len + 1 + t, m - 1)))
      return (buffer, done), (token, logp, valid)

    _, outs = jax.lax.scan(step, (buffer, jnp.zeros((batch,), bool)), jnp.arange(length))
    return outs  # each [L, B]

  tokens, logp, valid = jax.vmap(one_latent)(latents_KxB, keys_K)  # [K, L, B]
  to_bkl = lambda a: jnp.transpose(a, (2, 0, 1))  # noqa: E731
  return sampling.Rollout(to_bkl(tokens), to_bkl(logp), to_bkl(valid))


# ---------------------------------------------------------------- the case


def rollout_case(size: str, length: int, batch: int, repeats: int, peak_gflops: float,
                 methods=ROLLOUT_METHODS, prompt_len: int = ROLLOUT_PROMPT_LEN,
                 budget_s: float = 20.0, reference: util.MatmulReference | None = None,
                 **overrides) -> list[dict]:
  """Times the rollout decoders in ``methods`` on one model and input; one record each.

  The decoders are compiled first, then timed interleaved (``time_calls``).
  Records hold tokens/s, FLOPs (analytic; XLA's for the python loop), achieved
  GFLOP/s, the fraction of the matmul peak (of ``reference`` timed among the
  decoders' calls if given, else ``peak_gflops``), peak memory of the compiled
  program (the jitted step's for the python loop), ``sampler_speedup`` =
  this decoder's time / the sampler's, and ``tokens_agree`` / ``logp_max_diff``
  against the first method's rollout (the decoders must draw the same tokens).
  """
  for method in methods:
    if method not in ROLLOUT_METHODS:
      raise ValueError(f"method must be one of {ROLLOUT_METHODS}, got {method!r}.")
  model, params = make_model(size, prompt_len, length, **overrides)
  cfg = model.config
  prompt = make_prompts(batch, prompt_len, vocab_size=cfg.vocab_size)
  key = jax.random.PRNGKey(2)
  rows = batch * cfg.num_latents
  runs, info = {}, {}
  for method in methods:
    if method.startswith("python_loop"):
      donate = method == "python_loop_donated"
      pre, pre_s = util.compile_fn(_loop_prefill, model, params, prompt, key)
      state = pre(params, prompt, key)
      step, step_s = util.compile_fn(_loop_step_donated if donate else _loop_step, model,
                                     params, prompt_len, *state, 0)
      info[method] = dict(compile_s=pre_s + step_s,
                          peak_memory_bytes=util.peak_memory_bytes(step),
                          flops_xla=util.xla_flops(pre) + length * util.xla_flops(step))
      runs[method] = functools.partial(python_loop_rollout, model, params, prompt, key, length,
                                       donate)
    else:
      fn = dict(sampler=sampler_rollout, full_cache=full_cache_rollout,
                no_cache=no_cache_rollout)[method]
      compiled, compile_s = util.compile_fn(fn, model, params, prompt, key, length)
      info[method] = dict(compile_s=compile_s,
                          peak_memory_bytes=util.peak_memory_bytes(compiled),
                          flops_xla=None)  # A scan: XLA counts its body once.
      runs[method] = functools.partial(compiled, params, prompt, key)
  timings = util.time_with_reference(runs, repeats, budget_s, reference)
  ref = timings[methods[0]]["output"]
  records = []
  for method in methods:
    out = timings[method]["output"]
    # The decoders draw the same tokens (same keys, same arithmetic): a check
    # that the comparison is between equal work. Float differences between
    # cached and recomputed attention could flip a near-tie, hence a fraction.
    agree = dict(tokens_agree=float(jnp.mean(out.tokens == ref.tokens)),
                 logp_max_diff=float(jnp.max(jnp.abs(out.logp - ref.logp))))
    median = timings[method]["median_s"]
    flops = rollout_flops(cfg, rows, prompt_len, length, method)
    gflops = flops / median / 1e9
    records.append(dict(
        kind="rollout", size=size, method=method, B=batch, K=cfg.num_latents, L=length,
        P=prompt_len, M=cfg.max_len, params=util.param_count(params), median_s=median,
        min_s=timings[method]["min_s"], repeats=len(timings[method]["times_s"]),
        tokens_per_s=rows * length / median, flops_analytic=flops, gflops=gflops,
        **util.peak_fraction(gflops, peak_gflops, timings, reference), **info[method],
        **agree))
  if "sampler" in timings:
    for r in records:
      r["sampler_speedup"] = r["median_s"] / timings["sampler"]["median_s"]
  return records


def rollout_length_case(size: str, lengths, batch: int, repeats: int, peak_gflops: float,
                        prompt_len: int = ROLLOUT_PROMPT_LEN, budget_s: float = 20.0,
                        reference: util.MatmulReference | None = None) -> list[dict]:
  """The sampler and the full-cache decoder at each L in ``lengths``, all timed interleaved.

  One model size, B prompts of ``prompt_len`` tokens (the same at every L),
  K latents, a model of length M = P + 1 + L. Programs, for each L:

  * 'rollout' — the library sampler (its cache lengthened in chunks,
    ``sampling.cache_schedule``);
  * 'rollout_full_cache' — ``full_cache_rollout``: every decode step attends
    over all M preallocated positions (the sampler's earlier design).

  All the programs are compiled first and then timed round-robin
  (``time_calls``), so they see the same background load.

  Returns:
    One record per program (kind 'length'), with ``per_token_s`` = median /
    (B·K·L) and ``tokens_agree`` (the full-cache decoder against the sampler
    at the same L: the same keys draw the same tokens up to rounding).
  """
  lengths = sorted(lengths)
  fns = dict(rollout=(sampler_rollout, "sampler"),
             rollout_full_cache=(full_cache_rollout, "full_cache"))
  runs, info = {}, {}
  for length in lengths:
    model, params = make_model(size, prompt_len, length)
    prompt = make_prompts(batch, prompt_len, vocab_size=model.config.vocab_size)
    for program, (fn, method) in fns.items():
      name = f"{program}/L={length}"
      compiled, compile_s = util.compile_fn(fn, model, params, prompt, jax.random.PRNGKey(2),
                                            length)
      runs[name] = functools.partial(compiled, params, prompt, jax.random.PRNGKey(2))
      info[name] = dict(program=program, method=method, L=length, cfg=model.config,
                        compile_s=compile_s, peak_memory_bytes=util.peak_memory_bytes(compiled))
  timings = util.time_with_reference(runs, repeats, budget_s, reference)
  records = []
  for name, i in info.items():
    cfg, t = i["cfg"], timings[name]
    rows = batch * cfg.num_latents
    flops = rollout_flops(cfg, rows, prompt_len, i["L"], i["method"])
    gflops = flops / t["median_s"] / 1e9
    sampler_tokens = timings[f"rollout/L={i['L']}"]["output"].tokens
    records.append(dict(
        kind="length", program=i["program"], size=size, B=batch, K=cfg.num_latents, L=i["L"],
        P=prompt_len, M=cfg.max_len, median_s=t["median_s"], min_s=t["min_s"],
        repeats=len(t["times_s"]), per_token_s=t["median_s"] / (rows * i["L"]),
        flops_analytic=flops, gflops=gflops,
        **util.peak_fraction(gflops, peak_gflops, timings, reference),
        peak_memory_bytes=i["peak_memory_bytes"], compile_s=i["compile_s"],
        tokens_agree=float(jnp.mean(t["output"].tokens == sampler_tokens))))
  return records
