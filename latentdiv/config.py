"""The experiment configuration schema: every field, its default, and its validation.

Experiment files under ``experiments/configs/`` start from ``base_config()``
and override what they change (big_vision style). ``validate(config)`` runs
before anything is built or compiled and raises a ``ValueError`` that names the
field, its value and what is allowed.
"""

from __future__ import annotations

import difflib
import math

import ml_collections

from latentdiv import divergences
from latentdiv import estimators
from latentdiv import raml
from latentdiv import reconstruction
from latentdiv import tasks
from latentdiv import vocab

# Allowed names come from the modules that implement them (one source of truth).
TASKS = tasks.TASKS
LATE_VARIANTS = tasks.LATE_VARIANTS
TRANSFORMS = tasks.TRANSFORMS
RECONSTRUCTIONS = reconstruction.RECONSTRUCTION_KINDS
JSD_WEIGHTINGS = divergences.WEIGHTINGS
ESTIMATORS = estimators.ESTIMATORS
BASELINED = estimators.BASELINED_ESTIMATORS
BASELINES = ("none", "leave_one_out", "ema", "jsd")
TARGETS = ("data", "label_smoothing", "raml")
SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "bfloat16")
# Top-level sections other modules add to ``base_config()`` and validate
# themselves (``distill.distill_config``).
EXTENSION_SECTIONS = ("distill",)


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (a tiny early-divergence run)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The synthetic task (latentdiv.tasks). Sizes of the task define the vocabulary.
  c.task = ml_collections.ConfigDict()
  c.task.name = "early_divergence"
  c.task.prompt_len = 4
  c.task.alphabet_size = 6
  c.task.num_strategies = 3
  # late_divergence only: the strategies share a copy of the prompt, then differ on
  # the last num_divergent tokens ('shift': offsets; 'permute': same tokens, other order).
  c.task.num_divergent = 3
  c.task.variant = "shift"
  c.task.shift = 1  # early/late 'shift': strategy s adds s*shift (mod alphabet).
  # transduction only: input lengths are uniform in [min_len, prompt_len].
  c.task.min_len = 2
  c.task.transform = "reverse"

  # The model (latentdiv.model.ModelConfig). num_latents is K.
  c.model = ml_collections.ConfigDict()
  c.model.num_latents = 3
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.num_layers = 2
  c.model.d_ff = 256
  c.model.dtype = "float32"

  # The objective: reconstruction − λ_jsd·Ĵ − λ_pg·(sequence-level KL)  (DESIGN §3–5).
  c.objective = ml_collections.ConfigDict()
  c.objective.reconstruction = "hard_em"
  c.objective.lambda_jsd = 0.1
  c.objective.jsd_weighting = "uniform"
  c.objective.jsd_prefix_len = 4  # the 'prefix' weighting's L.
  # What the reconstruction term scores: the data y* ('data', maximum likelihood),
  # token-level label-smoothed targets, or RAML samples y ~ q(y | y*; tau) (DESIGN §8).
  c.objective.targets = "data"

  # Label smoothing and RAML (used when objective.targets is one of them).
  c.raml = ml_collections.ConfigDict()
  c.raml.epsilon = 0.1  # label smoothing weight of the uniform prior over content tokens.
  c.raml.tau = 0.8  # payoff temperature.
  c.raml.convention = "rescaled"  # 'rescaled' is what the paper's tau values mean.
  c.raml.reward = "hamming"  # 'hamming' (exact sampler) or 'edit' (approximate).
  c.raml.num_samples = 4  # N samples per example, drawn inside the jitted step.

  # Sequence-level inter-latent KL by prefix rollouts (DESIGN §5); off when lambda_pg = 0.
  c.seq_pg = ml_collections.ConfigDict()
  c.seq_pg.lambda_pg = 0.0
  c.seq_pg.estimator = "rao_blackwell"
  c.seq_pg.baseline = "none"
  c.seq_pg.rollout_len = 4  # L
  c.seq_pg.num_rollouts = 1  # N per (example, latent); leave_one_out needs N >= 2.
  c.seq_pg.num_pairs = 0  # ordered pairs per example; 0 = all K(K-1).
  c.seq_pg.warmup_steps = 0
  c.seq_pg.ramp_steps = 0
  c.seq_pg.ema_decay = 0.9  # for the 'ema' baseline and the JSD control-variate fit.

  # Optax optimiser.
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0

  # The loop.
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 3
  # Stop the run after this many consecutive steps with a non-finite loss or
  # gradient (each such step is skipped: parameters unchanged).
  c.train.max_nonfinite_steps = 10
  # Data parallelism runs on every visible device (batch sizes must divide by
  # their number). False: parameters and optimiser state replicated on each;
  # True: large arrays split over the devices FSDP-style (latentdiv.sharding).
  c.train.fsdp = False

  # Evaluation: samples per latent on a fixed evaluation set.
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.greedy = False  # sample at temperature 1 (the model's distribution) by default.
  return c


