"""Tests for experiments/estimator_variance.py (issue 3, deliverable 4).

The diagnostic's exact mode is checked against the oracle's exact gradient on
a tiny Transformer in float64 (every unbiased combination has relative error
~0, ``per_token_reward`` is biased, ``rao_blackwell`` has less variance than
``trajectory``), against an independent oracle computation of one
estimator's moments, and its Monte-Carlo mode against the exact moments with
tolerances derived from the exact variances. The moment arithmetic, the
baseline constants and the enumeration are checked against NumPy brute force,
and ``main`` runs end to end on a checkpoint workdir.

The exact run is computed once (``_exact``); the Monte-Carlo run and ``main``
reuse its compiled programs (same model, combinations and chunk size).
"""
import functools
import itertools
import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import estimator_variance as ev  # noqa: E402
from latentdiv import checkpointing  # noqa: E402
from latentdiv import estimators as est  # noqa: E402
from latentdiv import moments as moments_lib  # noqa: E402
from latentdiv import oracle  # noqa: E402
from latentdiv import train  # noqa: E402
from latentdiv import vocab  # noqa: E402

LENGTH = 3  # the tiny config's rollout length (A = 2: 15 possible outputs).
BATCH = 2


@functools.lru_cache(maxsize=None)
def _exact():
  """The tiny model in float64 and its exact diagnostics (as ``ev.run`` computes them)."""
  setup, params, _ = ev.load()
  # As ev.run draws it: outside x64 (the PRNG's integers differ under x64).
  batch = setup.task.sample(jax.random.fold_in(jax.random.PRNGKey(0), 4), BATCH)
  with jax.enable_x64(True):
    model, params = ev.to_float64(setup.model, params)
    cells = ev.all_cells(BATCH, model.config.num_latents)
    combos = ev.combinations()
    stats = ev.exact_diagnostics(model, params, batch.prompt, batch.target,
                                 batch.target_mask, cells, LENGTH, combos, chunk=32)
  return model, params, batch, cells, combos, stats


def _index(combos, estimator, baseline="none"):
  return combos.index(ev.Combo(estimator, baseline))


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------------------
# Pure helpers.
# ---------------------------------------------------------------------------


class CombinationsTest(parameterized.TestCase):

  def test_default_combinations(self):
    combos = ev.combinations()
    labels = {(c.estimator, c.baseline) for c in combos}
    self.assertLen(combos, 14)
    self.assertLen(labels, 14)
    for name in ("trajectory", "reward_to_go", "kl_to_go", "per_token_reward"):
      self.assertEqual({b for e, b in labels if e == name}, {"none"})
    for name in ("reward_to_go_baseline", "kl_to_go_baseline"):
      self.assertEqual({b for e, b in labels if e == name},
                       {"ema", "jsd", "leave_one_out"})
    self.assertEqual({b for e, b in labels if e == "rao_blackwell"}, set(ev.BASELINES))
    self.assertEqual([c.rollouts for c in combos],
                     [2 if c.baseline == "leave_one_out" else 1 for c in combos])

  def test_subsets_and_errors(self):
    self.assertEqual(ev.combinations(["trajectory", "rao_blackwell"], ["leave_one_out"]),
                     (ev.Combo("rao_blackwell", "leave_one_out"),))
    with self.assertRaisesRegex(ValueError, "allowed"):
      ev.combinations(["reinforce"])
    with self.assertRaisesRegex(ValueError, "allowed"):
      ev.combinations(baselines=["batch_mean"])

  def test_all_cells(self):
    cells = ev.all_cells(2, 3)
    self.assertLen(cells, 12)
    self.assertTrue(all(i != j for _, i, j in cells))
    self.assertLen(set(cells), 12)
    some = ev.all_cells(3, 4, num_pairs=5, seed=1)
    self.assertLen(some, 15)
    self.assertEqual({(i, j) for b, i, j in some if b == 0},
                     {(i, j) for b, i, j in some if b == 2})


class MomentsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_weighted_moments_and_merge_match_numpy(self):
    rng = np.random.default_rng(0)
    n, c, p = 11, 3, 5
    g = rng.normal(size=(n, c, p)) * np.array([1.0, 10.0, 0.1])[None, :, None] + 3.0
    w = rng.uniform(size=(n, c))
    w[2, 1] = 0.0
    ref = rng.normal(size=(p,))
    moments_of = self.variant(ev.moments_of)
    merge = self.variant(ev.merge_moments.__wrapped__)
    # Merging uneven parts (one of them empty for a combo) equals the whole.
    w_empty = w.copy()
    w_empty[:4, 0] = 0.0
    parts = [(0, 4), (4, 5), (5, n)]
    for weights in (w, w_empty):
      total = None
      for lo, hi in parts:
        part = moments_of(jnp.asarray(g[lo:hi]), jnp.asarray(weights[lo:hi]),
                          jnp.asarray(ref))
        total = part if total is None else merge(total, part)
      whole = moments_of(jnp.asarray(g), jnp.asarray(weights), jnp.asarray(ref))
      chex.assert_shape([total.mean, whole.mean], (c, p))
      chex.assert_shape([total.weight, total.m2, total.cos_sum], (c,))
      for k in range(c):
        wk = weights[:, k]
        mean = (wk[:, None] * g[:, k]).sum(0) / wk.sum()
        m2 = sum(wk[m] * np.sum((g[m, k] - mean)**2) for m in range(n))
        cos = sum(wk[m] * g[m, k] @ ref / np.linalg.norm(g[m, k]) / np.linalg.norm(ref)
                  for m in range(n))
        for got in (total, whole):
          np.testing.assert_allclose(got.weight[k], wk.sum(), rtol=1e-5)
          np.testing.assert_allclose(got.mean[k], mean, rtol=1e-4, atol=1e-4)
          np.testing.assert_allclose(got.m2[k], m2, rtol=1e-4)
          np.testing.assert_allclose(got.cos_sum[k], cos, rtol=1e-4, atol=1e-5)

  def test_baseline_constants_match_numpy(self):
    rng = np.random.default_rng(1)
    e, m, n, l = 2, 3, 5, 4
    returns = rng.normal(size=(e, m, n, l)) + 2.0
    mask = (rng.uniform(size=(m, n, l)) < 0.8).astype(np.float64)
    mask[..., 0] = 1.0
    weights = rng.uniform(size=(m, n))
    jsd = rng.uniform(size=(m, l))
    returns[1] = 0.5 + 3.0 * jsd[:, None, :] + 0.1 * rng.normal(size=(m, n, l))
    with jax.enable_x64(True):
      ema, c = ev.baseline_constants(jnp.asarray(returns), jnp.asarray(mask),
                                     jnp.asarray(weights), jnp.asarray(jsd))
    for k in range(e):
      for t in range(l):
        w = weights * mask[:, :, t]
        np.testing.assert_allclose(ema[k, t], np.sum(w * returns[k, :, :, t]) / w.sum(),
                                   rtol=1e-10)
      w = weights[:, :, None] * mask
      j = np.broadcast_to(jsd[:, None, :], mask.shape)
      mean = lambda x: np.sum(w * x) / w.sum()  # noqa: E731
      r = returns[k]
      cov = mean(r * j) - mean(r) * mean(j)
      np.testing.assert_allclose(c[k], cov / (mean(j * j) - mean(j)**2), rtol=1e-8)
    self.assertAlmostEqual(float(c[1]), 3.0, delta=0.1)  # R ≈ 0.5 + 3 J.


class ExactSequencesTest(parameterized.TestCase):

  @parameterized.parameters((5, 3), (6, 2), (5, 1))
  def test_matches_brute_force(self, vocab_size, length):
    tokens, mask, index = ev.exact_sequences(vocab_size, length)
    alphabet = vocab_size - vocab.NUM_RESERVED
    self.assertEqual(tokens.shape[0], ev.num_exact_sequences(alphabet, length))
    emitted = [vocab.EOS] + list(range(vocab.FIRST_CONTENT, vocab_size))
    expected = set()
    for seq in itertools.product(emitted, repeat=length):
      seq = list(seq)
      if vocab.EOS in seq:
        end = seq.index(vocab.EOS) + 1
        seq = seq[:end] + [vocab.PAD] * (length - end)
      expected.add(tuple(seq))
    got = {tuple(row) for row in np.asarray(tokens).tolist()}
    self.assertEqual(got, expected)
    self.assertLen(got, tokens.shape[0])
    for row, m in zip(np.asarray(tokens), np.asarray(mask)):
      scored = int(m.sum())
      self.assertTrue(np.all(m[:scored] == 1) and np.all(m[scored:] == 0))
      self.assertTrue(scored == length or row[scored - 1] == vocab.EOS)
    all_rows = np.asarray(oracle.all_sequences(vocab_size, length))
    np.testing.assert_array_equal(all_rows[np.asarray(index)], np.asarray(tokens))


# ---------------------------------------------------------------------------
# Exact mode on a tiny Transformer (float64).
# ---------------------------------------------------------------------------


