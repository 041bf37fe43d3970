"""Smoke tests for experiments/bench*.py: every measurement runs on a tiny model.

Timings are reported by the benchmark, never asserted here. What is asserted:
the three decoders draw the same rollouts (so the speed comparison is between
equal work), the analytic FLOP counts agree with XLA's cost analysis on
loop-free programs, the memory-only compile leaves the memory analysis
unchanged, the headline reads the right records, and the last printed line is
the headline JSON.
"""

import json
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from experiments import bench  # noqa: E402
from experiments import bench_hf  # noqa: E402
from experiments import bench_rollouts  # noqa: E402
from experiments import bench_steps  # noqa: E402
from experiments import bench_util  # noqa: E402
from latentdiv import experiment  # noqa: E402
from latentdiv import model as model_lib  # noqa: E402
from latentdiv import sampling  # noqa: E402

_PATH = os.path.join(_REPO, "experiments", "bench.py")

HEADLINE_KEYS = ("sampler_over_python_loop", "sampler_over_no_cache", "rollout_peak_fraction",
                 "train_step_peak_fraction", "matmul_peak_gflops")


class FlopsTest(absltest.TestCase):

  def _xla(self, fn, *args):
    return bench_util.xla_flops(jax.jit(fn).lower(*args).compile())

  def test_forward_flops_match_xla_on_a_loop_free_forward(self):
    # Wide enough that the matmuls dominate XLA's count (which adds 1 per elementwise op).
    model, params = bench_rollouts.make_model("tiny", 8, 8, d_model=128, d_ff=512)
    cfg = model.config
    tokens = jnp.full((2, cfg.max_len), 5, jnp.int32)
    latent = jnp.zeros((2,), jnp.int32)
    full = self._xla(lambda p: model.apply({"params": p}, tokens, latent)[0], params)
    self.assertBetween(full / (2 * bench_util.forward_flops(cfg, cfg.max_len, cfg.max_len)),
                       0.95, 1.25)
    cache = model_lib.init_cache(cfg, 2)
    step = self._xla(
        lambda p, c: model_lib.decode_step(model, p, c, tokens[:, 0], latent, 3)[0],
        params, cache)
    self.assertBetween(step / (2 * bench_util.forward_flops(cfg, 1, cfg.max_len)), 0.95, 1.25)

  def test_rollout_flops_by_method(self):
    cfg = bench_rollouts.model_config("tiny", 4, 8)
    cached = bench_rollouts.rollout_flops(cfg, 3, 4, 8, "full_cache")
    self.assertEqual(cached, bench_rollouts.rollout_flops(cfg, 3, 4, 8, "python_loop"))
    self.assertEqual(cached, 3 * (bench_util.forward_flops(cfg, 5, cfg.max_len, 1)
                                  + 8 * bench_util.forward_flops(cfg, 1, cfg.max_len)))
    # The sampler: 7 decode steps, in its schedule's caches (12 positions: one chunk).
    self.assertEqual(sampling.cache_schedule(4, 8), ((0, 7, 12),))
    self.assertEqual(bench_rollouts.rollout_flops(cfg, 3, 4, 8, "sampler"),
                     3 * (bench_util.forward_flops(cfg, 5, 12, 1)
                          + 7 * bench_util.forward_flops(cfg, 1, 12)))
    # Logits of the last position only: the unembedding counted once.
    self.assertEqual(bench_util.forward_flops(cfg, 5, 12) - bench_util.forward_flops(cfg, 5, 12, 1),
                     4 * 2 * cfg.d_model * cfg.vocab_size)
    self.assertEqual(bench_rollouts.rollout_flops(cfg, 3, 4, 8, "no_cache"),
                     3 * 8 * bench_util.forward_flops(cfg, cfg.max_len, cfg.max_len))
    with self.assertRaisesRegex(ValueError, "sampler"):
      bench_rollouts.rollout_flops(cfg, 3, 4, 8, "beam")


class TimingTest(absltest.TestCase):

  def test_time_calls_interleaves_and_respects_the_budget(self):
    calls = []
    fns = {"a": lambda: calls.append("a") or jnp.zeros(()),
           "b": lambda: calls.append("b") or jnp.zeros(())}
    timings = bench_util.time_calls(fns, repeats=3)
    self.assertEqual(calls, ["a", "b"] + ["a", "b"] * 3)  # warm-ups, then round-robin.
    for t in timings.values():
      self.assertLen(t["times_s"], 3)
      self.assertEqual(t["median_s"], float(np.median(t["times_s"])))
    slow = bench_util.time_call(lambda: jnp.zeros(()), repeats=50, budget_s=0.0)
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


