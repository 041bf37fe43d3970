"""On-policy distillation (OPD) of a student towards a frozen teacher (DESIGN.md §6).

Student ``π_θ(y | x, z)`` (the run's ``LatentTransformer``), frozen teacher
``q(y | x, z)`` restored from the checkpoint of another run's workdir. The
objective is the sequence-level reverse KL

    minimise  E_x KL(π_θ(·|x) ‖ q(·|x)) = E_x E_{y~π_θ} [ Σ_t r_t ],
    r_t = log π_θ(y_t|c_t) − log q(y_t|c_t),

over responses sampled from the student up to EOS (positions after EOS are
masked, ``KL_t = 0`` there). A latent-conditioned teacher is distilled at one
fixed latent (``teacher_latent = k ≥ 0``; the student then has K = 1) or per
latent (``teacher_latent = -1``; student latent k → teacher latent k).

Losses (``objective.loss``), each named for what it is:

* ``opd`` — ``estimators.policy_gradient`` with ``objective.estimator`` (one
  of DESIGN.md §5.3's) and ``objective.baseline`` (``none``; ``leave_one_out``
  over ``num_rollouts ≥ 2`` responses per prompt and latent; ``ema``, a
  per-position EMA of the returns). Unbiased for ``∇ KL(π_θ ‖ q)`` (no
  pathwise term: q is frozen).
  Variants (DESIGN.md §6.4): ``objective.discount`` = γ weights the future
  terms by γ^{t'−t} (γ = 1 unbiased; γ = 0 is the per-token reward, or with
  ``rao_blackwell`` MiniLLM's single-step exact-KL term alone);
  ``objective.length_normalize`` divides them by the number of remaining
  tokens (MiniLLM); both are biased for ∇KL. ``objective.single_step_kl``
  makes the current step of ``reward_to_go`` exact (MiniLLM's single-step
  decomposition; unbiased). ``objective.teacher_mix`` = α samples the
  responses from ``α·q + (1−α)·π_θ`` token by token, reweighted by
  ``objective.mix_weight``: ``'sequence'`` keeps every variant's on-policy
  expectation, ``'token'`` (MiniLLM) is biased. ``latentdiv.opd_exact``
  measures each variant's bias exactly.
* ``per_token_reward`` — the same surrogate with the coefficient ``A_t = r_t``
  alone: the per-token reverse KL used as a reward with no future terms. A
  BIASED estimator of the sequence KL's gradient (the oracle measures it).
* ``gkd`` — GKD (Agarwal et al. 2024): teacher-forced generalised
  JSD_β(P = teacher, Q = student) per token on a mixture of responses: a row
  is a student sample with probability ``gkd_lambda`` and otherwise the data
  target y* (``gkd_off_policy='data'``) or a teacher sample (``'teacher'``).
  The coin is per row (TRL flips one per batch: same expected mixture).
* ``seq_kd`` — sequence-level KD (Kim & Rush 2016): maximise
  ``Σ_t log π_θ(y_t|c_t)`` on teacher samples, the forward sequence KL(q ‖ π_θ)
  up to a constant.

``objective.temperature = τ`` is the sampling temperature of the training
rollouts; τ = 1 is the objective above (with τ ≠ 1, ``opd`` is unbiased for
KL(π_τ ‖ q_τ) instead). Evaluation always samples at τ = 1: Monte-Carlo
sequence reverse KL(π_θ ‖ q) with a 95% confidence interval, teacher-forced
token KLs on the data, task validity of student and teacher samples.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import ml_collections

from latentdiv import baselines
from latentdiv import checkpointing
from latentdiv import config as config_lib
from latentdiv import datasets
from latentdiv import divergences
from latentdiv import estimators
from latentdiv import metrics as metrics_lib
from latentdiv import model as model_lib
from latentdiv import opd
from latentdiv.opd import OPDLoss, opd_loss, reverse_kl_summary, seq_kd_loss, sequence_reverse_kl  # noqa: F401,E501
from latentdiv import sampling
from latentdiv import train
from latentdiv import workdir as workdir_lib

LOSSES = ("opd", "gkd", "per_token_reward", "seq_kd")
BASELINES = opd.BASELINES
OFF_POLICY_SOURCES = ("data", "teacher")
WARM_STARTS = ("none", "sft", "seq_kd")


def default_config() -> ml_collections.ConfigDict:
  """The ``objective`` section of distillation. ``config.model``/``task`` describe the STUDENT."""
  d = ml_collections.ConfigDict()
  d.name = "distillation"
  # A run.py workdir: config.json (teacher model/task) and checkpoints/ (its params).
  d.teacher_workdir = ""
  # k >= 0: distil the teacher at latent k into a K = 1 student; -1: per latent.
  d.teacher_latent = 0
  d.loss = "opd"  # one of LOSSES.
  d.estimator = "rao_blackwell"  # for loss='opd': one of estimators.ESTIMATORS.
  d.baseline = "none"  # for loss='opd': 'none', 'leave_one_out' or 'ema'.
  d.num_rollouts = 1  # responses per (prompt, latent); leave_one_out needs >= 2.
  # The practitioners' variants of 'opd' (DESIGN.md §6.4), biased unless 1.0 / False:
  # gamma on the future terms (tinker's kl_discount_factor, TRL MiniLLM's gamma;
  # 0 = the per-token reward, or with rao_blackwell the single-step exact KL),
  # and MiniLLM's length normalisation of the future terms.
  d.discount = 1.0
  d.length_normalize = False
  # MiniLLM's single-step decomposition: the current step of reward_to_go(_baseline)
  # replaced by the exact per-step KL gradient (kl_to_go so treated is rao_blackwell).
  d.single_step_kl = False
  # Teacher-mixed sampling (MiniLLM): responses drawn token by token from
  # teacher_mix * q + (1 - teacher_mix) * student, reweighted by mix_weight:
  # 'sequence' (prefix ratios: each variant keeps its on-policy expectation) or
  # 'token' (MiniLLM's per-token ratio: biased). 0 = on-policy.
  d.teacher_mix = 0.0
  d.mix_weight = "sequence"
  d.ema_decay = 0.9  # for baseline='ema'.
  d.gkd_beta = 0.5  # JSD_beta mixing weight (TRL default 0.5).
  d.gkd_lambda = 0.5  # on-policy fraction: a row is a student sample w.p. lambda.
  d.gkd_off_policy = "data"  # the other rows: 'data' (y*, TRL default) or 'teacher'.
  d.temperature = 1.0  # training sampling temperature (1 = the objective of §6).
  d.response_len = 0  # L, tokens per response; 0 = the task's target length.
  d.num_eval_samples = 256  # evaluation prompts, one student sample per latent each.
  # Warm start: the first warm_start_steps steps train on the data ('sft', the
  # NLL of y*) or on teacher samples ('seq_kd'), then `loss` takes over, in one
  # run (one compiled step: lax.cond on the step). 'none': `loss` from step 0.
  d.warm_start = "none"
  d.warm_start_steps = 0
  # Initialise the student from the newest checkpoint of this run.py workdir
  # ('' = from config.seed); its model must be config.model.
  d.student_workdir = ""
  return d


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks ``config.objective`` before anything is built.

  Raises:
    ValueError: naming the first invalid field, its value and what is allowed.
  """
  d = config.objective
  if not isinstance(d.teacher_workdir, str) or not d.teacher_workdir:
    raise ValueError(
        "config.objective.teacher_workdir must name a run.py workdir (with config.json and "
        f"checkpoints/), got {d.teacher_workdir!r}.")
  if not isinstance(d.teacher_latent, int) or isinstance(d.teacher_latent, bool) or (
      d.teacher_latent < -1):
    raise ValueError(
        "config.objective.teacher_latent must be an integer >= 0 (a fixed teacher latent) "
        f"or -1 (per latent), got {d.teacher_latent!r}.")
  for name, allowed in (("loss", LOSSES), ("estimator", estimators.ESTIMATORS),
                        ("baseline", BASELINES), ("gkd_off_policy", OFF_POLICY_SOURCES),
                        ("warm_start", WARM_STARTS)):
    config_lib.one_of(config, f"objective.{name}", allowed)
  for name in ("num_rollouts", "num_eval_samples"):
    config_lib.positive_int(config, f"objective.{name}")
  if d.num_eval_samples < 2:
    raise ValueError(
        "config.objective.num_eval_samples must be >= 2 (a standard error needs two "
        f"samples), got {d.num_eval_samples!r}.")
  config_lib.non_negative(config, "objective.response_len", kind=int)
  config_lib.non_negative(config, "objective.warm_start_steps", kind=int)
  if (d.warm_start == "none") != (d.warm_start_steps == 0):
    raise ValueError(
        "config.objective.warm_start and config.objective.warm_start_steps go together: "
        f"'none' with 0 steps, or 'sft' / 'seq_kd' with > 0 steps; got "
        f"{d.warm_start!r} with {d.warm_start_steps!r}.")
  if not isinstance(d.student_workdir, str):
    raise ValueError("config.objective.student_workdir must be a run.py workdir or '', got "
                     f"{d.student_workdir!r}.")
  config_lib.in_range(config, "objective.gkd_beta", 0, 1)
  config_lib.in_range(config, "objective.gkd_lambda", 0, 1)
  config_lib.in_range(config, "objective.ema_decay", 0, 1, closed_high=False)
  config_lib.finite_number(config, "objective.temperature")
  if not d.temperature > 0:
    raise ValueError(f"config.objective.temperature must be > 0, got {d.temperature!r}.")
  if d.baseline != "none" and (
      d.loss != "opd" or d.estimator not in estimators.BASELINED_ESTIMATORS):
    raise ValueError(
        f"config.objective.baseline={d.baseline!r} needs config.objective.loss='opd' and an "
        f"estimator that takes a baseline, one of {estimators.BASELINED_ESTIMATORS}; "
        f"got loss={d.loss!r}, estimator={d.estimator!r}.")
  if d.loss == "opd" and d.estimator.endswith("_baseline") and d.baseline == "none":
    raise ValueError(
        f"config.objective.estimator={d.estimator!r} needs a baseline: "
        f"config.objective.baseline must be one of {BASELINES[1:]}, got 'none'.")
  config_lib.in_range(config, "objective.discount", 0, 1)
  config_lib.boolean(config, "objective.length_normalize")
  config_lib.boolean(config, "objective.single_step_kl")
  config_lib.in_range(config, "objective.teacher_mix", 0, 1, closed_high=False)
  config_lib.one_of(config, "objective.mix_weight", opd.MIX_WEIGHTS)
  if d.loss != "opd" and (d.single_step_kl or d.teacher_mix > 0 or d.discount != 1
                          or d.length_normalize):
    raise ValueError(
        "config.objective.discount, length_normalize, single_step_kl and teacher_mix are "
        f"variants of loss='opd'; got loss={d.loss!r} with discount={d.discount!r}, "
        f"length_normalize={d.length_normalize!r}, single_step_kl={d.single_step_kl!r}, "
        f"teacher_mix={d.teacher_mix!r}.")
  if d.loss == "opd":
    try:
      opd.check_options(d.estimator, float(d.discount), d.length_normalize,
                        d.single_step_kl, float(d.teacher_mix), d.mix_weight)
    except ValueError as err:
      raise ValueError("config.objective.discount / length_normalize / single_step_kl / "
                       f"teacher_mix: {err}") from None
  if d.baseline == "leave_one_out" and d.num_rollouts < 2:
    raise ValueError(
        "config.objective.num_rollouts must be >= 2 with baseline 'leave_one_out', got "
        f"{d.num_rollouts}.")