def _positive_int(config, path):
  value = _get(config, path)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"config.{path} must be a positive integer, got {value!r}.")


def _non_negative(config, path, kind=(int, float)):
  value = _get(config, path)
  if (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
      or value < 0):
    raise ValueError(f"config.{path} must be a non-negative number (finite), got {value!r}.")


def _finite_number(config, path):
  value = _get(config, path)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"config.{path} must be a finite number, got {value!r}.")


def _one_of(config, path, allowed):
  value = _get(config, path)
  if value not in allowed:
    raise ValueError(f"config.{path} must be one of {allowed}, got {value!r}.")


def _get(config, path):
  node = config
  for part in path.split("."):
    if part not in node:
      raise ValueError(f"config.{path} is missing.")
    node = node[part]
  return node


def check_known_fields(config, schema, prefix: str = "config",
                       extension_sections=()) -> None:
  """Raises ValueError for a field of ``config`` that ``schema`` lacks (e.g. a misspelling).

  A config file that sets ``c.train.batchsize = 8`` on an unlocked ConfigDict
  adds a new field that nothing reads; this names it, with the closest
  known fields.

  Args:
    config: the ConfigDict to check.
    schema: a ConfigDict with every allowed field (``base_config()``).
    prefix: the dotted path of ``config`` for the message.
    extension_sections: top-level names allowed beyond ``schema`` (checked
      elsewhere).
  """
  for name in config.keys():
    path = f"{prefix}.{name}"
    if name not in schema:
      if name in extension_sections:
        continue
      close = difflib.get_close_matches(name, list(schema.keys()), n=3)
      hint = f" Did you mean {', '.join(f'{prefix}.{c}' for c in close)}?" if close else ""
      raise ValueError(
          f"{path} is not a field of the config.{hint} Known fields here: "
          f"{sorted(schema.keys())}.")
    if isinstance(schema[name], ml_collections.ConfigDict):
      if not isinstance(config[name], ml_collections.ConfigDict):
        raise ValueError(f"{path} must be a section (ConfigDict), got {config[name]!r}.")
      check_known_fields(config[name], schema[name], path)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field before anything compiles.

  Raises:
    ValueError: naming the first invalid (or unknown) field, its value and
      what is allowed.
  """
  check_known_fields(config, base_config(), extension_sections=EXTENSION_SECTIONS)
  for path in ("task.prompt_len", "task.alphabet_size", "task.num_strategies",
               "model.num_latents", "model.d_model", "model.num_heads",
               "model.num_layers", "model.d_ff", "seq_pg.rollout_len",
               "seq_pg.num_rollouts", "train.batch_size", "train.num_steps",
               "train.log_every", "train.eval_every", "train.checkpoint_every",
               "train.keep_checkpoints", "eval.batch_size", "objective.jsd_prefix_len",
               "task.num_divergent", "task.shift", "task.min_len",
               "train.max_nonfinite_steps", "raml.num_samples"):
    _positive_int(config, path)
  for path in ("objective.lambda_jsd", "seq_pg.lambda_pg", "optim.weight_decay",
               "optim.grad_clip_norm"):
    _non_negative(config, path)
  for path in ("seq_pg.warmup_steps", "seq_pg.ramp_steps", "seq_pg.num_pairs",
               "optim.warmup_steps"):
    _non_negative(config, path, kind=int)
  _one_of(config, "task.name", TASKS)
  _one_of(config, "task.variant", LATE_VARIANTS)
  _one_of(config, "task.transform", TRANSFORMS)
  _one_of(config, "objective.reconstruction", RECONSTRUCTIONS)
  _one_of(config, "objective.jsd_weighting", JSD_WEIGHTINGS)
  _one_of(config, "objective.targets", TARGETS)
  _one_of(config, "raml.convention", raml.CONVENTIONS)
  _one_of(config, "raml.reward", raml.REWARDS)
  for path in ("raml.epsilon", "raml.tau", "seq_pg.ema_decay", "optim.learning_rate"):
    _finite_number(config, path)
  for path in ("eval.greedy", "train.fsdp"):
    if not isinstance(_get(config, path), bool):
      raise ValueError(f"config.{path} must be True or False, got {_get(config, path)!r}.")
  if not 0 <= config.raml.epsilon <= 1:
    raise ValueError(f"config.raml.epsilon must be in [0, 1], got {config.raml.epsilon!r}.")
  if not config.raml.tau > 0:
    raise ValueError(f"config.raml.tau must be > 0, got {config.raml.tau!r}.")
  _one_of(config, "seq_pg.estimator", ESTIMATORS)
  _one_of(config, "seq_pg.baseline", BASELINES)
  _one_of(config, "optim.schedule", SCHEDULES)
  _one_of(config, "model.dtype", DTYPES)
  if not isinstance(config.seed, int) or isinstance(config.seed, bool):
    raise ValueError(f"config.seed must be an integer, got {config.seed!r}.")
  lr = config.optim.learning_rate
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
    raise ValueError(f"config.optim.learning_rate must be a positive number, got {lr!r}.")
  if not 0 <= config.seq_pg.ema_decay < 1:
    raise ValueError(
        f"config.seq_pg.ema_decay must be in [0, 1), got {config.seq_pg.ema_decay!r}.")
  k = config.model.num_latents
  divergence_on = config.objective.lambda_jsd > 0 or config.seq_pg.lambda_pg > 0
  if k < 2 and divergence_on:
    raise ValueError(
        f"config.model.num_latents (K) must be >= 2 when a divergence term is on "
        f"(objective.lambda_jsd > 0 or seq_pg.lambda_pg > 0), got {k}.")
  if config.model.d_model % config.model.num_heads:
    raise ValueError(
        f"config.model.num_heads={config.model.num_heads} must divide "
        f"config.model.d_model={config.model.d_model}.")
  if config.task.alphabet_size < 2:
    raise ValueError(
        f"config.task.alphabet_size must be >= 2, got {config.task.alphabet_size}.")
  if config.seq_pg.num_pairs > k * (k - 1):
    raise ValueError(
        f"config.seq_pg.num_pairs must be in [0, K(K-1) = {k * (k - 1)}], "
        f"got {config.seq_pg.num_pairs}.")
  if config.seq_pg.baseline == "leave_one_out" and config.seq_pg.num_rollouts < 2:
    raise ValueError(
        "config.seq_pg.num_rollouts must be >= 2 with baseline 'leave_one_out', "
        f"got {config.seq_pg.num_rollouts}.")
  if config.seq_pg.baseline != "none" and config.seq_pg.estimator not in BASELINED:
    raise ValueError(
        f"config.seq_pg.baseline={config.seq_pg.baseline!r} needs an estimator that "
        f"takes a baseline: config.seq_pg.estimator must be one of {BASELINED}, got "
        f"{config.seq_pg.estimator!r}.")
  if config.seq_pg.estimator.endswith("_baseline") and config.seq_pg.baseline == "none":
    raise ValueError(
        f"config.seq_pg.estimator={config.seq_pg.estimator!r} needs a baseline: "
        f"config.seq_pg.baseline must be one of {BASELINES[1:]}, got 'none'.")


def num_vocab(config: ml_collections.ConfigDict) -> int:
  """Vocabulary size V implied by the task: reserved ids plus the alphabet."""
  return vocab.NUM_RESERVED + config.task.alphabet_size
