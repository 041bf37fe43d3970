"""The training loop: one jitted step over an explicit train state, evaluation, checkpoints.

``train_and_evaluate(config, workdir)`` is what ``run.py`` calls. It validates
the config before anything compiles, resumes from the newest readable
checkpoint in ``workdir``, trains, evaluates and writes ``summary.json``.

The step (``make_train_step``) draws its batch on device from
``fold_in(data_key, step)`` (so the data order resumes exactly), computes

    loss = L_rec − λ_jsd · Ĵ − w_pg(step) · D̂_seq          (DESIGN.md §3–5)

and applies one Optax update: a single XLA program, no Python loop over time
steps or latents. With a data mesh (``latentdiv.sharding``) the same step runs
data-parallel over every device.

``run_loop`` is the host loop around a step (resume, log, evaluate,
checkpoint, signals); ``distill.train_and_evaluate`` uses it too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from latentdiv import checkpointing
from latentdiv import config as config_lib
from latentdiv import divergences
from latentdiv import metrics as metrics_lib
from latentdiv import model as model_lib
from latentdiv import raml
from latentdiv import reconstruction
from latentdiv import sampling
from latentdiv import seq_kl
from latentdiv import sharding
from latentdiv import tasks as tasks_lib
from latentdiv import vocab


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes (and a checkpoint holds).

  Attributes:
    step: scalar int32, the number of updates applied.
    params: model parameters.
    opt_state: Optax state.
    rng: PRNG key (raw uint32[2]) for the step's sampling.
    extra: estimator state carried across steps (EMA baseline, control-variate
      fit); a dict of arrays, empty when unused.
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
  """What a config builds once: the task, the model and the optimiser."""

  config: ml_collections.ConfigDict
  task: tasks_lib.Task
  model: model_lib.LatentTransformer
  optimizer: optax.GradientTransformation


def task_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The keyword arguments of ``tasks.make_task`` for ``config.task``."""
  t = config.task
  kwargs = dict(alphabet_size=t.alphabet_size, prompt_len=t.prompt_len)
  if t.name == "early_divergence":
    kwargs.update(num_strategies=t.num_strategies, shift=t.shift)
  elif t.name == "late_divergence":
    kwargs.update(num_strategies=t.num_strategies, num_divergent=t.num_divergent,
                  variant=t.variant, shift=t.shift)
  else:
    kwargs.update(min_len=t.min_len, transform=t.transform)
  return kwargs


def build(config: ml_collections.ConfigDict) -> Setup:
  """Validates ``config`` and builds the task, model and optimiser (nothing compiles).

  Raises:
    ValueError: naming the invalid field, its value and what is allowed.
  """
  config_lib.validate(config)
  try:
    task = tasks_lib.make_task(config.task.name, **task_kwargs(config))
  except ValueError as err:
    raise ValueError(f"config.task is inconsistent: {err}") from err
  t_len = task.target_len
  if config.seq_pg.rollout_len > t_len:
    raise ValueError(
        f"config.seq_pg.rollout_len (L) must be in [1, {t_len}] (the task's target "
        f"length), got {config.seq_pg.rollout_len}.")
  if config.objective.jsd_prefix_len > t_len:
    raise ValueError(
        f"config.objective.jsd_prefix_len must be in [1, {t_len}], got "
        f"{config.objective.jsd_prefix_len}.")
  model_config = model_lib.ModelConfig(
      vocab_size=task.vocab_size, num_latents=config.model.num_latents,
      max_len=task.prompt_len + t_len, d_model=config.model.d_model,
      num_heads=config.model.num_heads, num_layers=config.model.num_layers,
      d_ff=config.model.d_ff, dtype=config.model.dtype)
  model_config.validate()
  return Setup(config, task, model_lib.LatentTransformer(model_config),
               make_optimizer(config))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warmup then constant or cosine decay, after global-norm clipping."""
  o = config.optim
  steps = config.train.num_steps
  if o.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, o.warmup_steps, max(steps, o.warmup_steps + 1),
        end_value=0.1 * o.learning_rate)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
         optax.constant_schedule(o.learning_rate)], [o.warmup_steps])
  chain = [optax.adamw(schedule, weight_decay=o.weight_decay)]
  if o.grad_clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(o.grad_clip_norm))
  return optax.chain(*chain)


def init_state(setup: Setup) -> TrainState:
  """The state at step 0 (parameters from ``config.seed``)."""
  key = jax.random.PRNGKey(setup.config.seed)
  init_key, rng = jax.random.split(jax.random.fold_in(key, 1))
  params = model_lib.init_params(setup.model, init_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=setup.optimizer.init(params), rng=rng,
                    extra=_init_extra(setup), nonfinite_streak=jnp.zeros((), jnp.int32),
                    nonfinite_total=jnp.zeros((), jnp.int32))


def _init_extra(setup: Setup) -> dict:
  return seq_kl.init_state(setup.config) if setup.config.seq_pg.lambda_pg > 0 else {}


def data_key(config) -> jax.Array:
  """The key whose ``fold_in(·, step)`` draws the training batch of ``step``."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)


