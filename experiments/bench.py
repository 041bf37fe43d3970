"""Benchmarks: rollout throughput, train-step time, FLOP/s against the measured matmul peak.

    python experiments/bench.py --quick              # reduced set, < 2 minutes on 2 CPU cores
    python experiments/bench.py --out docs/bench.md  # the full set
    python experiments/bench.py --lengths            # growth with L ∈ {32, 128, 512} only
    python experiments/device_check.py               # the one-command accelerator check

Every case prints one JSON object; a Markdown table goes to ``--out``; the
LAST printed line is one JSON object with the headline ratios
(``sampler_over_python_loop``, ``sampler_over_no_cache``,
``rollout_peak_fraction``, ``train_step_peak_fraction``, ``matmul_peak_gflops``,
``seq_memory_k8_over_k4``, ``seq_step_over_lower_bound``, ...).
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
* **rollouts** (``experiments/bench_rollouts.py``) of L tokens for B prompts
  (length P) under each of K latents by five decoders on the same model,
  parameters, prompts and PRNG keys (they draw the same tokens; each record
  checks it): ``sampler`` (the library's ``sampling.sample_latents``, a
  ``lax.scan`` per cache length), ``full_cache`` (one scan, a cache of the
  model's whole length), ``python_loop`` (a Python loop over a jitted cached decode
  step), ``python_loop_donated`` (the same with the cache donated) and
  ``no_cache`` (a scan recomputing the whole prefix at every step). Tokens/s
  counts the B·K·L generated tokens.
* **train steps** (``experiments/bench_steps.py``: ``train.make_train_step``
  of an ``experiment.build``-ed config): reconstruction only; + token JSD;
  + the sequence-level term (``config.objective.sequence_term``; cases named
  ``rec+jsd+seq_pg/<estimator>``) for each estimator; OPD (the distillation
  objective); RAML targets with N = 1, 4, 16. The task is ``late_divergence``
  with P = L/2 and d = L/2 − 1, so the target length is T = L (the rollout
  length of the sequence term).
* **scaling with L** (8, 16, 32, 64) of the rollout and of the train step.
* **realistic vocabularies** (``bench_steps.vocab_case``; kind 'vocab'): the
  reconstruction step (``rec``), the sequence-level step (``seq``: the
  diversity objective with λ_jsd = 0 and the sequence term on, estimator
  rao_blackwell, baseline none) and the OPD step at V ∈ {32, 32768, 131072}
  and K ∈ {4, 8} on the small model, B = 8, L = T = 64. Every case's peak
  memory comes from compiling it (no run: cheap at any V); V = 32 is timed,
  V = 32768 for the cases in ``VOCAB_TIMED``, V = 131072 never.
  ``seq_memory_k8_over_k4`` is the seq step's memory at K = 8 over K = 4,
  V = 32768 (a K×K scoring held at once would give about 4; the library's
  ``lax.map`` over the target latent, about 2).
* **the sequence step over its lower bound** (``bench_steps.lower_bound_case``;
  kind 'lower_bound'): the seq step, the jitted sampler alone and the jitted
  K×K scoring pass (``sequence_term.pair_terms``, forward and backward) on
  fixed rollouts, timed interleaved; ``seq_step_over_lower_bound`` = step /
  (sampler + scoring), small (headline) and medium at V = 32, and at
  V = 32768 in the vocabulary cases.
* **growth with length** (``--lengths``, and in the full run; kind 'length'):
  the sampler and the full-cache decoder (prompt of fixed length 8, B = 32)
  and the seq step (P = L/2, B = 8) at L ∈ {32, 128, 512} on the small model,
  time per generated token. The full-cache decoder attends over all
  P + 1 + L preallocated positions at every step; the sampler lengthens its
  cache in chunks (``sampling.cache_schedule``):
  ``sampler_over_full_cache_l512`` is the time the bounded cache saves.
  Each family is timed interleaved.
* **against Hugging Face** (``--parts hf``, optional: needs the ``bench-hf``
  extra, ``experiments/bench_hf.py``): the sampler against ``transformers``'
  ``generate`` on a GPT-2 of the same shape, PyTorch on the CPU, per size
  (``sampler_over_hf_generate``).

How FLOPs are counted:

* ``flops_xla`` is ``compiled.cost_analysis()['flops']`` (XLA's HLO cost
  analysis: 2 per multiply-add of dots/convolutions, 1 per elementwise op).
  XLA counts the body of a while loop ONCE, whatever its trip count, so it is
  exact only for programs without loops: the teacher-forced train steps, the
  matmul, the prefill and the single decode step. For the python-loop decoder
  it is exact as ``prefill + L·step``; the sampler, the seq_pg and OPD steps contain
  a scan, so their ``flops_xla`` is an undercount and is not used.
* ``flops_analytic`` counts 2 FLOPs per multiply-add of every matmul and
  attention einsum the program executes (``forward_flops``): per position
  and layer 2·(4d² + 2·d·d_ff) for the projections and MLP, 4·d·(keys
  attended) for QKᵀ and AV, plus 2·d·V for the unembedding; a backward pass
  counts twice its forward. Cached decode steps attend over the cache they
  are given, as the program does: the sampler's chunk's length
  (``sampling.cache_schedule``), the other decoders' M = P + 1 + L. A
  teacher-forced pass unembeds its T target positions only.
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
import json
import os
import platform
import sys
import time

_ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT_DIR not in sys.path:
  sys.path.insert(0, _ROOT_DIR)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_hf  # noqa: E402
from experiments import bench_rollouts  # noqa: E402
from experiments import bench_steps  # noqa: E402
from experiments import bench_util as util  # noqa: E402

BENCH_SIZES = ("small", "medium", "large")
# Batch shapes per size: rollouts of B prompts × K latents, train batches of B.
ROLLOUT_BATCH = {"small": 32, "medium": 32, "large": 16, "tiny": 2}
TRAIN_BATCH = {"small": 32, "medium": 16, "large": 8, "tiny": 4}
# The latency case: the sampler against the per-token loop with one prompt
# (B·K = 4 rows), where a step's compute is smallest next to its dispatch.
LATENCY_BATCH = 1
LENGTHS = (8, 16, 32, 64)
DEFAULT_L = 32
# Realistic vocabularies (issue "Scale to real vocabularies"): the rec, seq
# and OPD steps at V ∈ VOCAB_SIZES and K ∈ VOCAB_LATENTS on the small model,
# B = VOCAB_BATCH, L = VOCAB_L (T = L); V = 3 reserved ids + the alphabet.
VOCAB_SIZES = (32, 32768, 131072)
VOCAB_LATENTS = (4, 8)
VOCAB_BATCH, VOCAB_L = 8, 64
HEADLINE_V = 32768  # seq_memory_k8_over_k4 is read here.
# Timed at V = HEADLINE_V (a few seconds a step or less on 2 cores; the rest
# there and everything at V = 131072 are compiled for their memory only).
VOCAB_TIMED = {("rec", 4), ("rec", 8), ("seq", 4), ("opd", 4)}
# Growth with length: rollouts and the sequence-level step at these L on the
# small model. Rollouts have a prompt of FIXED length LONG_PROMPT_LEN (only L
# grows); the seq step's task needs P = L/2 for T = L (see bench_steps).
LONG_LENGTHS = (32, 128, 512)
LONG_PROMPT_LEN = 8
LONG_TRAIN_BATCH = 8


# ---------------------------------------------------------------- output


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
  lines += _new_tables(records)
  lines += _hf_table(records)
  return "\n".join(lines) + "\n"


def _new_tables(records: list[dict]) -> list[str]:
  """The vocabulary, lower-bound and growth-with-length tables (where run)."""
  lines = []
  vocabs = [r for r in records if r.get("kind") == "vocab"]
  if vocabs:
    lines += ["", "## Realistic vocabularies", "",
              "Peak memory from XLA's memory analysis of the compiled step (arguments + "
              "outputs + temporaries − aliased); untimed cases were compiled only. "
              "`seq`: the sequence-level step (λ_jsd = 0, rao_blackwell, baseline none); "
              "×K=4: this memory over the same case's at K = 4.", "",
              "| case | size | B | K | L | V | memory MiB | ×K=4 | ms | timed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in vocabs:
      k4 = _find(records, kind="vocab", case=r["case"], V=r["V"], K=4, B=r["B"], L=r["L"])
      ratio = (r["peak_memory_bytes"] / k4["peak_memory_bytes"]
               if k4 and k4.get("peak_memory_bytes") and r.get("peak_memory_bytes") else None)
      ms = "–" if r.get("median_s") is None else f"{r['median_s'] * 1e3:.0f}"
      lines.append(f"| {r['case']} | {r['size']} | {r['B']} | {r['K']} | {r['L']} | {r['V']} "
                   f"| {_mib(r.get('peak_memory_bytes'))} | {_fmt(ratio)} | {ms} | "
                   f"{'yes' if r['timed'] else 'memory only'} |")
  bounds = [r for r in records if r.get("kind") == "lower_bound"]
  bounds += [dict(r, step_s=r["median_s"]) for r in vocabs if "seq_step_over_lower_bound" in r]
  if bounds:
    lines += ["", "## Sequence-level step over its lower bound", "",
              "Step, sampler alone and K×K scoring pass (forward + backward) timed "
              "interleaved in the same run; ratio = step / (sampler + scoring).", "",
              "| size | B | K | L | V | step ms | sampler ms | scoring ms | ratio | "
              "step memory MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in bounds:
      lines.append(f"| {r['size']} | {r['B']} | {r['K']} | {r['L']} | {r['V']} | "
                   f"{r['step_s'] * 1e3:.0f} | {r['sampler_s'] * 1e3:.0f} | "
                   f"{r['scoring_s'] * 1e3:.0f} | {_fmt(r['seq_step_over_lower_bound'])} | "
                   f"{_mib(r.get('peak_memory_bytes'))} |")
  grows = [r for r in records if r.get("kind") == "length"]
  if grows:
    lines += ["", "## Growth with length (L = 32, 128, 512)", "",
              "Per-token time = median / (B·K·L); ×shortest: over the same program's at "
              "the shortest L. Rollouts: prompt P = 8 whatever L; `rollout` is the "
              "sampler (cache lengthened in chunks), `rollout_full_cache` the decoder "
              "attending over all M = P + 1 + L positions at every step. seq_step: "
              "P = L/2 (the task's shortest prompt for T = L).", "",
              "| program | size | B | K | L | M | ms | µs / token | ×shortest | memory MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in grows:
      same = [q for q in grows if q["program"] == r["program"]]
      first = min(same, key=lambda q: q["L"])
      ratio = r["per_token_s"] / first["per_token_s"]
      lines.append(f"| {r['program']} | {r['size']} | {r['B']} | {r['K']} | {r['L']} | "
                   f"{r['M']} | {r['median_s'] * 1e3:.0f} | {r['per_token_s'] * 1e6:.2f} | "
                   f"{_fmt(ratio)} | {_mib(r.get('peak_memory_bytes'))} |")
  return lines


def _hf_table(records: list[dict]) -> list[str]:
  """The table of the Hugging Face cases (where run)."""
  lines = []
  hfs = [r for r in records if r.get("kind") == "hf"]
  if hfs:
    lines += ["", "## Against Hugging Face `generate`", "",
              "The sampler and `transformers` `generate` (GPT-2 of the same shape, PyTorch "
              "CPU, ancestral sampling at temperature 1, KV cache, fixed length) timed "
              "interleaved; ratio = generate's time / the sampler's (medians; fastest "
              "calls in parentheses). Matmul rows: a `[B·K, d] @ [d, d_ff]` product in "
              "each framework, timed beside them.", "",
              "| size | B·K | P | L | sampler ms | generate ms | sampler over generate | "
              "XLA matmul GFLOP/s | torch matmul GFLOP/s | torch threads |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in hfs:
      if "skipped" in r:
        lines.append(f"| {r['size']} | skipped: {r['skipped']} | | | | | | | | |")
        continue
      lines.append(f"| {r['size']} | {r['rows']} | {r['P']} | {r['L']} | "
                   f"{r['sampler_s'] * 1e3:.0f} | {r['hf_generate_s'] * 1e3:.0f} | "
                   f"{_fmt(r['sampler_over_hf_generate'])} "
                   f"({_fmt(r['sampler_over_hf_generate_min'])}) | "
                   f"{_fmt(r['xla_matmul_gflops'])} | {_fmt(r['torch_matmul_gflops'])} | "
                   f"{r['torch_threads']} |")
  return lines


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


MODES = ("full", "quick", "smoke", "lengths")
PARTS = ("rollouts", "trains", "lower_bounds", "vocab", "lengths", "hf")  # The case lists of a plan.


def vocab_plan(size: str = "small", length: int = VOCAB_L, batch: int = VOCAB_BATCH) -> list:
  """The vocabulary cases (case, size, L, B, V, K, timed) of the full run."""
  cases = []
  for v in VOCAB_SIZES:
    for k in VOCAB_LATENTS:
      for case in bench_steps.VOCAB_CASES:
        timed = v < HEADLINE_V or (v == HEADLINE_V and (case, k) in VOCAB_TIMED)
        cases.append((case, size, length, batch, v, k, timed))
  return cases


def lengths_plan(size: str = "small", lengths=LONG_LENGTHS) -> list:
  """The growth-with-length cases: ('rollout' | 'seq_step', size, lengths), each timed interleaved.

  'rollout': ``bench_rollouts.rollout_length_case`` (the sampler, B =
  ``ROLLOUT_BATCH[size]``, prompt ``LONG_PROMPT_LEN`` at every L, and the
  shortest L in the longest L's cache); 'seq_step':
  ``bench_steps.seq_length_case`` (B = ``LONG_TRAIN_BATCH``, P = L/2).
  """
  return [("rollout", size, tuple(lengths)), ("seq_step", size, tuple(lengths))]


def hf_plan(sizes) -> list:
  """The Hugging Face cases (size, L, B) of the full run: B = ``ROLLOUT_BATCH``, L = 32.

  Run only where PyTorch and ``transformers`` import (the optional
  ``bench-hf`` extra); elsewhere ``bench_hf.hf_case`` records why not.
  """
  return [(size, DEFAULT_L, ROLLOUT_BATCH[size]) for size in sizes]


def length_records(program: str, size: str, lengths, repeats: int, peak_gflops: float,
                   budget_s: float, reference: util.MatmulReference | None = None) -> list:
  """The records of one ``lengths_plan`` entry."""
  if program == "rollout":
    return bench_rollouts.rollout_length_case(
        size, lengths, ROLLOUT_BATCH[size], repeats, peak_gflops, prompt_len=LONG_PROMPT_LEN,
        budget_s=budget_s, reference=reference)
  if program == "seq_step":
    return bench_steps.seq_length_case(size, lengths, LONG_TRAIN_BATCH, repeats, peak_gflops,
                                       budget_s=budget_s, reference=reference)
  raise ValueError(f"program must be 'rollout' or 'seq_step', got {program!r}.")


def plan(mode: str, sizes: list[str]) -> dict:
  """What to run: rollout (size, L, methods), train (size, L, which), lower-bound
  (size, L, B), vocabulary (``vocab_plan``) and length (``lengths_plan``) cases.

  ``mode``: 'full' (every case for ``sizes``), 'quick' (the small model: the
  headline rollout ratios, the teacher-forced and one seq_pg step, growth
  over L = 8, 16, 32, the sequence step over its lower bound, and the seq
  step's memory at K = 4 and 8, V = 32768 (compiled, not run); < 2 min on 2
  idle cores; the Hugging Face cases are in 'full' only, ``hf_plan``),
  'lengths' (growth with L ∈ {32, 128, 512} only) or
  'smoke' (a 1-layer d=32 model, the rollout cases of the headline, one
  train step, the rec step's memory at K = 4 and 8 and the rollout length
  family at L = 16, 32: for tests).
  """
  empty = dict(lower_bounds=[], vocab=[], lengths=[], hf=[])
  if mode == "smoke":
    return dict(empty, repeats=1, budget_s=1.0, matmul_sizes=(128,),
                rollouts=[("tiny", 32, bench_rollouts.ROLLOUT_METHODS),
                          ("tiny", 64, ("sampler", "no_cache"))],
                trains=[("tiny", 8, "smoke")],
                # The cheapest step's memory pair (the seq step and its lower
                # bound run in tests/test_device_check.py), and the rollout
                # length family at two short L.
                vocab=[("rec", "tiny", 8, 2, 1024, k, False) for k in VOCAB_LATENTS],
                lengths=[("rollout", "tiny", (16, 32))])
  if mode == "lengths":
    return dict(empty, repeats=3, budget_s=10.0, matmul_sizes=(512, 1024), rollouts=[],
                trains=[], lengths=lengths_plan())
  latency = ("small", 32, ("sampler", "python_loop"), LATENCY_BATCH)
  if mode == "quick":
    return dict(
        repeats=3, budget_s=4.0, matmul_sizes=(512, 1024),
        rollouts=[("small", 32, bench_rollouts.ROLLOUT_METHODS),
                  ("small", 64, ("sampler", "no_cache")),
                  ("small", 8, ("sampler",)), ("small", 16, ("sampler",)), latency],
        trains=[("small", DEFAULT_L, "quick"), ("small", 8, "scaling_tf"),
                ("small", 16, "scaling_tf")],
        lower_bounds=[("small", DEFAULT_L, TRAIN_BATCH["small"])],
        vocab=[("seq", "small", VOCAB_L, VOCAB_BATCH, HEADLINE_V, k, False)
               for k in VOCAB_LATENTS],
        lengths=[], hf=[])
  if mode != "full":
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  rollouts, trains = [], []
  for size in sizes:
    for length in LENGTHS:
      if size == "small" and length in (32, 64):
        methods = bench_rollouts.ROLLOUT_METHODS
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
  lower_bounds = [(size, DEFAULT_L, TRAIN_BATCH[size]) for size in sizes
                  if size in ("small", "medium")]
  return dict(repeats=5, budget_s=10.0, matmul_sizes=util.MATMUL_SIZES, rollouts=rollouts,
              trains=trains, lower_bounds=lower_bounds, hf=hf_plan(sizes),
              vocab=vocab_plan() if "small" in sizes else [],
              lengths=lengths_plan() if "small" in sizes else [])


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
  ``sampler_over_no_cache`` (L = 64) on the small model (the smallest size
  run); ``rollout_peak_fraction`` (the sampler at L = 32) and
  ``train_step_peak_fraction`` (the teacher-forced 'rec+jsd' step at L = 32)
  of the largest size run; ``sampler_over_full_cache`` (L = 32, small);
  ``sampler_over_hf_generate_<size>`` (and ``_min_<size>``) per size of the
  Hugging Face cases; None where not run.
  """
  run = [s for s in util.SIZES if _find(records, kind="rollout", size=s)]
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
      [s for s in util.SIZES if _find(records, kind="train", size=s, case="rec+jsd")],
      kind="train", case="rec+jsd")
  medium = _find(records, kind="rollout", size="medium", method="sampler", L=DEFAULT_L)
  fraction = lambda r: None if r is None else r["peak_fraction"]  # noqa: E731
  bounds = [r for r in records if r.get("kind") == "lower_bound"]
  bound_size = ("small" if any(r["size"] == "small" for r in bounds)
                else (bounds[0]["size"] if bounds else None))

  def over_bound(size):
    r = _find(records, kind="lower_bound", size=size, V=util.ALPHABET_SIZE + 3)
    r = r or _find(records, kind="lower_bound", size=size)
    return None if r is None else r["seq_step_over_lower_bound"]

  seq_v = _find(records, kind="vocab", case="seq", V=HEADLINE_V, K=4, timed=True)
  memory = {f"{case}_memory_k8_over_k4": memory_ratio(records, case)[0]
            for case in ("rec", "opd")}
  seq_ratio, seq_k4, seq_k8, seq_mem_v = memory_ratio(records, "seq")
  return dict(
      kind="headline",
      seq_memory_k8_over_k4=seq_ratio,
      seq_step_over_lower_bound=over_bound(bound_size),
      sampler_over_python_loop=speedup(32, "python_loop"),
      sampler_over_no_cache=speedup(64, "no_cache"),
      sampler_over_python_loop_donated=speedup(32, "python_loop_donated"),
      sampler_over_python_loop_b1=speedup(32, "python_loop", LATENCY_BATCH),
      **{f"raml_over_ml_n{n}": raml_over_ml(n) for n in bench_steps.RAML_SAMPLES},
      rollout_peak_fraction=fraction(rollout),
      train_step_peak_fraction=fraction(tf),
      matmul_peak_gflops=peak["gflops"],
      matmul_gflops_here_range=_range([r.get("matmul_gflops_here") for r in records]),
      ratio_size=ratio_size,
      rollout_peak_fraction_size=rollout_size,
      rollout_peak_fraction_medium=fraction(medium),
      train_step_peak_fraction_size=train_size,
      seq_memory_k4_bytes=seq_k4,
      seq_memory_k8_bytes=seq_k8,
      seq_memory_v=seq_mem_v,
      **memory,
      seq_step_over_lower_bound_size=bound_size,
      seq_step_over_lower_bound_medium=over_bound("medium"),
      seq_step_over_lower_bound_v32768=(None if seq_v is None
                                        else seq_v.get("seq_step_over_lower_bound")),
      seq_step_v32768_s=None if seq_v is None else seq_v["median_s"],
      seq_step_v32768_memory_bytes=None if seq_v is None else seq_v["peak_memory_bytes"],
      **length_figures(records),
      sampler_over_full_cache=speedup(32, "full_cache"),
      **hf_figures(records),
      device=str(jax.devices()[0].device_kind),
  )