class ScaleCasesTest(absltest.TestCase):
  """The vocabulary, lower-bound and length cases: plans, configs, headline (nothing timed)."""

  def test_plans_hold_the_vocabulary_grid_the_memory_pair_and_the_lengths(self):
    full = bench.plan("full", list(bench.BENCH_SIZES))
    grid = {(c, v, k): timed for c, _, _, _, v, k, timed in full["vocab"]}
    self.assertLen(grid, 3 * len(bench.VOCAB_SIZES) * len(bench.VOCAB_LATENTS))
    self.assertTrue(all(grid[(c, 32, k)] for c in ("rec", "seq", "opd") for k in (4, 8)))
    self.assertFalse(any(grid[(c, 131072, k)] for c in ("rec", "seq", "opd") for k in (4, 8)))
    self.assertTrue(grid[("seq", 32768, 4)])  # The acceptance case runs.
    self.assertEqual({(s, b) for s, _, b in full["lower_bounds"]},
                     {("small", bench.TRAIN_BATCH["small"]),
                      ("medium", bench.TRAIN_BATCH["medium"])})
    self.assertEqual(full["lengths"], [("rollout", "small", bench.LONG_LENGTHS),
                                       ("seq_step", "small", bench.LONG_LENGTHS)])
    # The Hugging Face cases: in the full run only (an optional extra), B·K as the rollouts'.
    self.assertEqual(full["hf"], [("small", 32, 32), ("medium", 32, 32), ("large", 32, 16)])
    for mode in ("quick", "smoke", "lengths"):
      self.assertEqual(bench.plan(mode, ["small"])["hf"], [], mode)
    quick = bench.plan("quick", ["small"])
    self.assertEqual({(c, v, k, timed) for c, _, _, _, v, k, timed in quick["vocab"]},
                     {("seq", bench.HEADLINE_V, 4, False), ("seq", bench.HEADLINE_V, 8, False)})
    self.assertLen(quick["lower_bounds"], 1)
    lengths = bench.plan("lengths", ["small"])
    self.assertEqual((lengths["rollouts"], lengths["trains"]), ([], []))
    self.assertEqual(lengths["lengths"], full["lengths"])

  def test_vocabulary_and_long_configs_build(self):
    setup, _ = experiment.build(bench_steps.train_config(
        "small", 64, 8, **bench_steps.SEQ_STEP, **bench_steps.vocab_overrides(32768, 8)))
    self.assertEqual(setup.model.config.vocab_size, 32768)
    self.assertEqual(setup.model.config.num_latents, 8)
    self.assertEqual(setup.task.target_len, 64)
    self.assertEqual(setup.config.objective.lambda_jsd, 0.0)
    setup, _ = experiment.build(bench_steps.train_config("small", 512, 8, **bench_steps.SEQ_STEP))
    self.assertEqual((setup.task.prompt_len, setup.task.target_len), (256, 512))
    with self.assertRaisesRegex(ValueError, "vocab_size"):
      bench_steps.vocab_overrides(3, 4)

  def test_decode_bytes_count_parameters_and_the_whole_cache(self):
    cfg = bench_rollouts.model_config("tiny", 4, 8)
    params = jax.eval_shape(lambda: model_lib.init_params(model_lib.LatentTransformer(cfg),
                                                          jax.random.PRNGKey(0)))
    got = bench_steps.decode_bytes_per_step(cfg, params, rows=6)
    tables = (cfg.vocab_size + cfg.max_len + cfg.num_latents) * cfg.d_model  # Gathered.
    self.assertEqual(got["param_bytes"],
                     4 * (bench_util.param_count(params) - tables + 3 * 6 * cfg.d_model))
    self.assertEqual(got["cache_bytes"], 2 * cfg.num_layers * 6 * cfg.max_len * cfg.d_model * 4)
    self.assertEqual(got["bytes_per_decode_step"], got["param_bytes"] + got["cache_bytes"])

  def test_memory_only_compile_gives_the_same_memory_analysis(self):
    model, params = bench_rollouts.make_model("tiny", 4, 8)
    tokens = jnp.full((3, model.config.max_len), 5, jnp.int32)
    latent = jnp.zeros((3,), jnp.int32)
    loss = jax.jit(jax.grad(
        lambda p: jnp.sum(model.apply({"params": p}, tokens, latent)[0] ** 2)))
    full, _ = bench_util.compile_fn(loss, params)
    fast, _ = bench_util.compile_fn(loss, params, memory_only=True)
    self.assertEqual(bench_util.peak_memory_bytes(full), bench_util.peak_memory_bytes(fast))

  def test_headline_reads_memory_bound_and_length_records(self):
    def vocab(case, v, k, mem):
      return dict(kind="vocab", case=case, size="small", B=8, L=64, V=v, K=k, timed=False,
                  peak_memory_bytes=mem, median_s=None)

    def length(program, n, m, median_s):
      return dict(kind="length", program=program, size="small", B=32, K=4, L=n, P=8, M=m,
                  median_s=median_s, per_token_s=median_s / (128 * n), peak_memory_bytes=1)

    bound = dict(kind="lower_bound", size="small", B=32, K=4, L=32, V=32, step_s=3.0,
                 sampler_s=0.5, scoring_s=1.5, seq_step_over_lower_bound=1.5,
                 peak_memory_bytes=2 ** 20)
    records = [
        vocab("seq", 32, 4, 10), vocab("seq", 32, 8, 40),
        vocab("seq", bench.HEADLINE_V, 4, 100), vocab("seq", bench.HEADLINE_V, 8, 210),
        vocab("rec", bench.HEADLINE_V, 4, 50), vocab("rec", bench.HEADLINE_V, 8, 90),
        bound, dict(bound, size="medium", seq_step_over_lower_bound=1.25),
        length("rollout", 32, 41, 0.04), length("rollout_full_cache", 32, 41, 0.05),
        length("rollout", 512, 521, 1.28), length("rollout_full_cache", 512, 521, 2.56),
        length("seq_step", 32, 48, 1.0), length("seq_step", 512, 768, 40.0),
        dict(kind="hf", size="medium", rows=128, P=8, L=32, sampler_s=0.1, hf_generate_s=0.17,
             sampler_over_hf_generate=1.7, sampler_over_hf_generate_min=1.6,
             xla_matmul_gflops=200.0, torch_matmul_gflops=100.0, torch_threads=2),
        dict(kind="hf", size="large", skipped="No module named 'torch'"),
    ]
    headline = bench.headline_figures(records, dict(gflops=100.0))
    self.assertAlmostEqual(headline["seq_memory_k8_over_k4"], 2.1)  # At V = 32768, not 32.
    self.assertEqual((headline["seq_memory_k4_bytes"], headline["seq_memory_k8_bytes"]),
                     (100, 210))
    self.assertAlmostEqual(headline["rec_memory_k8_over_k4"], 1.8)
    self.assertIsNone(headline["opd_memory_k8_over_k4"])
    self.assertEqual(headline["seq_step_over_lower_bound"], 1.5)
    self.assertEqual(headline["seq_step_over_lower_bound_medium"], 1.25)
    self.assertAlmostEqual(headline["rollout_per_token_l512_over_l32"],
                           1.28 / 512 / (0.04 / 32))
    self.assertAlmostEqual(headline["full_cache_per_token_l512_over_l32"],
                           2.56 / 512 / (0.05 / 32))
    self.assertAlmostEqual(headline["seq_step_per_token_l512_over_l32"], 2.5)
    self.assertAlmostEqual(headline["sampler_over_full_cache_l512"], 2.0)
    self.assertAlmostEqual(headline["sampler_over_full_cache_l32"], 1.25)
    self.assertEqual(headline["sampler_over_hf_generate_medium"], 1.7)
    self.assertEqual(headline["sampler_over_hf_generate_min_medium"], 1.6)
    self.assertIsNone(headline["sampler_over_hf_generate_large"])
    meta = dict(device="cpu", num_devices=1, host="h", jax="x", mode="full", load_start="0",
                load_end="0", matmul_n=512)
    table = bench.markdown(records, {k: v for k, v in headline.items() if k != "kind"}, meta)
    for heading in ("## Realistic vocabularies", "## Sequence-level step over its lower bound",
                    "## Growth with length (L = 32, 128, 512)",
                    "## Against Hugging Face `generate`"):
      self.assertIn(heading, table)
    self.assertIn("| large | skipped: No module named 'torch' |", table)