def eval_key(config) -> jax.Array:
  """The key of the fixed evaluation batch (and, folded in, of its samples)."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)


def latent_logits(setup: Setup, params, prompt_BxP, target_BxT) -> jax.Array:
  """Teacher-forced logits of every latent, [B, K, T, V], in one pass vmapped over K."""
  batch = prompt_BxP.shape[0]

  def one(latent):
    return model_lib.teacher_forced_logits(setup.model, params, prompt_BxP, target_BxT,
                                           jnp.full((batch,), latent, jnp.int32))

  return jax.vmap(one, out_axes=1)(jnp.arange(setup.model.config.num_latents))


def content_alphabet(setup: Setup) -> tuple[int, int]:
  """The id range ``[lo, hi)`` of content tokens (what RAML samplers may write)."""
  return vocab.FIRST_CONTENT, setup.task.vocab_size


def _loglik_BxK(logits_BxKxTxV, target_BxT, mask_BxT):
  return jax.vmap(jax.vmap(reconstruction.sequence_log_likelihood, (0, None, None)))(
      logits_BxKxTxV, target_BxT, mask_BxT)


def reconstruction_loglik(setup: Setup, params, batch: tasks_lib.Batch, logits_BxKxTxV,
                          key) -> jax.Array:
  """The [B, K] per-latent log-likelihood terms the reconstruction loss is built from.

  ``objective.targets`` chooses what they score (DESIGN §3, §8):

  * ``data``: ``log p_k(y* | x)``;
  * ``label_smoothing``: ``−CE((1−ε)·onehot(y*) + ε·π, p_k)`` summed over tokens;
  * ``raml``: ``(1/N) Σ_n log p_k(y⁽ⁿ⁾ | x)`` with ``y⁽ⁿ⁾ ~ q(· | y*; τ)`` drawn
    here, inside the jitted step (``raml.sample_raml_targets``).
  """
  objective = setup.config.objective
  r = setup.config.raml
  if objective.targets == "data":
    return _loglik_BxK(logits_BxKxTxV, batch.target, batch.target_mask)
  if objective.targets == "label_smoothing":
    smoothed = functools.partial(raml.label_smoothing_loss, epsilon=r.epsilon,
                                 prior="uniform", alphabet=content_alphabet(setup))
    return -jax.vmap(jax.vmap(smoothed, (0, None, None)))(
        logits_BxKxTxV, batch.target, batch.target_mask)
  editable = jax.vmap(raml.editable_mask)(batch.target)
  samples = raml.sample_raml_targets(key, batch.target, editable, r.num_samples,
                                     content_alphabet(setup), r.tau, r.convention,
                                     reward=r.reward).tokens  # [B, N, T]
  masks = jax.vmap(jax.vmap(raml.output_mask))(samples)
  batch_size, num_samples, t_len = samples.shape
  flat = lambda a: a.reshape((batch_size * num_samples,) + a.shape[2:])  # noqa: E731
  logits = latent_logits(setup, params, jnp.repeat(batch.prompt, num_samples, axis=0),
                         flat(samples))
  loglik = _loglik_BxK(logits, flat(samples), flat(masks))
  return jnp.mean(loglik.reshape(batch_size, num_samples, -1), axis=1)


def teacher_forced_terms(setup: Setup, params, batch: tasks_lib.Batch, key=None):
  """Reconstruction and token-JSD terms of the loss on a batch (DESIGN §3–4, §8).

  Returns:
    (data logits [B, K, T, V], ``ReconstructionOutput``, ``TokenJSD`` batched,
    NLL per token of the best latent on the data).
  """
  cfg = setup.config.objective
  logits_BxKxTxV = latent_logits(setup, params, batch.prompt, batch.target)
  data_loglik = _loglik_BxK(logits_BxKxTxV, batch.target, batch.target_mask)
  if cfg.targets == "data" or key is None:
    loglik_BxK = data_loglik
  else:
    loglik_BxK = reconstruction_loglik(setup, params, batch, logits_BxKxTxV, key)
  rec = reconstruction.reconstruction_loss(cfg.reconstruction, loglik_BxK)
  # jsd_prefix_len belongs to the 'prefix' weighting only ('uniform' is over all
  # valid tokens); token_weights would also truncate 'uniform' if given it.
  prefix_len = cfg.jsd_prefix_len if cfg.jsd_weighting == "prefix" else None
  jsd_fn = functools.partial(divergences.token_jsd, weighting=cfg.jsd_weighting,
                             prefix_len=prefix_len)
  jsd = jax.vmap(jsd_fn)(logits_BxKxTxV, batch.target_mask)
  num_tokens = jnp.maximum(jnp.sum(batch.target_mask), 1)
  best_nll = -jnp.sum(jnp.max(data_loglik, axis=1)) / num_tokens
  return logits_BxKxTxV, rec, jsd, best_nll


def pg_weight(config, step) -> jax.Array:
  """λ_pg · ramp: 0 for ``warmup_steps``, then linear to λ_pg over ``ramp_steps`` (§5.5)."""
  s = config.seq_pg
  ramp = jnp.clip((step - s.warmup_steps + 1) / max(s.ramp_steps, 1), 0.0, 1.0)
  return jnp.where(step < s.warmup_steps, 0.0, s.lambda_pg * ramp)


def make_train_step(setup: Setup, mesh: jax.sharding.Mesh | None = None):
  """The jitted ``train_step(state) -> (state, metrics)`` for ``setup``.

  A ``BoundJit``: the run's data key is bound as an argument of the compiled
  program, so seeds share it (``.lower(state)`` gives the program).

  Args:
    setup: from ``build``.
    mesh: optional 1-D data mesh (``sharding.make_mesh``). With it the batch
      drawn inside the step is split over the mesh's devices, the state is
      replicated (or FSDP-sharded with ``config.train.fsdp``) in and out, and
      XLA all-reduces the gradient: data parallelism (DESIGN.md §10). The
      input state must already have that layout (``sharding.place_state``).
      Without it, a plain ``jax.jit`` on the default device.
  """
  config = setup.config
  dkey = data_key(config)
  use_pg = config.seq_pg.lambda_pg > 0

  def loss_fn(params, state, batch, key):
    raml_key, key = jax.random.split(key)
    logits, rec, jsd, best_nll = teacher_forced_terms(setup, params, batch, raml_key)
    token_jsd = jnp.mean(jsd.value)
    loss = rec.loss - config.objective.lambda_jsd * token_jsd
    aux = dict(rec_loss=rec.loss, token_jsd=token_jsd, nll_per_token=best_nll,
               **{f"usage/{k}": u for k, u in enumerate(rec.usage)})
    new_extra = state.extra
    if use_pg:
      weight = pg_weight(config, state.step)
      pg = seq_kl.seq_pg_terms(setup, params, batch, key, state.extra,
                               jax.lax.stop_gradient(logits))
      loss = loss + weight * pg.surrogate
      aux.update(pg.metrics, pg_weight=weight)
      new_extra = pg.extra
    aux["loss"] = loss
    return loss, (aux, new_extra)

  def train_step(state: TrainState, dkey: jax.Array):
    batch = setup.task.sample(jax.random.fold_in(dkey, state.step), config.train.batch_size)
    if mesh is not None:
      batch = sharding.constrain_batch(batch, mesh)
    rng, key = jax.random.split(state.rng)
    grads, (aux, extra) = jax.grad(loss_fn, has_aux=True)(state.params, state, batch, key)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux["grad_norm"] = optax.global_norm(grads)
    # A non-finite loss or gradient skips the update: params, optimiser and
    # estimator state stay as they were (optax.apply_if_finite checks only the
    # gradients and eventually applies them anyway; we stop the run instead).
    finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(aux["grad_norm"])
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    aux["nonfinite_steps"] = state.nonfinite_total + (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, rng=rng,
        params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        extra=keep(extra, state.extra), nonfinite_streak=streak,
        nonfinite_total=aux["nonfinite_steps"])
    return new_state, aux

  if mesh is None:
    jitted = jax.jit(train_step)
  else:
    jitted = sharding.jit_data_parallel(
        train_step, mesh, jax.eval_shape(lambda: init_state(setup)), fsdp=config.train.fsdp,
        num_replicated_args=1)
  return BoundJit(jitted, dkey)


class BoundJit:
  """A jitted ``fn(x, *bound)`` with its trailing arguments bound: ``f(x)``.

  The bound arrays (a seed's data key, the evaluation batch) are ARGUMENTS of
  the compiled program rather than constants inside it, so runs that differ
  only in their seed compile to the same program (a hit in JAX's persistent
  compilation cache, ``jax_compilation_cache_dir``, across a sweep).
  ``lower`` and ``_cache_size`` are the jitted function's, for inspection.
  """

  def __init__(self, jitted: Callable, *bound):
    self._jitted, self.bound_args = jitted, bound
    self.__name__ = getattr(jitted, "__name__", "bound_jit")

  def __call__(self, x):
    return self._jitted(x, *self.bound_args)

  def lower(self, x):
    """The jitted function lowered at ``(x, *bound_args)``; its compiled form takes all of them."""
    return self._jitted.lower(x, *self.bound_args)

  def _cache_size(self) -> int:
    return self._jitted._cache_size()  # pylint: disable=protected-access


def make_evaluate(setup: Setup, mesh: jax.sharding.Mesh | None = None):
  """The jitted ``evaluate(params) -> metrics`` on a fixed evaluation batch.

  With ``mesh`` the evaluation batch is split over the mesh's devices (as in
  ``make_train_step``); the parameters keep the layout they come with.

  Samples one output per (example, latent) at temperature 1 (or greedily with
  ``config.eval.greedy``), matches them against the hidden strategies' valid
  outputs, and scores the teacher-forced objective terms on the batch.
  """
  config = setup.config
  task = setup.task
  ekey = eval_key(config)
  eval_batch = task.sample(ekey, config.eval.batch_size)
  num_latents = setup.model.config.num_latents
  lo, hi = content_alphabet(setup)

  @jax.jit
  def evaluate(params, batch, eval_key):
    if mesh is not None:
      batch = sharding.constrain_batch(batch, mesh)
    rollout = sampling.sample_latents(setup.model, params, batch.prompt,
                                      jax.random.fold_in(eval_key, 1), task.target_len,
                                      greedy=config.eval.greedy)
    matches = metrics_lib.match_strategies(rollout.tokens, batch.valid_outputs)
    coverage = metrics_lib.strategy_coverage(matches, task.num_strategies)
    _, rec, jsd, best_nll = teacher_forced_terms(setup, params, batch)
    # Monte-Carlo sequence KL between latents on the samples (DESIGN §9).
    logits = sampling.score_latents(setup.model, params, batch.prompt, rollout.tokens)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits),
                               rollout.tokens[:, :, None, :, None], -1)[..., 0]
    kl = metrics_lib.mc_sequence_kl(logp, rollout.mask)
    # Transduction metrics (DESIGN §9): greedy decodes of the best latent on the data.
    greedy = sampling.sample_latents(setup.model, params, batch.prompt, eval_key,
                                     task.target_len, greedy=True)
    best = rec.winners[:, None, None]
    decoded = jnp.take_along_axis(greedy.tokens, best, axis=1)[:, 0]
    content_len = lambda y: jnp.sum(raml.editable_mask(y))  # noqa: E731
    distance = jax.vmap(lambda a, b: raml.edit_distance(a, content_len(a), b, content_len(b)))(
        decoded, batch.target)
    # KL(q || p) of the payoff distribution to the model (RAML's distillation view).
    editable = jax.vmap(raml.editable_mask)(batch.target)
    r = config.raml
    q_samples = raml.sample_raml_targets(jax.random.fold_in(eval_key, 2), batch.target,
                                         editable, 4, (lo, hi), r.tau, r.convention).tokens
    log_q = jax.vmap(jax.vmap(raml.hamming_log_prob, (0, None, None, None, None, None)),
                     (0, 0, 0, None, None, None))(q_samples, batch.target, editable,
                                                  (lo, hi), r.tau, r.convention)
    n = q_samples.shape[1]
    q_flat = q_samples.reshape((-1, q_samples.shape[-1]))
    q_logits = model_lib.teacher_forced_logits(
        setup.model, params, jnp.repeat(batch.prompt, n, axis=0), q_flat,
        jnp.repeat(rec.winners, n, axis=0))
    log_p = jax.vmap(raml.sequence_log_likelihood)(
        q_logits, q_flat, jax.vmap(raml.output_mask)(q_flat)).reshape(log_q.shape)
    return dict(
        exact_match=jnp.mean(metrics_lib.exact_match(decoded, batch.target)),
        edit_distance=jnp.mean(distance),
        kl_payoff_to_model=jnp.mean(log_q - log_p),
        validity=metrics_lib.per_latent_validity(matches),
        coverage=coverage.coverage,
        assignment=coverage.assignment,
        nmi=metrics_lib.latent_strategy_nmi(matches, task.num_strategies),
        confusion=metrics_lib.confusion(matches, task.num_strategies),
        latent_usage=metrics_lib.latent_usage(rec.winners, num_latents),
        token_jsd=jnp.mean(jsd.value),
        nll=best_nll,
        seq_kl=kl.mean,
        seq_kl_stderr=kl.stderr,
        samples=rollout.tokens[:4],
    )

  return BoundJit(evaluate, eval_batch, ekey), eval_batch


def _to_python(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), tree)


def _write_scalars(writer, step, metrics: dict, prefix: str):
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      writer.add_scalar(f"{prefix}/{name}", float(value), step)
    elif value.ndim == 1 and name in ("validity", "latent_usage"):
      for k, v in enumerate(value):
        writer.add_scalar(f"{prefix}/{name}/{k}", float(v), step)


def _config_record(config) -> dict:
  return json.loads(config.to_json_best_effort())


# Config fields that change the shapes or structure of the train state: a resume
# with a different value cannot restore the checkpoint, so it is refused up front.
STRUCTURAL_FIELDS = ("task", "model", "seq_pg.lambda_pg", "seq_pg.baseline",
                     "seq_pg.rollout_len", "optim.grad_clip_norm")


def _flatten(record: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in record.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def structural_differences(old: dict, new: dict) -> list[str]:
  """``'field: old -> new'`` for every structural field that differs between two config records."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  diffs = []
  for path in sorted(set(old_flat) | set(new_flat)):
    if not any(path == f or path.startswith(f + ".") for f in STRUCTURAL_FIELDS):
      continue
    a, b = old_flat.get(path), new_flat.get(path)
    if path == "seq_pg.lambda_pg":  # Only whether the term is on changes the state.
      a, b = a is not None and a > 0, b is not None and b > 0
      path = "seq_pg.lambda_pg > 0"
    if a != b:
      diffs.append(f"{path}: {a!r} -> {b!r}")
  return diffs


