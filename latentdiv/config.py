"""The loop's configuration schema, the validation helpers, and the whole-config check.

A config has the loop's sections (``seed``, ``task``, ``model``, ``optim``,
``train``, ``eval``: :func:`loop_config`) and one ``objective`` section whose
``objective.name`` picks the objective (``latentdiv.objectives``) and whose
other fields belong to that objective. Experiment files under
``experiments/configs/`` start from ``latentdiv.objectives.base_config(name)``
and override what they change (big_vision style).

Validation runs before anything is built or compiled and raises a
``ValueError`` that names the field, its value and what is allowed. The
helpers here (``positive_int``, ``one_of``, ...) are what objectives use to
validate their own sections.
"""

from __future__ import annotations

import difflib
import math

import ml_collections

from latentdiv import tasks
from latentdiv import text_data
from latentdiv import text_metrics
from latentdiv import vocab

SCHEDULES = ("constant", "cosine")
TASK_NAMES = tasks.TASKS + (text_data.NAME,)  # 'text': JSONL files (latentdiv.text_data).
MIN_BPE_VOCAB = 260
DTYPES = ("float32", "bfloat16")


def loop_config() -> ml_collections.ConfigDict:
  """The sections every objective shares, with their defaults (no ``objective``)."""
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
  # branch only: the continuation after the second branch token (tasks.HARD_BRANCHES).
  c.task.hard_branch = "lookup"
  # text only (latentdiv.text_data): JSONL files, one {"prompt": str, "references": [str, ...]}
  # per line; the sizes above are then taken from the data (prompt_len, alphabet_size and
  # num_strategies are ignored).
  c.task.train_file = ""
  c.task.valid_file = ""
  c.task.tokenizer = "char"  # 'char' (one id per character) or 'bpe' (Hugging Face tokenizers).
  c.task.tokenizer_vocab_size = 512  # 'bpe' only: ids including the 4 reserved ones.
  c.task.max_prompt_len = 0  # 0: the longest prompt of the files; longer ones are truncated.
  c.task.max_target_len = 0  # 0: the longest reference + EOS; longer ones are truncated.
  c.task.bleu_tokenize = "13a"  # sacrebleu's tokenizer for the text metrics ('none', 'char', ...).

  # The training data (latentdiv.datasets). train_size = 0: a fresh batch from the task's
  # generator at every step; N > 0: a fixed training set of N distinct examples drawn once
  # from the seed (prompts disjoint from the evaluation set), iterated in epochs and
  # reshuffled at every epoch; evaluation then also scores a slice of the training set
  # (metrics prefixed 'train_'), so over-fitting shows.
  c.data = ml_collections.ConfigDict()
  c.data.train_size = 0
  # Rows the training arrays hold (0: train_size). A sweep over train_size sets it to its
  # largest size so that every size shares one compiled train step (the size is an array).
  c.data.train_capacity = 0

  # The model (latentdiv.model.ModelConfig). num_latents is K.
  c.model = ml_collections.ConfigDict()
  c.model.num_latents = 3
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.num_layers = 2
  c.model.d_ff = 256
  c.model.dtype = "float32"

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

  # Evaluation on a fixed evaluation set.
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.greedy = False  # sample at temperature 1 (the model's distribution) by default.
  return c


