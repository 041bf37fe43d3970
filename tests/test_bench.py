"""Smoke tests for experiments/bench.py: every measurement runs on a tiny model.

Timings are reported by the benchmark, never asserted here. What is asserted:
the three decoders draw the same rollouts (so the speed comparison is between
equal work), the analytic FLOP counts agree with XLA's cost analysis on
loop-free programs, and the last printed line is the headline JSON.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from latentdiv import model as model_lib

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "experiments", "bench.py")
_spec = importlib.util.spec_from_file_location("bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

HEADLINE_KEYS = ("sampler_over_python_loop", "sampler_over_no_cache", "rollout_peak_fraction",
                 "train_step_peak_fraction", "matmul_peak_gflops")


class FlopsTest(absltest.TestCase):

  def _xla(self, fn, *args):
    return bench.xla_flops(jax.jit(fn).lower(*args).compile())

  def test_forward_flops_match_xla_on_a_loop_free_forward(self):
    # Wide enough that the matmuls dominate XLA's count (which adds 1 per elementwise op).
    model, params = bench.make_model("tiny", 8, 8, d_model=128, d_ff=512)
    cfg = model.config
    tokens = jnp.full((2, cfg.max_len), 5, jnp.int32)
    latent = jnp.zeros((2,), jnp.int32)
    full = self._xla(lambda p: model.apply({"params": p}, tokens, latent)[0], params)
    self.assertBetween(full / (2 * bench.forward_flops(cfg, cfg.max_len, cfg.max_len)),
                       0.95, 1.25)
    cache = model_lib.init_cache(cfg, 2)
    step = self._xla(
        lambda p, c: model_lib.decode_step(model, p, c, tokens[:, 0], latent, 3)[0],
        params, cache)
    self.assertBetween(step / (2 * bench.forward_flops(cfg, 1, cfg.max_len)), 0.95, 1.25)

  def test_rollout_flops_by_method(self):
    cfg = bench.model_config("tiny", 4, 8)
    cached = bench.rollout_flops(cfg, 3, 4, 8, "sampler")
    self.assertEqual(cached, bench.rollout_flops(cfg, 3, 4, 8, "python_loop"))
    self.assertEqual(cached, 3 * (bench.forward_flops(cfg, 5, cfg.max_len)
                                  + 8 * bench.forward_flops(cfg, 1, cfg.max_len)))
    self.assertEqual(bench.rollout_flops(cfg, 3, 4, 8, "no_cache"),
                     3 * 8 * bench.forward_flops(cfg, cfg.max_len, cfg.max_len))
    with self.assertRaisesRegex(ValueError, "sampler"):
      bench.rollout_flops(cfg, 3, 4, 8, "beam")


class TimingTest(absltest.TestCase):

  def test_time_calls_interleaves_and_respects_the_budget(self):
    calls = []
    fns = {"a": lambda: calls.append("a") or jnp.zeros(()),
           "b": lambda: calls.append("b") or jnp.zeros(())}
    timings = bench.time_calls(fns, repeats=3)
    self.assertEqual(calls, ["a", "b"] + ["a", "b"] * 3)  # warm-ups, then round-robin.
    for t in timings.values():
      self.assertLen(t["times_s"], 3)
      self.assertEqual(t["median_s"], float(np.median(t["times_s"])))
    slow = bench.time_call(lambda: jnp.zeros(()), repeats=50, budget_s=0.0)
    self.assertLen(slow["times_s"], 1)  # over budget: one timed call.


class HeadlineTest(absltest.TestCase):

  def test_raml_ratio_and_headline_read_the_right_records(self):
    def rollout(method, batch, median):
      return dict(kind="rollout", size="small", method=method, B=batch, L=32, median_s=median,
                  peak_fraction=0.1)

    records = [
        dict(kind="train", case="rec+jsd", size="small", L=32, median_s=2.0, peak_fraction=0.3),
        rollout("sampler", bench.ROLLOUT_BATCH["small"], 1.0),
        rollout("python_loop", bench.ROLLOUT_BATCH["small"], 1.5),
        rollout("sampler", bench.LATENCY_BATCH, 0.1),
        rollout("python_loop", bench.LATENCY_BATCH, 0.3),
    ]
    for r in records:
      if r["kind"] == "rollout":
        sampler = next(s for s in records if s.get("method") == "sampler" and s["B"] == r["B"])
        r["sampler_speedup"] = r["median_s"] / sampler["median_s"]
    raml = bench._with_ml_ratio(
        dict(kind="train", case="raml/N=4", size="small", L=32, median_s=5.0), records)
    self.assertEqual(raml["over_ml"], 2.5)
    skipped = bench._with_ml_ratio(
        dict(kind="train", case="raml/N=1", size="small", L=32, skipped="why"), records)
    self.assertNotIn("over_ml", skipped)
    headline = bench.headline_figures(records + [raml], dict(gflops=100.0))
    self.assertEqual(headline["sampler_over_python_loop"], 1.5)  # B = 32, not the B = 1 case.
    self.assertAlmostEqual(headline["sampler_over_python_loop_b1"], 3.0)
    self.assertEqual(headline["raml_over_ml_n4"], 2.5)
    self.assertIsNone(headline["raml_over_ml_n16"])
    self.assertEqual(headline["train_step_peak_fraction"], 0.3)


class MainSmokeTest(absltest.TestCase):

  def test_smoke_run_prints_cases_and_the_headline_last(self):
    # The command line itself, in a subprocess whose XLA compiles with LLVM
    # optimisation off (XLA_FLAGS must be set before jax starts): the smoke run
    # is mostly compile time, and its timings are not asserted.
    out_md = os.path.join(self.create_tempdir().full_path, "bench.md")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    proc = subprocess.run([sys.executable, _PATH, "--smoke", "--out", out_md], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    headline = lines[-1]
    self.assertEqual(headline["kind"], "headline")
    for key in HEADLINE_KEYS:
      self.assertIsNotNone(headline[key], key)
      self.assertGreater(headline[key], 0.0, key)
    kinds = {line["kind"] for line in lines[:-1]}
    self.assertEqual(kinds, {"meta", "matmul", "rollout", "train"})
    rollouts = [r for r in lines if r["kind"] == "rollout"]
    self.assertEqual({r["method"] for r in rollouts}, set(bench.ROLLOUT_METHODS))
    for r in rollouts:
      # The three decoders draw the same tokens with the same log-probabilities:
      # the speed comparison is between equal work.
      self.assertEqual(r["tokens_agree"], 1.0, r["method"])
      self.assertLess(r["logp_max_diff"], 1e-4, r["method"])
    for r in lines:
      if r["kind"] in ("rollout", "train"):
        for key in ("median_s", "gflops", "peak_fraction", "peak_memory_bytes", "B", "K", "L"):
          self.assertIn(key, r)
    train_case = next(r for r in lines if r["kind"] == "train")
    # Loop-free step: XLA's FLOP count is used and agrees with the analytic one.
    self.assertEqual(train_case["flops_counted"], "xla")
    self.assertBetween(train_case["flops_xla"] / train_case["flops_analytic"], 0.9, 1.4)
    with open(out_md) as f:
      table = f.read()
    for heading in ("## Headline", "## Rollouts", "## Train steps"):
      self.assertIn(heading, table)


@pytest.mark.slow
class TrainCasesTest(absltest.TestCase):
  """The other train-step kinds (seq_pg, OPD, RAML) on the tiny model (slow: compiles)."""

  def test_each_kind_runs_or_is_skipped_with_a_reason(self):
    jsd = {"objective.lambda_jsd": 0.1}
    cases = [("rec+jsd+seq_pg/rao_blackwell", dict(jsd, **{"seq_pg.lambda_pg": 0.1})),
             ("opd", {}),
             ("raml/N=1", dict(jsd, **{"objective.targets": "raml", "raml.num_samples": 1}))]
    for name, overrides in cases:
      record = bench.train_case(name, "tiny", 8, 4, overrides, repeats=1, peak_gflops=1.0,
                                budget_s=0.0)
      if "skipped" in record:
        self.assertIsInstance(record["skipped"], str)
        self.assertNotEqual(name, "rec+jsd+seq_pg/rao_blackwell")
        continue
      self.assertGreater(record["median_s"], 0.0)
      self.assertGreater(record["flops_analytic"], 0.0)
      self.assertBetween(record["flops_xla"] / record["flops_analytic"], 0.5, 1.5)


if __name__ == "__main__":
  absltest.main()