class ConfigMismatchError(ValueError):
  """A resume whose config changes the structure of the checkpointed state."""


class WorkdirBusyError(RuntimeError):
  """Another live process is training in the same workdir."""


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved before stopping."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds ``WORKDIR/.lock`` (pid and host) for the duration of a run.

  A second run on the same workdir refuses to start while the first is alive.
  A lock left behind by a killed run (its pid no longer exists on this host)
  is taken over with a warning.
  """
  path = os.path.join(workdir, ".lock")
  host = socket.gethostname()
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      try:
        with open(path) as f:
          owner = json.load(f)
      except (OSError, ValueError):
        owner = {}
      pid, owner_host = owner.get("pid"), owner.get("host")
      alive = False
      if isinstance(pid, int) and owner_host == host:
        try:
          os.kill(pid, 0)
          alive = True
        except ProcessLookupError:
          alive = False
        except PermissionError:
          alive = True
      elif owner_host not in (None, host):
        alive = True  # Cannot check a process on another host: assume it runs.
      if alive:
        raise WorkdirBusyError(
            f"Another run (pid {pid} on {owner_host}) is using workdir {workdir!r}. "
            f"Wait for it, stop it, or choose another --workdir. If no such run "
            f"exists, delete {path}.") from None
      logging.warning("Taking over the stale lock of a stopped run (pid %s) in %s.",
                      pid, workdir)
      os.remove(path)
  else:
    raise WorkdirBusyError(f"Could not acquire {path}.")
  with os.fdopen(fd, "w") as f:
    json.dump(dict(pid=os.getpid(), host=host), f)
  try:
    yield
  finally:
    try:
      os.remove(path)
    except FileNotFoundError:
      pass


def workdir_lock_for_this_process(workdir: str):
  """``workdir_lock`` in process 0; nothing in the other processes of a multi-host run.

  Every host of a multi-host run runs the same command on the same (shared)
  workdir: the lock keeps out OTHER runs, so only one process holds it.
  """
  if jax.process_index() == 0:
    return workdir_lock(workdir)
  return contextlib.nullcontext()


@contextlib.contextmanager
def _stop_on_signals():
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""
  received = []

  def handler(signum, frame):  # pylint: disable=unused-argument
    received.append(signum)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, handler)
  try:
    yield received
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def _truncate_log(path: str, last_step: int) -> None:
  """Drops log lines past ``last_step`` (written after the checkpoint a run resumes from)."""
  if not os.path.exists(path):
    return
  lines = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # A line cut short by a kill.
        continue
      if record["step"] <= last_step:
        lines.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(lines)
  os.replace(path + ".tmp", path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from ``workdir`` if it holds a checkpoint), evaluates, writes the summary.

  Writes to ``workdir``: ``checkpoints/`` (Orbax), TensorBoard event files,
  ``config.json``, ``metrics.jsonl`` (one line per log step and evaluation),
  and ``summary.json`` with at least ``coverage``, ``validity`` (per latent),
  ``latent_usage``, ``nmi``, ``token_jsd``, ``nll``, ``steps``.

  Reliability: the config is validated before anything compiles; a second run
  on a busy workdir is refused (``WorkdirBusyError``); a resume whose config
  changes the state's structure is refused with the differing fields named;
  an unreadable newest checkpoint is reported and an older one used; SIGTERM
  and SIGINT save a checkpoint and raise ``Interrupted``; a step with a
  non-finite loss or gradient leaves the parameters unchanged, and
  ``train.max_nonfinite_steps`` of them in a row raise ``NonFiniteError``.

  Returns:
    The summary dict.
  """
  setup = build(config)  # Validation happens here, before anything compiles.
  mesh = make_data_mesh(setup.config)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock_for_this_process(workdir):
    return _train_and_evaluate(setup, workdir, mesh)


