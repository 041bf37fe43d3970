"""Where the train step's batches come from: fresh draws, or a finite training set in epochs.

The train step (``latentdiv.train.make_train_step``) draws its batch inside
the jitted program as ``batch = source.batch_at(state.step)``, where
``source`` is an argument of the program (a pytree of device arrays plus
static sizes). Two sources exist (DESIGN.md §8.6, §9):

* ``FreshData`` — a new batch from the task's generator at every step,
  ``task.sample(fold_in(data_key, step), B)`` (``config.data.train_size = 0``);
* ``ArrayDataset`` — a fixed training set of N examples held as device arrays
  (leading axis N), iterated in epochs and reshuffled at every epoch. Example
  ``i`` of the flattened stream (``i = step·B + b``) is
  ``examples[perm_e[i mod N]]`` with ``e = ⌊i / N⌋`` and
  ``perm_e = permutation(fold_in(shuffle_key, e), N)``: every example is seen
  once per epoch, a batch may straddle two epochs, and the batch is a pure
  function of ``(seed, step)``, so a resume mid-epoch continues exactly.

``build(config, task)`` returns a ``Data``: the training source, the held-out
evaluation set and (for a finite set) a fixed slice of the training set that
evaluation also scores, so that over-fitting shows in the curves. For a
synthetic task with ``config.data.train_size = N > 0`` the training set is N
distinct examples drawn once from the seed, none of whose prompts occurs in
the held-out set (the evaluation batch of fresh-data runs,
``task.sample(eval_key, eval.batch_size)``); the training sets of one seed are
nested across N (the first N of one candidate stream). With
``config.data.train_capacity = C > N`` the arrays hold the first C examples
and N is an array: runs with different N ≤ C then share one compiled step. Text datasets read
from files (``latentdiv.text_data``) build the same ``ArrayDataset``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from latentdiv import tasks as tasks_lib

# Candidate draws for a training set of distinct examples: rounds of _ROUND examples,
# at most _MAX_ROUNDS + 2·⌊size/_ROUND⌋ of them before giving up.
_ROUND = 1024
_MAX_ROUNDS = 16


@flax.struct.dataclass
class FreshData:
  """A new batch from the task's generator at every step (an infinite training set).

  Attributes:
    key: the data key; step s draws ``task.sample(fold_in(key, s), batch_size)``.
    task: the task (static).
    batch_size: B (static).
  """

  key: jax.Array
  task: tasks_lib.Task = flax.struct.field(pytree_node=False)
  batch_size: int = flax.struct.field(pytree_node=False)

  def batch_at(self, step: jax.Array) -> tasks_lib.Batch:
    """The batch of ``step`` (jittable; ``step`` may be traced)."""
    return self.task.sample(jax.random.fold_in(self.key, step), self.batch_size)


@flax.struct.dataclass
class ArrayDataset:
  """A fixed set of N examples, iterated in epochs, reshuffled at every epoch.

  The arrays may hold more rows than N (a capacity C ≥ N; rows N..C−1 are
  never drawn), so that runs with different N share one compiled step: N is
  an array, not a shape.

  Attributes:
    examples: a ``tasks.Batch`` whose leaves have a leading axis C ≥ N.
    size: int32 scalar N, the number of examples (the first N rows).
    key: the shuffle key; epoch e uses the permutation ``perm_e`` that sorts
      ``uniform(fold_in(key, e), [C])`` over the first N rows.
    batch_size: B ≤ N (static).
  """

  examples: tasks_lib.Batch
  size: jax.Array
  key: jax.Array
  batch_size: int = flax.struct.field(pytree_node=False)

  def permutation(self, epoch: jax.Array) -> jax.Array:
    """[C] int32: a uniform permutation of 0..N−1 in its first N entries (epoch ``epoch``)."""
    capacity = self.examples.prompt.shape[0]
    u = jax.random.uniform(jax.random.fold_in(self.key, epoch), (capacity,))
    return jnp.argsort(jnp.where(jnp.arange(capacity) < self.size, u, 2.0)).astype(jnp.int32)

  def indices_at(self, step: jax.Array) -> jax.Array:
    """The [B] example indices of ``step``'s batch.

        i_b = step·B + b,   e_b = ⌊i_b / N⌋,   index_b = perm_{e_b}[i_b mod N]

    B ≤ N, so a batch spans at most two epochs (e_0 and e_0 + 1).
    """
    b = self.batch_size
    position = jnp.asarray(step, jnp.int32) * b + jnp.arange(b, dtype=jnp.int32)
    epoch, offset = position // self.size, position % self.size
    first = epoch[0]
    return jnp.where(epoch == first, self.permutation(first)[offset],
                     self.permutation(first + 1)[offset])

  def batch_at(self, step: jax.Array) -> tasks_lib.Batch:
    """The batch of ``step`` (jittable; ``step`` may be traced)."""
    index = self.indices_at(step)
    return jax.tree_util.tree_map(lambda a: a[index], self.examples)


def make_dataset(examples: tasks_lib.Batch, key: jax.Array, batch_size: int,
                 size: Optional[int] = None) -> ArrayDataset:
  """An ``ArrayDataset`` over the first ``size`` rows of ``examples`` (default: all C rows).

  Raises:
    ValueError: ``size`` not in [1, C], ``batch_size`` not in [1, size], or
      size·B too large for int32 stream positions.
  """
  capacity = int(examples.prompt.shape[0])
  chex.assert_equal_shape_prefix(list(examples), 1)
  size = capacity if size is None else int(size)
  if not 1 <= size <= capacity:
    raise ValueError(f"size={size} must be in [1, {capacity}] (the rows of the examples).")
  if not 1 <= batch_size <= size:
    raise ValueError(f"config.train.batch_size={batch_size} must be in [1, {size}] (the number "
                     f"of training examples).")
  if size * batch_size >= 2 ** 30:
    raise ValueError(f"{size} examples with batches of {batch_size} are too many for int32 "
                     "stream positions.")
  return ArrayDataset(examples=jax.tree_util.tree_map(jnp.asarray, examples),
                      size=jnp.asarray(size, jnp.int32), key=jnp.asarray(key),
                      batch_size=batch_size)


class Data(NamedTuple):
  """What a run trains and evaluates on.

  Attributes:
    train: ``FreshData`` or ``ArrayDataset`` (``batch_at(step)`` in the step).
    heldout: the fixed evaluation set (a ``tasks.Batch``).
    train_eval: a fixed slice of the training set of ``len(heldout)`` rows
      (cycling through it when it is smaller) that evaluation also scores;
      None for fresh data.
    text: for a text dataset, ``text_data.TextInfo`` (the tokenizer, the
      held-out prompts and all their references as strings); else None.
  """

  train: FreshData | ArrayDataset
  heldout: tasks_lib.Batch
  train_eval: Optional[tasks_lib.Batch]
  text: Optional[Any] = None


class LazyData:
  """A ``Data`` built on first use (``train``, ``heldout``, ``train_eval``, ``text``).

  Drawing a training set runs (and compiles) JAX code; deferring it until the
  loop asks for the data lets every config check, the objective's included,
  fail before anything compiles.
  """

  def __init__(self, build_fn: Callable[[], Data]):
    self._build_fn, self._data = build_fn, None

  def get(self) -> Data:
    if self._data is None:
      self._data = self._build_fn()
    return self._data

  train = property(lambda self: self.get().train)
  heldout = property(lambda self: self.get().heldout)
  train_eval = property(lambda self: self.get().train_eval)
  text = property(lambda self: self.get().text)


def seed_key(seed: int, stream: int) -> jax.Array:
  """``fold_in(PRNGKey(seed), stream)``: 2 = training batches, 3 = evaluation, 4 = training set."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream)


