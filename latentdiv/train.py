"""What every objective shares: the train state, the ONE train step, and its binding to the host loop.

An objective (``latentdiv.objectives``) supplies its loss, its extra state and
its evaluation; this module supplies everything else (nanodo's
``Trainer(get_loss_fn=…)``, tunix's distillation trainer that overrides only
the loss):

* ``TrainState`` — step, parameters, Optax state, PRNG key, the objective's
  ``extra`` state, the non-finite counters;
* ``make_train_step`` — the ONE step builder: draw the batch on device from
  the data source (``setup.data.train.batch_at(step)``: fresh draws from
  ``fold_in(data_key, step)``, or a finite training set in reshuffled epochs,
  ``latentdiv.datasets``), ``grad(objective.loss)``, Optax update, skip the
  update if the loss or gradient is not finite; data parallel on a mesh;
* ``train_and_evaluate`` — binds the step, the evaluation and the objective's
  progress lines to the host loop (``latentdiv.loop.run_loop``: resume,
  logging, evaluation cadence, checkpoints, SIGTERM/SIGINT, the non-finite
  stop) and writes ``summary.json``.

This module imports no objective. ``latentdiv.experiment.train_and_evaluate``
picks the objective named by ``config.objective.name`` and calls the one here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from latentdiv import config as config_lib
from latentdiv import datasets
from latentdiv import loop
from latentdiv import model as model_lib
from latentdiv import sharding
from latentdiv import tasks as tasks_lib
from latentdiv import text_data
from latentdiv import workdir as workdir_lib

# The loop's structural fields: a resume that changes one cannot restore the state.
STRUCTURAL_FIELDS = ("task", "data", "model", "optim.grad_clip_norm", "objective.name")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes (and a checkpoint holds).

  Attributes:
    step: scalar int32, the number of updates applied.
    params: model parameters.
    opt_state: Optax state.
    rng: PRNG key (raw uint32[2]) for the step's sampling.
    extra: the objective's state carried across steps (EMA baseline,
      control-variate fit); a dict of arrays, empty when unused.
    nonfinite_streak: consecutive steps (ending now) whose loss or gradient was
      not finite; such a step leaves params, opt_state and extra unchanged.
    nonfinite_total: all such steps of the run.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extra: dict
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


class Setup(NamedTuple):
  """What the loop's config sections build once: the task, the model, the optimiser, the data.

  ``data`` (``datasets.LazyData``, built on first use) holds the training
  source the step draws from, the held-out evaluation set and the training
  slice evaluation also scores; None when built without data
  (``build_setup(..., load_data=False)``).
  """

  config: ml_collections.ConfigDict
  task: tasks_lib.Task
  model: model_lib.LatentTransformer
  optimizer: optax.GradientTransformation
  data: Optional[datasets.LazyData] = None


class Objective:
  """What an objective provides to the loop. Subclass it; override ``loss`` at least.

  Class attributes (read before anything is built):

  * ``name`` — the value of ``config.objective.name`` that selects it;
  * ``structural_fields`` — dotted config paths whose change makes a
    checkpoint unrestorable or meaningless (a resume is refused);
  * ``eval_at_start`` — also evaluate a fresh run at step 0.

  Class methods: ``default_config()`` (its ``objective`` section, with
  ``name``), ``validate(config)`` (that section, raising ValueError before
  anything is built), ``format_summary(summary)`` (what ``run.py`` prints).

  An instance is built from a ``Setup`` (its ``__init__`` may raise ValueError
  for what needs the task, e.g. a length longer than the task's targets).
  Nothing compiles until the loop calls ``make_evaluate`` or the step.
  """

  name: str = ""
  structural_fields: tuple[str, ...] = ()
  eval_at_start: bool = False

  def __init__(self, setup: Setup):
    self.setup = setup
    self.config = setup.config

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    raise NotImplementedError

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:  # pylint: disable=unused-argument
    return None

  @classmethod
  def structure(cls, record: dict) -> dict:
    """The structural values of a config record (flat dict); override for derived ones."""
    return workdir_lib.select(record, STRUCTURAL_FIELDS + cls.structural_fields)

  @classmethod
  def format_summary(cls, summary: dict) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in summary.items())

  def init_extra(self) -> dict:
    """The objective's part of the state at step 0 (arrays only)."""
    return {}

  def initial_params(self, params):
    """The parameters a fresh run starts from (default: the seed's initialisation)."""
    return params

  def frozen(self) -> Any:
    """Non-differentiated inputs of the step and evaluation (e.g. a teacher's parameters)."""
    return ()

  def loss(self, params, frozen, extra: dict, batch: tasks_lib.Batch, key: jax.Array,
           step: jax.Array):
    """``(loss, (metrics, new_extra))`` for one batch; the loop differentiates ``loss``."""
    raise NotImplementedError

  def make_evaluate(self, mesh: jax.sharding.Mesh | None) -> Callable[[Any, Any], dict]:
    """A (jitted) ``evaluate(params, frozen) -> dict`` on a fixed evaluation set."""
    raise NotImplementedError

  def train_line(self, metrics: dict) -> str:
    """The objective's part of a progress line (host floats)."""
    return f"loss {metrics['loss']:.4f}"

  def eval_line(self, result: dict) -> str:
    return ""

  def summary(self, state: TrainState, result: dict, seconds_per_step: float) -> dict:
    """``summary.json`` from the final state, evaluation and step time."""
    return dict(steps=int(state.step), task=self.config.task.name,
                nonfinite_steps=int(state.nonfinite_total),
                **{k: v for k, v in result.items() if k != "samples"})


def build_setup(config: ml_collections.ConfigDict, workdir: str | None = None,
                load_data: bool = True) -> Setup:
  """The task, model, optimiser and data of the loop's (already validated) config sections.

  Args:
    config: the validated config.
    workdir: the run's directory, for what a task keeps there (a text
      task's tokenizer); None: nothing is read or written there.
    load_data: build ``Setup.data`` (the training set and evaluation sets);
      False for loading a trained model only.

  Raises:
    ValueError: the task's, the data's or the model's fields are inconsistent
      (for data files: naming the file and line).
  """
  if config.task.name == text_data.NAME:  # JSONL files; the tokenizer kept in the workdir.
    task, data = text_data.build(config, workdir, load_data)
  else:
    task, data = datasets.for_config(config, load_data)
  m = config.model
  model_config = model_lib.ModelConfig(
      vocab_size=task.vocab_size, num_latents=m.num_latents,
      max_len=task.prompt_len + task.target_len, d_model=m.d_model, num_heads=m.num_heads,
      num_layers=m.num_layers, d_ff=m.d_ff, dtype=m.dtype)
  model_config.validate()
  return Setup(config, task, model_lib.LatentTransformer(model_config), make_optimizer(config),
               data)


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate after ``count`` applied updates: linear warmup, then constant or cosine."""
  o = config.optim
  steps = config.train.num_steps
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, o.warmup_steps, max(steps, o.warmup_steps + 1),
        end_value=0.1 * o.learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
       optax.constant_schedule(o.learning_rate)], [o.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with ``make_schedule``'s learning rate, after global-norm clipping."""
  o = config.optim
  chain = [optax.adamw(make_schedule(config), weight_decay=o.weight_decay)]
  if o.grad_clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(o.grad_clip_norm))
  return optax.chain(*chain)