def hf_figures(records: list[dict]) -> dict:
  """``sampler_over_hf_generate_<size>`` and ``..._min_<size>`` of each bench size (None if not run)."""
  out = {}
  for size in BENCH_SIZES:
    r = _find(records, kind="hf", size=size)
    out[f"sampler_over_hf_generate_{size}"] = None if r is None else r["sampler_over_hf_generate"]
    out[f"sampler_over_hf_generate_min_{size}"] = (
        None if r is None else r["sampler_over_hf_generate_min"])
  return out


def memory_ratio(records: list[dict], case: str):
  """(peak memory at K = 8 / at K = 4, the K = 4 bytes, the K = 8 bytes, V) of a vocabulary case.

  At V = ``HEADLINE_V`` if both K were run there, else at the largest V where
  they were (the smoke run's); Nones if none.
  """
  by_v: dict[int, dict[int, int]] = {}
  for r in records:
    if r.get("kind") == "vocab" and r["case"] == case and r.get("peak_memory_bytes"):
      by_v.setdefault(r["V"], {})[r["K"]] = r["peak_memory_bytes"]
  pairs = {v: m for v, m in by_v.items() if 4 in m and 8 in m}
  if not pairs:
    return None, None, None, None
  v = HEADLINE_V if HEADLINE_V in pairs else max(pairs)
  return pairs[v][8] / pairs[v][4], pairs[v][4], pairs[v][8], v