class HfCaseTest(absltest.TestCase):
  """Only the skip path: generate itself is never timed in the test suite."""

  def test_missing_torch_is_a_skipped_record_with_the_reason(self):
    with mock.patch.object(bench_hf, "available", return_value="No module named 'torch'"):
      record = bench_hf.hf_case("tiny", 8, 2, repeats=1)
    self.assertEqual(record, dict(kind="hf", size="tiny", B=2, L=8, P=8,
                                  skipped="No module named 'torch'"))
    self.assertIsNone(bench.hf_figures([record])["sampler_over_hf_generate_small"])


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
    self.assertEqual(kinds, {"meta", "matmul", "rollout", "train", "vocab", "length"})
    # The memory pair (compiled only): K = 8 needs more than K = 4.
    self.assertGreater(headline["rec_memory_k8_over_k4"], 1.0)
    # The rollout length family: the sampler and the full-cache decoder at each L.
    grows = [(r["program"], r["L"], r["M"]) for r in lines if r["kind"] == "length"]
    self.assertEqual(grows, [("rollout", 16, 25), ("rollout_full_cache", 16, 25),
                             ("rollout", 32, 41), ("rollout_full_cache", 32, 41)])
    for r in lines:
      if r["kind"] == "length":
        self.assertEqual(r["tokens_agree"], 1.0)
    self.assertGreater(headline["rollout_per_token_l512_over_l32"], 0.0)
    self.assertGreater(headline["sampler_over_full_cache_l512"], 0.0)
    rollouts = [r for r in lines if r["kind"] == "rollout"]
    self.assertEqual({r["method"] for r in rollouts}, set(bench_rollouts.ROLLOUT_METHODS))
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
    for heading in ("## Headline", "## Rollouts", "## Train steps", "## Realistic vocabularies",
                    "## Growth with length"):
      self.assertIn(heading, table)