def _fresh_state(setup: Setup, objective: Objective, seed) -> TrainState:
  init_key, rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 1))
  params = model_lib.init_params(setup.model, init_key)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=setup.optimizer.init(params), rng=rng,
                    extra=objective.init_extra(), nonfinite_streak=zero, nonfinite_total=zero)


def init_state(setup: Setup, objective: Objective) -> TrainState:
  """The state at step 0: parameters from ``config.seed`` (or ``objective.initial_params``).

  Compiled with the seed as an argument, so seeds share the program.
  """
  state = jax.jit(lambda seed: _fresh_state(setup, objective, seed))(setup.config.seed)
  params = objective.initial_params(state.params)
  if params is not state.params:  # e.g. a student checkpoint: a fresh optimiser state for it.
    state = state.replace(params=params, opt_state=setup.optimizer.init(params))
  # Committed to the device, like every later state (and a restored teacher): the
  # step then compiles once, not once for this state and again for its outputs.
  return jax.device_put(state, jax.local_devices()[0])


def data_key(config) -> jax.Array:
  """The key of the training batches: ``fold_in(·, step)`` (fresh data) or the epoch shuffles."""
  return datasets.seed_key(config.seed, 2)


def eval_key(config) -> jax.Array:
  """The key of the fixed evaluation batch (and, folded in, of its samples)."""
  return datasets.seed_key(config.seed, 3)


