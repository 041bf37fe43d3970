"""Test-wide JAX settings: implicit rank promotion is an error (STYLE.md §5)."""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
