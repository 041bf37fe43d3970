"""Will a compiled program fit? XLA's memory analysis against the device's free memory.

The loop compiles the train step before the first step and checks it here
(DESIGN.md §11), so a batch that cannot fit is a one-line error naming the
figures and the fields to change, instead of an allocation failure after the
first step started.
"""

from __future__ import annotations

import jax


class DeviceMemoryError(MemoryError):
  """A compiled program needs more memory than the device has free."""


def peak_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries − aliased bytes of XLA's buffer assignment (None if unknown)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _host_available_bytes() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def available_bytes(device: jax.Device) -> int | None:
  """Free memory of ``device``: its allocator's limit minus use, or the host's available memory (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform == "cpu":
    return _host_available_bytes()
  return None


def check_fits(compiled, device: jax.Device, hint: str = "") -> int | None:
  """Raises DeviceMemoryError if ``compiled`` needs more than ``device`` has free.

  What the program still needs is its outputs and temporaries (minus
  buffers aliased to inputs); its arguments (the state) are already
  allocated, which ``available_bytes`` accounts for. A program sharded over
  several devices is checked per device (XLA's analysis is per device).

  Args:
    compiled: a ``jax.stages.Compiled``.
    device: the device it runs on (one of them).
    hint: what to change, appended to the message.

  Returns:
    The estimated bytes still needed, or None if XLA or the device gives no figures.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  free = available_bytes(device)
  if m is None or free is None:
    return None
  needed = int(m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
  if needed > free:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    raise DeviceMemoryError(
        f"The train step needs about {gib(needed)} on {device.platform}:{device.id} beyond its "
        f"arguments (XLA's memory analysis: outputs {gib(m.output_size_in_bytes)}, "
        f"temporaries {gib(m.temp_size_in_bytes)}; arguments {gib(m.argument_size_in_bytes)} "
        f"already held) but only {gib(free)} is free. {hint}".strip())
  return needed
