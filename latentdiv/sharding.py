"""Data parallelism on a device mesh: the batch split over a ``data`` axis, parameters replicated.

The same jitted step runs on one device, on 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on many GPUs/TPUs
across hosts (after ``jax.distributed.initialize()``) (DESIGN.md §10):

* ``make_mesh()`` — a 1-D ``jax.sharding.Mesh`` with axis ``'data'`` over all
  (global) devices;
* the batch is sharded on its leading axis (``batch_sharding``): each device
  holds ``B / num_devices`` examples. Inside a jitted step whose batch is drawn
  on device, ``constrain_batch`` pins that layout; a batch built on the host is
  placed with ``shard_batch``;
* parameters and optimiser state are replicated (``replicate``), or, FSDP
  style, large arrays are split along one axis over ``'data'``
  (``fsdp_shardings``) and XLA all-gathers them where they are used;
* ``jit_data_parallel(step, mesh, state)`` jits ``state -> (state, metrics)``
  with those shardings on the inputs and outputs.

XLA's SPMD partitioner (GSPMD) inserts the collectives: the per-example work
runs on each device's shard, and the gradient — a mean over the batch — is
summed across devices with an all-reduce. The result equals the single-device
step up to the float32 reassociation of that sum. Random draws inside the step
do not depend on the layout (``jax_threefry_partitionable``, on by default), so
a sharded step samples the same tokens as an unsharded one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"
# Arrays with fewer elements than this stay replicated under FSDP: splitting a
# bias or a LayerNorm scale saves nothing and costs a collective.
FSDP_MIN_SIZE = 2 ** 16


def make_mesh(devices=None, axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh with one axis, ``axis_name``, over ``devices`` (default: all global devices).

  Args:
    devices: a sequence of ``jax.Device`` (default ``jax.devices()``: every
      device of every process after ``jax.distributed.initialize()``).
    axis_name: the name of the mesh axis the batch is split over.

  Returns:
    ``jax.sharding.Mesh`` of shape ``(len(devices),)``.

  References:
    DESIGN.md §10.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device.")
  return Mesh(np.asarray(devices, dtype=object).reshape(-1), (axis_name,))


def _axis(mesh: Mesh) -> str:
  if len(mesh.axis_names) != 1:
    raise ValueError(
        f"A 1-D data mesh is expected (make_mesh), got axes {mesh.axis_names}.")
  return mesh.axis_names[0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh axis; the other axes whole: ``P('data')``."""
  return NamedSharding(mesh, P(_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device: ``P()``."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """Raises ValueError unless ``batch_size`` is a multiple of the number of devices.

  Args:
    batch_size: the GLOBAL batch size B.
    mesh: the data mesh.
    name: what to call the value in the message (e.g. ``config.train.batch_size``).
  """
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(
        f"{name} = {batch_size} must be a multiple of the number of devices on the "
        f"'{_axis(mesh)}' axis ({n}): each device holds {name} / {n} examples.")


def _leaf_path(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _check_leaves(batch, mesh: Mesh) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    if np.ndim(leaf) < 1:
      raise ValueError(
          f"batch leaf {_leaf_path(path)} is a scalar; every leaf needs a leading "
          "batch axis to be sharded.")
    check_batch_size(np.shape(leaf)[0], mesh, f"the leading axis of {_leaf_path(path)}")


def shard_batch(batch, mesh: Mesh):
  """Places a host-side batch on the mesh, split along its leading axis.

  Single process: ``batch`` is the global batch. Multi-process (after
  ``jax.distributed.initialize()``): each process passes ITS slice of the
  global batch (``B / process_count`` rows), assembled with
  ``jax.make_array_from_process_local_data``.

  Args:
    batch: a pytree of arrays with a common leading axis B (B divisible by the
      number of devices, per process by the local device count).
    mesh: the data mesh.

  Returns:
    The same pytree of global ``jax.Array`` sharded ``P('data')``.

  Raises:
    ValueError: a scalar leaf, or a leading axis not divisible by the devices.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    _check_leaves(batch, mesh)
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), batch)
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch)


