"""Runs experiments/adapter_example.py: a user's own Flax model and token ids with the library."""

import os
import sys

import pytest
from absl.testing import absltest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from experiments import adapter_example  # noqa: E402


@pytest.mark.slow  # ~25 s of CPU: the enumeration oracle compiles the GRU three ways.
class AdapterExampleTest(absltest.TestCase):

  def test_own_model_trains_and_its_estimator_matches_the_oracle(self):
    result = adapter_example.main(train_steps=30, mc_samples=4000)
    self.assertLess(result["loss_end"], result["loss_start"] - 1.0)
    self.assertGreater(result["exact_kl"], 0.1)  # the latents were pushed apart
    self.assertLess(result["exact_mean_relative_error"], 1e-5)
    self.assertLess(result["monte_carlo_relative_error"], 0.05)


if __name__ == "__main__":
  absltest.main()
