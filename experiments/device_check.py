"""One-command device check: one JSON line with the accelerator figures that matter.

    python experiments/device_check.py          # one GPU (or TPU chip): < 6 minutes
    python experiments/device_check.py --tiny   # a 1-layer model, seconds on a CPU (the test's)

Progress records go to stderr (one JSON object each); the LAST line on
stdout is the one JSON headline:

* ``copy_gbytes_per_s`` — the device's memory bandwidth, from a jitted
  elementwise copy (read + write of a ``--copy_mib`` array; fastest call);
* ``matmul_peak_gflops_float32`` / ``matmul_peak_gflops_bfloat16`` — dense
  ``[n, n] @ [n, n]`` at JAX's default precision (fastest call, best ``n``);
* ``sampler_tokens_per_s`` — the jitted library sampler
  (``sampling.sample_latents``: B prompts × K latents × L tokens) — and
  ``sampler_hbm_fraction``, its fraction of the bandwidth bound: a decode
  step of R = B·K rows must read at least every parameter and the filled
  part of the KV cache, P + 1 + L/2 positions on average over a rollout
  (``bytes_per_decode_step``, from
  ``bench_steps.decode_bytes_per_step``), so at ``copy_gbytes_per_s`` it
  cannot emit more than ``R · bandwidth / bytes_per_decode_step`` tokens/s;
* ``train_step_peak_fraction`` — the teacher-forced train step
  (reconstruction + token JSD, loop-free, XLA's FLOP count) against the
  matmul peak of the model's compute dtype (``--dtype``); the fractions
  against both peaks are printed too;
* ``seq_step_over_lower_bound`` — the sequence-level step over (the sampler
  alone + the K×K scoring pass forward and backward), timed interleaved
  (``bench_steps.lower_bound_case``);
* ``peak_memory_bytes`` — the largest of the compiled programs' memory
  analyses (``seq_step_memory_bytes`` is the sequence step's), and
  ``device_peak_bytes_in_use`` from the device's allocator where it reports
  one (GPU/TPU; None on CPU).

Every figure is measured in this run, with the benchmark's own cases
(``experiments/bench_steps.py``, ``experiments/bench_util.py``), so the check
cannot drift from the benchmark. ``tests/test_device_check.py`` runs
``--tiny`` on CPU; no test depends on an accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT_DIR not in sys.path:
  sys.path.insert(0, _ROOT_DIR)

import jax  # noqa: E402

from experiments import bench_steps  # noqa: E402
from experiments import bench_util as util  # noqa: E402

# The accelerator run: the large bench model at a realistic vocabulary.
DEFAULTS = dict(size="large", vocab_size=32768, batch=16, latents=4, length=128,
                matmul_sizes=(2048, 4096, 8192), copy_mib=1024, repeats=10, budget_s=10.0)
# --tiny: a 1-layer d=32 model, every program the same, seconds on a CPU.
TINY = dict(size="tiny", vocab_size=259, batch=2, latents=4, length=8, matmul_sizes=(128,),
            copy_mib=4, repeats=2, budget_s=1.0)


def _device_peak_bytes() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def check(size: str, vocab_size: int, batch: int, latents: int, length: int, dtype: str,
          matmul_sizes, copy_mib: int, repeats: int, budget_s: float) -> dict:
  """Runs every measurement; returns the headline dict (see the module docstring)."""
  start = time.perf_counter()
  copy = util.copy_bandwidth(copy_mib << 20, repeats=4 * repeats)
  peaks, references = {}, {}
  for name in ("float32", "bfloat16"):
    peaks[name], references[name] = util.matmul_peak(matmul_sizes, repeats=4 * repeats,
                                                     dtype=name)
  overrides = dict(bench_steps.vocab_overrides(vocab_size, latents), **{"model.dtype": dtype})
  # The teacher-forced step: reconstruction + token JSD (no loop: XLA's FLOPs are exact).
  train = util.emit(bench_steps.train_case(
      "rec+jsd", size, length, batch, dict(overrides, **{"objective.lambda_jsd": 0.1}),
      repeats, peaks[dtype]["gflops"], budget_s=budget_s, reference=references[dtype]))
  bound = util.emit(bench_steps.lower_bound_case(size, length, batch, repeats, budget_s,
                                                 references[dtype], overrides))
  rows = bound["B"] * bound["N"] * bound["K"]
  bound_tokens_per_s = rows * copy["gbytes_per_s"] * 1e9 / bound["bytes_per_decode_step"]
  memories = [m for m in (train["peak_memory_bytes"], bound["peak_memory_bytes"],
                          bound["sampler_peak_memory_bytes"],
                          bound["scoring_peak_memory_bytes"]) if m is not None]
  return dict(
      kind="device_check",
      device=str(jax.devices()[0].device_kind), platform=jax.devices()[0].platform,
      jax=jax.__version__,
      size=size, V=vocab_size, B=batch, K=latents, L=length, dtype=dtype,
      params=bound["params"],
      copy_gbytes_per_s=copy["gbytes_per_s"],
      matmul_peak_gflops_float32=peaks["float32"]["gflops"],
      matmul_peak_gflops_bfloat16=peaks["bfloat16"]["gflops"],
      sampler_tokens_per_s=bound["sampler_tokens_per_s"],
      sampler_hbm_bound_tokens_per_s=bound_tokens_per_s,
      sampler_hbm_fraction=bound["sampler_tokens_per_s"] / bound_tokens_per_s,
      bytes_per_decode_step=bound["bytes_per_decode_step"],
      train_step_s=train["median_s"],
      train_step_gflops=train["gflops"],
      train_step_peak_fraction=train["peak_fraction"],
      train_step_fraction_of_float32_peak=train["gflops"] / peaks["float32"]["gflops"],
      train_step_fraction_of_bfloat16_peak=train["gflops"] / peaks["bfloat16"]["gflops"],
      seq_step_over_lower_bound=bound["seq_step_over_lower_bound"],
      seq_step_s=bound["step_s"], sampler_s=bound["sampler_s"], scoring_s=bound["scoring_s"],
      seq_step_memory_bytes=bound["peak_memory_bytes"],
      peak_memory_bytes=max(memories) if memories else None,
      device_peak_bytes_in_use=_device_peak_bytes(),
      wall_s=time.perf_counter() - start,
  )


def main(argv=None) -> dict:
  """Parses the flags, runs ``check``, prints the headline as the last stdout line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true",
                      help="a 1-layer model and small buffers: seconds on a CPU (for tests)")
  parser.add_argument("--size", choices=tuple(util.SIZES), default=None)
  parser.add_argument("--vocab_size", type=int, default=None, help="V (3 reserved ids + alphabet)")
  parser.add_argument("--batch", type=int, default=None, help="B prompts")
  parser.add_argument("--latents", type=int, default=None, help="K latents")
  parser.add_argument("--length", type=int, default=None, help="L = rollout length = T")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the model's compute dtype")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per program")
  args = parser.parse_args(argv)
  settings = dict(TINY if args.tiny else DEFAULTS)
  for name in ("size", "vocab_size", "batch", "latents", "length", "repeats"):
    if getattr(args, name) is not None:
      settings[name] = getattr(args, name)
  util.set_emit_stream(sys.stderr)  # Progress records; stdout holds the headline only.
  headline = check(dtype=args.dtype, **settings)
  print(json.dumps(headline, default=float), flush=True)
  return headline


if __name__ == "__main__":
  main()
