"""Tests for latentdiv.objectives.distillation: on-policy distillation (DESIGN.md §6).

* Exact enumeration (DESIGN.md §7) with the actual LatentTransformer as student
  and as (wider) teacher, V = 3 reserved + 2 content ids, L = 3, EOS
  truncation on: every OPD estimator is unbiased for ∇KL(π ‖ q), through
  ``moments_lib.opd_gradient_moments`` and through ``opd.opd_loss`` itself
  (no baseline, EMA, leave-one-out); the per-token reward is biased. The oracle's
  sums run in float64 on the models' (float32) logits, so "exact" means a
  relative error ≤ 1e-4; the bias detected is ≥ 5%.
* The teacher receives no gradient from any loss, is not in the optimiser
  state and is unchanged by training; mismatched vocabularies, latents and
  lengths raise before anything is traced or compiled.
* A short distillation run lowers the Monte-Carlo reverse KL; the loop writes
  its logs, checkpoints and summary, and refuses a resume that changes the
  method. (Slow, ``-m slow``: per-latent GKD and OPD with an EMA baseline, and
  a resumed run equal to an uninterrupted one.)
* The pure functions match NumPy (chex variants, jit and no jit).
"""

import functools
import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiv import checkpointing
from latentdiv import estimators as est
from latentdiv import experiment
from latentdiv import logprobs
from latentdiv import model as model_lib
from latentdiv import moments as moments_lib
from latentdiv import objectives
from latentdiv import opd
from latentdiv import oracle
from latentdiv import sampling
from latentdiv import train
from latentdiv import vocab
from latentdiv import workdir as workdir_lib
from latentdiv.objectives import distillation

V = vocab.NUM_RESERVED + 2  # PAD, BOS, EOS + 2 content ids.
L = 3
PROMPT = np.array([[3, 4]], np.int32)
EXACT_TOL = 1e-4
BIAS_MIN = 0.05


# ---------------------------------------------------------------------------
# Enumeration fixtures: the real LatentTransformer as student and teacher.


def _init(model, seed, unembed_scale, eos_bias):
  params = jax.jit(functools.partial(model_lib.init_params, model))(jax.random.PRNGKey(seed))
  params = jax.tree.map(lambda a: a, params)
  # Sharper distributions than at initialisation, and an EOS likely enough that
  # many responses end before L (truncation is then really exercised).
  params["unembed"]["kernel"] = unembed_scale * params["unembed"]["kernel"]
  params["unembed"]["bias"] = params["unembed"]["bias"].at[vocab.EOS].add(eos_bias)
  return params


def _tiny_models():
  student = model_lib.LatentTransformer(model_lib.ModelConfig(
      vocab_size=V, num_latents=1, max_len=PROMPT.shape[1] + L, d_model=8, num_heads=2,
      num_layers=1, d_ff=16))
  teacher = model_lib.LatentTransformer(model_lib.ModelConfig(
      vocab_size=V, num_latents=2, max_len=PROMPT.shape[1] + L, d_model=16, num_heads=4,
      num_layers=1, d_ff=32))
  return student, _init(student, 0, 1.5, 2.5), teacher, _init(teacher, 1, 3.0, 0.0)


def _logits_fn(model, latent):
  """``(params, tokens_NxL) -> logits_NxLxV`` at a fixed latent, as float64."""

  def fn(params, tokens_NxL):
    n = tokens_NxL.shape[0]
    logits = model_lib.teacher_forced_logits(
        model, params, jnp.repeat(jnp.asarray(PROMPT), n, axis=0), tokens_NxL,
        jnp.full((n,), latent, jnp.int32))
    return logits.astype(jnp.float64)

  return fn


# opd.opd_loss variants run through the oracle, (estimator, baseline): one
# response each, then N = 2 responses with the leave-one-out baseline.
SINGLE_VARIANTS = tuple((e, "none") for e in est.ALL_ESTIMATORS) + tuple(
    (e, "ema") for e in est.BASELINED_ESTIMATORS)
