"""The training loop: one jitted step over an explicit train state, evaluation, checkpoints.

``train_and_evaluate(config, workdir)`` is what ``run.py`` calls. It validates
the config before anything compiles, resumes from the newest readable
checkpoint in ``workdir``, trains, evaluates and writes ``summary.json``.

The step (``make_train_step``) draws its batch on device from
``fold_in(data_key, step)`` (so the data order resumes exactly), computes

    loss = L_rec − λ_jsd · Ĵ − w_pg(step) · D̂_seq          (DESIGN.md §3–5)

and applies one Optax update: a single XLA program, no Python loop over time
steps or latents.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, NamedTuple

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
from latentdiv import reconstruction
from latentdiv import sampling
from latentdiv import seq_kl
from latentdiv import tasks as tasks_lib


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
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extra: dict


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
                    extra=_init_extra(setup))


def _init_extra(setup: Setup) -> dict:
  return seq_kl.init_state(setup.config) if setup.config.seq_pg.lambda_pg > 0 else {}


def data_key(config) -> jax.Array:
  """The key whose ``fold_in(·, step)`` draws the training batch of ``step``."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)


def latent_logits(setup: Setup, params, prompt_BxP, target_BxT) -> jax.Array:
  """Teacher-forced logits of every latent, [B, K, T, V], in one pass vmapped over K."""
  batch = prompt_BxP.shape[0]

  def one(latent):
    return model_lib.teacher_forced_logits(setup.model, params, prompt_BxP, target_BxT,
                                           jnp.full((batch,), latent, jnp.int32))

  return jax.vmap(one, out_axes=1)(jnp.arange(setup.model.config.num_latents))


def teacher_forced_terms(setup: Setup, params, batch: tasks_lib.Batch):
  """Reconstruction and token-JSD terms of the loss on a batch (DESIGN §3–4)."""
  cfg = setup.config.objective
  logits_BxKxTxV = latent_logits(setup, params, batch.prompt, batch.target)
  loglik_BxK = jax.vmap(jax.vmap(reconstruction.sequence_log_likelihood, (0, None, None)))(
      logits_BxKxTxV, batch.target, batch.target_mask)
  rec = reconstruction.reconstruction_loss(cfg.reconstruction, loglik_BxK)
  jsd_fn = functools.partial(divergences.token_jsd, weighting=cfg.jsd_weighting,
                             prefix_len=cfg.jsd_prefix_len)
  jsd = jax.vmap(jsd_fn)(logits_BxKxTxV, batch.target_mask)
  num_tokens = jnp.maximum(jnp.sum(batch.target_mask), 1)
  best_nll = -jnp.sum(jnp.max(loglik_BxK, axis=1)) / num_tokens
  return logits_BxKxTxV, rec, jsd, best_nll


def pg_weight(config, step) -> jax.Array:
  """λ_pg · ramp: 0 for ``warmup_steps``, then linear to λ_pg over ``ramp_steps`` (§5.5)."""
  s = config.seq_pg
  ramp = jnp.clip((step - s.warmup_steps + 1) / max(s.ramp_steps, 1), 0.0, 1.0)
  return jnp.where(step < s.warmup_steps, 0.0, s.lambda_pg * ramp)


def make_train_step(setup: Setup):
  """The jitted ``train_step(state) -> (state, metrics)`` for ``setup``."""
  config = setup.config
  dkey = data_key(config)
  use_pg = config.seq_pg.lambda_pg > 0

  def loss_fn(params, state, batch, key):
    logits, rec, jsd, best_nll = teacher_forced_terms(setup, params, batch)
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

  @jax.jit
  def train_step(state: TrainState):
    batch = setup.task.sample(jax.random.fold_in(dkey, state.step), config.train.batch_size)
    rng, key = jax.random.split(state.rng)
    grads, (aux, extra) = jax.grad(loss_fn, has_aux=True)(state.params, state, batch, key)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux["grad_norm"] = optax.global_norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=rng, extra=extra)
    return new_state, aux

  return train_step


