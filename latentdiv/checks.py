"""Argument checks at the boundary of the public functions (chex, raising ValueError).

One helper per check, shared by the estimator modules, so every bad argument
is reported the same way: chex's message plus the names of the arguments.
"""
from __future__ import annotations

import chex


def assert_rank(arrays, rank, names: str) -> None:
  """``chex.assert_rank`` raising ValueError that names ``names``."""
  chex.assert_rank(arrays, rank, custom_message=f"arguments: {names}",
                   exception_type=ValueError)


def assert_equal_shape(arrays, names: str) -> None:
  """``chex.assert_equal_shape`` raising ValueError that names ``names``."""
  chex.assert_equal_shape(arrays, custom_message=f"arguments: {names}",
                          exception_type=ValueError)
