"""Tests for latentdiv/mi_diagnostics.py: the combinations and the exact rows."""

from absl.testing import absltest
import jax
import pytest

from latentdiv import mi_diagnostics
from latentdiv import model as model_lib
from latentdiv import tasks


class CombinationsTest(absltest.TestCase):

  def test_baselines_only_where_they_apply(self):
    combos = mi_diagnostics.mi_combinations(("trajectory", "kl_to_go_baseline", "rao_blackwell"),
                                            ("none", "leave_one_out"), (False,))
    self.assertEqual([c.label for c in combos],
                     ["trajectory / none", "kl_to_go_baseline / leave_one_out",
                      "rao_blackwell / none", "rao_blackwell / leave_one_out"])
    with self.assertRaisesRegex(ValueError, "only in training"):
      mi_diagnostics.mi_combinations(("rao_blackwell",), ("ema",))


class ExactTest(absltest.TestCase):

  @pytest.mark.slow  # ~45 s; the same exactness is in test_mutual_information's default tests.
  def test_rows_unbiased_biased_and_relative_to_trajectory(self):
    task = tasks.make_task("early_divergence", alphabet_size=2, prompt_len=2, num_strategies=2)
    model = model_lib.LatentTransformer(model_lib.ModelConfig(
        vocab_size=task.vocab_size, num_latents=3, max_len=task.prompt_len + task.target_len,
        d_model=8, num_heads=2, num_layers=1, d_ff=16))
    params = model_lib.init_params(model, jax.random.PRNGKey(0))
    prompts = task.sample(jax.random.PRNGKey(1), 1).prompt
    combos = mi_diagnostics.mi_combinations(("trajectory", "rao_blackwell", "per_token_reward"),
                                            ("none",), (False,))
    out = mi_diagnostics.exact_mi_diagnostics(model, params, prompts, 2, combos)
    rows = {r["estimator"]: r for r in out["rows"]}
    self.assertLess(rows["trajectory"]["rel_err"], 1e-6)
    self.assertLess(rows["rao_blackwell"]["rel_err"], 1e-6)
    self.assertGreater(rows["per_token_reward"]["rel_err"], 0.05)
    self.assertAlmostEqual(rows["trajectory"]["var_ratio"], 1.0)
    self.assertLess(rows["rao_blackwell"]["var_ratio"], 1.0)
    self.assertLen(out["mi"], 1)
    self.assertGreater(out["mi"][0], 0.0)


if __name__ == "__main__":
  absltest.main()
