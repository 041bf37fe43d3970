"""What every benchmark case shares: model sizes, timing, compiling, FLOPs, memory, the matmul peak.

Used by ``experiments/bench_rollouts.py`` and ``experiments/bench_steps.py``;
``experiments/bench.py`` (the command line) says what is measured and how.

* ``time_calls`` — the programs of a case called round-robin, median and min;
* ``compile_fn`` — ahead-of-time compile (and, with ``set_hlo_dir``, the
  optimised HLO written out); ``memory_only=True`` compiles with LLVM's
  optimisation off, for programs whose memory analysis is read but which are
  never run (buffer assignment does not depend on it);
* ``xla_flops`` / ``peak_memory_bytes`` — XLA's cost and memory analyses;
* ``forward_flops`` — the analytic matmul FLOPs of one forward (and of a
  rollout: ``sampler_rollout_flops``, ``cached_rollout_flops``);
* ``matmul_peak`` / ``peak_fraction`` — the dense matmul peak (float32 or
  bfloat16) and a case's fraction of it;
* ``copy_bandwidth`` — the device's memory bandwidth, from a jitted
  elementwise copy;
* ``emit`` — one JSON line per record (kept in ``RECORDS`` for the report;
  ``set_emit_stream`` redirects the lines, e.g. to stderr).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentdiv import memory
from latentdiv import model as model_lib
from latentdiv import sampling

# Model sizes (DESIGN.md §10): layers, width, heads, MLP width.
SIZES = {
    "small": dict(num_layers=2, d_model=128, num_heads=4, d_ff=512),
    "medium": dict(num_layers=4, d_model=256, num_heads=4, d_ff=1024),
    "large": dict(num_layers=6, d_model=512, num_heads=8, d_ff=2048),
    # Not a benchmark size: the smoke test's (--smoke).
    "tiny": dict(num_layers=1, d_model=32, num_heads=2, d_ff=64),
}
NUM_LATENTS = 4  # K
ALPHABET_SIZE = 29  # V = 3 + 29 = 32.
MATMUL_SIZES = (512, 1024, 2048)


# ---------------------------------------------------------------- records


RECORDS: list[dict] = []  # Every record emitted in this run, in order.
_EMIT_STREAM: list = []  # Where ``emit`` prints (empty: stdout).


def set_emit_stream(stream) -> None:
  """From now on ``emit`` prints to ``stream`` (None: stdout)."""
  _EMIT_STREAM.clear()
  if stream is not None:
    _EMIT_STREAM.append(stream)


def emit(record: dict) -> dict:
  """Prints ``record`` as one JSON line (and keeps it in ``RECORDS`` for the report)."""
  RECORDS.append(record)
  print(json.dumps(record, default=float), flush=True,
        file=_EMIT_STREAM[0] if _EMIT_STREAM else sys.stdout)
  return record


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


# ---------------------------------------------------------------- compiling


_HLO_DIR: list[str] = []  # Where --hlo_dir writes the compiled programs (empty: nowhere).


def set_hlo_dir(path: str) -> None:
  """From now on ``compile_fn`` writes each program's optimised HLO into ``path`` ('' = nowhere)."""
  _HLO_DIR.clear()
  if path:
    os.makedirs(path, exist_ok=True)
    _HLO_DIR.append(path)


# Compiler options of a program that is compiled for its memory analysis only
# and never run: LLVM's optimisation off (XLA's HLO passes and buffer
# assignment, which the memory analysis reads, are unchanged; the figures
# are identical, tests/test_bench.py checks it), compile time about 40% less.
MEMORY_ONLY_OPTIONS = {"xla_backend_optimization_level": 0,
                       "xla_llvm_disable_expensive_passes": True}


def compile_fn(jitted, *args, memory_only: bool = False, **kwargs):
  """(compiled executable, compile seconds) of a ``jax.jit``-ed function at these args.

  ``args`` may be ``jax.ShapeDtypeStruct``s (nothing is allocated). With
  ``memory_only`` the program is compiled with ``MEMORY_ONLY_OPTIONS``: for
  its memory analysis, not for timing.
  """
  start = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  compiled = lowered.compile(MEMORY_ONLY_OPTIONS) if memory_only else lowered.compile()
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


# Arguments + outputs + temporaries − aliased bytes of XLA's buffer assignment
# (the figure the loop checks against the device before training).
peak_memory_bytes = memory.peak_bytes


# ---------------------------------------------------------------- FLOPs


def forward_flops(cfg: model_lib.ModelConfig, num_query: int, num_keys: int,
                  num_logits: int | None = None) -> float:
  """Matmul FLOPs (2 per multiply-add) of one forward over ``num_query`` positions of one sequence.

  Per position and layer: Q, K, V and output projections 4·2·d², MLP 2·2·d·d_ff,
  scores and weighted values 2·2·d·num_keys; plus the unembedding 2·d·V at
  each of the ``num_logits`` positions whose logits are computed (default
  all; a teacher-forced pass unembeds its T target positions only, a prefill
  its last).
  """
  d, f = cfg.d_model, cfg.d_ff
  per_layer = 8 * d * d + 4 * d * f + 4 * d * num_keys
  num_logits = num_query if num_logits is None else num_logits
  return float(num_query * cfg.num_layers * per_layer + num_logits * 2 * d * cfg.vocab_size)