def make_data_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The 1-D data mesh over every device (of every process), batch sizes checked against it.

  Raises:
    ValueError: ``config.train.batch_size`` or ``config.eval.batch_size`` is
      not a multiple of the number of devices (each device holds an equal
      share of the batch).
  """
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
  sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
  return mesh


def check_config_matches(config: ml_collections.ConfigDict, workdir: str,
                         differences: Callable[[dict, dict], list[str]]) -> None:
  """Raises ConfigMismatchError if ``workdir`` holds checkpoints of a config that ``differences`` rejects.

  Args:
    config: the config of the run about to start.
    workdir: its directory (``config.json`` and ``checkpoints/`` of an earlier run).
    differences: ``(saved_record, record) -> ['field: old -> new', ...]``.
  """
  config_path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  has_checkpoints = os.path.isdir(ckpt_dir) and any(
      name.isdigit() for name in os.listdir(ckpt_dir))
  if not (has_checkpoints and os.path.exists(config_path)):
    return
  with open(config_path) as f:
    diffs = differences(json.load(f), _config_record(config))
  if diffs:
    raise ConfigMismatchError(
        f"The config differs from the one the checkpoints in {workdir!r} were written "
        f"with, in fields that change the run: {'; '.join(diffs)}. Use the original "
        f"values or a new --workdir.")


class LoopResult(NamedTuple):
  """What ``run_loop`` hands back: the final state, the final evaluation, the step time."""

  state: Any
  final_eval: dict
  seconds_per_step: float  # Wall time per step, without the first (compiling) step and evals.


def run_loop(config: ml_collections.ConfigDict, workdir: str, *, initial_state, restore_target,
             place: Callable, step: Callable, evaluate: Callable,
             differences: Callable[[dict, dict], list[str]],
             train_line: Callable[[int, dict, float], str],
             eval_line: Callable[[int, dict], str],
             eval_at_start: bool = False) -> LoopResult:
  """The loop ``train_and_evaluate`` and ``distill.train_and_evaluate`` share.

  Resumes from the newest readable checkpoint in ``workdir/checkpoints`` (after
  refusing a config whose ``differences`` from the saved ``config.json`` are
  non-empty), runs ``step`` until ``config.train.num_steps``, logs every
  ``log_every`` steps (stdout, ``metrics.jsonl``, TensorBoard), evaluates every
  ``eval_every`` steps and at the end, checkpoints every ``checkpoint_every``
  steps and at the end. SIGTERM/SIGINT: checkpoint, then ``Interrupted``.
  ``max_nonfinite_steps`` consecutive non-finite steps: ``NonFiniteError``.

  Args:
    config: the validated config (``train`` section used here).
    workdir: the run's directory (already locked by the caller).
    initial_state: the state at step 0 (any layout).
    restore_target: ``jax.ShapeDtypeStruct`` tree (with shardings) to restore into.
    place: puts ``initial_state`` in the layout ``step`` expects.
    step: ``state -> (state, metrics)``, the jitted step; the state carries
      ``step`` and ``nonfinite_streak`` / ``nonfinite_total`` (``TrainState``).
    evaluate: ``state -> dict`` of Python values (host side).
    differences: ``(saved_record, record) -> ['field: old -> new', ...]``.
    train_line: ``(step, metrics, steps_per_sec) -> str`` printed at log steps.
    eval_line: ``(step, result) -> str`` printed after each evaluation.
    eval_at_start: also evaluate a fresh run at step 0.

  Returns:
    ``LoopResult``.
  """
  is_lead = jax.process_index() == 0
  record = _config_record(config)
  config_path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  log_path = os.path.join(workdir, "metrics.jsonl")
  manager = checkpointing.make_manager(ckpt_dir, config.train.keep_checkpoints,
                                       config.train.checkpoint_every)
  # Close the manager and the event writer on every path (errors included):
  # open ones can keep the interpreter from exiting.
  writer = None
  try:
    check_config_matches(config, workdir, differences)
    # Restored arrays land directly in the target's layout (each host reads
    # only its devices' shards); a fresh state is placed the same way, so the
    # step compiles once for both.
    restored = checkpointing.restore_latest(manager, restore_target)
    if restored is not None:
      state, _, ckpt_step = restored
      print(f"Resuming from step {ckpt_step} ({workdir}).", flush=True)
      if is_lead:
        _truncate_log(log_path, ckpt_step)
    else:
      state = place(initial_state)
    if is_lead:
      with open(config_path, "w") as f:
        json.dump(record, f, indent=2)

    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    writer = SummaryWriter(workdir) if is_lead else None
    num_steps = config.train.num_steps
    step_done = int(state.step)
    last_time, last_step = time.time(), step_done
    pending = None  # Metrics of the previous step, pulled to the host one step late.
    streak = None  # The previous step's count of consecutive non-finite steps.
    eval_seconds = 0.0

    def log_train(at, aux):
      nonlocal last_time, last_step
      now = time.time()
      rate = (at - last_step) / max(now - last_time, 1e-9)
      last_time, last_step = now, at
      aux = {k: float(v) for k, v in jax.device_get(aux).items()}
      if is_lead:
        _write_scalars(writer, at, aux, "train")
        writer.add_scalar("train/steps_per_sec", rate, at)
        with open(log_path, "a") as f:
          f.write(json.dumps(dict(step=at, kind="train", **aux)) + "\n")
        print(train_line(at, aux, rate), flush=True)

    def run_eval(at):
      nonlocal eval_seconds
      start = time.time()
      result = evaluate(state)
      eval_seconds += time.time() - start
      if is_lead:
        _write_scalars(writer, at, result, "eval")
        with open(log_path, "a") as f:
          f.write(json.dumps(dict(step=at, kind="eval", **{
              k: v for k, v in result.items() if k != "samples"})) + "\n")
        print(eval_line(at, result), flush=True)
      return result

    def flush_log():
      nonlocal pending
      if pending is not None:
        log_train(*pending)
        pending = None

    if eval_at_start and step_done == 0:
      run_eval(0)
    timed_from, timed_start = None, None  # Step timing excludes the first (compiling) step.
    with _stop_on_signals() as signals:
      while step_done < num_steps:
        state, aux = step(state)  # Dispatch; the device runs ahead of the host.
        step_done += 1
        if timed_from is None:
          jax.block_until_ready(state)
          timed_from, timed_start, eval_seconds = step_done, time.time(), 0.0
        if streak is not None and int(streak) >= config.train.max_nonfinite_steps:
          flush_log()
          manager.wait_until_finished()
          raise NonFiniteError(
              f"{int(streak)} consecutive steps ending at step {step_done - 1} had a "
              f"non-finite loss or gradient (parameters were left unchanged by each). The "
              f"newest checkpoint is step {manager.latest_step()} in {ckpt_dir}. Lower "
              f"optim.learning_rate or inspect the inputs, then rerun to resume from it.")
        streak = state.nonfinite_streak
        flush_log()
        if step_done % config.train.log_every == 0 or step_done == num_steps:
          pending = (step_done, aux)
        if step_done % config.train.eval_every == 0 and step_done != num_steps:
          run_eval(step_done)
        checkpointing.save(manager, step_done, state, dict(step=step_done))
        if signals:
          flush_log()
          if manager.latest_step() != step_done:
            checkpointing.save(manager, step_done, state, dict(step=step_done), force=True)
          manager.wait_until_finished()
          name = signal.Signals(signals[0]).name
          print(f"{name} received: checkpoint saved at step {step_done} in {ckpt_dir}; "
                f"rerun the same command to resume.", flush=True)
          raise Interrupted(f"{name} at step {step_done}; checkpoint saved in {ckpt_dir}.")
    jax.block_until_ready(state)
    seconds_per_step = float("nan")
    if timed_from is not None and step_done > timed_from:
      seconds_per_step = (time.time() - timed_start - eval_seconds) / (step_done - timed_from)
    flush_log()
    if not manager.all_steps() or manager.latest_step() != step_done:
      checkpointing.save(manager, step_done, state, dict(step=step_done), force=True)
    manager.wait_until_finished()
    return LoopResult(state, run_eval(step_done), seconds_per_step)
  finally:
    manager.close()
    if writer is not None:
      writer.close()


def write_summary(workdir: str, summary: dict) -> None:
  """``workdir/summary.json`` (written by process 0 only)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)