def make_evaluate(setup: Setup):
  """The jitted ``evaluate(params) -> metrics`` on a fixed evaluation batch.

  Samples one output per (example, latent) at temperature 1 (or greedily with
  ``config.eval.greedy``), matches them against the hidden strategies' valid
  outputs, and scores the teacher-forced objective terms on the batch.
  """
  config = setup.config
  task = setup.task
  eval_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)
  batch = task.sample(eval_key, config.eval.batch_size)
  temperature = 1e-6 if config.eval.greedy else 1.0
  num_latents = setup.model.config.num_latents

  @jax.jit
  def evaluate(params):
    rollout = sampling.sample_latents(setup.model, params, batch.prompt,
                                      jax.random.fold_in(eval_key, 1), task.target_len,
                                      temperature)
    matches = metrics_lib.match_strategies(rollout.tokens, batch.valid_outputs)
    coverage = metrics_lib.strategy_coverage(matches, task.num_strategies)
    _, rec, jsd, best_nll = teacher_forced_terms(setup, params, batch)
    # Monte-Carlo sequence KL between latents on the samples (DESIGN §9).
    logits = sampling.score_latents(setup.model, params, batch.prompt, rollout.tokens)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits),
                               rollout.tokens[:, :, None, :, None], -1)[..., 0]
    kl = metrics_lib.mc_sequence_kl(logp, rollout.mask)
    return dict(
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

  return evaluate, batch


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from ``workdir`` if it holds a checkpoint), evaluates, writes the summary.

  Writes to ``workdir``: ``checkpoints/`` (Orbax), TensorBoard event files,
  ``config.json``, ``metrics.jsonl`` (one line per log step and evaluation),
  and ``summary.json`` with at least ``coverage``, ``validity`` (per latent),
  ``latent_usage``, ``nmi``, ``token_jsd``, ``nll``, ``steps``.

  Returns:
    The summary dict.
  """
  setup = build(config)  # Validation happens here, before anything compiles.
  is_lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"),
                                       config.train.keep_checkpoints,
                                       config.train.checkpoint_every)
  state = init_state(setup)
  restored = checkpointing.restore_latest(manager, checkpointing.abstract_like(state))
  if restored is not None:
    state, _, ckpt_step = restored
    logging.info("Resumed from checkpoint at step %d in %s.", ckpt_step, workdir)
    print(f"Resuming from step {ckpt_step} ({workdir}).", flush=True)
  if is_lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(_config_record(config), f, indent=2)

  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  writer = SummaryWriter(workdir) if is_lead else None
  train_step = make_train_step(setup)
  evaluate, _ = make_evaluate(setup)
  num_steps = config.train.num_steps
  log_path = os.path.join(workdir, "metrics.jsonl")
  step = int(state.step)
  last_time, last_step = time.time(), step
  pending = None  # Metrics of the previous step, pulled to the host one step late.

  def log_train(step_done, aux):
    nonlocal last_time, last_step
    now = time.time()
    rate = (step_done - last_step) / max(now - last_time, 1e-9)
    last_time, last_step = now, step_done
    aux = {k: float(v) for k, v in jax.device_get(aux).items()}
    if is_lead:
      _write_scalars(writer, step_done, aux, "train")
      writer.add_scalar("train/steps_per_sec", rate, step_done)
      with open(log_path, "a") as f:
        f.write(json.dumps(dict(step=step_done, kind="train", **aux)) + "\n")
      print(f"step {step_done:6d}/{num_steps}  loss {aux['loss']:.4f}  "
            f"rec {aux['rec_loss']:.4f}  jsd {aux['token_jsd']:.4f}  "
            f"{rate:.1f} steps/s", flush=True)

  def run_eval(step_done):
    result = _to_python(jax.device_get(evaluate(state.params)))
    if is_lead:
      _write_scalars(writer, step_done, result, "eval")
      with open(log_path, "a") as f:
        f.write(json.dumps(dict(step=step_done, kind="eval", **{
            k: v for k, v in result.items() if k != "samples"})) + "\n")
      print(f"eval @ {step_done}: coverage {result['coverage']:.2f}  validity "
            f"{[round(v, 3) for v in result['validity']]}  nmi {result['nmi']:.3f}  "
            f"usage {[round(v, 2) for v in result['latent_usage']]}", flush=True)
    return result

  while step < num_steps:
    state, aux = train_step(state)  # Dispatch; the device runs ahead of the host.
    step += 1
    if pending is not None:
      log_train(*pending)
      pending = None
    if step % config.train.log_every == 0 or step == num_steps:
      pending = (step, aux)
    if step % config.train.eval_every == 0 and step != num_steps:
      run_eval(step)
    checkpointing.save(manager, step, state, dict(step=step))
  if pending is not None:
    log_train(*pending)
  if not manager.all_steps() or manager.latest_step() != step:
    checkpointing.save(manager, step, state, dict(step=step), force=True)
  manager.wait_until_finished()
  result = run_eval(step)
  summary = dict(
      steps=step,
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
      task=config.task.name,
  )
  if is_lead:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    writer.close()
  manager.close()
  return summary
