"""The memory check before training (latentdiv/memory.py): XLA's figures against the free memory.

The loop-level check (a run whose step cannot fit is refused after
compiling, before the first step, with nothing written) is in
``tests/test_reliability.py``.
"""

from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp

from latentdiv import memory


def _compiled(n: int):
  return jax.jit(lambda x: jnp.outer(x, x) + 1.0).lower(
      jax.ShapeDtypeStruct((n,), jnp.float32)).compile()


class MemoryTest(absltest.TestCase):

  def test_peak_bytes_grow_with_the_program(self):
    small, large = memory.peak_bytes(_compiled(64)), memory.peak_bytes(_compiled(4096))
    self.assertGreaterEqual(small, 64 * 4)
    self.assertGreater(large, 16 * small)

  def test_the_host_reports_free_memory_for_the_cpu(self):
    free = memory.available_bytes(jax.devices("cpu")[0])
    self.assertIsNotNone(free)
    self.assertGreater(free, 0)

  def test_a_program_larger_than_the_free_memory_is_refused_naming_the_figures(self):
    compiled = _compiled(4096)  # Its output, the 4096 x 4096 outer product: 64 MiB.
    device = jax.devices()[0]
    with mock.patch.object(memory, "available_bytes", return_value=2**20):
      with self.assertRaisesRegex(memory.DeviceMemoryError,
                                  r"needs about 0\.\d\d GiB .*temporaries .*only 0\.00 GiB is "
                                  r"free\. Lower the batch"):
        memory.check_fits(compiled, device, "Lower the batch.")
    with mock.patch.object(memory, "available_bytes", return_value=2**40):
      self.assertGreater(memory.check_fits(compiled, device), 0)
    with mock.patch.object(memory, "available_bytes", return_value=None):
      self.assertIsNone(memory.check_fits(compiled, device))  # No figures: no check.


if __name__ == "__main__":
  absltest.main()