class ExactModeTest(parameterized.TestCase):

  def test_shapes(self):
    _, params, _, cells, combos, stats = _exact()
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    self.assertLen(stats, len(cells))
    for s in stats:
      chex.assert_shape(s.mean, (len(combos), num_params))
      chex.assert_shape([s.variance, s.cos_one], (len(combos),))
      chex.assert_shape(s.ref, (num_params,))
      self.assertEqual(s.mean.dtype, jnp.float64)
      self.assertGreater(s.kl, 0.0)

  def test_unbiased_estimators_match_exact_gradient(self):
    _, _, _, _, combos, stats = _exact()
    for s in stats:
      ref = np.asarray(s.ref)
      for c, combo in enumerate(combos):
        if combo.estimator not in est.ESTIMATORS:
          continue
        mean = np.asarray(s.mean[c])
        self.assertLess(_rel_err(mean, ref), 1e-5, msg=(s.cell, combo))
        cosine = mean @ ref / np.linalg.norm(mean) / np.linalg.norm(ref)
        self.assertGreater(cosine, 1 - 1e-9, msg=(s.cell, combo))

  def test_per_token_reward_is_biased(self):
    _, _, _, _, combos, stats = _exact()
    c = _index(combos, "per_token_reward")
    for s in stats:
      self.assertGreater(_rel_err(s.mean[c], s.ref), 0.02, msg=s.cell)

  def test_rao_blackwell_has_less_variance_than_trajectory(self):
    _, _, _, _, combos, stats = _exact()
    rb, traj = _index(combos, "rao_blackwell"), _index(combos, "trajectory")
    for s in stats:
      self.assertLess(float(s.variance[rb]), float(s.variance[traj]), msg=s.cell)
      self.assertTrue(np.all(np.asarray(s.variance) > 0))

  @pytest.mark.slow
  def test_moments_match_the_oracle(self):
    """An independent path: the oracle's own enumeration (all V^L rows) and jax.grad."""
    model, params, batch, cells, combos, stats = _exact()
    cell = 5
    b, i, j = cells[cell]
    c = _index(combos, "rao_blackwell")
    with jax.enable_x64(True):
      logits_fn = ev.make_logits_fn(model, batch.prompt[b])
      moments = jax.jit(lambda p: moments_lib.estimator_gradient_moments(
          logits_fn, p, i, j, "rao_blackwell", model.config.vocab_size, LENGTH,
          eos_id=vocab.EOS, pad_id=vocab.PAD))(params)
      # The oracle's surrogate is a loss: its mean is −∇D.
      mean = -ev._ravel(moments.mean)  # pylint: disable=protected-access
    self.assertLess(_rel_err(stats[cell].mean[c], mean), 1e-6)
    np.testing.assert_allclose(float(stats[cell].variance[c]), float(moments.variance),
                               rtol=1e-6)


# ---------------------------------------------------------------------------
# Monte-Carlo mode against the exact moments.
# ---------------------------------------------------------------------------


class MonteCarloModeTest(parameterized.TestCase):

  def test_converges_to_exact_within_variance_tolerance(self):
    model, params, batch, cells, combos, exact = _exact()
    n = 1000
    biased = _index(combos, "per_token_reward")
    rb = _index(combos, "rao_blackwell")
    # The two cells where per_token_reward's bias is largest relative to its noise.
    bias = [np.sum((np.asarray(e.mean[biased]) - np.asarray(e.ref))**2)
            / float(e.variance[biased]) for e in exact]
    picked = [cells[k] for k in sorted(np.argsort(bias)[-2:].tolist())]
    args = (model, params, batch.prompt, batch.target, batch.target_mask, picked, LENGTH,
            combos)
    with jax.enable_x64(True):
      stats = ev.monte_carlo_diagnostics(*args, key=jax.random.PRNGKey(1),
                                         num_reference=400, num_samples=n, chunk=32,
                                         reference_combos=combos)
      # The ema / jsd constants are pooled over the cells: the same two cells.
      exact = ev.exact_diagnostics(*args, chunk=32)
    for s, e in zip(stats, exact):
      self.assertEqual(s.cell, e.cell)
      sq = lambda a, b: float(np.sum((np.asarray(a) - np.asarray(b))**2))  # noqa: E731
      # The reference (mean of rao_blackwell over n rollouts) and D_ij.
      self.assertLess(sq(s.ref, e.ref), 9 * float(e.variance[rb]) / 400, msg=s.cell)
      self.assertLess(abs(s.kl - e.kl), 4 * s.kl_stderr, msg=s.cell)
      for c, combo in enumerate(combos):
        count = n // combo.rollouts
        self.assertEqual(s.num_estimates[c], count)
        # E‖ḡ − E g‖² = Var/n: the sample mean converges to the exact mean ...
        tolerance = 9 * float(e.variance[c]) / count
        self.assertLess(sq(s.mean[c], e.mean[c]), tolerance, msg=(s.cell, combo))
        # ... which is the exact gradient for the unbiased estimators only.
        if c == biased:
          self.assertGreater(sq(s.mean[c], e.ref), tolerance, msg=(s.cell, combo))
        else:
          self.assertLess(sq(s.mean[c], e.ref), tolerance, msg=(s.cell, combo))
        ratio = float(s.variance[c]) / float(e.variance[c])
        self.assertBetween(ratio, 0.7, 1.4, msg=(s.cell, combo))


