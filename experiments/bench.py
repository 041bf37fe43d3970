"""Benchmarks: rollout throughput, train-step time, FLOP/s against the measured matmul peak.

    python experiments/bench.py --quick              # reduced set, < 2 minutes on 2 CPU cores
    python experiments/bench.py --out docs/bench.md  # the full set

Every case prints one JSON object; a Markdown table goes to ``--out``; the
LAST printed line is one JSON object with the headline ratios
(``sampler_over_python_loop``, ``sampler_over_no_cache``,
``rollout_peak_fraction``, ``train_step_peak_fraction``, ``matmul_peak_gflops``).
Ratios measured in one run, not absolute times, are the figures to quote
(DESIGN.md §10).

What is measured (model sizes in ``SIZES``; B, K, L in every record):

* **matmul peak**: the FLOP/s of a jitted dense float32 ``[n, n] @ [n, n]``
  (2·n³ FLOPs) from its fastest of many calls, best over ``n`` in
  ``MATMUL_SIZES``, timed in the same process at the start
  (``matmul_peak_gflops``). The best size is timed again among each case's own
  calls (interleaved; ``matmul_gflops_here``, fastest call), and the case's
  peak fraction divides its achieved FLOP/s (from its MEDIAN time) by the
  larger of the two: a conservative fraction on a shared machine.
* **rollouts** of L tokens for B prompts (length P) under each of K latents,
  three decoders on the same model, parameters, prompts and PRNG keys (they
  draw the same tokens):

  - ``sampler``: the library's ``sampling.sample_latents`` under ``jax.jit``
    (one ``lax.scan`` over L, vmapped over K, KV cache);
  - ``python_loop``: a jitted prefill, then a Python ``for`` loop calling a
    jitted single decode step (the same cached ``model.decode_step`` and the
    same sampling arithmetic, vmapped over K) once per token, dispatched
    asynchronously (nothing read back until the end);
  - ``python_loop_donated``: the same loop with the step's cache (and logits,
    done flags) donated, so each step updates the cache in place: the
    strongest per-token loop, differing from the sampler only by the return
    to Python between tokens;
  - ``no_cache``: a jitted ``lax.scan`` whose every step runs the model's
    teacher-forced forward over the whole fixed-length ``[P + 1 + L]`` buffer
    (prompt, BOS, the tokens so far, PAD after) and reads the logits at the
    current position: the prefix is recomputed at every step.

  Tokens/s counts the B·K·L generated tokens.
* **train steps** (``train.make_train_step`` of a ``train.build``-ed config):
  reconstruction only; + token JSD; + seq_pg for each estimator; OPD (if
  ``latentdiv.distill`` exists); RAML targets with N = 1, 4, 16 (if the
  config schema has them). The task is ``late_divergence`` with P = L/2 and
  d = L/2 − 1, so the target length is T = L (the rollout length of seq_pg).
* **scaling with L** (8, 16, 32, 64) of the rollout and of the train step.

How FLOPs are counted:

* ``flops_xla`` is ``compiled.cost_analysis()['flops']`` (XLA's HLO cost
  analysis: 2 per multiply-add of dots/convolutions, 1 per elementwise op).
  XLA counts the body of a while loop ONCE, whatever its trip count, so it is
  exact only for programs without loops: the teacher-forced train steps, the
  matmul, the prefill and the single decode step. For the python-loop decoder
  it is exact as ``prefill + L·step``; the sampler and the seq_pg steps contain
  a scan, so their ``flops_xla`` is an undercount and is not used.
* ``flops_analytic`` counts 2 FLOPs per multiply-add of every matmul and
  attention einsum the program executes (``forward_flops``): per position
  and layer 2·(4d² + 2·d·d_ff) for the projections and MLP, 4·d·(keys
  attended) for QKᵀ and AV, plus 2·d·V for the unembedding; a backward pass
  counts twice its forward. Cached decode steps attend over the whole
  preallocated cache (length M = P + 1 + L), as the program does.
* Peak fractions use ``flops_xla`` for loop-free programs (cross-checked
  against ``flops_analytic``; both are printed) and ``flops_analytic``
  otherwise.

Peak memory is XLA's buffer assignment for the compiled program
(``compiled.memory_analysis()``: arguments + outputs + temporaries − aliased).

Timing: compile (ahead of time, ``jit(f).lower(...).compile()``), one
warm-up call per program, then ``--repeats`` rounds in which the programs of a
case (the three decoders, and the reference matmul) are called in turn, each
call ended by ``jax.block_until_ready``; the median is reported (and the min).
A program whose warm-up call exceeds the time budget gets fewer repeats (at
least one).

Profiling: ``--hlo_dir DIR`` writes the optimised HLO of every compiled case
(``compiled.as_text()``); ``--profile_dir DIR`` wraps the run in
``jax.profiler.trace`` (open with TensorBoard's profile plugin or Perfetto).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentdiv import config as config_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from latentdiv import estimators  # noqa: E402  pylint: disable=g-import-not-at-top
from latentdiv import model as model_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from latentdiv import sampling  # noqa: E402  pylint: disable=g-import-not-at-top
from latentdiv import train  # noqa: E402  pylint: disable=g-import-not-at-top
from latentdiv import vocab  # noqa: E402  pylint: disable=g-import-not-at-top

# Model sizes (DESIGN.md §10 / issue 7): layers, width, heads, MLP width.
SIZES = {
    "small": dict(num_layers=2, d_model=128, num_heads=4, d_ff=512),
    "medium": dict(num_layers=4, d_model=256, num_heads=4, d_ff=1024),
    "large": dict(num_layers=6, d_model=512, num_heads=8, d_ff=2048),
    # Not a benchmark size: the smoke test's (--smoke).
    "tiny": dict(num_layers=1, d_model=32, num_heads=2, d_ff=64),
}
BENCH_SIZES = ("small", "medium", "large")
# Batch shapes per size: rollouts of B prompts × K latents, train batches of B.
ROLLOUT_BATCH = {"small": 32, "medium": 32, "large": 16, "tiny": 2}
TRAIN_BATCH = {"small": 32, "medium": 16, "large": 8, "tiny": 4}
# The latency case: the sampler against the per-token loop with one prompt
# (B·K = 4 rows), where a step's compute is smallest next to its dispatch.
LATENCY_BATCH = 1
NUM_LATENTS = 4  # K
ROLLOUT_PROMPT_LEN = 8  # P of the rollout cases.
ALPHABET_SIZE = 29  # V = 3 + 29 = 32.
LENGTHS = (8, 16, 32, 64)
MATMUL_SIZES = (512, 1024, 2048)
RAML_SAMPLES = (1, 4, 16)
DEFAULT_L = 32


# ---------------------------------------------------------------- timing


def block(tree):
  return jax.block_until_ready(tree)


def time_calls(fns: dict[str, Callable[[], Any]], repeats: int,
               budget_s: float = 20.0) -> dict[str, dict]:
  """Median wall time of each ``fns[name]()``, the calls interleaved round-robin.

  Each function is called once to warm up (timed: on a busy machine a slow
  case then gets fewer repeats, at least 1, so that its timed calls take about
  ``budget_s``), then the functions are called in turn ``repeats`` times, each
  call ended by ``jax.block_until_ready``. Interleaving exposes every case to
  the same background load, which keeps the ratios fair on a shared machine.

  Returns:
    {name: dict(median_s, min_s, times_s, output)}; ``output`` is the
    warm-up call's result.
  """
  wanted, outputs = {}, {}
  for name, fn in fns.items():
    start = time.perf_counter()
    outputs[name] = block(fn())
    first = time.perf_counter() - start
    wanted[name] = max(1, min(max(repeats, 1), int(budget_s // max(first, 1e-9))))
  times = {name: [] for name in fns}
  for r in range(max(wanted.values())):
    for name, fn in fns.items():
      if r < wanted[name]:
        start = time.perf_counter()
        block(fn())
        times[name].append(time.perf_counter() - start)
  return {name: dict(median_s=statistics.median(t), min_s=min(t), times_s=t,
                     output=outputs[name]) for name, t in times.items()}


def time_call(fn: Callable[[], Any], repeats: int, budget_s: float = 20.0) -> dict:
  """``time_calls`` of one function: dict(median_s, min_s, times_s, output)."""
  return time_calls({"fn": fn}, repeats, budget_s)["fn"]


_HLO_DIR: list[str] = []  # Where --hlo_dir writes the compiled programs (empty: nowhere).


def compile_fn(jitted, *args, **kwargs):
  """(compiled executable, compile seconds) of a ``jax.jit``-ed function at these args."""
  start = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  seconds = time.perf_counter() - start
  if _HLO_DIR:
    name = getattr(jitted, "__name__", "program")
    index = len(os.listdir(_HLO_DIR[0]))
    with open(os.path.join(_HLO_DIR[0], f"{index:03d}_{name}.hlo.txt"), "w") as f:
      f.write(compiled.as_text())
  return compiled, seconds


def xla_flops(compiled) -> float:
  """``compiled.cost_analysis()['flops']`` (a loop body is counted once)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def peak_memory_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries − aliased bytes of XLA's buffer assignment."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