def _train_and_evaluate(setup: Setup, workdir: str, mesh: jax.sharding.Mesh) -> dict:
  config = setup.config
  fsdp = config.train.fsdp
  state = init_state(setup)
  train_step = make_train_step(setup, mesh)
  evaluate, _ = make_evaluate(setup, mesh)
  num_steps = config.train.num_steps
  if mesh.devices.size > 1:
    print(f"Data parallel over {mesh.devices.size} devices "
          f"({'FSDP' if fsdp else 'replicated'} state).", flush=True)

  def train_line(step, aux, rate):
    return (f"step {step:6d}/{num_steps}  loss {aux['loss']:.4f}  rec {aux['rec_loss']:.4f}  "
            f"jsd {aux['token_jsd']:.4f}  {rate:.1f} steps/s")

  def eval_line(step, result):
    return (f"eval @ {step}: coverage {result['coverage']:.2f}  validity "
            f"{[round(v, 3) for v in result['validity']]}  nmi {result['nmi']:.3f}  "
            f"usage {[round(v, 2) for v in result['latent_usage']]}")

  # (The step time stays out of this summary: equal runs have equal summaries.)
  state, result, _ = run_loop(
      config, workdir, initial_state=state,
      restore_target=sharding.abstract_state(state, mesh, fsdp),
      place=lambda s: sharding.place_state(s, mesh, fsdp), step=train_step,
      evaluate=lambda s: _to_python(jax.device_get(evaluate(s.params))),
      differences=structural_differences, train_line=train_line, eval_line=eval_line)
  summary = dict(
      steps=int(state.step),
      coverage=result["coverage"],
      validity=result["validity"],
      latent_usage=result["latent_usage"],
      nmi=result["nmi"],
      token_jsd=result["token_jsd"],
      nll=result["nll"],
      seq_kl=result["seq_kl"],
      seq_kl_stderr=result["seq_kl_stderr"],
      assignment=result["assignment"],
      confusion=result["confusion"],
      nonfinite_steps=int(state.nonfinite_total),
      exact_match=result["exact_match"],
      edit_distance=result["edit_distance"],
      kl_payoff_to_model=result["kl_payoff_to_model"],
      task=config.task.name,
  )
  write_summary(workdir, summary)
  return summary