def length_figures(records: list[dict]) -> dict:
  """Headline figures of the growth-with-length cases (Nones where not run).

  ``rollout_per_token_l512_over_l32`` / ``full_cache_per_token_l512_over_l32``
  / ``seq_step_per_token_l512_over_l32``: time per generated token at the
  longest L over that at the shortest, of the sampler, the full-cache
  decoder and the seq step. ``sampler_over_full_cache_l512`` (and ``_l32``):
  the full-cache decoder's time over the sampler's at the longest (shortest)
  L, the two timed interleaved.
  """
  def get(program, length):
    cands = [r for r in records if r.get("kind") == "length" and r["program"] == program
             and r["L"] == length]
    return cands[0] if cands else None

  out = dict(rollout_per_token_l512_over_l32=None, full_cache_per_token_l512_over_l32=None,
             seq_step_per_token_l512_over_l32=None, sampler_over_full_cache_l512=None,
             sampler_over_full_cache_l32=None)
  lengths = sorted({r["L"] for r in records if r.get("kind") == "length"
                    and r["program"] == "rollout"})
  if not lengths:
    return out
  lo, hi = lengths[0], lengths[-1]

  def ratio(a, b, key="per_token_s"):
    return None if a is None or b is None else a[key] / b[key]

  if hi != lo:
    out["rollout_per_token_l512_over_l32"] = ratio(get("rollout", hi), get("rollout", lo))
    out["full_cache_per_token_l512_over_l32"] = ratio(get("rollout_full_cache", hi),
                                                      get("rollout_full_cache", lo))
    out["seq_step_per_token_l512_over_l32"] = ratio(get("seq_step", hi), get("seq_step", lo))
  out["sampler_over_full_cache_l512"] = ratio(get("rollout_full_cache", hi), get("rollout", hi),
                                              "median_s")
  out["sampler_over_full_cache_l32"] = ratio(get("rollout_full_cache", lo), get("rollout", lo),
                                             "median_s")
  return out