PAIR_VARIANTS = tuple((e, "leave_one_out") for e in est.BASELINED_ESTIMATORS)
EMA_L = (0.3, -0.2, 0.5)  # A fixed (sample-independent) per-position baseline.


def _stacked_grads(s_fn, t_fn, s_params, t_params, variants):
  """``(tokens_NxL, mask_NxL) -> pytree [E, ...]``: ∇ of opd.opd_loss for E variants.

  One forward pass of each model and one reverse pass vmapped over the E
  losses (``jax.jacrev``), so the enumeration program holds the model once.
  """

  def losses(p, tokens_NxL, mask_NxL):
    s = s_fn(p, tokens_NxL)[None]
    t = t_fn(t_params, tokens_NxL)[None]
    return jnp.stack([
        opd.opd_loss(s, t, tokens_NxL[None], mask_NxL[None], e, b,
                              jnp.asarray(EMA_L) if b == "ema" else None).loss
        for e, b in variants])

  return lambda tokens_NxL, mask_NxL: jax.jacrev(losses)(s_params, tokens_NxL, mask_NxL)


def _enumeration_report(s_fn, t_fn, s_params, t_params):
  """Relative errors ‖E[g] − ∇KL‖ / ‖∇KL‖ of the estimators, all in one program.

  Keys: ``oracle/per_token_reward`` (``moments_lib.opd_gradient_moments``, i.e.
  ``surrogates.opd_surrogate``), ``distillation/EST/BASELINE``
  (``opd.opd_loss``, the loss the train step runs, with each
  baseline; leave-one-out over N = 2 responses enumerated in pairs); the exact
  KL, P(EOS before L) and ‖∇KL‖.
  """
  kw = dict(eos_id=vocab.EOS, pad_id=vocab.PAD)
  exact = oracle.exact_opd_kl_grad(s_fn, s_params, t_fn, t_params, V, L, **kw)
  err = lambda mean: oracle.relative_error(mean, exact)  # noqa: E731
  out = {}
  # The oracle's own OPD route (surrogates.opd_surrogate), for the biased coefficient.
  out["oracle/per_token_reward"] = err(moments_lib.opd_gradient_moments(
      s_fn, s_params, t_fn, t_params, est.PER_TOKEN_REWARD, V, L, **kw).mean)
  student_fn = lambda p, y, k: s_fn(p, y)  # noqa: E731
  single = _stacked_grads(s_fn, t_fn, s_params, t_params, SINGLE_VARIANTS)
  mean = moments_lib.estimator_moments(lambda y, m: single(y[None], m[None]), student_fn,
                                  s_params, 0, V, L, **kw).mean
  for i, (e, b) in enumerate(SINGLE_VARIANTS):
    out[f"distillation/{e}/{b}"] = err(jax.tree.map(lambda x, i=i: x[i], mean))
  pair = _stacked_grads(s_fn, t_fn, s_params, t_params, PAIR_VARIANTS)
  mean = moments_lib.pair_estimator_moments(pair, student_fn, s_params, 0, V, L, **kw).mean
  for i, (e, b) in enumerate(PAIR_VARIANTS):
    out[f"distillation/{e}/{b}"] = err(jax.tree.map(lambda x, i=i: x[i], mean))
  out["kl"] = oracle.exact_opd_kl(s_fn, s_params, t_fn, t_params, V, L, **kw)
  out["grad_norm"] = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(exact)))
  logp = oracle.exact_sequence_logprobs(student_fn, s_params, 0, V, L, **kw)
  tokens = oracle.all_sequences(V, L)
  early = jnp.any(tokens[:, :L - 1] == vocab.EOS, axis=1)
  out["p_early_eos"] = jnp.sum(jnp.where(early, jnp.exp(logp), 0.0))
  return out