# What each field of loop_config means (run.py --print_config shows it beside
# the value and the default; tests/test_config.py checks every field has one).
FIELD_HELP = {
    "seed": "random seed: parameters, data order and sampling (an int32)",
    "task.name": f"the synthetic task, one of {tasks.TASKS}",
    "task.prompt_len": "prompt length P (transduction: the longest input)",
    "task.alphabet_size": "content symbols A; the vocabulary is A + 3 (PAD, BOS, EOS)",
    "task.num_strategies": "hidden strategies S the data mixes",
    "task.num_divergent": "late_divergence: the last tokens where the strategies differ",
    "task.variant": "late_divergence: 'shift' (offsets) or 'permute' (same tokens, another order)",
    "task.shift": "early/late 'shift': strategy s adds s*shift (mod A)",
    "task.min_len": "transduction: shortest input (lengths uniform in [min_len, prompt_len])",
    "task.transform": f"transduction: the map from input to output, one of {tasks.TRANSFORMS}",
    "task.hard_branch": "branch: the continuation after the second branch token, one of "
                        f"{tasks.HARD_BRANCHES}",
    "task.train_file": "text: JSONL training file, one {\"prompt\", \"references\"} per line",
    "task.valid_file": "text: JSONL held-out file, same format",
    "task.tokenizer": "text: 'char' (one id per character) or 'bpe' (Hugging Face tokenizers, "
                      "trained on train_file, saved in the run folder)",
    "task.tokenizer_vocab_size": "text, 'bpe': ids including the 4 reserved ones (>= 260)",
    "task.max_prompt_len": "text: truncate prompts to this (0: the longest in the files)",
    "task.max_target_len": "text: truncate references + EOS to this (0: the longest)",
    "task.bleu_tokenize": "text: sacrebleu's tokenizer for the BLEU metrics ('13a', 'char', ...)",
    "data.train_size": "0: fresh examples every step; N: a fixed training set of N examples "
                       "in reshuffled epochs (train_* metrics on a slice of it)",
    "data.train_capacity": "rows the training arrays hold (0: train_size); sweeps over N set "
                           "their largest N so every size shares one compiled step",
    "model.num_latents": "K, the number of latent values z",
    "model.d_model": "Transformer width",
    "model.num_heads": "attention heads (must divide d_model)",
    "model.num_layers": "Transformer blocks",
    "model.d_ff": "MLP hidden width",
    "model.dtype": "compute dtype, 'float32' or 'bfloat16' (parameters stay float32)",
    "optim.learning_rate": "AdamW peak learning rate (logged as train/learning_rate)",
    "optim.schedule": "'cosine' (decays to 0.1x over train.num_steps) or 'constant'",
    "optim.warmup_steps": "linear warmup from 0 over this many steps",
    "optim.weight_decay": "AdamW weight decay",
    "optim.grad_clip_norm": "clip the gradient's global norm to this (0: no clipping)",
    "train.batch_size": "examples per step, over all devices (divisible by their number)",
    "train.num_steps": "total train steps (the cosine schedule's horizon)",
    "train.log_every": "steps between progress lines and metrics.jsonl / TensorBoard rows",
    "train.eval_every": "steps between evaluations (and always at the end)",
    "train.checkpoint_every": "steps between checkpoints (and always at the end)",
    "train.keep_checkpoints": "how many of the newest checkpoints to keep",
    "train.max_nonfinite_steps": "stop after this many consecutive non-finite steps",
    "train.fsdp": "shard large parameter arrays over the devices (else replicate them)",
    "eval.batch_size": "evaluation examples (a fixed set; divisible by the devices)",
    "eval.greedy": "evaluate greedy decodes instead of samples at temperature 1",
}


# ---------------------------------------------------------------------------
# Validation helpers (used by the loop and by every objective's section).


def get(config, path):
  """``config[a][b]`` for ``path = 'a.b'``; ValueError naming the path if missing."""
  node = config
  for part in path.split("."):
    if part not in node:
      raise ValueError(f"config.{path} is missing.")
    node = node[part]
  return node


INT32_MAX = 2**31 - 1  # Counts and sizes enter the compiled programs as int32.


def _at_most_int32(path, value):
  if value > INT32_MAX:
    raise ValueError(f"config.{path} must be at most 2**31 - 1 = {INT32_MAX} (it is used as "
                     f"an int32), got {value!r}.")


def positive_int(config, path):
  value = get(config, path)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"config.{path} must be a positive integer, got {value!r}.")
  _at_most_int32(path, value)


def non_negative(config, path, kind=(int, float)):
  value = get(config, path)
  if (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
      or value < 0):
    raise ValueError(f"config.{path} must be a non-negative number (finite), got {value!r}.")
  if isinstance(value, int):
    _at_most_int32(path, value)


def finite_number(config, path):
  value = get(config, path)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"config.{path} must be a finite number, got {value!r}.")


def in_range(config, path, low, high, closed_high=True):
  """A finite number in ``[low, high]`` (or ``[low, high)``)."""
  finite_number(config, path)
  value = get(config, path)
  if not (low <= value and (value <= high if closed_high else value < high)):
    bracket = "]" if closed_high else ")"
    raise ValueError(f"config.{path} must be in [{low}, {high}{bracket}, got {value!r}.")


def one_of(config, path, allowed):
  value = get(config, path)
  if value not in allowed:
    raise ValueError(f"config.{path} must be one of {allowed}, got {value!r}.")


def boolean(config, path):
  if not isinstance(get(config, path), bool):
    raise ValueError(f"config.{path} must be True or False, got {get(config, path)!r}.")


def check_known_fields(config, schema, prefix: str = "config") -> None:
  """Raises ValueError for a field of ``config`` that ``schema`` lacks (e.g. a misspelling).

  A config file that sets ``c.train.batchsize = 8`` on an unlocked ConfigDict
  adds a new field that nothing reads; this names it, with the closest
  known fields.

  Args:
    config: the ConfigDict to check.
    schema: a ConfigDict with every allowed field.
    prefix: the dotted path of ``config`` for the message.
  """
  for name in config.keys():
    path = f"{prefix}.{name}"
    if name not in schema:
      close = difflib.get_close_matches(name, list(schema.keys()), n=3)
      hint = f" Did you mean {', '.join(f'{prefix}.{c}' for c in close)}?" if close else ""
      raise ValueError(
          f"{path} is not a field of the config.{hint} Known fields here: "
          f"{sorted(schema.keys())}.")
    if isinstance(schema[name], ml_collections.ConfigDict):
      if not isinstance(config[name], ml_collections.ConfigDict):
        raise ValueError(f"{path} must be a section (ConfigDict), got {config[name]!r}.")
      check_known_fields(config[name], schema[name], path)