class BoundJit:
  """A jitted ``fn(x, *bound)`` with its trailing arguments bound: ``f(x)``.

  The bound arrays (a seed's data key, the evaluation batch, a teacher's
  parameters) are ARGUMENTS of the compiled program rather than constants
  inside it, so runs that differ only in their seed compile to the same
  program (a hit in JAX's persistent compilation cache across a sweep).
  ``lower`` and ``_cache_size`` are the jitted function's, for inspection.
  """

  def __init__(self, jitted: Callable, *bound):
    self._jitted, self.bound_args = jitted, bound
    self.__name__ = getattr(jitted, "__name__", "bound_jit")

  def __call__(self, x):
    return self._jitted(x, *self.bound_args)

  def lower(self, x):
    """The jitted function lowered at ``(x, *bound_args)``."""
    return self._jitted.lower(x, *self.bound_args)

  def _cache_size(self) -> int:
    return self._jitted._cache_size()  # pylint: disable=protected-access


def make_train_step(setup: Setup, objective: Objective, mesh: jax.sharding.Mesh | None = None,
                    frozen: Any = ()) -> BoundJit:
  """The jitted ``train_step(state) -> (state, metrics)``: grad → Optax update → non-finite guard.

  ``metrics`` holds the objective's, ``grad_norm``, ``learning_rate`` (the
  rate of this step's update) and ``nonfinite_steps`` (the run's total).

  Args:
    setup: from ``build_setup`` (with data): the step draws
      ``setup.data.train.batch_at(step)``, the source bound as an argument.
    objective: supplies ``loss(params, frozen, extra, batch, key, step)``.
    mesh: optional 1-D data mesh (``sharding.make_mesh``): the batch drawn
      inside the step is split over its devices, the state replicated (or
      FSDP-sharded with ``config.train.fsdp``) in and out, and XLA all-reduces
      the gradient (DESIGN.md §10). The input state must already have that
      layout (``sharding.place_state``). Without it, a plain ``jax.jit``.
    frozen: ``objective.frozen()``, placed like the state (replicated on the
      mesh); bound as an argument of the program, never differentiated.

  Returns:
    A ``BoundJit`` (``.lower(state)`` gives the program).
  """
  config = setup.config
  schedule = make_schedule(config)

  def train_step(state: TrainState, source, frozen):
    batch = source.batch_at(state.step)
    if mesh is not None:
      batch = sharding.constrain_batch(batch, mesh)
    rng, key = jax.random.split(state.rng)
    loss_fn = lambda p: objective.loss(p, frozen, state.extra, batch, key, state.step)  # noqa: E731
    grads, (aux, extra) = jax.grad(lambda p: _with_loss(loss_fn(p)), has_aux=True)(
        state.params)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux["grad_norm"] = optax.global_norm(grads)
    # The rate this step's update used: Optax counts applied updates only.
    aux["learning_rate"] = schedule(state.step - state.nonfinite_total)
    # A non-finite loss or gradient skips the update: params, optimiser and
    # estimator state stay as they were (optax.apply_if_finite checks only the
    # gradients and eventually applies them anyway; we stop the run instead).
    finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(aux["grad_norm"])
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    aux["nonfinite_steps"] = state.nonfinite_total + (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, rng=rng, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state), extra=keep(extra, state.extra),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=aux["nonfinite_steps"])
    return new_state, aux

  if mesh is None:
    jitted = jax.jit(train_step)
  else:
    jitted = sharding.jit_data_parallel(
        train_step, mesh, jax.eval_shape(lambda: _fresh_state(setup, objective, 0)),
        fsdp=config.train.fsdp, num_replicated_args=2)
  source = setup.data.train
  return BoundJit(jitted, source if mesh is None else sharding.replicate(source, mesh), frozen)


def _with_loss(out):
  loss, (aux, extra) = out
  return loss, (dict(aux, loss=loss), extra)