def cached_rollout_flops(cfg: model_lib.ModelConfig, prompt_len: int, length: int) -> float:
  """Analytic FLOPs of one rollout by a decoder with a FULL preallocated cache.

  Prefill of [x, BOS] (logits of the last position only), then L decode
  steps, each attending over the whole cache of ``cfg.max_len`` positions
  (the decoders ``full_cache`` and ``python_loop``; the last step's output is
  unused but computed).
  """
  return (forward_flops(cfg, prompt_len + 1, cfg.max_len, 1)
          + length * forward_flops(cfg, 1, cfg.max_len))


def sampler_rollout_flops(cfg: model_lib.ModelConfig, prompt_len: int, length: int) -> float:
  """Analytic FLOPs of one rollout by the library sampler (``sampling.sample``).

  Prefill of [x, BOS] into the first cache of ``sampling.cache_schedule``,
  then the L − 1 decode steps, each attending over its chunk's cache length.
  """
  chunks = sampling.cache_schedule(prompt_len, length)
  first = chunks[0][2] if chunks else prompt_len + 1
  return (forward_flops(cfg, prompt_len + 1, first, 1)
          + sum((stop - start) * forward_flops(cfg, 1, cache_len)
                for start, stop, cache_len in chunks))


def param_count(params) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(params)))


# ---------------------------------------------------------------- matmul peak


class MatmulReference(NamedTuple):
  """A compiled dense float32 matmul, timed beside each case for its peak fraction."""

  run: Callable[[], Any]
  flops: float
  n: int


def matmul_peak(sizes=MATMUL_SIZES, repeats: int = 20,
                dtype: str = "float32") -> tuple[dict, MatmulReference]:
  """The peak FLOP/s of a jitted dense ``[n, n] @ [n, n]`` in ``dtype``: the best over ``sizes``.

  A peak is a best case: each size is timed ``repeats`` times and its FLOP/s
  is taken from the FASTEST call (on a shared machine, the median mixes in
  other processes' load; both are printed). Emits one 'matmul' record a size.
  The matmul runs at JAX's default precision, as the model's do.

  Returns:
    (dict(gflops, n) of the best size, a ``MatmulReference`` of that size).
  """
  matmul = jax.jit(jnp.matmul)
  best, reference = dict(gflops=0.0, n=None), None
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.dtype(dtype))
    compiled, _ = compile_fn(matmul, a, b)
    timing = time_call(functools.partial(compiled, a, b), repeats, budget_s=10.0)
    gflops = 2.0 * n ** 3 / timing["min_s"] / 1e9
    emit(dict(kind="matmul", n=n, dtype=dtype, median_s=timing["median_s"],
              min_s=timing["min_s"],
              gflops=gflops, gflops_median=2.0 * n ** 3 / timing["median_s"] / 1e9,
              repeats=len(timing["times_s"]), flops_xla=xla_flops(compiled),
              flops_analytic=2.0 * n ** 3))
    if gflops > best["gflops"]:
      best = dict(gflops=gflops, n=n)
      reference = MatmulReference(functools.partial(compiled, a, b), 2.0 * n ** 3, n)
  return best, reference


def time_with_reference(runs: dict[str, Callable[[], Any]], repeats: int, budget_s: float,
                        reference: MatmulReference | None) -> dict[str, dict]:
  """``time_calls`` of a case's programs with the reference matmul (``'_matmul'``) among them."""
  if reference is not None:
    runs = dict(runs, _matmul=reference.run)
  return time_calls(runs, repeats, budget_s)


def peak_fraction(gflops: float, peak_gflops: float, timings: dict,
                  reference: MatmulReference | None) -> dict:
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


# ---------------------------------------------------------------- memory bandwidth


def copy_bandwidth(num_bytes: int, repeats: int = 20) -> dict:
  """Device memory bandwidth from a jitted elementwise copy of a ``num_bytes`` float32 array.

  The program is ``x * c`` (XLA cannot elide it, unlike a bare copy): it
  reads and writes every byte once, so the bandwidth is ``2 · num_bytes``
  over the FASTEST of ``repeats`` calls (a peak, like the matmul's).

  Returns:
    dict(kind='copy', bytes, median_s, min_s, gbytes_per_s) (also emitted).
  """
  n = max(1, num_bytes // 4)
  x = jnp.ones((n,), jnp.float32)
  compiled, _ = compile_fn(jax.jit(lambda a: a * 1.5), x)
  timing = time_call(functools.partial(compiled, x), repeats, budget_s=10.0)
  moved = 2.0 * 4 * n
  return emit(dict(kind="copy", bytes=4 * n, median_s=timing["median_s"],
                   min_s=timing["min_s"], repeats=len(timing["times_s"]),
                   gbytes_per_s=moved / timing["min_s"] / 1e9,
                   gbytes_per_s_median=moved / timing["median_s"] / 1e9))