def _put(tree, shardings):
  """Each leaf of ``tree`` placed with its sharding (multi-process: each host keeps its shards)."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(jax.device_put, tree, shardings)

  def put(a, sharding):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

  return jax.tree_util.tree_map(put, tree, shardings)


def replicate(tree, mesh: Mesh):
  """A full copy of every leaf of ``tree`` on every device of ``mesh``.

  Multi-process: every process must pass the same values (e.g. parameters
  initialised from the same seed, or restored from the same checkpoint).
  """
  return _put(tree, jax.tree_util.tree_map(lambda _: replicated(mesh), tree))


def fsdp_spec(shape: tuple[int, ...], num_devices: int, axis_name: str = DATA_AXIS,
              min_size: int = FSDP_MIN_SIZE) -> P:
  """The FSDP ``PartitionSpec`` of an array of ``shape``.

  The largest axis whose length is a multiple of ``num_devices`` is split over
  ``axis_name`` (ties: the last such axis); arrays with fewer than
  ``min_size`` elements, or with no such axis, stay replicated (``P()``).

  Args:
    shape: the array's shape.
    num_devices: the size of the mesh axis.
    axis_name: the mesh axis to split over.
    min_size: smallest array (in elements) worth splitting.

  Returns:
    ``PartitionSpec`` with ``axis_name`` at the split axis and None elsewhere.
  """
  if int(np.prod(shape, dtype=np.int64)) < min_size or num_devices == 1:
    return P()
  candidates = [i for i, n in enumerate(shape) if n % num_devices == 0]
  if not candidates:
    return P()
  best = max(candidates, key=lambda i: (shape[i], i))
  return P(*[axis_name if i == best else None for i in range(len(shape))])


def fsdp_shardings(tree, mesh: Mesh, min_size: int = FSDP_MIN_SIZE):
  """``NamedSharding`` per leaf of ``tree``: large arrays split FSDP-style, the rest replicated.

  Applied to a whole train state, the Adam moments get the same layout as the
  parameters they mirror (same shapes, same rule). Leaves may be arrays or
  ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).

  Returns:
    A pytree of ``NamedSharding`` with ``tree``'s structure.
  """
  axis = _axis(mesh)
  n = mesh.devices.size
  return jax.tree_util.tree_map(
      lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), n, axis, min_size)), tree)


def state_shardings(state, mesh: Mesh, fsdp: bool = False,
                    min_size: int = FSDP_MIN_SIZE):
  """Shardings of a train state: every leaf replicated, or (``fsdp``) ``fsdp_shardings``."""
  if fsdp:
    return fsdp_shardings(state, mesh, min_size)
  return jax.tree_util.tree_map(lambda _: replicated(mesh), state)


def abstract_state(state, mesh: Mesh, fsdp: bool = False, min_size: int = FSDP_MIN_SIZE):
  """``jax.ShapeDtypeStruct`` leaves WITH their mesh shardings: a checkpoint restore target.

  Orbax restores each array directly into this layout (on every host, only
  the shards its devices hold), so a multi-host run never materialises the
  whole state on one device.
  """
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      state, state_shardings(state, mesh, fsdp, min_size))


def place_state(state, mesh: Mesh, fsdp: bool = False, min_size: int = FSDP_MIN_SIZE):
  """Puts ``state`` on the mesh with ``state_shardings``.

  Multi-process: every process passes the same values (same seed or the same
  restored checkpoint); each keeps only its devices' shards.
  """
  return _put(state, state_shardings(state, mesh, fsdp, min_size))


def constrain_batch(batch, mesh: Mesh):
  """Inside ``jit``: pins every leaf of ``batch`` to ``P('data')`` (leading axis over devices).

  Use on a batch drawn on device inside the step (``task.sample``): the
  partitioner then generates and processes each device's rows on that device.
  """
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda a: jax.lax.with_sharding_constraint(a, sharding), batch)


def jit_data_parallel(step: Callable, mesh: Mesh, state: Any = None, fsdp: bool = False,
                      donate: bool = False, min_size: int = FSDP_MIN_SIZE,
                      num_replicated_args: int = 0) -> Callable:
  """Jits ``step(state, *args) -> (state, metrics)`` with the state on the mesh.

  The state (parameters, optimiser state, PRNG key, estimator state) is
  replicated (or FSDP-sharded with ``fsdp=True``) in and out; metrics come out
  replicated. Batches drawn inside ``step`` should be pinned with
  ``constrain_batch`` so that they are split over ``'data'``.

  Args:
    step: a function of the train state (may already be ``jax.jit``-ed).
    mesh: the data mesh.
    state: an example state, arrays or ``jax.ShapeDtypeStruct`` (e.g.
      ``jax.eval_shape(init_state, ...)``); needed only with ``fsdp``.
    fsdp: split large state arrays over ``'data'`` instead of replicating them.
    donate: donate the input state's buffers to the output.
    min_size: with ``fsdp``, arrays smaller than this stay replicated.
    num_replicated_args: how many arguments follow the state (e.g. a data
      key); each is replicated.

  Returns:
    The jitted step. Its input state must already be laid out as declared
    (``place_state``, or a restore into ``abstract_state``).
  """
  if fsdp:
    if state is None:
      raise ValueError("jit_data_parallel(fsdp=True) needs an example state for its shapes.")
    shardings = state_shardings(state, mesh, True, min_size)
  else:
    shardings = replicated(mesh)  # A prefix: every leaf of the state.
  return jax.jit(step, in_shardings=(shardings,) + (replicated(mesh),) * num_replicated_args,
                 out_shardings=(shardings, replicated(mesh)),
                 donate_argnums=(0,) if donate else ())
