"""On-policy distillation (OPD) of a student towards a frozen teacher (DESIGN.md §6).

Student ``π_θ(y | x, z)`` (a ``LatentTransformer``, any depth and width), frozen
teacher ``q(y | x, z)`` restored from the Orbax checkpoint of a ``run.py``
workdir. The objective is the sequence-level reverse KL

    minimise  E_x KL(π_θ(·|x) ‖ q(·|x)) = E_x E_{y~π_θ} [ Σ_t r_t ],
    r_t = log π_θ(y_t|c_t) − log q(y_t|c_t),

over responses sampled from the student up to EOS (positions after EOS are
masked, ``KL_t = 0`` there). A latent-conditioned teacher is distilled at one
fixed latent (``distill.teacher_latent = k ≥ 0``; the student then has K = 1)
or per latent (``teacher_latent = -1``; the student has the teacher's K and its
latent k is distilled towards teacher latent k).

Losses (``distill.loss``), each named for what it is:

* ``opd`` — ``estimators.opd_surrogate`` with ``distill.estimator`` (one of
  (i)–(v) or ``rao_blackwell``, seed 002 Theorem 1) and ``distill.baseline``
  (``none``; ``leave_one_out`` over ``num_rollouts ≥ 2`` responses per prompt
  and latent; ``ema``, a per-position EMA of the returns carried in the train
  state). Unbiased for ``∇ KL(π_θ ‖ q)`` (no pathwise term: q is frozen).
* ``per_token_reward`` — the same surrogate with the coefficient ``A_t = r_t``
  alone: the per-token reverse KL used as a reward with no future terms. It is
  a BIASED estimator of the sequence KL's gradient (it drops how y_t changes
  the KL of the tokens that follow it); the enumeration oracle measures the
  bias in ``tests/test_distill.py``.
* ``gkd`` — TRL's GKD loss ``divergences.gkd_loss``: teacher-forced
  generalised JSD_β(P = teacher, Q = student) per token (``batchmean``: mean
  over valid tokens), on a mixture of responses: each row is a student sample
  with probability ``gkd_lambda`` (the on-policy fraction, TRL's ``lmbda``)
  and otherwise an off-policy response, the task's data target y*
  (``gkd_off_policy='data'``, TRL's default) or a teacher sample
  (``'teacher'``, TRL's ``seq_kd=True``). TRL flips one coin per batch; here
  the coin is per row (same expected mixture, less variance). Student samples
  are treated as constants (no gradient through sampling), as in TRL.
* ``seq_kd`` — sequence-level KD (Kim & Rush 2016): maximise
  ``Σ_t log π_θ(y_t|c_t)`` on teacher samples ``y ~ q``, i.e. minimise the
  forward sequence KL(q ‖ π_θ) up to a constant.

Temperature: ``distill.temperature = τ`` is the sampling temperature of the
training rollouts. τ = 1 is the objective above. With τ ≠ 1 the ``opd`` and
``per_token_reward`` surrogates score the tempered student and teacher
(logits/τ), so ``opd`` is then unbiased for KL(π_τ ‖ q_τ) — a different
objective than §6's; ``gkd`` passes τ to ``gkd_loss`` (it divides both logits)
and ``seq_kd`` samples the teacher at τ. Evaluation always samples at τ = 1.

The teacher's parameters are an explicit, non-differentiated argument of the
jitted step (not closed over, not in the optimiser state), and its logits are
stop-gradiented. The step — rollouts (one ``lax.scan``), teacher and student
scoring, loss, update — is one XLA program. Keys (data, sampling) are runtime
arguments, so runs that differ only in ``seed`` share the compiled program.

Evaluation: Monte-Carlo sequence reverse KL(π_θ ‖ q) from ``num_eval_samples``
student samples per latent with a 95% confidence interval (mean ± 1.96·stderr
over prompts), the teacher-forced token KL on the data, and the task validity
of student (and, for reference, teacher) samples.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

from latentdiv import checkpointing
from latentdiv import config as config_lib
from latentdiv import divergences
from latentdiv import estimators
from latentdiv import metrics as metrics_lib
from latentdiv import model as model_lib
from latentdiv import sampling
from latentdiv import sharding
from latentdiv import tasks as tasks_lib
from latentdiv import train

# Private helpers of train.py reused here (logging, signals, config records).
# pylint: disable=protected-access

LOSSES = ("opd", "gkd", "per_token_reward", "seq_kd")
BASELINES = ("none", "leave_one_out", "ema")
OFF_POLICY_SOURCES = ("data", "teacher")
ESTIMATORS = estimators.ESTIMATORS

# Fields whose change makes a checkpoint of the student state meaningless or
# unrestorable; a resume that changes one is refused.
STRUCTURAL_FIELDS = ("distill.teacher_workdir", "distill.teacher_latent", "distill.loss",
                     "distill.baseline", "distill.response_len")


# ---------------------------------------------------------------------------
# Configuration.


def distill_config() -> ml_collections.ConfigDict:
  """``config.base_config()`` plus the ``distill`` section (all defaults).

  ``config.model`` and ``config.task`` describe the STUDENT (its width and
  depth may differ from the teacher's; the vocabulary must not). The teacher's
  model and task come from ``distill.teacher_workdir/config.json``.
  """
  c = config_lib.base_config()
  c.objective.lambda_jsd = 0.0  # Unused by distillation (and allows K = 1).
  c.model.num_latents = 1
  # Unused by distillation; kept within any task's target length so that the
  # base validation (train.build) accepts short tasks.
  c.seq_pg.rollout_len = 1
  c.objective.jsd_prefix_len = 1
  d = c.distill = ml_collections.ConfigDict()
  # A run.py workdir: config.json (teacher model/task) and checkpoints/ (its params).
  d.teacher_workdir = ""
  # k >= 0: distil the teacher at latent k into a K = 1 student; -1: per latent
  # (the student has the teacher's K; student latent k -> teacher latent k).
  d.teacher_latent = 0
  d.loss = "opd"  # one of LOSSES.
  d.estimator = "rao_blackwell"  # for loss='opd': one of estimators.ESTIMATORS.
  d.baseline = "none"  # for loss='opd': 'none', 'leave_one_out' or 'ema'.
  d.num_rollouts = 1  # responses per (prompt, latent); leave_one_out needs >= 2.
  d.ema_decay = 0.9  # for baseline='ema'.
  d.gkd_beta = 0.5  # JSD_beta mixing weight (TRL default 0.5).
  d.gkd_lambda = 0.5  # on-policy fraction: a row is a student sample w.p. lambda.
  d.gkd_off_policy = "data"  # the other rows: 'data' (y*, TRL default) or 'teacher'.
  d.temperature = 1.0  # training sampling temperature (1 = the objective of §6).
  d.response_len = 0  # L, tokens per response; 0 = the task's target length.
  d.num_eval_samples = 256  # evaluation prompts, one student sample per latent each.
  return c


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate_distill(config: ml_collections.ConfigDict) -> None:
  """Checks the ``distill`` section (and the base fields) before anything is built.

  Raises:
    ValueError: naming the first invalid field, its value and what is allowed.
  """
  config_lib.validate(config)
  if "distill" not in config:
    raise ValueError("config.distill is missing; start from distill.distill_config().")
  config_lib.check_known_fields(config.distill, distill_config().distill, "config.distill")
  d = config.distill
  for name in ("teacher_workdir", "teacher_latent", "loss", "estimator", "baseline",
               "num_rollouts", "ema_decay", "gkd_beta", "gkd_lambda", "gkd_off_policy",
               "temperature", "response_len", "num_eval_samples"):
    if name not in d:
      raise ValueError(f"config.distill.{name} is missing.")
  if not isinstance(d.teacher_workdir, str) or not d.teacher_workdir:
    raise ValueError(
        "config.distill.teacher_workdir must name a run.py workdir (with config.json and "
        f"checkpoints/), got {d.teacher_workdir!r}.")
  if not _integer(d.teacher_latent) or d.teacher_latent < -1:
    raise ValueError(
        "config.distill.teacher_latent must be an integer >= 0 (a fixed teacher latent) "
        f"or -1 (per latent), got {d.teacher_latent!r}.")
  for name, allowed in (("loss", LOSSES), ("estimator", ESTIMATORS),
                        ("baseline", BASELINES), ("gkd_off_policy", OFF_POLICY_SOURCES)):
    if d[name] not in allowed:
      raise ValueError(f"config.distill.{name} must be one of {allowed}, got {d[name]!r}.")
  for name in ("num_rollouts", "num_eval_samples"):
    if not _integer(d[name]) or d[name] < 1:
      raise ValueError(f"config.distill.{name} must be a positive integer, got {d[name]!r}.")
  if d.num_eval_samples < 2:
    raise ValueError(
        "config.distill.num_eval_samples must be >= 2 (a standard error needs two "
        f"samples), got {d.num_eval_samples!r}.")
  if not _integer(d.response_len) or d.response_len < 0:
    raise ValueError(
        "config.distill.response_len must be an integer >= 0 (0 = the task's target "
        f"length), got {d.response_len!r}.")
  for name in ("gkd_beta", "gkd_lambda"):
    if not _number(d[name]) or not 0 <= d[name] <= 1:
      raise ValueError(f"config.distill.{name} must be in [0, 1], got {d[name]!r}.")
  if not _number(d.ema_decay) or not 0 <= d.ema_decay < 1:
    raise ValueError(f"config.distill.ema_decay must be in [0, 1), got {d.ema_decay!r}.")
  if not _number(d.temperature) or not d.temperature > 0:
    raise ValueError(f"config.distill.temperature must be > 0, got {d.temperature!r}.")
  if d.baseline != "none":
    if d.loss != "opd" or d.estimator not in estimators.BASELINED_ESTIMATORS:
      raise ValueError(
          f"config.distill.baseline={d.baseline!r} needs config.distill.loss='opd' and an "
          f"estimator that takes a baseline, one of {estimators.BASELINED_ESTIMATORS}; "
          f"got loss={d.loss!r}, estimator={d.estimator!r}.")
  if d.loss == "opd" and d.estimator.endswith("_baseline") and d.baseline == "none":
    raise ValueError(
        f"config.distill.estimator={d.estimator!r} needs a baseline: config.distill.baseline "
        f"must be one of {BASELINES[1:]}, got 'none'.")
  if d.baseline == "leave_one_out" and d.num_rollouts < 2:
    raise ValueError(
        "config.distill.num_rollouts must be >= 2 with baseline 'leave_one_out', got "
        f"{d.num_rollouts}.")


# ---------------------------------------------------------------------------
# Teacher and student.


class DistillSetup(NamedTuple):
  """What a distillation config builds (nothing compiled).

  Attributes:
    config: the validated config.
    task: the student's task (prompts, data targets, valid outputs).
    student: the student ``LatentTransformer``.
    teacher: the teacher ``LatentTransformer`` (from the teacher's config.json).
    optimizer: the student's Optax optimiser (``train.make_optimizer``).
    teacher_record: the teacher's config.json as a dict.
    response_len: L, the number of tokens per response.
  """

  config: ml_collections.ConfigDict
  task: tasks_lib.Task
  student: model_lib.LatentTransformer
  teacher: model_lib.LatentTransformer
  optimizer: optax.GradientTransformation
  teacher_record: dict
  response_len: int


def _merge(base: ml_collections.ConfigDict, record: dict) -> None:
  """Copies the values of ``record`` into ``base`` where ``base`` has the field."""
  for key, value in record.items():
    if key not in base:
      continue
    if isinstance(base[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(base[key], value)
    else:
      base[key] = value


def teacher_config(teacher_workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The teacher's config (``base_config`` updated from its ``config.json``) and the record.

  Raises:
    ValueError: the workdir has no readable config.json.
  """
  path = os.path.join(teacher_workdir, "config.json")
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as err:
    raise ValueError(
        f"config.distill.teacher_workdir={teacher_workdir!r}: cannot read {path} ({err}). "
        "Train the teacher first, e.g. python run.py --workdir=THAT_DIR.") from None
  config = config_lib.base_config()
  _merge(config, record)
  return config, record


def build(config: ml_collections.ConfigDict) -> DistillSetup:
  """Validates ``config``, reads the teacher's config.json and builds both models.

  Nothing compiles and no parameter is loaded: a vocabulary or latent mismatch
  between student and teacher is reported here.

  Raises:
    ValueError: an invalid field, an unreadable teacher config, or a
      student/teacher mismatch (vocabulary, latents, lengths).
  """
  validate_distill(config)
  student_setup = train.build(config)
  d = config.distill
  t_config, record = teacher_config(d.teacher_workdir)
  try:
    teacher_setup = train.build(t_config)
  except ValueError as err:
    raise ValueError(
        f"The teacher's config ({d.teacher_workdir}/config.json) is invalid: {err}") from None
  task = student_setup.task
  student_cfg = student_setup.model.config
  teacher_cfg = teacher_setup.model.config
  if student_cfg.vocab_size != teacher_cfg.vocab_size:
    raise ValueError(
        f"Vocabulary mismatch: the student's task gives V = {student_cfg.vocab_size} "
        f"(config.task.alphabet_size = {config.task.alphabet_size} + "
        f"{student_cfg.vocab_size - config.task.alphabet_size} reserved ids) but the teacher "
        f"in config.distill.teacher_workdir = {d.teacher_workdir!r} has V = "
        f"{teacher_cfg.vocab_size} (task.alphabet_size = {t_config.task.alphabet_size}). "
        "Student and teacher must share the vocabulary.")
  k_teacher, k_student = teacher_cfg.num_latents, student_cfg.num_latents
  if d.teacher_latent == -1:
    if k_student != k_teacher:
      raise ValueError(
          f"Latent mismatch: config.distill.teacher_latent = -1 (per latent) needs "
          f"config.model.num_latents = the teacher's K = {k_teacher}, got {k_student}.")
  else:
    if d.teacher_latent >= k_teacher:
      raise ValueError(
          f"Latent mismatch: config.distill.teacher_latent must be in [0, {k_teacher}) "
          f"(the teacher's K = {k_teacher}) or -1, got {d.teacher_latent}.")
    if k_student != 1:
      raise ValueError(
          f"Latent mismatch: with a fixed teacher latent (config.distill.teacher_latent = "
          f"{d.teacher_latent}) the student has one latent: config.model.num_latents must "
          f"be 1, got {k_student} (use teacher_latent = -1 to distil per latent).")
  response_len = d.response_len or task.target_len
  if response_len > task.target_len:
    raise ValueError(
        f"config.distill.response_len must be in [0, {task.target_len}] (the task's target "
        f"length; 0 = all of it), got {d.response_len}.")
  if task.prompt_len + response_len > teacher_cfg.max_len:
    raise ValueError(
        f"Length mismatch: prompt_len {task.prompt_len} + response_len {response_len} = "
        f"{task.prompt_len + response_len} exceeds the teacher's max_len "
        f"{teacher_cfg.max_len} (its task.prompt_len + target length).")
  return DistillSetup(config, task, student_setup.model, teacher_setup.model,
                      student_setup.optimizer, record, response_len)


def load_teacher_params(setup: DistillSetup) -> Any:
  """The teacher's parameters from the newest checkpoint of ``teacher_workdir``.

  Only the ``params`` of the saved train state are read (Orbax partial
  restore, with an abstract target built from the teacher's config); the
  teacher's optimiser state is never loaded. The teacher's workdir is only
  read.

  Raises:
    ValueError: no checkpoint in ``teacher_workdir/checkpoints``.
    checkpointing.CheckpointError: the newest checkpoint does not restore.
  """
  directory = os.path.abspath(os.path.join(setup.config.distill.teacher_workdir,
                                           "checkpoints"))
  if not os.path.isdir(directory):
    raise ValueError(
        f"config.distill.teacher_workdir: no checkpoints in {directory}; train the teacher "
        "first.")
  manager = ocp.CheckpointManager(
      directory, item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise ValueError(
        f"config.distill.teacher_workdir: no checkpoints in {directory}; train the teacher "
        "first.")
  device = jax.local_devices()[0]
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(device)),
      jax.eval_shape(functools.partial(model_lib.init_params, setup.teacher),
                     jax.random.PRNGKey(0)))
  target = {"params": abstract}
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  except Exception as err:  # pylint: disable=broad-except
    raise checkpointing.CheckpointError(
        f"The teacher checkpoint at step {step} in {directory} did not restore: "
        f"{type(err).__name__}: {err}") from err
  finally:
    manager.close()
  return restored["state"]["params"]


def row_latents(setup: DistillSetup, num_prompts: int, num_rollouts: int):
  """Student and teacher latents of the ``num_prompts · K_s · num_rollouts`` rows.

  Rows are ordered (prompt, student latent, rollout). Student latent k is
  distilled towards teacher latent k (per latent) or towards the fixed
  ``teacher_latent`` (then K_s = 1).

  Returns:
    (student latents [R] int32, teacher latents [R] int32).
  """
  k_student = setup.student.config.num_latents
  latent_k = jnp.repeat(jnp.arange(k_student, dtype=jnp.int32), num_rollouts)
  student_r = jnp.tile(latent_k, num_prompts)
  fixed = setup.config.distill.teacher_latent
  teacher_r = student_r if fixed < 0 else jnp.full_like(student_r, fixed)
  return student_r, teacher_r


# ---------------------------------------------------------------------------
# Losses (pure functions of logits; used by the step and by the tests).


def sequence_reverse_kl(student_logits_BxLxV: jax.Array, teacher_logits_BxLxV: jax.Array,
                        tokens_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Per-response log-ratio ``R = Σ_t mask_t (log π(y_t|c_t) − log q(y_t|c_t))``.

  For y ~ π (temperature 1, up to EOS), ``E[R] = KL(π(·|x) ‖ q(·|x))``: the
  Monte-Carlo estimate of the sequence reverse KL. No gradient.

  Args:
    student_logits_BxLxV: [B, L, V] student logits at the responses' contexts.
    teacher_logits_BxLxV: [B, L, V] teacher logits at the same contexts.
    tokens_BxL: [B, L] int responses.
    mask_BxL: [B, L] 1 up to and including EOS.

  Returns:
    [B] log-ratios R.

  References:
    DESIGN.md §6 (Monte-Carlo sequence reverse KL).
  """
  chex.assert_rank([student_logits_BxLxV, teacher_logits_BxLxV, tokens_BxL, mask_BxL],
                   [3, 3, 2, 2])
  chex.assert_equal_shape([student_logits_BxLxV, teacher_logits_BxLxV])
  chex.assert_equal_shape([tokens_BxL, mask_BxL])
  chex.assert_equal_shape_prefix([student_logits_BxLxV, tokens_BxL], 2)
  terms = jax.vmap(estimators.per_token_terms)(
      jax.lax.stop_gradient(student_logits_BxLxV),
      jax.lax.stop_gradient(teacher_logits_BxLxV), tokens_BxL)
  mask = mask_BxL.astype(terms.logp_score_t.dtype)
  return jnp.sum((terms.logp_score_t - terms.logp_target_t) * mask, axis=-1)


class OPDLoss(NamedTuple):
  """Output of :func:`opd_loss`.

  Attributes:
    loss: scalar, the mean surrogate over the G·N responses.
    returns: [G, N, L] the estimator's returns (before the baseline).
    baseline: [G, N, L] the baseline subtracted, 0 at masked positions and for 'none'.
    reverse_kl: [G, N] the responses' log-ratios R = Σ_t r_t.
  """

  loss: jax.Array
  returns: jax.Array
  baseline: jax.Array
  reverse_kl: jax.Array


def opd_loss(student_logits_GxNxLxV: jax.Array, teacher_logits_GxNxLxV: jax.Array,
             tokens_GxNxL: jax.Array, mask_GxNxL: jax.Array, estimator: str,
             baseline: str = "none", ema_L: jax.Array | None = None) -> OPDLoss:
  """OPD loss on G groups of N student responses: its gradient estimates ``+∇KL(π ‖ q)``.

  For each response ``y^(g,n) ~ π(·|x_g, z_g)``::

    loss = (1/GN) Σ_{g,n} opd_surrogate(estimator, π, sg(q), y^(g,n), b^(g,n))

  (``estimators.opd_surrogate``: ``Σ_t sg(A_t) log π(y_t|c_t)`` for (i)–(v),
  plus ``Σ_t KL_t`` for rao_blackwell; no pathwise term). Baselines ``b_t``:
  ``none``; ``leave_one_out`` — the mean of the other N − 1 responses' returns
  at position t (``estimators.leave_one_out_baseline``, needs N ≥ 2);
  ``ema`` — the given per-position ``ema_L``. Neither depends on the
  response's own tokens, so every unbiased estimator stays unbiased.

  Args:
    student_logits_GxNxLxV: [G, N, L, V] student logits (with gradient).
    teacher_logits_GxNxLxV: [G, N, L, V] teacher logits (stop-gradiented here).
    tokens_GxNxL: [G, N, L] int responses sampled from the student.
    mask_GxNxL: [G, N, L] 1 up to and including EOS.
    estimator: a name in ``estimators.ALL_ESTIMATORS`` (static).
    baseline: ``'none'``, ``'leave_one_out'`` or ``'ema'`` (static; only with
      the estimators of ``estimators.BASELINED_ESTIMATORS``).
    ema_L: [L] EMA baseline (required for ``'ema'``).

  Returns:
    :class:`OPDLoss`.

  Raises:
    ValueError: unknown estimator/baseline, a baseline for an estimator that
      takes none, N < 2 with leave-one-out, or ``ema_L`` missing.

  References:
    DESIGN.md §5.3, §5.4, §6; seed 002 Theorem 1.
  """
  chex.assert_rank([student_logits_GxNxLxV, teacher_logits_GxNxLxV, tokens_GxNxL,
                    mask_GxNxL], [4, 4, 3, 3])
  chex.assert_equal_shape([student_logits_GxNxLxV, teacher_logits_GxNxLxV])
  chex.assert_equal_shape([tokens_GxNxL, mask_GxNxL])
  chex.assert_equal_shape_prefix([student_logits_GxNxLxV, tokens_GxNxL], 3)
  if baseline not in BASELINES:
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}.")
  if baseline != "none" and not estimators.uses_baseline(estimator):
    raise ValueError(
        f"Estimator {estimator!r} takes no baseline; estimators with a baseline: "
        f"{estimators.BASELINED_ESTIMATORS}.")
  teacher = jax.lax.stop_gradient(teacher_logits_GxNxLxV)
  over_gn = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731
  terms = over_gn(estimators.per_token_terms)(
      jax.lax.stop_gradient(student_logits_GxNxLxV), teacher, tokens_GxNxL)
  maskf = mask_GxNxL.astype(terms.kl_t.dtype)
  r_t = (terms.logp_score_t - terms.logp_target_t) * maskf
  returns = over_gn(functools.partial(estimators.estimator_returns, estimator))(
      r_t, terms.kl_t, mask_GxNxL)
  if baseline == "leave_one_out":
    base = jax.vmap(estimators.leave_one_out_baseline)(returns, maskf) * maskf
  elif baseline == "ema":
    if ema_L is None:
      raise ValueError("baseline='ema' needs ema_L, the [L] EMA of the returns.")
    chex.assert_shape(ema_L, tokens_GxNxL.shape[-1:])
    base = jnp.broadcast_to(ema_L.astype(returns.dtype), returns.shape) * maskf
  else:
    base = jnp.zeros_like(returns)
  surrogate = functools.partial(estimators.opd_surrogate, estimator)
  if baseline == "none":
    losses = over_gn(surrogate)(student_logits_GxNxLxV, teacher, tokens_GxNxL, mask_GxNxL)
  else:
    losses = over_gn(surrogate)(student_logits_GxNxLxV, teacher, tokens_GxNxL, mask_GxNxL,
                                base)
  return OPDLoss(loss=jnp.mean(losses), returns=returns, baseline=base,
                 reverse_kl=jnp.sum(r_t, axis=-1))


def seq_kd_loss(student_logits_BxLxV: jax.Array, tokens_BxL: jax.Array,
                mask_BxL: jax.Array) -> jax.Array:
  """Sequence-level KD loss: negative log-likelihood of teacher samples.

  ``loss = −(1/B) Σ_b Σ_t mask_bt log π(y_bt | c_bt)`` with ``y_b ~ q``; its
  gradient is an unbiased estimate of ``∇ KL(q ‖ π)`` (the forward sequence KL;
  ``E_q[log q]`` does not depend on θ).

  Args:
    student_logits_BxLxV: [B, L, V] student logits at the samples' contexts.
    tokens_BxL: [B, L] int teacher samples.
    mask_BxL: [B, L] 1 up to and including EOS.

  Returns:
    Scalar loss.

  References:
    DESIGN.md §6; Kim & Rush (2016), "Sequence-Level Knowledge Distillation".
  """
  chex.assert_rank([student_logits_BxLxV, tokens_BxL, mask_BxL], [3, 2, 2])
  chex.assert_equal_shape([tokens_BxL, mask_BxL])
  chex.assert_equal_shape_prefix([student_logits_BxLxV, tokens_BxL], 2)
  logp = jax.nn.log_softmax(student_logits_BxLxV, axis=-1)
  logp_t = jnp.take_along_axis(logp, tokens_BxL[..., None].astype(jnp.int32), -1)[..., 0]
  return -jnp.mean(jnp.sum(logp_t * mask_BxL.astype(logp_t.dtype), axis=-1))


def reverse_kl_summary(reverse_kl_BxK: jax.Array, level: float = 0.95) -> dict:
  """Mean, standard error and confidence interval of a Monte-Carlo sequence KL.

  With ``R[b, k]`` the log-ratio of one response per prompt b and latent k:
  ``m_b = (1/K) Σ_k R[b, k]``, ``mean = (1/B) Σ_b m_b``,
  ``stderr = std_b(m_b) / sqrt(B)`` (ddof 1), ``ci = mean ± z·stderr``
  (``metrics.confidence_interval``; z = 1.96 at 95%). Per latent likewise.

  Args:
    reverse_kl_BxK: [B, K] log-ratios (B ≥ 2).
    level: confidence level.

  Returns:
    dict with ``reverse_kl``, ``reverse_kl_stderr``, ``reverse_kl_ci_low``,
    ``reverse_kl_ci_high`` (scalars) and ``reverse_kl_per_latent``,
    ``reverse_kl_per_latent_stderr`` ([K]).

  References:
    DESIGN.md §6.
  """
  chex.assert_rank(reverse_kl_BxK, 2)
  num = reverse_kl_BxK.shape[0]
  if num < 2:
    raise ValueError(f"reverse_kl_BxK needs >= 2 rows for a standard error, got {num}.")
  per_prompt = jnp.mean(reverse_kl_BxK, axis=1)
  mean = jnp.mean(per_prompt)
  stderr = jnp.std(per_prompt, ddof=1) / jnp.sqrt(num)
  low, high = metrics_lib.confidence_interval(mean, stderr, level)
  return dict(reverse_kl=mean, reverse_kl_stderr=stderr, reverse_kl_ci_low=low,
              reverse_kl_ci_high=high,
              reverse_kl_per_latent=jnp.mean(reverse_kl_BxK, axis=0),
              reverse_kl_per_latent_stderr=jnp.std(reverse_kl_BxK, axis=0, ddof=1)
              / jnp.sqrt(num))


# ---------------------------------------------------------------------------
# The train step.


def init_state(setup: DistillSetup) -> train.TrainState:
  """The student's state at step 0 (parameters from ``config.seed``); no teacher inside."""

  def init(seed):
    init_key, rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 1))
    params = model_lib.init_params(setup.student, init_key)
    extra = {}
    if setup.config.distill.baseline == "ema":
      extra = dict(ema=jnp.zeros((setup.response_len,), jnp.float32))
    zero = jnp.zeros((), jnp.int32)
    return train.TrainState(step=zero, params=params, opt_state=setup.optimizer.init(params),
                            rng=rng, extra=extra, nonfinite_streak=zero, nonfinite_total=zero)

  # One small compiled program (the seed is an argument, so it is shared by seeds).
  return jax.jit(init)(setup.config.seed)


