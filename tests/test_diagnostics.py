"""Tests for latentdiv/diagnostics.py on a tiny Transformer.

The exact mode is checked against the oracle's exact gradient in float64
(every unbiased combination has relative error ~0, ``per_token_reward`` is
biased, ``rao_blackwell`` has less variance than ``trajectory``), against an
independent oracle computation of one estimator's moments
(``moments.estimator_gradient_moments``), and the Monte-Carlo mode against
the exact moments with tolerances derived from the exact variances. The
baseline constants and the enumeration are checked against NumPy brute
force, and :func:`diagnostics.diagnose` end to end.

The exact run is computed once (``_exact``); the Monte-Carlo run reuses its
compiled programs (same model, combinations and chunk size).
"""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiv import baselines
from latentdiv import diagnostics as dg
from latentdiv import estimators as est
from latentdiv import model as model_lib
from latentdiv import model_oracle
from latentdiv import moments
from latentdiv import tasks
from latentdiv import vocab

LENGTH = 3  # the rollout length (A = 2: 15 possible outputs).
BATCH = 2


@functools.lru_cache(maxsize=None)
def _model():
  """A fresh 1-layer, d = 16 Transformer with K = 3 latents on A = 2 content tokens.

  The parameters of ``train.init_state`` at seed 0 (``experiments/estimator_variance.py``'s
  default model), built here without the training code.
  """
  task = tasks.make_task("early_divergence", alphabet_size=2, prompt_len=2,
                         num_strategies=2)
  model = model_lib.LatentTransformer(model_lib.ModelConfig(
      vocab_size=task.vocab_size, num_latents=3, max_len=task.prompt_len + task.target_len,
      d_model=16, num_heads=2, num_layers=1, d_ff=32))
  init_key, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), 1))
  params = jax.jit(functools.partial(model_lib.init_params, model))(init_key)
  # Outside x64 (the PRNG's integers differ under x64).
  batch = task.sample(jax.random.fold_in(jax.random.PRNGKey(0), 4), BATCH)
  return model, params, batch


@functools.lru_cache(maxsize=None)
def _exact():
  """The tiny model in float64 and its exact diagnostics."""
  model, params, batch = _model()
  with jax.enable_x64(True):
    model, params = model_oracle.to_float64(model, params)
    cells = dg.all_cells(BATCH, model.config.num_latents)
    combos = dg.combinations()
    stats = dg.exact_diagnostics(model, params, batch.prompt, batch.target,
                                 batch.target_mask, cells, LENGTH, combos, chunk=32)
  return model, params, batch, cells, combos, stats


def _index(combos, estimator, baseline="none"):
  return combos.index(dg.Combo(estimator, baseline))


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------------------
# Pure helpers.
# ---------------------------------------------------------------------------