def cycle_rows(examples: tasks_lib.Batch, rows: int) -> tasks_lib.Batch:
  """``rows`` rows ``examples[r mod N]``, r = 0..rows−1 (the training slice evaluation scores)."""
  n = int(examples.prompt.shape[0])
  index = np.arange(rows) % n
  return jax.tree_util.tree_map(lambda a: a[index], examples)


def _row_keys(array: np.ndarray) -> list[bytes]:
  return [row.tobytes() for row in np.ascontiguousarray(array.reshape(array.shape[0], -1))]


def distinct_training_set(task: tasks_lib.Task, key: jax.Array, size: int,
                          excluded_prompts: np.ndarray) -> tasks_lib.Batch:
  """``size`` distinct examples of ``task``, none with a prompt in ``excluded_prompts``.

  Candidates are drawn in rounds of ``_ROUND`` examples,
  ``task.sample(fold_in(key, r), _ROUND)``, and kept in order of appearance
  when their (prompt, target) is new and their prompt is not excluded; the
  first ``size`` are the training set, so the sets of one key are nested
  across sizes.

  Raises:
    ValueError: the task does not have ``size`` such examples (e.g. a small
      alphabet and short prompts), naming how many were found.
  """
  excluded = set(_row_keys(np.asarray(excluded_prompts)))
  seen, chunks, found = set(), [], 0
  draw = jax.jit(task.sample, static_argnums=1)
  rounds = _MAX_ROUNDS + 2 * (size // _ROUND)
  for r in range(rounds):
    batch = jax.device_get(draw(jax.random.fold_in(key, r), _ROUND))
    prompts, pairs = _row_keys(batch.prompt), _row_keys(
        np.concatenate([batch.prompt, batch.target], axis=1))
    keep = []
    for i, (prompt, pair) in enumerate(zip(prompts, pairs)):
      if prompt in excluded or pair in seen:
        continue
      seen.add(pair)
      keep.append(i)
      if found + len(keep) == size:
        break
    chunks.append(jax.tree_util.tree_map(lambda a, k=np.array(keep, int): a[k], batch))
    found += len(keep)
    if found == size:
      return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *chunks)
  raise ValueError(
      f"config.data.train_size={size} is more than the task can supply: only {found} "
      f"distinct examples with prompts outside the held-out set were found in "
      f"{rounds * _ROUND} draws. Use a smaller train_size or a larger task "
      f"(alphabet_size, prompt_len).")