class ExactEnumerationTest(parameterized.TestCase):
  """Unbiasedness and bias, exactly, with a frozen teacher (teacher latent 1).

  All V^L = 125 responses (and 125² pairs for leave-one-out) are enumerated
  once, in one jitted program, in setUpClass.
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    with jax.enable_x64(True):
      student, s_params, teacher, t_params = _tiny_models()
      report = jax.jit(functools.partial(_enumeration_report, _logits_fn(student, 0),
                                         _logits_fn(teacher, 1)))(s_params, t_params)
      cls.report = {k: float(v) for k, v in report.items()}

  def test_setting_is_not_degenerate(self):
    self.assertGreater(self.report["kl"], 0.05)
    self.assertGreater(self.report["p_early_eos"], 0.2)  # EOS truncation is exercised.
    self.assertLess(self.report["p_early_eos"], 0.9)
    self.assertGreater(self.report["grad_norm"], 1e-2)

  def test_oracle_per_token_reward_is_biased(self):
    self.assertGreater(self.report["oracle/per_token_reward"], BIAS_MIN)

  @parameterized.parameters(*(SINGLE_VARIANTS + PAIR_VARIANTS))
  def test_distillation_opd_loss(self, estimator, baseline):
    error = self.report[f"distillation/{estimator}/{baseline}"]
    if estimator == est.PER_TOKEN_REWARD:
      self.assertGreater(error, BIAS_MIN)
    else:
      self.assertLess(error, EXACT_TOL)

  def test_both_routes_agree_on_the_bias(self):
    self.assertAlmostEqual(self.report["distillation/per_token_reward/none"],
                           self.report["oracle/per_token_reward"], places=5)


# ---------------------------------------------------------------------------
# Pure functions against NumPy.


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _random_inputs(seed, shape_prefix, vocab_size=6):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=shape_prefix + (vocab_size,)).astype(np.float32) * 2
  t = rng.normal(size=shape_prefix + (vocab_size,)).astype(np.float32) * 2
  tokens = rng.integers(0, vocab_size, size=shape_prefix).astype(np.int32)
  lengths = rng.integers(1, shape_prefix[-1] + 1, size=shape_prefix[:-1])
  mask = np.arange(shape_prefix[-1]) < lengths[..., None]
  return s, t, tokens, mask


class PureFunctionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_sequence_reverse_kl(self):
    s, t, tokens, mask = _random_inputs(0, (5, 4))
    got = self.variant(opd.sequence_reverse_kl)(s, t, tokens, mask)
    ls, lt = _np_log_softmax(s), _np_log_softmax(t)
    pick = lambda a: np.take_along_axis(a, tokens[..., None], -1)[..., 0]  # noqa: E731
    want = np.sum((pick(ls) - pick(lt)) * mask, axis=-1)
    chex.assert_shape(got, (5,))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_seq_kd_loss(self):
    s, _, tokens, mask = _random_inputs(1, (6, 3))
    got = self.variant(opd.seq_kd_loss)(s, tokens, mask)
    logp = np.take_along_axis(_np_log_softmax(s), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, -np.mean(np.sum(logp * mask, -1)), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_reverse_kl_summary(self):
    r = np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32)
    got = self.variant(opd.reverse_kl_summary)(r)
    m = r.mean(1)
    se = m.std(ddof=1) / np.sqrt(50)
    np.testing.assert_allclose(got["reverse_kl"], m.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["reverse_kl_stderr"], se, rtol=1e-4)
    np.testing.assert_allclose(got["reverse_kl_ci_low"], m.mean() - 1.959964 * se, rtol=1e-4)
    np.testing.assert_allclose(got["reverse_kl_ci_high"], m.mean() + 1.959964 * se, rtol=1e-4)
    np.testing.assert_allclose(got["reverse_kl_per_latent"], r.mean(0), rtol=1e-5)
    np.testing.assert_allclose(got["reverse_kl_per_latent_stderr"],
                               r.std(0, ddof=1) / np.sqrt(50), rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_opd_loss_values_and_leave_one_out_baseline(self):
    s, t, tokens, mask = _random_inputs(3, (2, 3, 4))  # G=2, N=3, L=4.
    fn = self.variant(functools.partial(opd.opd_loss,
                                        estimator="reward_to_go_baseline",
                                        baseline="leave_one_out"))
    out = fn(s, t, tokens, mask)
    ls, lt = _np_log_softmax(s), _np_log_softmax(t)
    pick = lambda a: np.take_along_axis(a, tokens[..., None], -1)[..., 0]  # noqa: E731
    r = (pick(ls) - pick(lt)) * mask
    to_go = np.flip(np.cumsum(np.flip(r, -1), -1), -1) * mask
    base = np.zeros_like(to_go)
    for g in range(2):
      for n in range(3):
        others = [m for m in range(3) if m != n]
        count = mask[g, others].sum(0)
        base[g, n] = np.where(count > 0, (to_go[g, others] * mask[g, others]).sum(0)
                              / np.maximum(count, 1), 0.0) * mask[g, n]
    want_loss = np.mean(np.sum((to_go - base) * pick(ls) * mask, -1))
    chex.assert_shape(out.returns, (2, 3, 4))
    np.testing.assert_allclose(out.returns, to_go, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.baseline, base, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.reverse_kl, r.sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.loss, want_loss, rtol=1e-4, atol=1e-5)

  def test_opd_loss_rejects_bad_options(self):
    s, t, tokens, mask = _random_inputs(4, (1, 2, 3))
    with self.assertRaisesRegex(ValueError, "takes no baseline"):
      opd.opd_loss(s, t, tokens, mask, "trajectory", "leave_one_out")
    with self.assertRaisesRegex(ValueError, "baseline must be one of"):
      opd.opd_loss(s, t, tokens, mask, "rao_blackwell", "batch")
    with self.assertRaisesRegex(ValueError, "ema_L"):
      opd.opd_loss(s, t, tokens, mask, "rao_blackwell", "ema")
    with self.assertRaisesRegex(ValueError, "Unknown estimator"):
      opd.opd_loss(s, t, tokens, mask, "reinforce")
    with self.assertRaises(AssertionError):
      opd.opd_loss(s[0], t[0], tokens[0], mask[0], "trajectory")


# ---------------------------------------------------------------------------
# Teacher workdirs, configs, the loop.


def _teacher_config(alphabet_size=2, num_latents=2, prompt_len=2):
  c = objectives.base_config()
  c.task.alphabet_size = alphabet_size
  c.task.num_strategies = 2
  c.task.prompt_len = prompt_len
  c.model.num_latents = num_latents
  c.model.d_model = 16  # Wider than the student (d_model 8); one layer keeps compiles short.
  c.model.num_heads = 4
  c.model.num_layers = 1
  c.model.d_ff = 32
  c.objective.sequence_term.rollout_len = 2
  c.objective.jsd_prefix_len = 2
  return c


def _write_teacher(workdir, unembed_scale=6.0, **kwargs):
  """A run.py-style teacher workdir: config.json and one checkpoint of a (sharpened) init."""
  cfg = _teacher_config(**kwargs)
  setup, objective = experiment.build(cfg)
  state = jax.jit(lambda: train.init_state(setup, objective))()
  params = jax.tree.map(lambda a: a, state.params)
  params["unembed"]["kernel"] = unembed_scale * params["unembed"]["kernel"]
  state = state.replace(params=params)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(workdir_lib.config_record(cfg), f)
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), 1, 1)
  checkpointing.save(manager, 7, state, dict(step=7), force=True)
  manager.wait_until_finished()
  manager.close()
  return params


def _student_config(teacher_workdir, **distill_fields):
  c = objectives.base_config("distillation")
  c.task.alphabet_size = 2
  c.task.num_strategies = 2
  c.task.prompt_len = 2
  c.model.num_latents = 1
  c.model.d_model = 8
  c.model.num_heads = 2
  c.model.num_layers = 1
  c.model.d_ff = 16
  c.train.batch_size = 16
  c.train.num_steps = 40
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.train.checkpoint_every = 20
  c.optim.learning_rate = 1e-2
  c.optim.warmup_steps = 2
  c.optim.schedule = "constant"
  c.objective.teacher_workdir = teacher_workdir
  c.objective.teacher_latent = 1
  c.objective.num_eval_samples = 128
  for name, value in distill_fields.items():
    c.objective[name] = value
  return c


class _CountCompiles:
  """Counts jaxpr traces and backend compiles while active."""

  EVENTS = ("/jax/core/compile/backend_compile_duration",
            "/jax/core/compile/jaxpr_trace_duration")

  def __enter__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def _listen(self, event, duration, **kwargs):  # pylint: disable=unused-argument
    if event in self.EVENTS:
      self.count += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


_TEACHER = {}  # One teacher workdir for the whole module (written in setUpModule).


def setUpModule():
  root = tempfile.mkdtemp(prefix="test_distillation_")
  _TEACHER["root"] = root
  _TEACHER["dir"] = os.path.join(root, "teacher")
  _TEACHER["params"] = _write_teacher(_TEACHER["dir"])


def tearDownModule():
  shutil.rmtree(_TEACHER["root"], ignore_errors=True)


class ConfigAndMismatchTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = _TEACHER["root"]
    cls.teacher_dir = _TEACHER["dir"]

  @parameterized.named_parameters(
      ("vocabulary", dict(alphabet_size=3), {}, "Vocabulary mismatch.*alphabet_size"),
      ("per_latent_k", {}, dict(teacher_latent=-1), "Latent mismatch.*num_latents"),
      ("latent_out_of_range", {}, dict(teacher_latent=2), r"Latent mismatch.*\[0, 2\)"),
      ("length", dict(prompt_len=3), dict(response_len=3), "Length mismatch.*max_len"),
  )
  def test_mismatch_raises_before_anything_compiles(self, task, distill_fields, pattern):
    config = _student_config(self.teacher_dir, **distill_fields)
    for name, value in task.items():
      config.task[name] = value
    workdir = os.path.join(self.root, "mismatch_" + self._testMethodName)
    with _CountCompiles() as counter:
      with self.assertRaisesRegex(ValueError, pattern):
        experiment.train_and_evaluate(config, workdir)
    self.assertEqual(counter.count, 0)
    self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))

  def test_fixed_latent_needs_a_one_latent_student(self):
    config = _student_config(self.teacher_dir)
    config.model.num_latents = 2
    with self.assertRaisesRegex(ValueError, "num_latents must be 1"):
      experiment.build(config)

  @parameterized.named_parameters(
      ("loss", dict(loss="kd"), "config.objective.loss must be one of"),
      ("estimator", dict(estimator="reinforce"), "config.objective.estimator must be one of"),
      ("baseline", dict(baseline="mean"), "config.objective.baseline must be one of"),
      ("baseline_needs_opd", dict(loss="gkd", baseline="ema"), "config.objective.baseline"),
      ("baseline_needs_estimator", dict(estimator="trajectory", baseline="ema"),
       "estimator that takes a baseline"),
      ("estimator_needs_baseline", dict(estimator="kl_to_go_baseline"), "needs a baseline"),
      ("loo_rollouts", dict(estimator="rao_blackwell", baseline="leave_one_out"),
       "num_rollouts must be >= 2"),
      ("lambda", dict(gkd_lambda=1.5), r"config.objective.gkd_lambda must be in \[0, 1\]"),
      ("beta", dict(gkd_beta=-0.1), r"config.objective.gkd_beta must be in \[0, 1\]"),
      ("temperature", dict(temperature=0.0), "config.objective.temperature must be > 0"),
      ("teacher_latent", dict(teacher_latent=-2), "config.objective.teacher_latent"),
      ("workdir", dict(teacher_workdir=""), "config.objective.teacher_workdir"),
      ("missing_workdir", dict(teacher_workdir="/nonexistent/x"), "cannot read"),
      ("response_len", dict(response_len=9), r"config.objective.response_len must be in"),
      ("off_policy", dict(gkd_off_policy="student"), "gkd_off_policy must be one of"),
      ("discount", dict(discount=1.5), r"config.objective.discount must be in \[0, 1\]"),
      ("discount_trajectory", dict(estimator="trajectory", discount=0.5),
       "apply to the to-go estimators"),
      ("teacher_mix", dict(teacher_mix=1.0), r"config.objective.teacher_mix must be in \[0, 1\)"),
      ("mix_weight", dict(mix_weight="seq"), "config.objective.mix_weight must be one of"),
      ("single_step_kl", dict(estimator="kl_to_go", single_step_kl=True),
       "single_step_kl applies to"),
      ("mix_trajectory", dict(estimator="trajectory", teacher_mix=0.2), "to-go estimator"),
      ("variants_need_opd", dict(loss="gkd", teacher_mix=0.2), "variants of loss='opd'"),
      ("warm_start", dict(warm_start="dpo"), "warm_start must be one of"),
      ("warm_start_steps", dict(warm_start="seq_kd"), "warm_start_steps go together"),
      ("warm_steps_alone", dict(warm_start_steps=5), "warm_start_steps go together"),
      ("student_workdir", dict(student_workdir="/nonexistent/y"),
       "config.objective.student_workdir"),
      ("unknown", dict(estimatr="kl_to_go"),
       r"config.objective.estimatr is not a field.*config.objective.estimator\?"),
  )
  def test_invalid_fields_are_named(self, fields, pattern):
    config = _student_config(self.teacher_dir)
    for name, value in fields.items():
      config.objective[name] = value
    with self.assertRaisesRegex(ValueError, pattern):
      setup, objective = experiment.build(config)
      if "student_workdir" in fields:  # Read when the run starts, before compiling.
        train.init_state(setup, objective)

  def test_teacher_gets_no_gradient(self):
    # Sampling is replaced by random responses (the rollouts carry no gradient
    # anyway), which keeps the programs small.
    by_loss = {}
    for loss in distillation.LOSSES:
      config = _student_config(self.teacher_dir, loss=loss, gkd_lambda=0.5,
                               gkd_off_policy="teacher")
      config.train.batch_size = 4
      _, by_loss[loss] = experiment.build(config)
    setup = by_loss["opd"].setup
    teacher_params = by_loss["opd"].frozen()
    params = jax.jit(functools.partial(model_lib.init_params, setup.model))(
        jax.random.PRNGKey(0))
    batch = setup.task.sample(jax.random.PRNGKey(1), 4)

    def fake_sample(model, params, prompt, latent, key, length, temperature=1.0):
      del model, params, latent, temperature
      tokens = jax.random.randint(key, (prompt.shape[0], length), vocab.EOS, V)
      mask = logprobs.mask_through_eos(tokens)
      tokens = jnp.where(mask, tokens, vocab.PAD)
      return sampling.Rollout(tokens, jnp.zeros(tokens.shape), mask)

    def teacher_grad(objective):
      # Only the teacher's gradient: with the teacher stop-gradiented, autodiff
      # returns zeros that depend on nothing and the program is trivial.
      fn = lambda tp: objective.loss(params, tp, {}, batch, jax.random.PRNGKey(2),  # noqa: E731
                                     jnp.zeros((), jnp.int32))[0]
      return jax.jit(jax.grad(fn))(teacher_params)

    with mock.patch.object(distillation.sampling, "sample", fake_sample):
      for loss, objective in by_loss.items():
        for leaf in jax.tree.leaves(teacher_grad(objective)):
          np.testing.assert_array_equal(leaf, 0.0, err_msg=loss)


class DistillRunTest(absltest.TestCase):

  def test_short_run_lowers_reverse_kl_and_leaves_teacher_alone(self):
    teacher_dir, original = _TEACHER["dir"], _TEACHER["params"]
    config = _student_config(teacher_dir, loss="opd", estimator="rao_blackwell")
    workdir = os.path.join(self.create_tempdir().full_path, "student")
    summary = experiment.train_and_evaluate(config, workdir)

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      log = [json.loads(line) for line in f]
    evals = [r for r in log if r["kind"] == "eval"]
    self.assertEqual([r["step"] for r in evals], [0, 40])
    first, last = evals[0], evals[-1]
    self.assertGreater(first["reverse_kl"], 0.3)
    self.assertLess(last["reverse_kl_ci_high"], first["reverse_kl_ci_low"])
    self.assertLess(last["reverse_kl"], 0.6 * first["reverse_kl"])
    self.assertEqual(summary["steps"], 40)
    for key in ("reverse_kl", "reverse_kl_stderr", "reverse_kl_ci_low", "reverse_kl_ci_high",
                "token_kl", "token_forward_kl", "validity", "teacher_validity",
                "response_len", "seconds_per_step"):
      self.assertIn(key, summary)
    self.assertLen(summary["validity"], 1)
    self.assertLessEqual(summary["reverse_kl_ci_low"], summary["reverse_kl"])
    with open(os.path.join(workdir, "summary.json")) as f:
      self.assertEqual(json.load(f)["steps"], 40)

    # The teacher's checkpoint is unchanged and is not part of the student's state.
    setup, objective = experiment.build(config)
    chex.assert_trees_all_equal(objective.frozen(), original)
    self.assertEqual(sorted(os.listdir(os.path.join(teacher_dir, "checkpoints"))), ["7"])
    manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), 3, 20)
    abstract = jax.eval_shape(lambda: train.init_state(setup, objective))
    restored, _, step = checkpointing.restore_latest(manager, abstract)
    manager.close()
    self.assertEqual(step, 40)
    n_student = len(jax.tree.leaves(restored.params))
    adam = [s for s in jax.tree.leaves(restored.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]
    self.assertLen(adam, 1)
    chex.assert_trees_all_equal_structs(adam[0].mu, restored.params)
    chex.assert_trees_all_equal_structs(adam[0].nu, restored.params)
    # Besides Adam's two moments of the student, the optimiser state holds only scalars.
    arrays = [x for x in jax.tree.leaves(restored.opt_state) if np.ndim(x) > 0]
    self.assertLen(arrays, 2 * n_student)
    initial = train.init_state(setup, objective).params
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), restored.params, initial)
    self.assertTrue(all(jax.tree.leaves(changed)))

    # Resuming this workdir with another method is refused (before compiling).
    config.objective.loss = "seq_kd"
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError,
                                "objective.loss: 'opd' -> 'seq_kd'"):
      experiment.train_and_evaluate(config, workdir)

  def _warm_config(self):
    config = _student_config(_TEACHER["dir"], loss="opd", estimator="rao_blackwell",
                             warm_start="seq_kd", warm_start_steps=3)
    config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 6, 1, 2
    return config

  def test_warm_start_switches_in_one_program(self):
    setup, objective = experiment.build(self._warm_config())
    state = train.init_state(setup, objective)
    step = train.make_train_step(setup, objective, frozen=objective.frozen())
    phases, seq_kd_nll, reverse_kl = [], [], []
    for _ in range(6):
      state, metrics = step(state)
      phases.append(float(metrics["warm_start"]))
      seq_kd_nll.append(float(metrics["teacher_sample_nll"]))
      reverse_kl.append(float(metrics["sample_reverse_kl"]))
    self.assertEqual(step._cache_size(), 1)  # Both phases: one compiled program.
    self.assertEqual(phases, [1, 1, 1, 0, 0, 0])
    self.assertTrue(all(v > 0 for v in seq_kd_nll[:3]) and all(v == 0 for v in seq_kd_nll[3:]))
    self.assertTrue(all(v == 0 for v in reverse_kl[:3]) and all(v != 0 for v in reverse_kl[3:]))

  def test_teacher_mixed_single_step_with_leave_one_out(self):
    # MiniLLM's sampling and single-step term with a leave-one-out baseline under
    # sequence weights: one program, responses from sampling.sample_mixture.
    config = _student_config(_TEACHER["dir"], loss="opd", estimator="reward_to_go_baseline",
                             baseline="leave_one_out", num_rollouts=2, single_step_kl=True,
                             teacher_mix=0.3)
    setup, objective = experiment.build(config)
    state = train.init_state(setup, objective)
    step = train.make_train_step(setup, objective, frozen=objective.frozen())
    calls = []
    real = distillation.sampling.sample_mixture

    def spy(*args, **kwargs):
      calls.append(args[9])  # teacher_mix (α).
      return real(*args, **kwargs)

    with mock.patch.object(distillation.sampling, "sample_mixture", spy):
      for _ in range(3):
        new_state, metrics = step(state)
        self.assertTrue(np.isfinite(float(metrics["loss"])))
        self.assertTrue(np.isfinite(float(metrics["sample_reverse_kl"])))
        state = new_state
    self.assertEqual(calls, [0.3])  # Traced once, with α.
    self.assertEqual(step._cache_size(), 1)
    self.assertEqual(int(state.step), 3)

  @pytest.mark.slow
  def test_warm_start_resumes_across_the_switch(self):
    # Interrupted at step 2 (inside the warm start) and resumed: the same run.
    config = self._warm_config()
    root = self.create_tempdir().full_path
    straight = experiment.train_and_evaluate(config, os.path.join(root, "straight"))
    config.train.num_steps = 2
    experiment.train_and_evaluate(config, os.path.join(root, "resumed"))
    config.train.num_steps = 6
    resumed = experiment.train_and_evaluate(config, os.path.join(root, "resumed"),
                                            accept_changes=True)
    for key in ("reverse_kl", "token_kl", "response_len"):
      np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-5, err_msg=key)

  def test_student_workdir_initialises_the_student(self):
    root = self.create_tempdir().full_path
    first = _student_config(_TEACHER["dir"], loss="seq_kd")
    first.train.num_steps = 4
    experiment.train_and_evaluate(first, os.path.join(root, "sft"))
    config = _student_config(_TEACHER["dir"], student_workdir=os.path.join(root, "sft"))
    setup, objective = experiment.build(config)
    state = train.init_state(setup, objective)
    chex.assert_trees_all_equal(state.params, experiment.load(os.path.join(root, "sft")).params)
    self.assertEqual(int(state.step), 0)

  def test_row_latents(self):
    _, objective = experiment.build(_student_config(_TEACHER["dir"]))
    student, teacher = objective.row_latents(2, 3)
    np.testing.assert_array_equal(student, np.zeros(6))
    np.testing.assert_array_equal(teacher, np.ones(6))  # the fixed teacher latent 1.
    config = _student_config(_TEACHER["dir"], teacher_latent=-1)
    config.model.num_latents = 2
    _, objective = experiment.build(config)
    student, teacher = objective.row_latents(2, 3)
    want = np.array([0, 0, 0, 1, 1, 1] * 2)  # (prompt, latent, rollout) order.
    np.testing.assert_array_equal(student, want)
    np.testing.assert_array_equal(teacher, want)

  @pytest.mark.slow
  def test_per_latent_variants_and_exact_resume(self):
    root = self.create_tempdir().full_path
    variants = (("gkd", dict(gkd_lambda=0.5, gkd_off_policy="teacher")),
                ("opd", dict(estimator="kl_to_go_baseline", baseline="ema")),
                ("opd", dict(estimator="rao_blackwell", baseline="leave_one_out",
                             num_rollouts=2)))
    for i, (loss, extra) in enumerate(variants):
      config = _student_config(_TEACHER["dir"], loss=loss, teacher_latent=-1, **extra)
      config.model.num_latents = 2
      config.train.num_steps = 20
      straight = experiment.train_and_evaluate(config, os.path.join(root, f"run{i}"))
      self.assertLess(straight["reverse_kl"], _first_eval(root, f"run{i}"))
      self.assertLen(straight["validity"], 2)
    # Stopping at step 10 and resuming gives the run that never stopped (the
    # last config: OPD, leave-one-out, two rollouts).
    config.train.num_steps = 10
    experiment.train_and_evaluate(config, os.path.join(root, "resumed"))
    config.train.num_steps = 20
    resumed = experiment.train_and_evaluate(config, os.path.join(root, "resumed"),
                                            accept_changes=True)
    for key in ("reverse_kl", "token_kl", "validity"):
      np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-5)


def _first_eval(root, name):
  with open(os.path.join(root, name, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "eval"][0]["reverse_kl"]


if __name__ == "__main__":
  absltest.main()
