"""experiments/device_check.py end to end at its tiny size on CPU (so that it cannot rot).

Values are not asserted (they are the device's); what is: the command runs,
its last stdout line is the one JSON headline, and every figure is there.
"""

import json
import math
import os
import subprocess
import sys

from absl.testing import absltest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATH = os.path.join(_REPO, "experiments", "device_check.py")

POSITIVE = ("copy_gbytes_per_s", "matmul_peak_gflops_float32", "matmul_peak_gflops_bfloat16",
            "sampler_tokens_per_s", "sampler_hbm_bound_tokens_per_s", "sampler_hbm_fraction",
            "bytes_per_decode_step", "train_step_s", "train_step_peak_fraction",
            "train_step_fraction_of_float32_peak", "train_step_fraction_of_bfloat16_peak",
            "seq_step_over_lower_bound", "seq_step_s", "sampler_s", "scoring_s",
            "seq_step_memory_bytes", "peak_memory_bytes", "wall_s")


class DeviceCheckTest(absltest.TestCase):

  def test_tiny_run_prints_the_headline_last(self):
    # A subprocess whose XLA compiles with LLVM optimisation off (XLA_FLAGS is
    # read when jax starts): the tiny run is mostly compile time.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    proc = subprocess.run([sys.executable, _PATH, "--tiny"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    headline = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(headline["kind"], "device_check")
    self.assertEqual((headline["size"], headline["platform"]), ("tiny", "cpu"))
    for key in POSITIVE:
      value = headline[key]
      self.assertIsNotNone(value, key)
      self.assertTrue(math.isfinite(value) and value > 0, f"{key} = {value}")
    self.assertGreaterEqual(headline["peak_memory_bytes"], headline["seq_step_memory_bytes"])
    self.assertIn("device_peak_bytes_in_use", headline)  # None on CPU.
    # The progress records went to stderr, one JSON object a line.
    kinds = {json.loads(line)["kind"] for line in proc.stderr.splitlines()
             if line.startswith("{")}
    self.assertTrue({"copy", "matmul", "train", "lower_bound"} <= kinds, kinds)


if __name__ == "__main__":
  absltest.main()
