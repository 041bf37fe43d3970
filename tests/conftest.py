"""Test-wide settings.

* Implicit rank promotion is an error (STYLE.md §5): shapes must line up explicitly.
* absl flags count as parsed, so absltest helpers (``create_tempdir``) work under pytest.
"""
from absl import flags
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
flags.FLAGS.mark_as_parsed()