# ---------------------------------------------------------------------------
# The script: loading a checkpoint and main end to end.
# ---------------------------------------------------------------------------


def _fake_run(workdir):
  """A run.py workdir holding the tiny config and its step-0 state at step 7."""
  setup, params, _ = ev.load()
  # The state's structure with the fresh parameters (the rest is never read).
  abstract = jax.eval_shape(lambda: train.init_state(setup))
  state = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                 abstract).replace(params=params)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(setup.config.to_json_best_effort()), f)
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), 3, 1)
  checkpointing.save(manager, 7, state, dict(step=7), force=True)
  manager.wait_until_finished()
  manager.close()
  return state


class MainTest(parameterized.TestCase):

  def test_main_on_a_checkpoint_writes_table_json_and_plot(self):
    workdir = self.create_tempdir().full_path
    state = _fake_run(workdir)
    setup, params, source = ev.load(workdir=workdir)
    chex.assert_trees_all_equal(params, state.params)
    self.assertIn("step 7", source)
    self.assertEqual(setup.model, ev.load()[0].model)
    with self.assertRaises(FileNotFoundError):
      ev.restore_params(setup, workdir, step=3)

    out = self.create_tempdir().full_path
    fv = flags.FlagValues()
    ev.define_flags(fv)
    fv(["estimator_variance.py", f"--workdir={workdir}", f"--output_dir={out}",
        "--batch_size=2", "--num_pairs=1"])
    ev.main(["estimator_variance.py"], fv)
    base = os.path.join(out, "estimator_variance")
    with open(base + ".json") as f:
      result = json.load(f)
    with open(base + ".md") as f:
      table = f.read()
    with open(base + ".png", "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertEqual(result["mode"], "exact")
    self.assertEqual(result["precision"], "float64")
    self.assertEqual(result["num_outputs"], 15)
    self.assertLen(result["rows"], 14)
    self.assertLen(result["cells"], 2)
    self.assertIn("step 7", table)
    rows = {(r["estimator"], r["baseline"]): r for r in result["rows"]}
    for (name, baseline), row in rows.items():
      self.assertIn(f"| {name} | {baseline} |", table)
      if name in est.ESTIMATORS:
        self.assertLess(row["rel_err_max"], 1e-5, msg=row)
        self.assertGreater(row["cosine"], 1 - 1e-9, msg=row)
      else:
        self.assertGreater(row["rel_err"], 0.02, msg=row)
      # Table rows are the means of the per-cell metrics.
      cell_values = [m["variance"] for c in result["cells"] for m in c["combos"]
                     if (m["estimator"], m["baseline"]) == (name, baseline)]
      self.assertAlmostEqual(row["variance"], np.mean(cell_values), delta=1e-9 * row["variance"])
    self.assertLess(rows[("rao_blackwell", "none")]["variance"],
                    rows[("trajectory", "none")]["variance"])

  @pytest.mark.slow
  def test_script_runs_from_the_command_line(self):
    out = self.create_tempdir().full_path
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "estimator_variance.py"),
         "--estimators=trajectory,rao_blackwell", "--baselines=none,leave_one_out",
         "--batch_size=1", "--num_pairs=2", "--mode=mc", "--num_samples=64",
         "--num_reference=128", f"--output_dir={out}"],
        capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(proc.returncode, 0, msg=proc.stderr[-3000:])
    self.assertIn("rao_blackwell | leave_one_out", proc.stdout)
    for ext in ("md", "json", "png"):
      self.assertTrue(os.path.exists(os.path.join(out, f"estimator_variance.{ext}")))


if __name__ == "__main__":
  absltest.main()