# ---------------------------------------------------------------------------
# The objective.


def teacher_config(teacher_workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The teacher's loop config (defaults updated from its ``config.json``) and the record.

  Raises:
    ValueError: the workdir has no readable config.json.
  """
  record = workdir_lib.read_config_record(teacher_workdir)
  if record is None:
    raise ValueError(
        f"config.objective.teacher_workdir={teacher_workdir!r}: cannot read "
        f"{teacher_workdir}/config.json. Train the teacher first, e.g. python run.py "
        "--workdir=THAT_DIR.")
  config = config_lib.loop_config()
  config_lib.update_from_record(config, record)
  return config, record


class Distillation(train.Objective):
  """Student ← frozen teacher by ``opd`` / ``per_token_reward`` / ``gkd`` / ``seq_kd``."""

  name = "distillation"
  structural_fields = ("objective.teacher_workdir", "objective.teacher_latent",
                       "objective.loss", "objective.baseline", "objective.response_len",
                       "objective.warm_start", "objective.warm_start_steps",
                       "objective.student_workdir")
  eval_at_start = True
  default_config = staticmethod(default_config)
  validate = staticmethod(validate)

  def __init__(self, setup: train.Setup):
    """Reads the teacher's config.json and checks student/teacher compatibility (nothing compiles)."""
    super().__init__(setup)
    d = self.config.objective
    t_config, self.teacher_record = teacher_config(d.teacher_workdir)
    try:
      config_lib.validate_loop(t_config)
      self.teacher = train.build_setup(t_config).model
    except ValueError as err:
      raise ValueError(
          f"The teacher's config ({d.teacher_workdir}/config.json) is invalid: {err}") from None
    task, student = setup.task, setup.model.config
    teacher = self.teacher.config
    if student.vocab_size != teacher.vocab_size:
      raise ValueError(
          f"Vocabulary mismatch: the student's task gives V = {student.vocab_size} "
          f"(config.task.alphabet_size = {self.config.task.alphabet_size} + "
          f"{student.vocab_size - self.config.task.alphabet_size} reserved ids) but the "
          f"teacher in config.objective.teacher_workdir = {d.teacher_workdir!r} has V = "
          f"{teacher.vocab_size} (task.alphabet_size = {t_config.task.alphabet_size}). "
          "Student and teacher must share the vocabulary.")
    k_teacher, k_student = teacher.num_latents, student.num_latents
    if d.teacher_latent == -1 and k_student != k_teacher:
      raise ValueError(
          f"Latent mismatch: config.objective.teacher_latent = -1 (per latent) needs "
          f"config.model.num_latents = the teacher's K = {k_teacher}, got {k_student}.")
    if d.teacher_latent >= k_teacher:
      raise ValueError(
          f"Latent mismatch: config.objective.teacher_latent must be in [0, {k_teacher}) "
          f"(the teacher's K = {k_teacher}) or -1, got {d.teacher_latent}.")
    if d.teacher_latent >= 0 and k_student != 1:
      raise ValueError(
          f"Latent mismatch: with a fixed teacher latent (config.objective.teacher_latent = "
          f"{d.teacher_latent}) the student has one latent: config.model.num_latents must "
          f"be 1, got {k_student} (use teacher_latent = -1 to distil per latent).")
    self.response_len = d.response_len or task.target_len
    if self.response_len > task.target_len:
      raise ValueError(
          f"config.objective.response_len must be in [0, {task.target_len}] (the task's "
          f"target length; 0 = all of it), got {d.response_len}.")
    if task.prompt_len + self.response_len > teacher.max_len:
      raise ValueError(
          f"Length mismatch: prompt_len {task.prompt_len} + response_len "
          f"{self.response_len} exceeds the teacher's max_len {teacher.max_len}.")

  def frozen(self):
    """The teacher's parameters, read from ``teacher_workdir`` (params only, read-only)."""
    abstract = jax.eval_shape(functools.partial(model_lib.init_params, self.teacher),
                              jax.random.PRNGKey(0))
    try:
      return checkpointing.restore_params(self.config.objective.teacher_workdir, abstract)
    except ValueError as err:
      raise ValueError(f"config.objective.teacher_workdir: {err}") from None

  def init_extra(self):
    if self.config.objective.baseline == "ema":
      return dict(ema=jnp.zeros((self.response_len,), jnp.float32))
    return {}

  def row_latents(self, num_prompts: int, num_rollouts: int):
    """Student and teacher latents [R] of the rows, ordered (prompt, student latent, rollout)."""
    k_student = self.setup.model.config.num_latents
    student_r = jnp.tile(jnp.repeat(jnp.arange(k_student, dtype=jnp.int32), num_rollouts),
                         num_prompts)
    fixed = self.config.objective.teacher_latent
    return student_r, student_r if fixed < 0 else jnp.full_like(student_r, fixed)

  def initial_params(self, params):
    """The student's parameters at step 0: from ``student_workdir`` if given."""
    workdir = self.config.objective.student_workdir
    if not workdir:
      return params
    try:
      return checkpointing.restore_params(workdir, jax.eval_shape(lambda: params))
    except ValueError as err:
      raise ValueError(f"config.objective.student_workdir: {err}") from None

  def loss(self, params, frozen, extra, batch, key, step):
    """The configured loss; during a warm start, SFT or seq-KD instead (DESIGN.md §6)."""
    d = self.config.objective
    main = lambda: self._loss(d.loss, params, frozen, extra, batch, key)  # noqa: E731
    if d.warm_start == "none":
      return main()
    warm_loss = "sft" if d.warm_start == "sft" else "seq_kd"
    warm = lambda: self._loss(warm_loss, params, frozen, extra, batch, key)  # noqa: E731
    # One program for both phases: the branches' metrics are padded to the same keys.
    keys = sorted(set(jax.eval_shape(warm)[1][0]) | set(jax.eval_shape(main)[1][0]))

    def padded(branch):
      def run():
        loss, (metrics, new_extra) = branch()
        metrics = {k: metrics.get(k, jnp.zeros((), jnp.float32)) for k in keys}
        return loss, (metrics, new_extra)
      return run

    loss, (metrics, new_extra) = jax.lax.cond(step < d.warm_start_steps, padded(warm),
                                              padded(main))
    metrics["warm_start"] = (step < d.warm_start_steps).astype(jnp.float32)
    return loss, (metrics, new_extra)

  def _loss(self, kind, params, frozen, extra, batch, key):
    d, student, teacher = self.config.objective, self.setup.model, self.teacher
    length, tau = self.response_len, d.temperature
    n_rollouts = d.num_rollouts if kind in ("opd", "per_token_reward") else 1
    num_prompts, k_student = batch.prompt.shape[0], student.config.num_latents
    student_r, teacher_r = self.row_latents(num_prompts, n_rollouts)
    prompt_r = jnp.repeat(batch.prompt, k_student * n_rollouts, axis=0)
    teacher_params = jax.lax.stop_gradient(frozen)
    student_key, off_key, coin_key = jax.random.split(key, 3)
    sample = lambda m, p, lat, k: sampling.sample(m, p, prompt_r, lat, k, length, tau)  # noqa: E731
    student_sample = lambda: sample(student, jax.lax.stop_gradient(params), student_r,  # noqa: E731
                                    student_key)

    def score(tokens):
      s = model_lib.teacher_forced_logits(student, params, prompt_r, tokens, student_r)
      t = model_lib.teacher_forced_logits(teacher, teacher_params, prompt_r, tokens, teacher_r)
      return s, jax.lax.stop_gradient(t)

    metrics, new_extra = {}, dict(extra)
    if kind in ("opd", "per_token_reward"):
      if kind == "opd" and d.teacher_mix > 0:
        rollout = sampling.sample_mixture(
            student, jax.lax.stop_gradient(params), teacher, teacher_params, prompt_r,
            student_r, teacher_r, student_key, length, float(d.teacher_mix), tau)
      else:
        rollout = student_sample()
      s_logits, t_logits = score(rollout.tokens)
      estimator = d.estimator if kind == "opd" else estimators.PER_TOKEN_REWARD
      baseline = d.baseline if kind == "opd" else "none"
      group = lambda a: a.reshape((num_prompts * k_student, n_rollouts) + a.shape[1:])  # noqa: E731
      variant = (dict(discount=float(d.discount), length_normalize=d.length_normalize,
                      single_step_kl=d.single_step_kl, teacher_mix=float(d.teacher_mix),
                      mix_weight=d.mix_weight) if kind == "opd" else {})
      out = opd_loss(group(s_logits / tau), group(t_logits / tau), group(rollout.tokens),
                     group(rollout.mask), estimator, baseline, extra.get("ema"), **variant)
      loss, maskf = out.loss, group(rollout.mask).astype(jnp.float32)
      if baseline == "ema":
        step_mean = jnp.sum(out.returns * maskf, axis=(0, 1)) / jnp.maximum(
            jnp.sum(maskf, axis=(0, 1)), 1.0)
        new_extra["ema"] = baselines.ema_update(extra["ema"], step_mean, d.ema_decay)
      if baseline != "none":
        metrics["baseline_explained_variance"] = baselines.explained_variance(
            out.returns, out.baseline, maskf)
      reverse_kl, mask = sequence_reverse_kl(s_logits, t_logits, rollout.tokens,
                                             rollout.mask), rollout.mask
      if kind == "opd" and d.teacher_mix > 0:  # Importance-weighted: unbiased for the KL.
        reverse_kl = out.reverse_kl
      metrics["sample_reverse_kl"] = jnp.mean(reverse_kl)
    elif kind == "gkd":
      on_policy = jax.random.bernoulli(coin_key, d.gkd_lambda, prompt_r.shape[:1])
      if d.gkd_lambda == 1 or d.gkd_lambda == 0:
        on_policy = jnp.full(prompt_r.shape[:1], d.gkd_lambda == 1)
      if d.gkd_off_policy == "teacher" and d.gkd_lambda < 1:
        off = sample(teacher, teacher_params, teacher_r, off_key)
        off_tokens, off_mask = off.tokens, off.mask
      else:
        off_tokens = jnp.repeat(batch.target[:, :length], k_student, axis=0)
        off_mask = jnp.repeat(batch.target_mask[:, :length], k_student, axis=0)
      if d.gkd_lambda > 0:
        on = student_sample()
        tokens = jnp.where(on_policy[:, None], on.tokens, off_tokens)
        mask = jnp.where(on_policy[:, None], on.mask, off_mask)
      else:
        tokens, mask = off_tokens, off_mask
      s_logits, t_logits = score(tokens)
      loss = opd.gkd_loss(s_logits, t_logits, mask, d.gkd_beta, tau, "batchmean")
      reverse_kl, on_f = (sequence_reverse_kl(s_logits, t_logits, tokens, mask),
                          on_policy.astype(jnp.float32))
      metrics.update(on_policy_fraction=jnp.mean(on_f),
                     sample_reverse_kl=jnp.sum(reverse_kl * on_f) / jnp.maximum(
                         jnp.sum(on_f), 1.0))
    elif kind == "sft":  # the NLL of the data y*, the usual warm start.
      tokens = jnp.repeat(batch.target[:, :length], k_student, axis=0)
      mask = jnp.repeat(batch.target_mask[:, :length], k_student, axis=0)
      s_logits = model_lib.teacher_forced_logits(student, params, prompt_r, tokens, student_r)
      loss = seq_kd_loss(s_logits, tokens, mask)
      metrics["data_nll"] = loss
    else:  # seq_kd
      rollout = sample(teacher, teacher_params, teacher_r, off_key)
      s_logits = model_lib.teacher_forced_logits(student, params, prompt_r, rollout.tokens,
                                                 student_r)
      loss, mask = seq_kd_loss(s_logits, rollout.tokens, rollout.mask), rollout.mask
      metrics["teacher_sample_nll"] = loss
    metrics["response_len"] = jnp.mean(jnp.sum(mask, axis=-1))
    return loss, (metrics, new_extra)

  def make_evaluate(self, mesh=None):
    """The jitted ``evaluate(params, teacher_params)`` on ``num_eval_samples`` fixed prompts."""
    task, length, student, teacher = (self.setup.task, self.response_len, self.setup.model,
                                      self.teacher)
    num = self.config.objective.num_eval_samples
    k_student = student.config.num_latents
    student_r, teacher_r = self.row_latents(num, 1)
    pad = lambda y: jnp.pad(y, ((0, 0), (0, task.target_len - length)))  # noqa: E731
    to_bk = lambda y: pad(y).reshape(num, k_student, task.target_len)  # noqa: E731

    # Fresh data: num prompts drawn from the evaluation key (as always); a finite or
    # text training set: its held-out prompts (cycled to num rows).
    held_out = (None if self.setup.data is None or self.setup.data.train_eval is None
                else datasets.cycle_rows(self.setup.data.heldout, num))

    @jax.jit
    def evaluate(params, teacher_params, key, batch):
      if batch is None:
        batch = task.sample(key, num)
      prompt_r = jnp.repeat(batch.prompt, k_student, axis=0)
      s_key, t_key = jax.random.split(jax.random.fold_in(key, 1))
      s_logits_fn = functools.partial(model_lib.teacher_forced_logits, student, params,
                                      prompt_r, latent_B=student_r)
      t_logits_fn = functools.partial(model_lib.teacher_forced_logits, teacher,
                                      teacher_params, prompt_r, latent_B=teacher_r)
      rollout = sampling.sample(student, params, prompt_r, student_r, s_key, length)
      reverse_kl = sequence_reverse_kl(s_logits_fn(rollout.tokens), t_logits_fn(rollout.tokens),
                                       rollout.tokens, rollout.mask)
      result = reverse_kl_summary(reverse_kl.reshape(num, k_student))
      target_r = jnp.repeat(batch.target[:, :length], k_student, axis=0)
      tmask = jnp.repeat(batch.target_mask[:, :length], k_student, axis=0).astype(jnp.float32)
      s_data, t_data = s_logits_fn(target_r), t_logits_fn(target_r)
      n_tokens = jnp.maximum(jnp.sum(tmask), 1.0)
      result["token_kl"] = jnp.sum(divergences.reverse_kl(t_data, s_data) * tmask) / n_tokens
      result["token_forward_kl"] = jnp.sum(
          divergences.forward_kl(t_data, s_data) * tmask) / n_tokens
      valid = batch.valid_outputs
      result["validity"] = metrics_lib.per_latent_validity(
          metrics_lib.match_strategies(to_bk(rollout.tokens), valid))
      t_rollout = sampling.sample(teacher, teacher_params, prompt_r, teacher_r, t_key, length)
      result["teacher_validity"] = metrics_lib.per_latent_validity(
          metrics_lib.match_strategies(to_bk(t_rollout.tokens), valid))
      result["teacher_response_len"] = jnp.mean(jnp.sum(t_rollout.mask, axis=-1))
      result["response_len"] = jnp.mean(jnp.sum(rollout.mask, axis=-1))
      result["samples"] = to_bk(rollout.tokens)[:4]
      return result

    ekey = train.eval_key(self.config)
    return lambda params, teacher_params: evaluate(params, teacher_params, ekey, held_out)

  def train_line(self, aux):
    """The quantity optimised: the sampled reverse KL (OPD, GKD) or the NLL (SFT, seq-KD)."""
    lr = f"  lr {aux['learning_rate']:.2e}" if "learning_rate" in aux else ""
    warm = aux.get("warm_start", 0.0) > 0
    if warm or "sample_reverse_kl" not in aux:
      name, value = (("data NLL", aux["data_nll"]) if aux.get("data_nll", 0.0) else
                     ("teacher-sample NLL", aux.get("teacher_sample_nll", aux["loss"])))
      return f"{name} {value:.4f}  len {aux['response_len']:.2f}{lr}"
    return (f"reverse KL (samples) {aux['sample_reverse_kl']:.4f}  "
            f"len {aux['response_len']:.2f}{lr}")

  def eval_line(self, result):
    return (f"reverse KL {result['reverse_kl']:.3f} "
            f"[{result['reverse_kl_ci_low']:.3f}, {result['reverse_kl_ci_high']:.3f}]  "
            f"validity {[round(v, 3) for v in result['validity']]}")

  def summary(self, state, result, seconds_per_step):
    d = self.config.objective
    return dict(steps=int(state.step), loss=d.loss,
                estimator=d.estimator if d.loss == "opd" else None, baseline=d.baseline,
                teacher_workdir=d.teacher_workdir, teacher_latent=d.teacher_latent,
                seconds_per_step=seconds_per_step, nonfinite_steps=int(state.nonfinite_total),
                task=self.config.task.name,
                **{k: v for k, v in result.items() if k != "samples"})

  @classmethod
  def format_summary(cls, summary: dict) -> str:
    name = summary["loss"] + (f" ({summary['estimator']})" if summary.get("estimator") else "")
    return "\n".join([
        f"Distilled for {summary['steps']} steps with {name} on '{summary['task']}'.",
        f"  sequence reverse KL(student || teacher) (MC): {summary['reverse_kl']:.4f} "
        f"[95% CI {summary['reverse_kl_ci_low']:.4f}, {summary['reverse_kl_ci_high']:.4f}]",
        f"  token KL on data: reverse {summary['token_kl']:.4f}   forward "
        f"{summary['token_forward_kl']:.4f}",
        "  validity per latent: student " + ", ".join(f"{v:.1%}" for v in summary["validity"])
        + "; teacher " + ", ".join(f"{v:.1%}" for v in summary["teacher_validity"]),
        f"  mean response length: student {summary['response_len']:.2f}, teacher "
        f"{summary['teacher_response_len']:.2f} tokens"
        + ("   WARNING: the student's responses collapsed (less than half the teacher's "
           "length; e.g. EOS first). Try a warm start: objective.warm_start='seq_kd'."
           if summary["response_len"] < 0.5 * summary["teacher_response_len"] else ""),
        f"  {summary['seconds_per_step'] * 1e3:.1f} ms per step",
    ])