def main(argv=None) -> dict:
  """Runs the benchmark; prints one JSON line per case, then the headline line."""
  # PyTorch (the Hugging Face cases only) loads later: its OpenMP threads then
  # sleep rather than spin while they wait, which keeps it from collapsing
  # on a machine whose cores other processes share. XLA does not use OpenMP.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="reduced set, < 2 min on 2 cores")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model, the headline cases (for tests)")
  parser.add_argument("--lengths", action="store_true",
                      help="growth with L in {32, 128, 512} only (rollouts and the seq step)")
  parser.add_argument("--parts", default="",
                      help="comma-separated subset of " + ",".join(PARTS)
                      + " (default: all of the mode's cases)")
  parser.add_argument("--sizes", default=",".join(BENCH_SIZES),
                      help="comma-separated subset of " + ",".join(BENCH_SIZES))
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
  parser.add_argument("--out", default="docs/bench.md", help="Markdown table path ('' = none)")
  parser.add_argument("--hlo_dir", default="", help="write each compiled program's HLO here")
  parser.add_argument("--profile_dir", default="", help="jax.profiler trace of the run")
  args = parser.parse_args(argv)
  util.set_hlo_dir(args.hlo_dir)
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
  mode = ("smoke" if args.smoke else "quick" if args.quick
          else "lengths" if args.lengths else "full")
  todo = plan(mode, sizes)
  parts = [p for p in args.parts.split(",") if p]
  for part in parts:
    if part not in PARTS:
      raise ValueError(f"--parts must name parts in {PARTS}, got {part!r}.")
  for part in PARTS:
    if parts and part not in parts:
      todo[part] = []
  repeats = args.repeats or todo["repeats"]
  util.RECORDS.clear()
  meta = dict(device=str(jax.devices()[0].device_kind), num_devices=jax.device_count(),
              host=f"{platform.node()} ({os.cpu_count()} CPUs: {bench_hf.cpu_model()})",
              jax=jax.__version__,
              mode=mode, load_start=_load())
  util.emit(dict(kind="meta", **meta))
  start = time.perf_counter()
  peak, reference = util.matmul_peak(todo["matmul_sizes"], repeats=4 * repeats)
  meta["matmul_n"] = peak["n"]
  for size, length, methods, *batch in todo["rollouts"]:
    batch = batch[0] if batch else ROLLOUT_BATCH[size]
    for record in bench_rollouts.rollout_case(
        size, length, batch, repeats, peak["gflops"], methods, budget_s=todo["budget_s"],
        reference=reference):
      util.emit(record)
  for size, length, which in todo["trains"]:
    for name, overrides in bench_steps.train_cases(size, length, TRAIN_BATCH[size], which):
      record = bench_steps.train_case(
          name, size, length, TRAIN_BATCH[size], overrides, repeats, peak["gflops"],
          budget_s=todo["budget_s"], reference=reference)
      util.emit(_with_ml_ratio(record, util.RECORDS))
  for size, length, batch in todo["lower_bounds"]:
    util.emit(bench_steps.lower_bound_case(size, length, batch, repeats, todo["budget_s"],
                                           reference))
  for case, size, length, batch, v, k, timed in todo["vocab"]:
    util.emit(bench_steps.vocab_case(case, size, length, batch, v, k, timed,
                                     repeats=min(repeats, 3), budget_s=todo["budget_s"]))
  for size, length, batch in todo["hf"]:
    util.emit(bench_hf.hf_case(size, length, batch, repeats, todo["budget_s"]))
  for program, size, lengths in todo["lengths"]:
    for record in length_records(program, size, lengths, repeats, peak["gflops"],
                                 todo["budget_s"], reference):
      util.emit(record)
  meta["load_end"] = _load()
  headline = headline_figures(util.RECORDS, peak)
  headline["wall_s"] = time.perf_counter() - start
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(markdown(util.RECORDS, {k: v for k, v in headline.items() if k != "kind"}, meta))
  print(json.dumps(headline, default=float), flush=True)
  return headline


if __name__ == "__main__":
  main()