def make_data_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The 1-D data mesh over every device (of every process), batch sizes checked against it.

  Raises:
    ValueError: ``config.train.batch_size`` or ``config.eval.batch_size`` is
      not a multiple of the number of devices.
  """
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
  sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
  return mesh


def _duration(seconds: float) -> str:
  """``'1h02m'``, ``'3m05s'`` or ``'42s'``."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(at: int, num_steps: int, objective_part: str, rate: float) -> str:
  """``step 50/1000 (5%)  <objective's quantities>  12.3 steps/s  ETA 1m17s``."""
  eta = _duration((num_steps - at) / rate) if rate > 0 and at < num_steps else "0s"
  return (f"step {at:6d}/{num_steps} ({100 * at / num_steps:3.0f}%)  {objective_part}  "
          f"{rate:.1f} steps/s  ETA {eta}")


def train_and_evaluate(setup: Setup, objective: Objective, workdir: str,
                       accept_changes: bool = False) -> dict:
  """Trains ``objective`` (resuming from ``workdir``), evaluates, writes ``summary.json``.

  Writes to ``workdir``: ``checkpoints/`` (Orbax, with checksums),
  TensorBoard event files, ``config.json`` and ``config_history.jsonl``,
  ``metrics.jsonl`` (one line per log step and evaluation) and
  ``summary.json`` (``objective.summary``).

  Reliability (DESIGN.md §11): a second run on a busy workdir is refused
  (``workdir.WorkdirBusyError``); a config that differs from the workdir's
  is refused before anything is restored or compiled, listing every changed
  field (``workdir.ConfigMismatchError``) — structural changes always,
  others unless ``accept_changes`` (a lower learning rate after a
  non-finite stop needs no flag); a checkpoint that fails its checksum or
  does not load is reported and an older one used; a train step that cannot
  fit the device is refused after compiling, before the first step
  (``memory.DeviceMemoryError``); SIGTERM and SIGINT save a checkpoint and
  raise ``Interrupted``; a step with a non-finite loss or gradient leaves the
  state unchanged, and ``train.max_nonfinite_steps`` of them in a row raise
  ``NonFiniteError``.

  Args:
    setup: from ``build_setup``.
    objective: the objective, built from ``setup``.
    workdir: the run's directory (created if needed).
    accept_changes: continue a run whose config changed in non-structural fields.

  Returns:
    The summary dict.
  """
  config = setup.config
  mesh = make_data_mesh(config)
  workdir_lib.check_usable(workdir)  # Creates it; WorkdirError (one line) if it cannot.
  with workdir_lib.lock_for_this_process(workdir):
    defaults = dict(workdir_lib.config_record(config_lib.loop_config()),
                    objective=workdir_lib.config_record(objective.default_config()))
    changes = workdir_lib.check_resume(
        workdir, workdir_lib.config_record(config), objective.structure,
        accept_changes=accept_changes, defaults=defaults)
    fsdp = config.train.fsdp
    if mesh.devices.size > 1:
      print(f"Data parallel over {mesh.devices.size} devices "
            f"({'FSDP' if fsdp else 'replicated'} state).", flush=True)
    frozen = sharding.replicate(objective.frozen(), mesh)
    state = init_state(setup, objective)
    step = make_train_step(setup, objective, mesh, frozen)
    evaluate = objective.make_evaluate(mesh)
    num_steps = config.train.num_steps

    def train_line(at, aux, rate):
      return progress_line(at, num_steps, objective.train_line(aux), rate)

    def eval_line(at, result):
      return f"eval @ {at}: {objective.eval_line(result)}"

    state, result, seconds_per_step = loop.run_loop(
        config, workdir, initial_state=state,
        restore_target=sharding.abstract_state(state, mesh, fsdp),
        place=lambda s: sharding.place_state(s, mesh, fsdp), step=step,
        evaluate=lambda s: workdir_lib.to_python(jax.device_get(evaluate(s.params, frozen))),
        train_line=train_line, eval_line=eval_line, eval_at_start=objective.eval_at_start,
        changes=changes)
    summary = objective.summary(state, result, seconds_per_step)
    workdir_lib.write_summary(workdir, summary)
    return summary