def validate_loop(config: ml_collections.ConfigDict) -> None:
  """Checks the loop's sections (everything but ``objective``).

  Raises:
    ValueError: naming the first invalid field, its value and what is allowed.
  """
  for path in ("task.prompt_len", "task.alphabet_size", "task.num_strategies",
               "model.num_latents", "model.d_model", "model.num_heads",
               "model.num_layers", "model.d_ff", "train.batch_size", "train.num_steps",
               "train.log_every", "train.eval_every", "train.checkpoint_every",
               "train.keep_checkpoints", "eval.batch_size", "task.num_divergent",
               "task.shift", "task.min_len", "train.max_nonfinite_steps"):
    positive_int(config, path)
  for path in ("optim.weight_decay", "optim.grad_clip_norm"):
    non_negative(config, path)
  non_negative(config, "optim.warmup_steps", kind=int)
  non_negative(config, "data.train_size", kind=int)
  non_negative(config, "data.train_capacity", kind=int)
  if 0 < config.data.train_size < config.train.batch_size:
    raise ValueError(
        f"config.data.train_size={config.data.train_size} must be 0 (fresh data) or at least "
        f"config.train.batch_size={config.train.batch_size}.")
  one_of(config, "task.name", TASK_NAMES)
  one_of(config, "task.tokenizer", text_data.TOKENIZERS)
  for path in ("task.max_prompt_len", "task.max_target_len"):
    non_negative(config, path, kind=int)
  if config.task.max_target_len == 1:
    raise ValueError("config.task.max_target_len must be 0 (from the data) or >= 2 (room for "
                     "a token and the EOS), got 1.")
  positive_int(config, "task.tokenizer_vocab_size")
  if config.task.tokenizer_vocab_size < MIN_BPE_VOCAB:
    raise ValueError(f"config.task.tokenizer_vocab_size must be an integer >= {MIN_BPE_VOCAB} "
                     f"(256 bytes and 4 reserved ids; read by tokenizer 'bpe'), got "
                     f"{config.task.tokenizer_vocab_size!r}.")
  for path in ("task.train_file", "task.valid_file"):
    if not isinstance(get(config, path), str):
      raise ValueError(f"config.{path} must be a string (a JSONL file for the 'text' task, "
                       f"else ''), got {get(config, path)!r}.")
  one_of(config, "task.variant", tasks.LATE_VARIANTS)
  one_of(config, "task.transform", tasks.TRANSFORMS)
  one_of(config, "task.hard_branch", tasks.HARD_BRANCHES)
  one_of(config, "task.bleu_tokenize", text_metrics.BLEU_TOKENIZERS)
  one_of(config, "optim.schedule", SCHEDULES)
  one_of(config, "model.dtype", DTYPES)
  for path in ("eval.greedy", "train.fsdp"):
    boolean(config, path)
  finite_number(config, "optim.learning_rate")
  if (not isinstance(config.seed, int) or isinstance(config.seed, bool)
      or not -INT32_MAX - 1 <= config.seed <= INT32_MAX):
    raise ValueError(f"config.seed must be an integer in [-2**31, 2**31 - 1] (an int32), "
                     f"got {config.seed!r}.")
  if not config.optim.learning_rate > 0:
    raise ValueError(
        f"config.optim.learning_rate must be a positive number, got "
        f"{config.optim.learning_rate!r}.")
  if config.model.d_model % config.model.num_heads:
    raise ValueError(
        f"config.model.num_heads={config.model.num_heads} must divide "
        f"config.model.d_model={config.model.d_model}.")
  if config.task.alphabet_size < 2:
    raise ValueError(
        f"config.task.alphabet_size must be >= 2, got {config.task.alphabet_size}.")


def num_vocab(config: ml_collections.ConfigDict) -> int:
  """Vocabulary size V implied by the task: reserved ids plus the alphabet."""
  return vocab.NUM_RESERVED + config.task.alphabet_size


def update_from_record(base: ml_collections.ConfigDict, record: dict) -> None:
  """Copies the values of a saved ``config.json`` record into ``base`` where ``base`` has the field."""
  for key, value in record.items():
    if key not in base:
      continue
    if isinstance(base[key], ml_collections.ConfigDict):
      if isinstance(value, dict):
        update_from_record(base[key], value)
    else:
      base[key] = value