@pytest.mark.slow
class TrainCasesTest(absltest.TestCase):
  """The other train-step kinds (sequence term, OPD, RAML), the length families and the
  abstract (memory-only) builds on the tiny model (slow: compiles)."""

  def test_each_kind_runs_or_is_skipped_with_a_reason(self):
    jsd = {"objective.lambda_jsd": 0.1}
    cases = [("rec+jsd+seq_pg/rao_blackwell",
              dict(jsd, **{"objective.sequence_term.weight": 0.1})),
             ("opd", {}),
             ("raml/N=1", dict(jsd, **{"objective.targets": "raml",
                                       "objective.raml.num_samples": 1}))]
    for name, overrides in cases:
      record = bench_steps.train_case(name, "tiny", 8, 4, overrides, repeats=1,
                                      peak_gflops=1.0, budget_s=0.0)
      if "skipped" in record:
        self.assertIsInstance(record["skipped"], str)
        self.assertNotEqual(name, "rec+jsd+seq_pg/rao_blackwell")
        continue
      self.assertGreater(record["median_s"], 0.0)
      self.assertGreater(record["flops_analytic"], 0.0)
      self.assertBetween(record["flops_xla"] / record["flops_analytic"], 0.5, 1.5)

  def test_rollout_length_case_times_each_length_and_each_decoder(self):
    records = bench_rollouts.rollout_length_case("tiny", (4, 8), 2, repeats=1,
                                                 peak_gflops=1.0, prompt_len=3, budget_s=0.0)
    self.assertEqual([(r["program"], r["L"], r["M"]) for r in records],
                     [("rollout", 4, 8), ("rollout_full_cache", 4, 8),
                      ("rollout", 8, 12), ("rollout_full_cache", 8, 12)])
    for r in records:
      self.assertEqual(r["kind"], "length")
      self.assertAlmostEqual(r["per_token_s"], r["median_s"] / (2 * r["K"] * r["L"]))

  def test_seq_length_case_runs_each_length(self):
    records = bench_steps.seq_length_case("tiny", (4, 8), 2, repeats=1, peak_gflops=1.0,
                                          budget_s=0.0)
    self.assertEqual([(r["L"], r["P"], r["M"]) for r in records], [(4, 2, 6), (8, 4, 12)])
    self.assertTrue(all(r["median_s"] > 0 for r in records))

  def test_vocab_cases_compile_abstractly_for_memory(self):
    # OPD's teacher and the states as ShapeDtypeStructs: compiled, never run.
    for case in ("opd", "seq"):
      record = bench_steps.vocab_case(case, "tiny", 8, 2, 1024, 4, timed=False)
      self.assertGreater(record["peak_memory_bytes"], 0, case)
      self.assertIsNone(record["median_s"])


if __name__ == "__main__":
  absltest.main()