def data_key(config) -> jax.Array:
  """The key whose ``fold_in(·, step)`` draws the prompts of ``step``."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)


def distill_loss(setup: DistillSetup, params, teacher_params, batch: tasks_lib.Batch,
                 key: jax.Array, extra: dict):
  """The configured distillation loss on one batch of prompts.

  Rows are (prompt, student latent, rollout); see :func:`row_latents`.

  Args:
    setup: from :func:`build`.
    params: student parameters (differentiated).
    teacher_params: teacher parameters (no gradient flows into them).
    batch: ``tasks.Batch`` of the student's task.
    key: PRNG key of the step.
    extra: estimator state (``{'ema': [L]}`` for the EMA baseline).

  Returns:
    (loss, (metrics dict, new extra)).

  References:
    DESIGN.md §6.
  """
  d = setup.config.distill
  length, tau = setup.response_len, d.temperature
  n_rollouts = d.num_rollouts if d.loss in ("opd", "per_token_reward") else 1
  num_prompts = batch.prompt.shape[0]
  k_student = setup.student.config.num_latents
  student_r, teacher_r = row_latents(setup, num_prompts, n_rollouts)
  prompt_r = jnp.repeat(batch.prompt, k_student * n_rollouts, axis=0)
  teacher_params = jax.lax.stop_gradient(teacher_params)
  student_key, off_key, coin_key = jax.random.split(key, 3)
  metrics = {}

  def student_sample():
    return sampling.sample(setup.student, jax.lax.stop_gradient(params), prompt_r,
                           student_r, student_key, length, tau)

  def teacher_sample():
    return sampling.sample(setup.teacher, teacher_params, prompt_r, teacher_r, off_key,
                           length, tau)

  def score(tokens):
    s = model_lib.teacher_forced_logits(setup.student, params, prompt_r, tokens, student_r)
    t = model_lib.teacher_forced_logits(setup.teacher, teacher_params, prompt_r, tokens,
                                        teacher_r)
    return s, jax.lax.stop_gradient(t)

  new_extra = dict(extra)
  if d.loss in ("opd", "per_token_reward"):
    rollout = student_sample()
    s_logits, t_logits = score(rollout.tokens)
    estimator = d.estimator if d.loss == "opd" else estimators.PER_TOKEN_REWARD
    baseline = d.baseline if d.loss == "opd" else "none"
    groups = num_prompts * k_student
    group = lambda a: a.reshape((groups, n_rollouts) + a.shape[1:])  # noqa: E731
    out = opd_loss(group(s_logits / tau), group(t_logits / tau), group(rollout.tokens),
                   group(rollout.mask), estimator, baseline, extra.get("ema"))
    loss = out.loss
    maskf = group(rollout.mask).astype(jnp.float32)
    if baseline == "ema":
      step_mean = jnp.sum(out.returns * maskf, axis=(0, 1)) / jnp.maximum(
          jnp.sum(maskf, axis=(0, 1)), 1.0)
      new_extra["ema"] = estimators.ema_update(extra["ema"], step_mean, d.ema_decay)
    if baseline != "none":
      metrics["baseline_explained_variance"] = estimators.explained_variance(
          out.returns, out.baseline, maskf)
    reverse_kl = sequence_reverse_kl(s_logits, t_logits, rollout.tokens, rollout.mask)
    metrics.update(sample_reverse_kl=jnp.mean(reverse_kl),
                   response_len=jnp.mean(jnp.sum(rollout.mask, axis=-1)))
  elif d.loss == "gkd":
    if d.gkd_lambda > 0:
      on = student_sample()
    if d.gkd_lambda < 1:
      if d.gkd_off_policy == "teacher":
        off = teacher_sample()
        off_tokens, off_mask = off.tokens, off.mask
      else:
        off_tokens = jnp.repeat(batch.target[:, :length], k_student, axis=0)
        off_mask = jnp.repeat(batch.target_mask[:, :length], k_student, axis=0)
    if d.gkd_lambda == 1:
      tokens, mask, on_policy = on.tokens, on.mask, jnp.ones(prompt_r.shape[:1], bool)
    elif d.gkd_lambda == 0:
      tokens, mask, on_policy = off_tokens, off_mask, jnp.zeros(prompt_r.shape[:1], bool)
    else:
      on_policy = jax.random.bernoulli(coin_key, d.gkd_lambda, prompt_r.shape[:1])
      tokens = jnp.where(on_policy[:, None], on.tokens, off_tokens)
      mask = jnp.where(on_policy[:, None], on.mask, off_mask)
    s_logits, t_logits = score(tokens)
    loss = divergences.gkd_loss(s_logits, t_logits, mask, d.gkd_beta, tau, "batchmean")
    reverse_kl = sequence_reverse_kl(s_logits, t_logits, tokens, mask)
    on_f = on_policy.astype(jnp.float32)
    metrics.update(
        on_policy_fraction=jnp.mean(on_f),
        sample_reverse_kl=jnp.sum(reverse_kl * on_f) / jnp.maximum(jnp.sum(on_f), 1.0),
        response_len=jnp.mean(jnp.sum(mask, axis=-1)))
  else:  # seq_kd
    rollout = teacher_sample()
    s_logits = model_lib.teacher_forced_logits(setup.student, params, prompt_r,
                                               rollout.tokens, student_r)
    loss = seq_kd_loss(s_logits, rollout.tokens, rollout.mask)
    metrics.update(teacher_sample_nll=loss,
                   response_len=jnp.mean(jnp.sum(rollout.mask, axis=-1)))
  metrics["loss"] = loss
  return loss, (metrics, new_extra)


def make_train_step(setup: DistillSetup, mesh: jax.sharding.Mesh | None = None):
  """The jitted ``train_step(state, teacher_params, data_key) -> (state, metrics)``.

  With a data ``mesh`` (``sharding.make_mesh``) the prompts are split over its
  devices and the state, teacher and key are replicated (data parallelism,
  as ``train.make_train_step``); inputs must already be laid out so
  (``sharding.replicate``).

  One XLA program: prompts drawn on device from ``fold_in(data_key, step)``,
  the rollouts' ``lax.scan``, teacher and student scoring, the loss and one
  Optax update of the STUDENT. The teacher's parameters are an argument that
  is never differentiated nor returned. A step with a non-finite loss or
  gradient leaves the student unchanged (as in ``train.make_train_step``).
  """
  config = setup.config

  def train_step(state: train.TrainState, teacher_params, dkey: jax.Array):
    batch = setup.task.sample(jax.random.fold_in(dkey, state.step), config.train.batch_size)
    if mesh is not None:
      batch = sharding.constrain_batch(batch, mesh)
    rng, key = jax.random.split(state.rng)
    grads, (aux, extra) = jax.grad(
        lambda p: distill_loss(setup, p, teacher_params, batch, key, state.extra),
        has_aux=True)(state.params)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux["grad_norm"] = optax.global_norm(grads)
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
    return jax.jit(train_step)
  rep = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(rep, rep, rep), out_shardings=(rep, rep))


# ---------------------------------------------------------------------------
# Evaluation.


# The key of the fixed evaluation prompts and samples: a training run's.
eval_key = train.eval_key


def make_evaluate(setup: DistillSetup):
  """The jitted ``evaluate(params, teacher_params, key) -> metrics``.

  On ``num_eval_samples`` prompts from ``key`` (fixed per run), one student
  sample per prompt and student latent at temperature 1:

  * ``reverse_kl`` ± CI: Monte-Carlo sequence KL(π ‖ q) (:func:`reverse_kl_summary`);
  * ``token_kl`` / ``token_forward_kl``: teacher-forced per-token KL(π ‖ q) /
    KL(q ‖ π) on the data targets y*, averaged over valid tokens;
  * ``validity``: per student latent, the share of samples equal to one of the
    task's valid outputs (``metrics.match_strategies``); ``teacher_validity``
    the same for teacher samples at the corresponding teacher latents.
  """
  task, length = setup.task, setup.response_len
  num = setup.config.distill.num_eval_samples
  k_student = setup.student.config.num_latents
  student_r, teacher_r = row_latents(setup, num, 1)

  def pad_to_target(tokens_RxL):
    return jnp.pad(tokens_RxL, ((0, 0), (0, task.target_len - length)))

  @jax.jit
  def evaluate(params, teacher_params, key):
    batch = task.sample(key, num)
    prompt_r = jnp.repeat(batch.prompt, k_student, axis=0)
    s_key, t_key = jax.random.split(jax.random.fold_in(key, 1))
    rollout = sampling.sample(setup.student, params, prompt_r, student_r, s_key, length)
    s_logits = model_lib.teacher_forced_logits(setup.student, params, prompt_r,
                                               rollout.tokens, student_r)
    t_logits = model_lib.teacher_forced_logits(setup.teacher, teacher_params, prompt_r,
                                               rollout.tokens, teacher_r)
    reverse_kl = sequence_reverse_kl(s_logits, t_logits, rollout.tokens, rollout.mask)
    result = reverse_kl_summary(reverse_kl.reshape(num, k_student))
    # Teacher-forced token KLs on the data y*.
    target_r = jnp.repeat(batch.target[:, :length], k_student, axis=0)
    tmask_r = jnp.repeat(batch.target_mask[:, :length], k_student, axis=0).astype(jnp.float32)
    s_data = model_lib.teacher_forced_logits(setup.student, params, prompt_r, target_r,
                                             student_r)
    t_data = model_lib.teacher_forced_logits(setup.teacher, teacher_params, prompt_r,
                                             target_r, teacher_r)
    n_tokens = jnp.maximum(jnp.sum(tmask_r), 1.0)
    result["token_kl"] = jnp.sum(divergences.reverse_kl(t_data, s_data) * tmask_r) / n_tokens
    result["token_forward_kl"] = jnp.sum(
        divergences.forward_kl(t_data, s_data) * tmask_r) / n_tokens
    # Task validity of student and teacher samples.
    valid = batch.valid_outputs
    samples = pad_to_target(rollout.tokens).reshape(num, k_student, task.target_len)
    result["validity"] = metrics_lib.per_latent_validity(
        metrics_lib.match_strategies(samples, valid))
    teacher_rollout = sampling.sample(setup.teacher, teacher_params, prompt_r, teacher_r,
                                      t_key, length)
    t_samples = pad_to_target(teacher_rollout.tokens).reshape(num, k_student, task.target_len)
    result["teacher_validity"] = metrics_lib.per_latent_validity(
        metrics_lib.match_strategies(t_samples, valid))
    result["response_len"] = jnp.mean(jnp.sum(rollout.mask, axis=-1))
    result["samples"] = samples[:4]
    return result

  return evaluate


# ---------------------------------------------------------------------------
# The loop.


def structural_differences(old: dict, new: dict) -> list[str]:
  """``train.structural_differences`` plus the distillation fields that change a run."""
  diffs = train.structural_differences(old, new)
  for path in STRUCTURAL_FIELDS:
    section, name = path.split(".")
    a = old.get(section, {}).get(name)
    b = new.get(section, {}).get(name)
    if a != b:
      diffs.append(f"{path}: {a!r} -> {b!r}")
  return diffs


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Distils the teacher into the student (resuming from ``workdir``), evaluates, summarises.

  Writes to ``workdir`` what ``train.train_and_evaluate`` writes:
  ``checkpoints/`` (Orbax; the student's state only), TensorBoard events,
  ``config.json``, ``metrics.jsonl`` (train lines every ``log_every`` steps,
  eval lines at step 0, every ``eval_every`` steps and at the end) and
  ``summary.json`` (``reverse_kl`` with ``reverse_kl_stderr`` and the 95% CI,
  per latent, ``token_kl``, ``token_forward_kl``, ``validity``,
  ``teacher_validity``, ``seconds_per_step``, ``steps``, ...).

  Reliability as in ``train.train_and_evaluate``: validation and the
  student/teacher compatibility check before anything compiles, a workdir
  lock, refusal of a resume that changes the state's structure or the
  teacher, SIGTERM/SIGINT checkpoint, non-finite steps skipped.

  Returns:
    The summary dict.
  """
  setup = build(config)  # Validation and the teacher/student checks: nothing compiles.
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
  os.makedirs(workdir, exist_ok=True)
  with train.workdir_lock_for_this_process(workdir):
    return _train_and_evaluate(setup, workdir, mesh)