class CombinationsTest(parameterized.TestCase):

  def test_default_combinations(self):
    combos = dg.combinations()
    labels = {(c.estimator, c.baseline) for c in combos}
    self.assertLen(combos, 14)
    self.assertLen(labels, 14)
    for name in ("trajectory", "reward_to_go", "kl_to_go", "per_token_reward"):
      self.assertEqual({b for e, b in labels if e == name}, {"none"})
    for name in ("reward_to_go_baseline", "kl_to_go_baseline"):
      self.assertEqual({b for e, b in labels if e == name},
                       {"ema", "jsd", "leave_one_out"})
    self.assertEqual({b for e, b in labels if e == "rao_blackwell"}, set(baselines.BASELINES))
    self.assertEqual([c.rollouts for c in combos],
                     [2 if c.baseline == "leave_one_out" else 1 for c in combos])

  def test_subsets_and_errors(self):
    self.assertEqual(dg.combinations(["trajectory", "rao_blackwell"], ["leave_one_out"]),
                     (dg.Combo("rao_blackwell", "leave_one_out"),))
    with self.assertRaisesRegex(ValueError, "allowed"):
      dg.combinations(["reinforce"])
    with self.assertRaisesRegex(ValueError, "allowed"):
      dg.combinations(baselines=["batch_mean"])

  def test_all_cells(self):
    cells = dg.all_cells(2, 3)
    self.assertLen(cells, 12)
    self.assertTrue(all(i != j for _, i, j in cells))
    self.assertLen(set(cells), 12)
    some = dg.all_cells(3, 4, num_pairs=5, seed=1)
    self.assertLen(some, 15)
    self.assertEqual({(i, j) for b, i, j in some if b == 0},
                     {(i, j) for b, i, j in some if b == 2})


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
      logits_fn = model_oracle.make_logits_fn(model, batch.prompt[b])
      m = jax.jit(lambda p: moments.estimator_gradient_moments(
          logits_fn, p, i, j, "rao_blackwell", model.config.vocab_size, LENGTH,
          eos_id=vocab.EOS, pad_id=vocab.PAD))(params)
      # The oracle's surrogate is a loss: its mean is −∇D.
      mean = -flatten_util.ravel_pytree(m.mean)[0]
    self.assertLess(_rel_err(stats[cell].mean[c], mean), 1e-6)
    np.testing.assert_allclose(float(stats[cell].variance[c]), float(m.variance),
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
      stats = dg.monte_carlo_diagnostics(*args, key=jax.random.PRNGKey(1),
                                         num_reference=400, num_samples=n, chunk=32,
                                         reference_combos=combos)
      # The ema / jsd constants are pooled over the cells: the same two cells.
      exact = dg.exact_diagnostics(*args, chunk=32)
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

class DiagnoseTest(parameterized.TestCase):

  def test_exact_run_and_summary(self):
    model, params, batch = _model()
    result = dg.diagnose(model, params, batch, LENGTH, num_pairs=1)
    self.assertEqual(result["mode"], "exact")
    self.assertEqual(result["precision"], "float64")
    self.assertEqual(result["num_outputs"], 15)
    self.assertLen(result["cells"], BATCH)
    rows = {(r["estimator"], r["baseline"]): r for r in result["rows"]}
    self.assertEqual(list(rows), list(dg.combinations()))
    for (name, _), row in rows.items():
      if name in est.ESTIMATORS:
        self.assertLess(row["rel_err_max"], 1e-5, msg=row)
      else:
        self.assertGreater(row["rel_err"], 0.02, msg=row)
      cell_values = [m["variance"] for c in result["cells"] for m in c["combos"]
                     if (m["estimator"], m["baseline"]) == (name, row["baseline"])]
      self.assertAlmostEqual(row["variance"], np.mean(cell_values),
                             delta=1e-9 * row["variance"])
    self.assertAlmostEqual(rows[("trajectory", "none")]["var_ratio"], 1.0)

  def test_errors(self):
    model, params, batch = _model()
    with self.assertRaisesRegex(ValueError, "mode"):
      dg.diagnose(model, params, batch, LENGTH, mode="sampled")
    with self.assertRaisesRegex(ValueError, "precision"):
      dg.diagnose(model, params, batch, LENGTH, precision="bfloat16")
    with self.assertRaisesRegex(ValueError, "rollout_len"):
      dg.diagnose(model, params, batch, 99)
    with self.assertRaisesRegex(ValueError, "No combination"):
      dg.diagnose(model, params, batch, LENGTH, estimators=["trajectory"],
                  baselines=["ema"])
    with self.assertRaisesRegex(ValueError, "even"):
      dg.monte_carlo_diagnostics(model, params, batch.prompt, batch.target,
                                 batch.target_mask, [(0, 0, 1)], LENGTH,
                                 dg.combinations(), jax.random.PRNGKey(0), 6, 3)
    with self.assertRaisesRegex(ValueError, "reference_combos"):
      dg.monte_carlo_diagnostics(model, params, batch.prompt, batch.target,
                                 batch.target_mask, [(0, 0, 1)], LENGTH,
                                 dg.combinations(), jax.random.PRNGKey(0), 8, 8,
                                 reference_combos=(dg.Combo("trajectory", "none"),))


if __name__ == "__main__":
  absltest.main()