# ---------------------------------------------------------------- FLOPs


def forward_flops(cfg: model_lib.ModelConfig, num_query: int, num_keys: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of one forward over ``num_query`` positions of one sequence.

  Per position and layer: Q, K, V and output projections 4·2·d², MLP 2·2·d·d_ff,
  scores and weighted values 2·2·d·num_keys; plus the unembedding 2·d·V.
  """
  d, f = cfg.d_model, cfg.d_ff
  per_layer = 8 * d * d + 4 * d * f + 4 * d * num_keys
  return float(num_query * (cfg.num_layers * per_layer + 2 * d * cfg.vocab_size))


def rollout_flops(cfg: model_lib.ModelConfig, rows: int, prompt_len: int, length: int,
                  method: str) -> float:
  """Analytic FLOPs of ``rows`` rollouts of ``length`` tokens by ``method``."""
  m = cfg.max_len
  if method in ("sampler", "python_loop", "python_loop_donated"):
    # Prefill of [x, BOS] then one cached step per token (the sampler runs L
    # steps; the last one's output is unused but computed).
    per_row = forward_flops(cfg, prompt_len + 1, m) + length * forward_flops(cfg, 1, m)
  elif method == "no_cache":
    per_row = length * forward_flops(cfg, m, m)
  else:
    raise ValueError(f"method must be one of {ROLLOUT_METHODS}, got {method!r}.")
  return rows * per_row


def train_step_flops(setup: train.Setup) -> float:
  """Analytic FLOPs of one train step: forward + backward (= 3 forwards) of every pass.

  Teacher-forced reconstruction/JSD: B·K sequences of P + T positions (B·N·K
  with RAML targets, plus the data pass). seq_pg adds the rollouts (forward
  only) of B·N·K rows and the scoring of each rollout under the K latents,
  B·N·K·K sequences, forward + backward.
  """
  c = setup.config
  cfg = setup.model.config
  k, b = cfg.num_latents, c.train.batch_size
  p, t = setup.task.prompt_len, setup.task.target_len
  seq = forward_flops(cfg, p + t, p + t)
  sequences = b * k
  if c.objective.targets == "raml":
    sequences += b * k * c.raml.num_samples
  total = 3 * sequences * seq
  if c.seq_pg.lambda_pg > 0:
    rows = b * c.seq_pg.num_rollouts * k
    length = c.seq_pg.rollout_len
    total += rows * (forward_flops(cfg, p + 1, cfg.max_len)
                     + length * forward_flops(cfg, 1, cfg.max_len))
    total += 3 * rows * k * forward_flops(cfg, p + length, p + length)
  return float(total)


def param_count(params) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(params)))


# ---------------------------------------------------------------- matmul peak


class MatmulReference(NamedTuple):
  """A compiled dense float32 matmul, timed beside each case for its peak fraction."""

  run: Callable[[], Any]
  flops: float
  n: int


def matmul_peak(sizes=MATMUL_SIZES, repeats: int = 20) -> tuple[dict, MatmulReference]:
  """The peak FLOP/s of a jitted dense float32 ``[n, n] @ [n, n]``: the best over ``sizes``.

  A peak is a best case: each size is timed ``repeats`` times and its FLOP/s
  is taken from the FASTEST call (on a shared machine, the median mixes in
  other processes' load; both are printed).

  Returns:
    (dict(gflops, n) of the best size, a ``MatmulReference`` of that size).
  """
  matmul = jax.jit(jnp.matmul)
  best, reference = dict(gflops=0.0, n=None), None
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    compiled, _ = compile_fn(matmul, a, b)
    timing = time_call(functools.partial(compiled, a, b), repeats, budget_s=10.0)
    gflops = 2.0 * n ** 3 / timing["min_s"] / 1e9
    emit(dict(kind="matmul", n=n, median_s=timing["median_s"], min_s=timing["min_s"],
              gflops=gflops, gflops_median=2.0 * n ** 3 / timing["median_s"] / 1e9,
              repeats=len(timing["times_s"]), flops_xla=xla_flops(compiled),
              flops_analytic=2.0 * n ** 3))
    if gflops > best["gflops"]:
      best = dict(gflops=gflops, n=n)
      reference = MatmulReference(functools.partial(compiled, a, b), 2.0 * n ** 3, n)
  return best, reference


def _fraction(gflops: float, peak_gflops: float, timings: dict, reference) -> dict:
  """Peak fraction against the best of ``peak_gflops`` and the matmul timed beside the case.

  ``matmul_gflops_here`` is the reference matmul's FLOP/s from its fastest
  call among the case's calls; the denominator is the larger of it and the
  start-of-run peak, so a quiet moment during the case raises the bar.
  """
  here = None
  if reference is not None and "_matmul" in timings:
    here = reference.flops / timings["_matmul"]["min_s"] / 1e9
  peak = max(peak_gflops or 0.0, here or 0.0)
  return dict(matmul_gflops_here=here, peak_fraction=gflops / peak if peak else None)


# ---------------------------------------------------------------- rollouts

ROLLOUT_METHODS = ("sampler", "python_loop", "python_loop_donated", "no_cache")


def model_config(size: str, prompt_len: int, length: int, num_latents: int = NUM_LATENTS,
                 **overrides) -> model_lib.ModelConfig:
  """``SIZES[size]`` (with ``overrides``) and max_len = P + 1 + L (room for the last token)."""
  cfg = model_lib.ModelConfig(vocab_size=vocab.NUM_RESERVED + ALPHABET_SIZE,
                              num_latents=num_latents, max_len=prompt_len + 1 + length,
                              **dict(SIZES[size], **overrides))
  cfg.validate()
  return cfg


def make_model(size: str, prompt_len: int, length: int,
               num_latents: int = NUM_LATENTS, seed: int = 0, **overrides):
  """(model, params) of ``model_config(...)``; parameters from ``seed``."""
  model = model_lib.LatentTransformer(
      model_config(size, prompt_len, length, num_latents, **overrides))
  init = jax.jit(functools.partial(model_lib.init_params, model))
  return model, init(jax.random.PRNGKey(seed))


def make_prompts(batch: int, prompt_len: int, seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, prompt_len),
                            vocab.FIRST_CONTENT, vocab.NUM_RESERVED + ALPHABET_SIZE,
                            jnp.int32)


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


def rollout_case(size: str, length: int, batch: int, repeats: int, peak_gflops: float,
                 methods=ROLLOUT_METHODS, prompt_len: int = ROLLOUT_PROMPT_LEN,
                 budget_s: float = 20.0, reference: MatmulReference | None = None,
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
  prompt = make_prompts(batch, prompt_len)
  key = jax.random.PRNGKey(2)
  rows = batch * cfg.num_latents
  runs, info = {}, {}
  for method in methods:
    if method.startswith("python_loop"):
      donate = method == "python_loop_donated"
      pre, pre_s = compile_fn(_loop_prefill, model, params, prompt, key)
      state = pre(params, prompt, key)
      step, step_s = compile_fn(_loop_step_donated if donate else _loop_step, model, params,
                                prompt_len, *state, 0)
      info[method] = dict(compile_s=pre_s + step_s, peak_memory_bytes=peak_memory_bytes(step),
                          flops_xla=xla_flops(pre) + length * xla_flops(step))
      runs[method] = functools.partial(python_loop_rollout, model, params, prompt, key, length,
                                       donate)
    else:
      fn = sampler_rollout if method == "sampler" else no_cache_rollout
      compiled, compile_s = compile_fn(fn, model, params, prompt, key, length)
      info[method] = dict(compile_s=compile_s, peak_memory_bytes=peak_memory_bytes(compiled),
                          flops_xla=None)  # A scan: XLA counts its body once.
      runs[method] = functools.partial(compiled, params, prompt, key)
  if reference is not None:
    runs["_matmul"] = reference.run
  timings = time_calls(runs, repeats, budget_s)
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
        P=prompt_len, M=cfg.max_len, params=param_count(params), median_s=median,
        min_s=timings[method]["min_s"], repeats=len(timings[method]["times_s"]),
        tokens_per_s=rows * length / median, flops_analytic=flops, gflops=gflops,
        **_fraction(gflops, peak_gflops, timings, reference), **info[method], **agree))
  if "sampler" in timings:
    for r in records:
      r["sampler_speedup"] = r["median_s"] / timings["sampler"]["median_s"]
  return records


# ---------------------------------------------------------------- train steps


def train_config(size: str, length: int, batch: int, **overrides) -> Any:
  """The bench's train config: late_divergence with T = L, model ``SIZES[size]``, K latents.

  ``overrides`` are ``"section.field": value`` pairs.
  """
  c = config_lib.base_config()
  c.task.name = "late_divergence"
  c.task.alphabet_size = ALPHABET_SIZE
  c.task.prompt_len = length // 2
  c.task.num_divergent = length - length // 2 - 1  # T = P + d + 1 = L.
  c.task.num_strategies = 3
  c.model.num_latents = NUM_LATENTS
  for name, value in SIZES[size].items():
    c.model[name] = value
  c.train.batch_size = batch
  c.objective.lambda_jsd = 0.0
  c.objective.jsd_prefix_len = min(4, length)
  c.seq_pg.rollout_len = length
  for path, value in overrides.items():
    section, field = path.split(".")
    c[section][field] = value
  return c


def opd_available() -> str | None:
  """None if on-policy distillation can be benchmarked, else the reason it cannot."""
  if importlib.util.find_spec("latentdiv.distill") is None:
    return "latentdiv.distill does not exist"
  return None


def opd_step(size: str, length: int, batch: int, workdir: str):
  """(setup, compiled-able jitted step, its args) of an OPD step of ``SIZES[size]``.

  Student and teacher have the same size; the teacher (per latent,
  ``teacher_latent = -1``) gets fresh parameters and a ``config.json`` in
  ``workdir`` (no checkpoint is needed to time a step). Loss ``opd`` with the
  ``rao_blackwell`` estimator, responses of L tokens.
  """
  from latentdiv import distill  # pylint: disable=import-outside-toplevel
  teacher = train_config(size, length, batch)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(teacher.to_json_best_effort())
  c = distill.distill_config()
  for section in ("task", "model", "train"):
    for field, value in teacher[section].items():
      c[section][field] = value
  c.objective.lambda_jsd = 0.0
  c.seq_pg.rollout_len = 1
  c.objective.jsd_prefix_len = 1
  c.distill.teacher_workdir = workdir
  c.distill.teacher_latent = -1
  c.distill.loss = "opd"
  c.distill.estimator = estimators.RAO_BLACKWELL
  setup = distill.build(c)
  state = jax.jit(lambda: distill.init_state(setup))()
  teacher_params = jax.jit(functools.partial(model_lib.init_params, setup.teacher))(
      jax.random.PRNGKey(1))
  return setup, distill.make_train_step(setup), (state, teacher_params,
                                                   distill.data_key(c))


def opd_flops(setup) -> float:
  """Analytic FLOPs of an OPD step: student rollouts, student fwd+bwd and teacher fwd scoring."""
  s, t = setup.student.config, setup.teacher.config
  rows = setup.config.train.batch_size * s.num_latents * setup.config.distill.num_rollouts
  p, length = setup.task.prompt_len, setup.response_len
  rollout = forward_flops(s, p + 1, s.max_len) + length * forward_flops(s, 1, s.max_len)
  score = 3 * forward_flops(s, p + length, p + length) + forward_flops(t, p + length, p + length)
  return float(rows * (rollout + score))


def raml_available() -> str | None:
  if "raml" not in getattr(config_lib, "TARGETS", ()):
    return "the train step has no RAML objective (config.objective.targets)"
  return None


def train_cases(size: str, length: int, batch: int, which: str = "all") -> list:
  """``(name, overrides)`` of the train-step cases.

  ``which``: 'all' (every case), 'core' (rec, rec+jsd, seq_pg/rao_blackwell,
  OPD, RAML N = 4), 'quick' (rec+jsd, seq_pg/rao_blackwell), 'scaling'
  (rec+jsd, seq_pg/rao_blackwell) or 'smoke' / 'scaling_tf' (rec+jsd only).
  """
  del size, length, batch  # The same cases at every size and length.
  jsd = {"objective.lambda_jsd": 0.1}
  rb = (f"rec+jsd+seq_pg/{estimators.RAO_BLACKWELL}", dict(jsd, **{"seq_pg.lambda_pg": 0.1}))
  raml_case = lambda n: (f"raml/N={n}", dict(jsd, **{  # noqa: E731
      "objective.targets": "raml", "raml.num_samples": n}))
  if which in ("smoke", "scaling_tf"):
    return [("rec+jsd", jsd)]
  if which in ("quick", "scaling"):
    return [("rec+jsd", jsd), rb]
  if which == "core":
    return [("rec", {}), ("rec+jsd", jsd), rb, ("opd", {}), raml_case(4)]
  if which != "all":
    raise ValueError(f"which must be one of ('all', 'core', 'quick', 'scaling', "
                     f"'scaling_tf', 'smoke'), got {which!r}.")
  cases = [("rec", {}), ("rec+jsd", jsd)]
  for est in estimators.ESTIMATORS:
    baseline = "ema" if est.endswith("_baseline") else "none"
    cases.append((f"rec+jsd+seq_pg/{est}",
                  dict(jsd, **{"seq_pg.lambda_pg": 0.1, "seq_pg.estimator": est,
                               "seq_pg.baseline": baseline})))
  cases.append(("opd", {}))
  cases.extend(raml_case(n) for n in RAML_SAMPLES)
  return cases


def train_case(name: str, size: str, length: int, batch: int, overrides: dict | None,
               repeats: int, peak_gflops: float, budget_s: float = 20.0,
               reference: MatmulReference | None = None) -> dict:
  """Times one train step (``train.make_train_step``); a record with time, FLOP/s, memory.

  ``name == 'opd'`` times ``distill.make_train_step`` instead (skipped, with
  the reason, where ``latentdiv.distill`` is missing or fails to build).
  """
  base = dict(kind="train", case=name, size=size, B=batch, K=NUM_LATENTS, L=length)
  if name.startswith("raml") and raml_available() is not None:
    return dict(base, skipped=raml_available())
  if name == "opd":
    reason = opd_available()
    if reason is not None:
      return dict(base, skipped=reason)
    import tempfile  # pylint: disable=import-outside-toplevel
    try:
      with tempfile.TemporaryDirectory() as workdir:
        setup, step, args = opd_step(size, length, batch, workdir)
        compiled, compile_s = compile_fn(step, *args)
    except Exception as err:  # pylint: disable=broad-except
      return dict(base, skipped=f"OPD step failed to build: {type(err).__name__}: {err}")
    flops_analytic, has_loop = opd_flops(setup), True
    params = args[0].params
    prompt_len, target_len = setup.task.prompt_len, setup.task.target_len
  else:
    setup = train.build(train_config(size, length, batch, **overrides))
    state = jax.jit(lambda: train.init_state(setup))()
    step = train.make_train_step(setup)
    compiled, compile_s = compile_fn(step, state)
    args = (state, *step.bound_args)  # The compiled step takes the data key as an argument.
    flops_analytic = train_step_flops(setup)
    has_loop = setup.config.seq_pg.lambda_pg > 0
    params = state.params
    prompt_len, target_len = setup.task.prompt_len, setup.task.target_len
  runs = {"step": lambda: compiled(*args)}
  if reference is not None:
    runs["_matmul"] = reference.run
  timings = time_calls(runs, repeats, budget_s)
  timing = timings["step"]
  flops_xla = xla_flops(compiled)
  flops = flops_analytic if has_loop else flops_xla
  gflops = flops / timing["median_s"] / 1e9
  return dict(
      base, P=prompt_len, T=target_len, params=param_count(params),
      median_s=timing["median_s"], min_s=timing["min_s"], repeats=len(timing["times_s"]),
      flops_xla=flops_xla, flops_analytic=flops_analytic,
      flops_counted="analytic (scan in step)" if has_loop else "xla",
      gflops=gflops, **_fraction(gflops, peak_gflops, timings, reference),
      peak_memory_bytes=peak_memory_bytes(compiled), compile_s=compile_s)


# ---------------------------------------------------------------- output


_PRINTED: list[dict] = []


def emit(record: dict) -> dict:
  """Prints ``record`` as one JSON line (and keeps it for the table)."""
  _PRINTED.append(record)
  print(json.dumps(record, default=float), flush=True)
  return record


def _fmt(value, spec=".3g"):
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "–"
  return format(value, spec)


def _mib(value):
  return "–" if value is None else f"{value / 2 ** 20:.1f}"


def markdown(records: list[dict], headline: dict, meta: dict) -> str:
  """The Markdown report of a run."""
  lines = ["# latentdiv benchmarks", "",
           f"Device: {meta['device']} ({meta['num_devices']} device(s)); "
           f"host: {meta['host']}; jax {meta['jax']}; mode: {meta['mode']}; "
           f"load average at start: {meta['load_start']}, at end: {meta['load_end']}.",
           "",
           f"Dense float32 matmul peak measured in this run: "
           f"**{headline['matmul_peak_gflops']:.1f} GFLOP/s** (n = {meta['matmul_n']}).",
           "", "Generated by `python experiments/bench.py"
           + ("" if meta["mode"] == "full" else f" --{meta['mode']}") + "`. See its docstring for "
           "how FLOPs and memory are counted. Ratios, not absolute times, are the "
           "figures to quote.", "", "## Headline", "", "| figure | value |", "|---|---|"]
  for key, value in headline.items():
    if isinstance(value, list):
      value = " – ".join(_fmt(v) for v in value)
    elif not isinstance(value, str):
      value = _fmt(value)
    lines.append(f"| `{key}` | {value} |")
  rollouts = [r for r in records if r.get("kind") == "rollout"]
  if rollouts:
    lines += ["", "## Rollouts", "",
              "B prompts × K latents × L tokens; `speedup` = this decoder's time / "
              "the sampler's.", "",
              "| size | method | B | K | L | ms | tokens/s | speedup of sampler | "
              "GFLOP/s | matmul GFLOP/s here | peak fraction | memory MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rollouts:
      lines.append(
          f"| {r['size']} | {r['method']} | {r['B']} | {r['K']} | {r['L']} | "
          f"{r['median_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
          f"{_fmt(r.get('sampler_speedup'))} | {_fmt(r['gflops'])} | "
          f"{_fmt(r.get('matmul_gflops_here'))} | "
          f"{_fmt(r['peak_fraction'])} | {_mib(r['peak_memory_bytes'])} |")
  trains = [r for r in records if r.get("kind") == "train"]
  if trains:
    lines += ["", "## Train steps", "",
              "Task late_divergence with T = L (P = L/2); FLOPs from XLA for loop-free "
              "steps, analytic where the step contains the rollout scan.", "",
              "| size | case | B | K | L | ms | GFLOP/s | matmul GFLOP/s here | peak fraction "
              "| FLOPs xla / analytic | memory MiB | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in trains:
      if "skipped" in r:
        lines.append(f"| {r['size']} | {r['case']} | {r['B']} | {r['K']} | {r['L']} | "
                     f"skipped: {r['skipped']} | | | | | | |")
        continue
      ratio = r["flops_xla"] / r["flops_analytic"] if r["flops_analytic"] else None
      case = r["case"] + (f" (×{r['over_ml']:.2f} the ML step)" if "over_ml" in r else "")
      lines.append(
          f"| {r['size']} | {case} | {r['B']} | {r['K']} | {r['L']} | "
          f"{r['median_s'] * 1e3:.1f} | {_fmt(r['gflops'])} | "
          f"{_fmt(r.get('matmul_gflops_here'))} | {_fmt(r['peak_fraction'])} | "
          f"{_fmt(ratio)} | {_mib(r['peak_memory_bytes'])} | {r['compile_s']:.1f} |")
  lines += _scaling_table(records)
  return "\n".join(lines) + "\n"


def _scaling_table(records: list[dict]) -> list[str]:
  """Time and memory against L, relative to the shortest L run, per (size, case)."""
  groups: dict[tuple, dict] = {}
  for r in records:
    if (r.get("kind") == "rollout" and r["method"] == "sampler"
        and r["B"] == ROLLOUT_BATCH.get(r["size"])):  # Not the B = 1 latency case.
      name = "rollout (sampler)"
    elif r.get("kind") == "train" and "skipped" not in r:
      name = f"train {r['case']}"
    else:
      continue
    groups.setdefault((r["size"], name), {})[r["L"]] = r
  groups = {k: v for k, v in groups.items() if len(v) > 1}
  if not groups:
    return []
  lines = ["", "## Growth with L", "",
           "Time and peak memory at each L divided by those at the shortest L run "
           "(absolute ms and MiB in parentheses).", "",
           "| size | program | " + " | ".join(f"L = {n}" for n in LENGTHS) + " |",
           "|---|---|" + "---|" * len(LENGTHS)]
  for (size, name), by_l in groups.items():
    first = by_l[min(by_l)]
    cells = []
    for n in LENGTHS:
      r = by_l.get(n)
      if r is None:
        cells.append("")
        continue
      mem = r["peak_memory_bytes"]
      mem_ratio = (mem / first["peak_memory_bytes"]) if mem and first["peak_memory_bytes"] else None
      cells.append(f"×{r['median_s'] / first['median_s']:.2f} time, ×{_fmt(mem_ratio)} mem "
                   f"({r['median_s'] * 1e3:.0f} ms, {_mib(mem)} MiB)")
    lines.append(f"| {size} | {name} | " + " | ".join(cells) + " |")
  return lines


def _load():
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


# ---------------------------------------------------------------- plan


MODES = ("full", "quick", "smoke")


def plan(mode: str, sizes: list[str]) -> dict:
  """What to run: rollout (size, L, methods) and train (size, L, which) cases.

  ``mode``: 'full' (every case for ``sizes``), 'quick' (the small model: the
  headline rollout ratios, the teacher-forced and one seq_pg step, growth
  over L = 8, 16, 32; < 2 min on 2 idle cores) or
  'smoke' (a 1-layer d=32 model, the rollout cases of the headline and one
  train step: for tests).
  """
  if mode == "smoke":
    return dict(repeats=1, budget_s=1.0, matmul_sizes=(128,),
                rollouts=[("tiny", 32, ROLLOUT_METHODS), ("tiny", 64, ("sampler", "no_cache"))],
                trains=[("tiny", 8, "smoke")])
  latency = ("small", 32, ("sampler", "python_loop"), LATENCY_BATCH)
  if mode == "quick":
    return dict(
        repeats=3, budget_s=4.0, matmul_sizes=(512, 1024),
        rollouts=[("small", 32, ROLLOUT_METHODS), ("small", 64, ("sampler", "no_cache")),
                  ("small", 8, ("sampler",)), ("small", 16, ("sampler",)), latency],
        trains=[("small", DEFAULT_L, "quick"), ("small", 8, "scaling_tf"),
                ("small", 16, "scaling_tf")])
  if mode != "full":
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  rollouts, trains = [], []
  for size in sizes:
    for length in LENGTHS:
      if size == "small" and length in (32, 64):
        methods = ROLLOUT_METHODS
      elif length == DEFAULT_L:
        methods = ("sampler", "python_loop", "python_loop_donated")
      else:
        methods = ("sampler",)
      rollouts.append((size, length, methods))
    if size == "small":
      rollouts.append(latency)
    trains.append((size, DEFAULT_L, "all" if size == "small" else "core"))
    for length in LENGTHS:
      if length != DEFAULT_L and size != "large":
        trains.append((size, length, "scaling"))
  return dict(repeats=5, budget_s=10.0, matmul_sizes=MATMUL_SIZES, rollouts=rollouts,
              trains=trains)


def _with_ml_ratio(record: dict, records: list[dict]) -> dict:
  """Adds ``over_ml`` to a RAML record: its step time / the 'rec+jsd' (ML targets) step's.

  The two steps differ only in their targets (RAML samples vs the data), on
  the same model, batch and length: the cost of RAML's N samples per example.
  """
  if record.get("kind") != "train" or not record["case"].startswith("raml/") or (
      "skipped" in record):
    return record
  ml = _find(records, kind="train", case="rec+jsd", size=record["size"], L=record["L"])
  if ml is not None:
    record["over_ml"] = record["median_s"] / ml["median_s"]
  return record


def _find(records, **kw):
  for r in records:
    if all(r.get(k) == v for k, v in kw.items()) and "skipped" not in r:
      return r
  return None


def _range(values):
  values = [v for v in values if v is not None]
  return [min(values), max(values)] if values else None


def headline_figures(records: list[dict], peak: dict) -> dict:
  """The last line: the ratios a script reads.

  ``sampler_over_python_loop`` (L = 32; also against the donated loop) and
  ``sampler_over_no_cache`` (L = 64) on the small model (the smallest size run); ``rollout_peak_fraction`` (the
  sampler at L = 32) and ``train_step_peak_fraction`` (the teacher-forced
  'rec+jsd' step at L = 32) of the largest size run; None where not run.
  """
  run = [s for s in SIZES if _find(records, kind="rollout", size=s)]
  ratio_size = "small" if "small" in run else (run[0] if run else None)

  def speedup(length, method, batch=None):
    batch = ROLLOUT_BATCH.get(ratio_size) if batch is None else batch
    r = _find(records, kind="rollout", size=ratio_size, L=length, method=method, B=batch)
    return None if r is None else r["sampler_speedup"]

  def raml_over_ml(n):
    r = _find(records, kind="train", case=f"raml/N={n}")
    return None if r is None else r.get("over_ml")

  def at_default_l(sizes, **kw):
    if not sizes:
      return None, None
    size = sizes[-1]
    return size, (_find(records, size=size, L=DEFAULT_L, **kw)
                  or _find(records, size=size, **kw))

  rollout_size, rollout = at_default_l(
      [s for s in BENCH_SIZES if _find(records, kind="rollout", size=s, method="sampler")]
      or run, kind="rollout", method="sampler")
  train_size, tf = at_default_l(
      [s for s in SIZES if _find(records, kind="train", size=s, case="rec+jsd")],
      kind="train", case="rec+jsd")
  medium = _find(records, kind="rollout", size="medium", method="sampler", L=DEFAULT_L)
  fraction = lambda r: None if r is None else r["peak_fraction"]  # noqa: E731
  return dict(
      kind="headline",
      sampler_over_python_loop=speedup(32, "python_loop"),
      sampler_over_no_cache=speedup(64, "no_cache"),
      sampler_over_python_loop_donated=speedup(32, "python_loop_donated"),
      sampler_over_python_loop_b1=speedup(32, "python_loop", LATENCY_BATCH),
      **{f"raml_over_ml_n{n}": raml_over_ml(n) for n in RAML_SAMPLES},
      rollout_peak_fraction=fraction(rollout),
      train_step_peak_fraction=fraction(tf),
      matmul_peak_gflops=peak["gflops"],
      matmul_gflops_here_range=_range([r.get("matmul_gflops_here") for r in records]),
      ratio_size=ratio_size,
      rollout_peak_fraction_size=rollout_size,
      rollout_peak_fraction_medium=fraction(medium),
      train_step_peak_fraction_size=train_size,
      device=str(jax.devices()[0].device_kind),
  )


def main(argv=None) -> dict:
  """Runs the benchmark; prints one JSON line per case, then the headline line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="reduced set, < 2 min on 2 cores")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model, the headline cases (for tests)")
  parser.add_argument("--sizes", default=",".join(BENCH_SIZES),
                      help="comma-separated subset of " + ",".join(BENCH_SIZES))
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
  parser.add_argument("--out", default="docs/bench.md", help="Markdown table path ('' = none)")
  parser.add_argument("--hlo_dir", default="", help="write each compiled program's HLO here")
  parser.add_argument("--profile_dir", default="", help="jax.profiler trace of the run")
  args = parser.parse_args(argv)
  _HLO_DIR.clear()
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
    _HLO_DIR.append(args.hlo_dir)
  profile = (jax.profiler.trace(args.profile_dir) if args.profile_dir
             else contextlib.nullcontext())
  with profile:
    return _run(args)


def _run(args) -> dict:
  """``main`` after parsing."""
  sizes = [s for s in args.sizes.split(",") if s]
  for s in sizes:
    if s not in BENCH_SIZES:
      raise ValueError(f"--sizes must name sizes in {BENCH_SIZES}, got {s!r}.")
  mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
  todo = plan(mode, sizes)
  repeats = args.repeats or todo["repeats"]
  _PRINTED.clear()
  meta = dict(device=str(jax.devices()[0].device_kind), num_devices=jax.device_count(),
              host=f"{platform.node()} ({os.cpu_count()} CPUs)", jax=jax.__version__,
              mode=mode, load_start=_load())
  emit(dict(kind="meta", **meta))
  start = time.perf_counter()
  peak, reference = matmul_peak(todo["matmul_sizes"], repeats=4 * repeats)
  meta["matmul_n"] = peak["n"]
  for size, length, methods, *batch in todo["rollouts"]:
    batch = batch[0] if batch else ROLLOUT_BATCH[size]
    for record in rollout_case(size, length, batch, repeats, peak["gflops"],
                               methods, budget_s=todo["budget_s"], reference=reference):
      emit(record)
  for size, length, which in todo["trains"]:
    for name, overrides in train_cases(size, length, TRAIN_BATCH[size], which):
      record = train_case(name, size, length, TRAIN_BATCH[size], overrides, repeats,
                          peak["gflops"], budget_s=todo["budget_s"], reference=reference)
      emit(_with_ml_ratio(record, _PRINTED))
  meta["load_end"] = _load()
  headline = headline_figures(_PRINTED, peak)
  headline["wall_s"] = time.perf_counter() - start
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(markdown(_PRINTED, {k: v for k, v in headline.items() if k != "kind"}, meta))
  print(json.dumps(headline, default=float), flush=True)
  return headline


if __name__ == "__main__":
  main()