def build(config, task: tasks_lib.Task) -> Data:
  """The ``Data`` of a synthetic task's config (``config.data.train_size``; 0 = fresh data).

  The held-out set is ``task.sample(eval_key, eval.batch_size)`` in both
  regimes, so fresh-data and finite-set runs of a seed are evaluated on the
  same prompts.
  """
  heldout = task.sample(seed_key(config.seed, 3), config.eval.batch_size)
  size = config.data.train_size
  if size == 0:
    return Data(FreshData(key=seed_key(config.seed, 2), task=task,
                          batch_size=config.train.batch_size), heldout, None)
  capacity = max(size, config.data.train_capacity)
  examples = distinct_training_set(task, seed_key(config.seed, 4), capacity,
                                   np.asarray(heldout.prompt))
  train = make_dataset(examples, seed_key(config.seed, 2), config.train.batch_size, size)
  first = jax.tree_util.tree_map(lambda a: a[:size], examples)
  return Data(train, heldout, cycle_rows(first, config.eval.batch_size))


def for_config(config, load_data: bool = True):
  """``(task, data)`` of a synthetic task's config: the task and its ``build``.

  (A text task's come from ``text_data.build``; ``train.build_setup`` picks.)

  Args:
    config: the validated config.
    load_data: also build the data (a ``LazyData``, drawn on first use; else
      None: loading a trained model).
  """
  task = tasks_lib.from_config(config.task)
  return task, (LazyData(lambda: build(config, task)) if load_data else None)