def _train_and_evaluate(setup: DistillSetup, workdir: str, mesh: jax.sharding.Mesh) -> dict:
  config = setup.config
  # Refuse a mismatched resume before reading the teacher (run_loop checks again).
  train.check_config_matches(config, workdir, structural_differences)
  # The teacher and the student's state are replicated on the mesh (a state
  # restored from a checkpoint lands there too): committed inputs, so the
  # step compiles once.
  teacher_params = sharding.replicate(load_teacher_params(setup), mesh)
  state = init_state(setup)
  train_step = make_train_step(setup, mesh)
  evaluate = make_evaluate(setup)
  dkey, ekey = data_key(config), eval_key(config)
  num_steps = config.train.num_steps

  def train_line(step, aux, rate):
    return f"step {step:6d}/{num_steps}  loss {aux['loss']:.4f}  {rate:.1f} steps/s"

  def eval_line(step, result):
    return (f"eval @ {step}: reverse KL {result['reverse_kl']:.3f} "
            f"[{result['reverse_kl_ci_low']:.3f}, {result['reverse_kl_ci_high']:.3f}]  "
            f"validity {[round(v, 3) for v in result['validity']]}")

  state, result, seconds_per_step = train.run_loop(
      config, workdir, initial_state=state,
      restore_target=sharding.abstract_state(state, mesh),
      place=lambda s: sharding.replicate(s, mesh),
      step=lambda s: train_step(s, teacher_params, dkey),
      evaluate=lambda s: train._to_python(
          jax.device_get(evaluate(s.params, teacher_params, ekey))),
      differences=structural_differences, train_line=train_line, eval_line=eval_line,
      eval_at_start=True)
  d = config.distill
  summary = dict(
      steps=int(state.step),
      loss=d.loss,
      estimator=d.estimator if d.loss == "opd" else None,
      baseline=d.baseline,
      teacher_workdir=d.teacher_workdir,
      teacher_latent=d.teacher_latent,
      seconds_per_step=seconds_per_step,
      nonfinite_steps=int(state.nonfinite_total),
      task=config.task.name,
      **{k: v for k, v in result.items() if k != "samples"},
  )
  train.write_summary(workdir, summary)
  return summary


def format_summary(summary: dict) -> str:
  """A few human-readable lines of a distillation summary (what ``run.py`` prints)."""
  name = summary["loss"] + (f" ({summary['estimator']})" if summary.get("estimator") else "")
  return "\n".join([
      f"Distilled for {summary['steps']} steps with {name} on '{summary['task']}'.",
      f"  sequence reverse KL(student || teacher) (MC): {summary['reverse_kl']:.4f} "
      f"[95% CI {summary['reverse_kl_ci_low']:.4f}, {summary['reverse_kl_ci_high']:.4f}]",
      f"  token KL on data: reverse {summary['token_kl']:.4f}   forward "
      f"{summary['token_forward_kl']:.4f}",
      "  validity per latent: student " + ", ".join(f"{v:.1%}" for v in summary["validity"])
      + "; teacher " + ", ".join(f"{v:.1%}" for v in summary["teacher_validity"]),
      f"  {summary['seconds_per_step'] * 1e3:.1f} ms per step",
  ])
