"""Reliability: bad input, killed runs, damaged checkpoints, NaNs, determinism (DESIGN.md §11).

Every test injects a fault and checks what the library does with it:

* configs drawn across the whole config space (hypothesis) are either built or
  rejected with a ``ValueError`` naming the field and its value, before
  anything compiles; an independent oracle (``expected_invalid_fields``)
  decides which is right;
* ``run.py`` with unknown fields, wrong types, invalid or overflowing values,
  broken config files and unusable workdirs: one stderr line, exit 2;
* ``run.py`` killed with SIGKILL the moment a checkpoint exists, then
  SIGTERM (exit 143), then resumed, against an uninterrupted run of the same
  config and seed: the same state, and every row of ``metrics.jsonl`` and
  TensorBoard exactly once; a run dying as its checkpoint completes;
* corrupt, partial and truncated checkpoints (the lock, the resume rules and
  checksums: ``tests/test_workdir.py``, ``tests/test_checkpointing.py``);
  a train step that cannot fit the device's memory;
* NaN parameters (one step, and a whole run), a learning rate that overflows
  the parameters and the advised rerun with a lower one, logits of ±1e4 on
  the smallest shapes;
* the same config and seed run twice.

Runs in this file share a persistent compilation cache (a temporary directory,
removed afterwards), so that the tiny config of ``tests/configs/tiny.py``
compiles once for the in-process runs and the ``run.py`` subprocesses alike.
"""

import collections
import contextlib
import glob
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import pytest
import orbax.checkpoint as ocp

from latentdiv import checkpointing
from latentdiv import divergences
from latentdiv import estimators
from latentdiv import experiment
from latentdiv import loop
from latentdiv import memory
from latentdiv import logprobs
from latentdiv import objectives
from latentdiv import opd
from latentdiv import raml
from latentdiv import reconstruction
from latentdiv import runlog
from latentdiv import sequence_term
from latentdiv import surrogates
from latentdiv import tasks
from latentdiv import text_data
from latentdiv import text_metrics
from latentdiv import train
from latentdiv import workdir as workdir_lib
import test_runlog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO, "run.py")
TINY = os.path.join(REPO, "tests", "configs", "tiny.py")

# ----------------------------------------------------------------------------
# Module state: a persistent compilation cache and memoised reference runs.
# ----------------------------------------------------------------------------

_MODULE = {}
_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


def setUpModule():  # pylint: disable=invalid-name
  _MODULE["tmp"] = tempfile.mkdtemp(prefix="latentdiv_reliability_")
  _MODULE["cache"] = os.path.join(_MODULE["tmp"], "jax_cache")
  _MODULE["old_flags"] = {name: getattr(jax.config, name) for name in _CACHE_FLAGS}
  _MODULE["references"] = {}
  jax.config.update("jax_compilation_cache_dir", _MODULE["cache"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()


def tearDownModule():  # pylint: disable=invalid-name
  for name, value in _MODULE["old_flags"].items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  shutil.rmtree(_MODULE["tmp"], ignore_errors=True)


def tiny_config():
  """``get_config()`` of tests/configs/tiny.py (what the subprocesses run)."""
  spec = importlib.util.spec_from_file_location("tiny_config", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def reference_run(num_steps: int):
  """An uninterrupted in-process run of the tiny config (memoised): (workdir, summary)."""
  if num_steps not in _MODULE["references"]:
    workdir = os.path.join(_MODULE["tmp"], f"reference_{num_steps}")
    config = tiny_config()
    config.train.num_steps = num_steps
    with contextlib.redirect_stdout(io.StringIO()):
      summary = experiment.train_and_evaluate(config, workdir)
    _MODULE["references"][num_steps] = (workdir, summary)
  return _MODULE["references"][num_steps]


def _fresh_dir(name: str) -> str:
  return tempfile.mkdtemp(prefix=name + "_", dir=_MODULE["tmp"])


@contextlib.contextmanager
def count_compilations():
  """Records every trace/lowering/XLA compilation JAX reports while active."""
  events = []

  def listener(name, duration, **kwargs):  # pylint: disable=unused-argument
    if name.startswith("/jax/core/compile/"):
      events.append((name, kwargs.get("fun_name")))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _get(config, path):
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def _set(config, path, value):
  *parents, leaf = path.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def _leaf_paths(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _leaf_paths(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _restore_raw(workdir, step):
  """The state saved at ``step``, read with Orbax directly (no target structure)."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  finally:
    checkpointer.close()


WALL_CLOCK = ("time", "steps_per_sec")  # Row fields that differ between equal runs.


def _lock_is_free(workdir):
  """Whether ``workdir``'s lock can be taken now (and is released again)."""
  try:
    with workdir_lib.lock(workdir):
      return True
  except workdir_lib.WorkdirBusyError:
    return False


def _log_records(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def _files_under(directory):
  return {os.path.relpath(f, directory): open(f, "rb").read()
          for f in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(f)}


# ----------------------------------------------------------------------------
# The config oracle: written from the schema's documentation, not from validate().
# ----------------------------------------------------------------------------

POSITIVE_INTS = (
    "task.prompt_len", "task.alphabet_size", "task.num_strategies", "task.num_divergent",
    "task.shift", "task.min_len", "model.num_latents", "model.d_model", "model.num_heads",
    "model.num_layers", "model.d_ff", "objective.jsd_prefix_len", "objective.raml.num_samples",
    "objective.sequence_term.rollout_len", "objective.sequence_term.num_rollouts",
    "train.batch_size", "train.num_steps", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite_steps",
    "eval.batch_size")
NON_NEGATIVE_NUMBERS = ("objective.lambda_jsd", "objective.sequence_term.weight",
                        "optim.weight_decay", "optim.grad_clip_norm",
                        "objective.raml.proposal_tau")
NON_NEGATIVE_INTS = ("objective.sequence_term.warmup_steps", "objective.sequence_term.ramp_steps",
                     "objective.sequence_term.num_pairs", "optim.warmup_steps",
                     "objective.anneal_steps", "data.train_size", "data.train_capacity",
                     "task.max_prompt_len", "task.max_target_len")
BASELINES = ("none", "leave_one_out", "ema", "jsd")
# Allowed names: the tuples of the modules that implement them (DESIGN.md), or
# the schema's documentation for those only the config knows.
OPTIONS = {
    # A diversity config: another objective's name leaves its fields unknown.
    "objective.name": ("diversity",),
    "task.name": tasks.TASKS,
    "task.variant": tasks.LATE_VARIANTS,
    "task.transform": tasks.TRANSFORMS,
    "task.hard_branch": tasks.HARD_BRANCHES,
    "task.tokenizer": text_data.TOKENIZERS,
    "task.bleu_tokenize": text_metrics.BLEU_TOKENIZERS,
    "model.dtype": ("float32", "bfloat16"),
    "objective.reconstruction": reconstruction.RECONSTRUCTION_KINDS,
    "objective.jsd_weighting": divergences.WEIGHTINGS,
    "objective.targets": ("data", "label_smoothing", "raml"),
    "objective.raml.convention": raml.CONVENTIONS,
    "objective.raml.reward": raml.REWARDS + raml.IMPORTANCE_REWARDS,
    "objective.sequence_term.kind": sequence_term.KINDS,
    "objective.sequence_term.estimator": estimators.ESTIMATORS,
    "objective.sequence_term.baseline": BASELINES,
    "optim.schedule": ("constant", "cosine"),
}


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _task_problems(config):
  """(invalid task fields, T or None) for a config whose task fields are each valid."""
  t = config.task
  a, p, s, d = t.alphabet_size, t.prompt_len, t.num_strategies, t.num_divergent
  distinct_shifts = len({(i * t.shift) % a for i in range(s)}) == s
  if t.name == "early_divergence":
    if not distinct_shifts:
      return {"task.shift", "task.num_strategies", "task.alphabet_size"}, None
    return set(), p + 1
  if t.name == "late_divergence":
    if d > p:
      return {"task.num_divergent", "task.prompt_len"}, None
    if t.variant == "shift" and not distinct_shifts:
      return {"task.shift", "task.num_strategies", "task.alphabet_size"}, None
    if t.variant == "permute" and not s <= d <= a:
      return {"task.num_strategies", "task.num_divergent", "task.alphabet_size"}, None
    return set(), p + d + 1
  if t.name == "pattern_placement":  # The prompt written at each of S offsets.
    return set(), p + s
  if t.name == "branch":  # Two branch tokens, then the continuation and the EOS.
    return set(), p + 2
  if t.min_len > p:
    return {"task.min_len", "task.prompt_len"}, None
  return set(), p + 1


def expected_invalid_fields(config) -> set:
  """The fields that make ``config`` invalid (empty: it must build), per the schema's rules."""
  get = lambda path: _get(config, path)  # noqa: E731
  bad = set()
  # Integers enter the compiled programs as int32.
  fits = lambda v: not _is_int(v) or v <= INT32_MAX  # noqa: E731
  for path in POSITIVE_INTS:
    if not (_is_int(get(path)) and 0 < get(path) <= INT32_MAX):
      bad.add(path)
  for path in NON_NEGATIVE_NUMBERS:
    if not (_is_number(get(path)) and get(path) >= 0 and fits(get(path))):
      bad.add(path)
  for path in NON_NEGATIVE_INTS:
    if not (_is_int(get(path)) and 0 <= get(path) <= INT32_MAX):
      bad.add(path)
  for path, allowed in OPTIONS.items():
    if get(path) not in allowed:
      bad.add(path)
  ranges = {"objective.raml.epsilon": lambda v: 0 <= v <= 1,
            "objective.raml.tau": lambda v: v > 0,
            "objective.jsd_weight_temperature": lambda v: v > 0,
            "optim.learning_rate": lambda v: v > 0,
            "objective.sequence_term.ema_decay": lambda v: 0 <= v < 1,
            "objective.wta_epsilon": lambda v: 0 <= v < 1}
  for path, ok in ranges.items():
    if not (_is_number(get(path)) and ok(get(path))):
      bad.add(path)
  if not (_is_int(config.seed) and -INT32_MAX - 1 <= config.seed <= INT32_MAX):
    bad.add("seed")
  for path in ("eval.greedy", "train.fsdp", "objective.sequence_term.pathwise"):
    if not isinstance(get(path), bool):
      bad.add(path)
  fine = lambda *paths: not bad.intersection(paths)  # noqa: E731

  k = config.model.num_latents
  pg = config.objective.sequence_term
  if fine("model.num_latents", "objective.lambda_jsd", "objective.sequence_term.weight") and (
      k < 2 and (config.objective.lambda_jsd > 0 or pg.weight > 0)):
    bad.add("model.num_latents")
  if fine("model.d_model", "model.num_heads") and config.model.d_model % config.model.num_heads:
    bad.update({"model.d_model", "model.num_heads"})
  if fine("task.alphabet_size") and config.task.alphabet_size < 2:
    bad.add("task.alphabet_size")
  if fine("model.num_latents", "objective.sequence_term.num_pairs") and (
      pg.num_pairs > k * (k - 1)):
    bad.add("objective.sequence_term.num_pairs")
  if fine("objective.sequence_term.kind", "objective.sequence_term.num_pairs") and (
      pg.kind == "mi" and pg.num_pairs):  # The MI uses every latent.
    bad.add("objective.sequence_term.num_pairs")
  if fine("task.max_target_len") and config.task.max_target_len == 1:  # Room for the EOS.
    bad.add("task.max_target_len")
  if not (_is_int(config.task.tokenizer_vocab_size)
          and 260 <= config.task.tokenizer_vocab_size <= INT32_MAX):
    bad.add("task.tokenizer_vocab_size")  # 256 bytes and 4 reserved ids.
  for path in ("task.train_file", "task.valid_file"):
    if not isinstance(get(path), str):
      bad.add(path)
  if fine("data.train_size", "train.batch_size") and (
      0 < config.data.train_size < config.train.batch_size):
    bad.add("data.train_size")
  if fine("objective.sequence_term.baseline", "objective.sequence_term.num_rollouts") and (
      pg.baseline == "leave_one_out" and pg.num_rollouts < 2):
    bad.add("objective.sequence_term.num_rollouts")
  if fine("objective.sequence_term.baseline", "objective.sequence_term.estimator") and (
      (pg.baseline != "none" and pg.estimator not in estimators.BASELINED_ESTIMATORS)
      or (pg.estimator.endswith("_baseline") and pg.baseline == "none")):
    bad.update({"objective.sequence_term.baseline", "objective.sequence_term.estimator"})
  task_fields = [p for p in list(POSITIVE_INTS) + list(OPTIONS) if p.startswith("task.")]
  if fine(*task_fields):
    task_bad, target_len = _task_problems(config)
    bad |= task_bad
    if target_len is not None:
      if fine("objective.sequence_term.rollout_len") and pg.rollout_len > target_len:
        bad.add("objective.sequence_term.rollout_len")
      if fine("objective.jsd_prefix_len") and config.objective.jsd_prefix_len > target_len:
        bad.add("objective.jsd_prefix_len")
  return bad


def _names_field(message: str, path: str) -> bool:
  if f"config.{path}" in message:
    return True
  # Task consistency errors name the task and the factory's argument.
  return (path.startswith("task.") and "config.task" in message
          and path.split(".")[-1] in message)


# Values that must be rejected, per field; every field of objectives.base_config() is here.
INT32_MAX = 2**31 - 1
_BAD_POSITIVE = (0, -1, None, True, INT32_MAX + 1)
INVALID_VALUES = {
    "seed": (None, True, 10**20, INT32_MAX + 1, -INT32_MAX - 2),
    "task.name": ("copy", "Early_Divergence", "", None),
    "task.prompt_len": _BAD_POSITIVE,
    "task.alphabet_size": (1, 0, -3, None),
    "task.num_strategies": _BAD_POSITIVE,
    "task.num_divergent": _BAD_POSITIVE,
    "task.variant": ("rotate", None),
    "task.shift": _BAD_POSITIVE,
    "task.min_len": _BAD_POSITIVE,
    "task.transform": ("sort", None),
    "model.num_latents": (0, -2, None),
    "model.d_model": (0, -8, None),
    "model.num_heads": _BAD_POSITIVE,
    "model.num_layers": _BAD_POSITIVE,
    "model.d_ff": _BAD_POSITIVE,
    "model.dtype": ("float16", "f32", None),
    "objective.name": ("diversityy", "Diversity", "", None),
    "objective.reconstruction": ("em", None),
    "objective.lambda_jsd": (-0.1, -1e-9, None),
    "objective.jsd_weighting": ("idf", None),
    "objective.jsd_prefix_len": _BAD_POSITIVE,
    "objective.jsd_weight_temperature": (0.0, -0.1, None, math.nan, math.inf),
    "objective.targets": ("bleu", None),
    "objective.raml.epsilon": (-0.1, 1.5),
    "objective.raml.tau": (0.0, -1.0),
    "objective.raml.convention": ("paper", None),
    "objective.raml.reward": ("bleu", "edit_IS", None),
    "objective.raml.proposal_tau": (-0.5, None),
    "objective.wta_epsilon": (-0.1, 1.0, None),
    "objective.anneal_steps": (-1, 2**40, None),
    "objective.sequence_term.pathwise": (None,),
    "task.hard_branch": ("copy", None),
    "task.tokenizer": ("word", None),
    "task.bleu_tokenize": ("moses", None),
    "task.max_prompt_len": (-1, None),
    "task.max_target_len": (-1, None),
    "data.train_size": (-1, None),
    "data.train_capacity": (-2, None),
    "task.tokenizer_vocab_size": (100, 259, None, True),
    "task.train_file": (None,),
    "task.valid_file": (None,),
    "objective.raml.num_samples": _BAD_POSITIVE,
    "objective.sequence_term.weight": (-1.0, None),
    "objective.sequence_term.kind": ("jsd", "KL", None),
    "objective.sequence_term.estimator": ("reinforce", "per_token_reward", None),
    "objective.sequence_term.baseline": ("mean", "batch_mean", None),
    "objective.sequence_term.rollout_len": _BAD_POSITIVE,
    "objective.sequence_term.num_rollouts": _BAD_POSITIVE,
    "objective.sequence_term.num_pairs": (-1, None, True),
    "objective.sequence_term.warmup_steps": (-1, None),
    "objective.sequence_term.ramp_steps": (-1, None),
    "objective.sequence_term.ema_decay": (1.0, -0.1, 1.5),
    "optim.learning_rate": (0.0, -1e-3, None),
    "optim.schedule": ("linear", None),
    "optim.warmup_steps": (-1, None, INT32_MAX + 1),
    "optim.weight_decay": (-0.01, None),
    "optim.grad_clip_norm": (-1.0, None),
    "train.batch_size": _BAD_POSITIVE,
    "train.num_steps": _BAD_POSITIVE + (3_000_000_000,),
    "train.log_every": _BAD_POSITIVE,
    "train.eval_every": _BAD_POSITIVE,
    "train.checkpoint_every": _BAD_POSITIVE,
    "train.keep_checkpoints": _BAD_POSITIVE,
    "train.max_nonfinite_steps": _BAD_POSITIVE,
    "eval.batch_size": _BAD_POSITIVE,
    "eval.greedy": (),
    "train.fsdp": (None,),  # ml_collections itself refuses other types for a bool.
}
# Invalid values validate() once let through (None, NaN, inf); kept as their own
# regression test and drawn by the property test too.
KNOWN_GAPS = {
    "objective.raml.epsilon": (None,),  # TypeError from a comparison with None.
    "objective.raml.tau": (None, math.inf),
    "objective.sequence_term.ema_decay": (None,),
    "objective.lambda_jsd": (math.nan, math.inf),  # Accepted; every step is then NaN.
    "objective.sequence_term.weight": (math.nan, math.inf),
    "optim.learning_rate": (math.inf,),
    "optim.weight_decay": (math.nan, math.inf),
    "optim.grad_clip_norm": (math.nan, math.inf),
    "eval.greedy": (None,),
}
for _path, _values in KNOWN_GAPS.items():
  INVALID_VALUES[_path] = tuple(INVALID_VALUES.get(_path, ())) + tuple(_values)


def _target_len(config):
  return _task_problems(config)[1]


def _clash_k1(c):
  c.model.num_latents, c.objective.lambda_jsd, c.objective.sequence_term.num_pairs = 1, 0.1, 0


def _clash_heads(c):
  c.model.d_model, c.model.num_heads = 16, 3


def _clash_pairs(c):
  c.objective.sequence_term.num_pairs = c.model.num_latents * (c.model.num_latents - 1) + 1


def _clash_leave_one_out(c):
  s = c.objective.sequence_term
  s.baseline, s.estimator, s.num_rollouts = "leave_one_out", "rao_blackwell", 1


def _clash_baseline_needs_estimator(c):
  s = c.objective.sequence_term
  s.baseline, s.estimator = "ema", "trajectory"


def _clash_estimator_needs_baseline(c):
  s = c.objective.sequence_term
  s.baseline, s.estimator = "none", "reward_to_go_baseline"


def _clash_rollout(c):
  c.objective.sequence_term.rollout_len = _target_len(c) + 1


def _clash_prefix(c):
  c.objective.jsd_prefix_len = _target_len(c) + 1


def _clash_shifts(c):
  c.task.name, c.task.alphabet_size, c.task.num_strategies, c.task.shift = (
      "early_divergence", 4, 3, 2)  # Offsets 0, 2, 0 (mod 4).
  c.objective.sequence_term.rollout_len = c.objective.jsd_prefix_len = 1


def _clash_min_len(c):
  c.task.name, c.task.min_len = "transduction", c.task.prompt_len + 1
  c.objective.sequence_term.rollout_len = c.objective.jsd_prefix_len = 1


def _clash_num_divergent(c):
  c.task.name, c.task.variant = "late_divergence", "shift"
  c.task.num_divergent = c.task.prompt_len + 1


def _clash_permute(c):
  c.task.name, c.task.variant = "late_divergence", "permute"
  c.task.num_divergent = min(c.task.prompt_len, c.task.alphabet_size)
  c.task.num_strategies = c.task.num_divergent + 1


def _clash_alphabet(c):
  c.task.alphabet_size = 1


# Configs that break exactly one cross-field rule of an otherwise valid config,
# and the field the rejection must name.
CLASHES = {
    "one_latent_with_a_divergence_term": (_clash_k1, "model.num_latents"),
    "num_heads_not_dividing_d_model": (_clash_heads, "model.num_heads"),
    "num_pairs_above_K(K-1)": (_clash_pairs, "objective.sequence_term.num_pairs"),
    "leave_one_out_with_one_rollout": (_clash_leave_one_out,
                                       "objective.sequence_term.num_rollouts"),
    "baseline_with_an_unbaselined_estimator": (_clash_baseline_needs_estimator,
                                               "objective.sequence_term.estimator"),
    "baselined_estimator_without_baseline": (_clash_estimator_needs_baseline,
                                             "objective.sequence_term.baseline"),
    "rollout_longer_than_the_target": (_clash_rollout, "objective.sequence_term.rollout_len"),
    "jsd_prefix_longer_than_the_target": (_clash_prefix, "objective.jsd_prefix_len"),
    "colliding_strategy_shifts": (_clash_shifts, "task.shift"),
    "min_len_above_prompt_len": (_clash_min_len, "task.min_len"),
    "num_divergent_above_prompt_len": (_clash_num_divergent, "task.num_divergent"),
    "permute_with_more_strategies_than_divergent_tokens": (_clash_permute,
                                                           "task.num_strategies"),
    "alphabet_of_one": (_clash_alphabet, "task.alphabet_size"),
}


@st.composite
def configs(draw, tiny=False, allow_invalid=True):
  """Configs across the whole schema: valid values, cross-field clashes, invalid values.

  Modes: ``valid`` (dependent fields drawn within what the others allow),
  ``one_bad_value`` / ``one_clash`` (a valid config with exactly one invalid
  value, or one broken cross-field rule: a missing rule cannot hide behind
  another error), ``free`` (every field independent, plus up to three invalid
  values).
  """
  mode = "valid"
  if allow_invalid:
    mode = draw(st.sampled_from(("valid", "one_bad_value", "one_clash", "free")))
  small = lambda lo, hi, tiny_hi: st.integers(lo, tiny_hi if tiny else hi)  # noqa: E731
  floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
  valid = {
      "seed": st.integers(0, 2**31 - 1),
      "task.name": st.sampled_from(tasks.TASKS),
      "task.prompt_len": small(1, 6, 3),
      "task.alphabet_size": small(2, 8, 5),
      "task.num_strategies": small(1, 4, 3),
      "task.num_divergent": small(1, 4, 3),
      "task.variant": st.sampled_from(tasks.LATE_VARIANTS),
      "task.shift": st.integers(1, 3),
      "task.min_len": st.integers(1, 4),
      "task.transform": st.sampled_from(tasks.TRANSFORMS),
      "task.hard_branch": st.sampled_from(tasks.HARD_BRANCHES),
      # The text task's fields (read only when task.name is 'text', never drawn here).
      "task.train_file": st.just(""),
      "task.valid_file": st.just(""),
      "task.tokenizer": st.sampled_from(text_data.TOKENIZERS),
      "task.tokenizer_vocab_size": st.integers(260, 4096),
      "task.max_prompt_len": st.integers(0, 8),
      "task.max_target_len": st.sampled_from((0, 2, 9)),
      "task.bleu_tokenize": st.sampled_from(("13a", "none", "char", "intl")),
      # A fixed training set may be more than a tiny task can supply (test_datasets).
      "data.train_size": st.just(0),
      "data.train_capacity": st.sampled_from((0, 128)),
      "model.num_latents": small(1, 4, 3),
      "model.d_model": st.sampled_from((8, 16) if tiny else (8, 12, 16, 32)),
      "model.num_heads": st.sampled_from((1, 2) if tiny else (1, 2, 3, 4)),
      "model.num_layers": small(1, 3, 1),
      "model.d_ff": st.sampled_from((16,) if tiny else (8, 16, 64)),
      "model.dtype": st.sampled_from(OPTIONS["model.dtype"]),
      "objective.reconstruction": st.sampled_from(OPTIONS["objective.reconstruction"]),
      "objective.wta_epsilon": floats(0.0, 0.5),
      "objective.anneal_steps": st.integers(0, 300),
      "objective.lambda_jsd": st.one_of(st.just(0.0), floats(0.01, 2.0)),
      "objective.jsd_weighting": st.sampled_from(OPTIONS["objective.jsd_weighting"]),
      "objective.jsd_prefix_len": st.integers(1, 8),
      "objective.targets": st.sampled_from(OPTIONS["objective.targets"]),
      "objective.raml.epsilon": floats(0.0, 1.0),
      "objective.raml.tau": floats(0.05, 5.0),
      "objective.raml.convention": st.sampled_from(raml.CONVENTIONS),
      "objective.raml.reward": st.sampled_from(raml.REWARDS),
      "objective.raml.num_samples": small(1, 4, 2),
      "objective.raml.proposal_tau": st.one_of(st.just(0.0), floats(0.05, 5.0)),
      "objective.sequence_term.kind": st.sampled_from(sequence_term.KINDS),
      "objective.sequence_term.pathwise": st.booleans(),
      "objective.sequence_term.weight": st.one_of(st.just(0.0), floats(0.01, 1.0)),
      "objective.sequence_term.estimator": st.sampled_from(estimators.ESTIMATORS),
      "objective.sequence_term.baseline": st.sampled_from(BASELINES),
      "objective.sequence_term.rollout_len": st.integers(1, 10),
      "objective.sequence_term.num_rollouts": small(1, 3, 2),
      "objective.sequence_term.num_pairs": st.integers(0, 13),
      "objective.sequence_term.warmup_steps": st.integers(0, 10),
      "objective.sequence_term.ramp_steps": st.integers(0, 10),
      "objective.sequence_term.ema_decay": floats(0.0, 0.999),
      "optim.learning_rate": floats(1e-5, 0.1),
      "optim.schedule": st.sampled_from(OPTIONS["optim.schedule"]),
      "optim.warmup_steps": st.integers(0, 100),
      "optim.weight_decay": floats(0.0, 0.1),
      "optim.grad_clip_norm": st.one_of(st.just(0.0), floats(0.1, 10.0)),
      "train.batch_size": small(1, 64, 4),
      "train.num_steps": st.integers(1, 100),
      "train.log_every": st.integers(1, 100),
      "train.eval_every": st.integers(1, 100),
      "train.checkpoint_every": st.integers(1, 100),
      "train.keep_checkpoints": st.integers(1, 5),
      "train.max_nonfinite_steps": st.integers(1, 20),
      "eval.batch_size": small(1, 64, 4),
      "eval.greedy": st.booleans(),
      "train.fsdp": st.booleans(),
  }
  values = {path: draw(strategy) for path, strategy in valid.items()}
  if mode != "free":
    # Coherent: dependent fields drawn inside what the others allow.
    v = values
    v["model.num_heads"] = draw(st.sampled_from(
        [h for h in (1, 2, 3, 4) if v["model.d_model"] % h == 0 and (h <= 2 or not tiny)]))
    k = v["model.num_latents"]
    if k == 1:
      v["objective.lambda_jsd"] = v["objective.sequence_term.weight"] = 0.0
    v["objective.sequence_term.num_pairs"] = (
        0 if v["objective.sequence_term.kind"] == "mi" else draw(st.integers(0, k * (k - 1))))
    v["objective.sequence_term.estimator"] = draw(st.sampled_from(
        estimators.BASELINED_ESTIMATORS if v["objective.sequence_term.baseline"] != "none" else
        [e for e in estimators.ESTIMATORS if not e.endswith("_baseline")]))
    if v["objective.sequence_term.baseline"] == "leave_one_out":
      v["objective.sequence_term.num_rollouts"] = draw(st.integers(2, 3))
    p, a = v["task.prompt_len"], v["task.alphabet_size"]
    v["task.shift"] = 1
    v["task.min_len"] = min(v["task.min_len"], p)
    d = v["task.num_divergent"] = min(v["task.num_divergent"], p, a)
    v["task.num_strategies"] = min(v["task.num_strategies"], a)
    if v["task.name"] == "late_divergence" and v["task.variant"] == "permute":
      v["task.num_strategies"] = min(v["task.num_strategies"], d)
    t_len = {"late_divergence": p + d + 1, "pattern_placement": p + v["task.num_strategies"],
             "branch": p + 2}.get(v["task.name"], p + 1)
    v["objective.sequence_term.rollout_len"] = draw(st.integers(1, t_len))
    v["objective.jsd_prefix_len"] = draw(st.integers(1, t_len))
  config = objectives.base_config()
  for path, value in values.items():
    _set(config, path, value)
  if mode == "one_clash":
    CLASHES[draw(st.sampled_from(sorted(CLASHES)))][0](config)
  spoilable = sorted(p for p, bad in INVALID_VALUES.items() if bad)
  num_bad = {"one_bad_value": 1, "free": draw(st.integers(0, 3))}.get(mode, 0)
  for path in draw(st.lists(st.sampled_from(spoilable), min_size=num_bad, max_size=num_bad,
                            unique=True)):
    _set(config, path, draw(st.sampled_from(INVALID_VALUES[path])))
  return config


def _tiny_runnable(config):
  """Sizes that keep a two-step compile cheap."""
  config.train.num_steps = 2
  config.eval.batch_size = 4
  return config


# ----------------------------------------------------------------------------
# 1. Input validation.
# ----------------------------------------------------------------------------


class ConfigPropertyTest(parameterized.TestCase):

  def test_the_strategy_covers_every_field_of_the_schema(self):
    fields = set(_leaf_paths(objectives.base_config()))
    self.assertEqual(set(INVALID_VALUES), fields)
    self.assertEqual(expected_invalid_fields(objectives.base_config()), set())
    self.assertEqual(expected_invalid_fields(tiny_config()), set())

  def test_every_single_invalid_value_is_rejected_naming_its_field(self):
    cases = [(path, value) for path, values in INVALID_VALUES.items() for value in values]
    for path, value in cases:
      config = tiny_config()
      _set(config, path, value)
      with self.subTest(f"{path}={value!r}"):
        self.assertIn(path, expected_invalid_fields(config))
        with self.assertRaises(ValueError) as caught:
          experiment.build(config)
        self.assertTrue(_names_field(str(caught.exception), path), str(caught.exception))
        self.assertIn(str(value), str(caught.exception))
    print(f"\nsingle invalid values rejected: {len(cases)}")

  @parameterized.named_parameters(*[(name, name) for name in CLASHES])
  def test_every_single_cross_field_clash_is_rejected_naming_the_field(self, name):
    clash, field = CLASHES[name]
    for base in (tiny_config(), objectives.base_config()):
      config = base
      clash(config)
      self.assertIn(field, expected_invalid_fields(config))
      with self.assertRaises(ValueError) as caught:
        experiment.build(config)
      self.assertTrue(_names_field(str(caught.exception), field), str(caught.exception))

  def test_drawn_configs_build_or_are_rejected_naming_the_field_before_compiling(self):
    # tasks.transduction() evaluates jnp.arange(prompt_len) when it is built
    # (an eager op: one tiny XLA compilation per prompt_len, see
    # test_rejected_transduction_config_compiles_nothing); warm those up so that
    # any other compilation during build() is caught below.
    for prompt_len in range(1, 7):
      tasks.transduction(alphabet_size=2, prompt_len=prompt_len, min_len=1)
    counts = collections.Counter()
    rejected_fields = collections.Counter()

    @hypothesis.settings(max_examples=200, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(configs())
    def check(config):
      expected = expected_invalid_fields(config)
      with count_compilations() as compiled:
        try:
          (setup, _), error = experiment.build(config), None
        except ValueError as err:
          setup, error = None, err
      self.assertEqual(compiled, [], "build() compiled something")
      if expected:
        counts["invalid"] += 1
        hypothesis.event("invalid")
        self.assertIsNotNone(error, f"accepted a config with invalid {sorted(expected)}")
        message = str(error)
        named = [p for p in sorted(expected) if _names_field(message, p)]
        self.assertTrue(named, f"{message!r} names none of {sorted(expected)}")
        self.assertTrue(
            any(str(_get(config, p)) in message for p in named),
            f"{message!r} does not show the value of {named}")
        self.assertRegex(message, r"must|needs|allowed|choose")
        rejected_fields[named[0]] += 1
      else:
        counts["valid"] += 1
        hypothesis.event("valid")
        self.assertIsNone(error, f"rejected a valid config: {error}")
        self.assertEqual(setup.task.target_len, _target_len(config))
        self.assertEqual(setup.task.vocab_size, 3 + config.task.alphabet_size)
        self.assertEqual(setup.model.config.num_latents, config.model.num_latents)

    check()
    print(f"\nconfig property test: {sum(counts.values())} configs, "
          f"{counts['invalid']} invalid (rejected), {counts['valid']} valid (built); "
          f"rejections per field named: {dict(sorted(rejected_fields.items()))}")
    # The strategy must exercise both sides (hypothesis may stop early only on failure).
    self.assertGreaterEqual(counts["invalid"], 50)
    self.assertGreaterEqual(counts["valid"], 10)

  @pytest.mark.slow  # Compiles a train step per drawn config (about 5 minutes).
  def test_valid_tiny_drawn_configs_train_two_steps(self):

    @hypothesis.settings(max_examples=2, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(configs(tiny=True, allow_invalid=False))
    def check(config):
      hypothesis.assume(not expected_invalid_fields(config))
      setup, objective = experiment.build(_tiny_runnable(config))
      state = train.init_state(setup, objective)
      step = train.make_train_step(setup, objective)
      for _ in range(2):
        state, metrics = step(state)
      self.assertEqual(int(state.step), 2)
      self.assertEqual(int(metrics["nonfinite_steps"]), 0)
      chex.assert_tree_all_finite((state.params, metrics))

    check()

  def test_known_gaps_are_rejected_naming_the_field(self):
    failures = []
    for path, values in KNOWN_GAPS.items():
      for value in values:
        config = objectives.base_config()
        _set(config, path, value)
        try:
          experiment.build(config)
          failures.append(f"{path}={value!r} accepted")
        except ValueError as err:
          if f"config.{path}" not in str(err):
            failures.append(f"{path}={value!r}: {err}")
        except Exception as err:  # pylint: disable=broad-except
          failures.append(f"{path}={value!r}: {type(err).__name__}: {err}")
    self.assertEqual(failures, [])

  def test_rejected_transduction_config_compiles_nothing(self):
    config = objectives.base_config()
    config.task.name = "transduction"
    config.task.prompt_len = 23  # A length no other test builds.
    config.objective.sequence_term.rollout_len = 99
    with count_compilations() as compiled:
      with self.assertRaisesRegex(ValueError, r"config\.objective\.sequence_term\.rollout_len"):
        experiment.build(config)
    self.assertEqual(compiled, [])


class ShapeMessageTest(parameterized.TestCase):
  """Public loss functions reject mismatched shapes naming their arguments."""

  @parameterized.named_parameters(
      ("token_jsd", lambda z: divergences.token_jsd(z(2, 3, 5), z(4)), ("mask_T",)),
      ("pairwise_token_jsd", lambda z: divergences.pairwise_token_jsd(z(2, 3, 5), z(4)),
       ("mask_T",)),
      ("gkd_loss", lambda z: opd.gkd_loss(z(2, 3, 5), z(2, 4, 5)),
       ("teacher_logits_BxTxV",)),
      ("sequence_log_likelihood", lambda z: logprobs.sequence_log_likelihood(
          z(3, 5), jnp.zeros(4, jnp.int32), z(4)), ("logits_TxV", "tokens_T")),
      ("hard_em_loss", lambda z: reconstruction.hard_em_loss(z(3)), ("loglik_BxK",)),
      ("sequence_kl_surrogate_from_logits",
       lambda z: surrogates.sequence_kl_surrogate_from_logits(
           "trajectory", z(3, 5), z(3, 5), jnp.zeros(3, jnp.int32), z(4)), ("mask_t",)),
  )
  def test_mismatched_shapes_name_the_arguments(self, call, names):
    zeros = lambda *shape: jnp.zeros(shape)  # noqa: E731
    with self.assertRaises((ValueError, AssertionError)) as caught:
      call(zeros)
    self.assertTrue(any(n in str(caught.exception) for n in names), str(caught.exception))

  def test_raml_and_opd_losses_name_their_arguments(self):
    # (raml.sequence_log_likelihood is logprobs.sequence_log_likelihood now: above.)
    z = lambda *shape: jnp.zeros(shape)  # noqa: E731
    ids = jnp.zeros(4, jnp.int32)
    calls = {
        "targets_T": lambda: raml.label_smoothing_loss(z(3, 5), ids, z(4), 0.1),
        "weights_N": lambda: raml.raml_loss(z(3), z(4)),
        "teacher_logits_LxV": lambda: surrogates.opd_surrogate(
            "trajectory", z(3, 5), z(3, 4), jnp.zeros(3, jnp.int32), z(3)),
    }
    unnamed = []
    for name, call in calls.items():
      try:
        call()
        unnamed.append(f"{name}: no error")
      except (ValueError, AssertionError) as err:
        if name not in str(err):
          unnamed.append(f"{name}: {err}")
    self.assertEqual(unnamed, [])


# ----------------------------------------------------------------------------
# 2. The command line.
# ----------------------------------------------------------------------------


def _subprocess_env(**extra):
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=_MODULE["cache"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("JAX_LOG_COMPILES", None)
  env.update(extra)
  return env


class CommandLineTest(parameterized.TestCase):

  def test_bad_input_fails_with_one_clear_line_and_compiles_nothing(self):
    root = _fresh_dir("cli")
    workdir = os.path.join(root, "run")
    # (More faults of each kind, in process: tests/test_cli.py, tests/test_workdir.py,
    # ConfigPropertyTest; all of them through run.py: experiments/fault_matrix.py.)
    bad_files = {
        "syntax.py": "def get_config(:\n",
        "bool_lr.py": ("from latentdiv import objectives\n\ndef get_config():\n"
                       "  config = objectives.base_config()\n"
                       "  config.optim.learning_rate = True\n  return config\n"),
    }
    for name, source in bad_files.items():
      with open(os.path.join(root, name), "w") as f:
        f.write(source)
    cases = {
        "unknown": (["--config.train.num_stepz=3"], r"FATAL.*num_stepz"),
        "wrong_type": (["--config.train.num_steps=abc"], r"FATAL.*train\.num_steps.*abc"),
        "invalid_value": (["--config.model.num_latents=1"],
                          r"config\.model\.num_latents.*>= 2.*got 1"),
        "invalid_objective_value": (
            ["--config.objective.sequence_term.num_rollouts=0"],
            r"config\.objective\.sequence_term\.num_rollouts must be a positive integer, "
            r"got 0"),
        "old_field_path": (["--config.seq_pg.lambda_pg=0.1"], r"FATAL.*seq_pg"),
        "seed_overflow": (["--config.seed=100000000000000000000"],
                          r"FATAL config\.seed must be an integer in \[-2\*\*31, 2\*\*31 - 1\]"
                          r".*got 100000000000000000000\.$"),
        "empty_workdir": (["--workdir="], r"^FATAL --workdir is empty"),
        "config_syntax_error": ([f"--config={root}/syntax.py"],
                                r"^FATAL .*syntax\.py, line 1: SyntaxError"),
        "config_bool_learning_rate": ([f"--config={root}/bool_lr.py"],
                                      r"^FATAL .*bool_lr\.py, line 5: get_config\(\) raised "
                                      r"TypeError: .*'learning_rate'.*bool"),
    }
    procs = {}
    for name, (flags, _) in cases.items():
      defaults = [f"--config={TINY}"] * (not any(f.startswith("--config=") for f in flags))
      defaults += [f"--workdir={workdir}"] * (not any(f.startswith("--workdir=") for f in flags))
      procs[name] = subprocess.Popen(
          [sys.executable, RUN_PY, *defaults, *flags],
          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
          env=_subprocess_env(JAX_LOG_COMPILES="1"))
    # Positive control: JAX_LOG_COMPILES does report compilations in a subprocess.
    control = subprocess.run(
        [sys.executable, "-c", "import jax.numpy as jnp; (jnp.arange(3) + 1).block_until_ready()"],
        capture_output=True, text=True, env=_subprocess_env(JAX_LOG_COMPILES="1"), check=True)
    self.assertIn("Compiling", control.stderr)
    for name, (_, pattern) in cases.items():
      stdout, stderr = procs[name].communicate(timeout=300)
      with self.subTest(name):
        self.assertEqual(procs[name].returncode, 2, stderr)
        self.assertNotIn("Traceback", stdout + stderr)
        # One line in all: no usage dump, no traceback, no compilation log.
        self.assertLen(stderr.strip().splitlines(), 1, stderr)
        self.assertRegex(stderr.strip(), pattern)
    self.assertFalse(os.path.exists(workdir))  # Nothing ran.


# ----------------------------------------------------------------------------
# 3. Killed runs resume exactly.
# ----------------------------------------------------------------------------


class KillAndResumeTest(parameterized.TestCase):

  def _start(self, workdir, name):
    out = open(os.path.join(os.path.dirname(workdir), f"{name}.out"), "w")
    err = open(os.path.join(os.path.dirname(workdir), f"{name}.err"), "w")
    self.addCleanup(out.close)
    self.addCleanup(err.close)
    proc = subprocess.Popen([sys.executable, RUN_PY, f"--config={TINY}", f"--workdir={workdir}"],
                            cwd=REPO, stdout=out, stderr=err, env=_subprocess_env())
    self.addCleanup(lambda: proc.poll() is None and proc.kill())
    return proc, out.name, err.name

  def _wait_for_checkpoint_after(self, proc, workdir, step, logs, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
      steps = _checkpoint_steps(workdir)
      if steps and steps[-1] > step:
        return steps[-1]
      if proc.poll() is not None:
        self.fail(f"run.py exited with {proc.returncode} before a checkpoint past step "
                  f"{step}:\n{open(logs[0]).read()}\n{open(logs[1]).read()}")
      time.sleep(0.01)
    self.fail(f"no checkpoint past step {step} within {timeout} s")

  def test_sigkill_then_sigterm_then_resume_equals_an_uninterrupted_run(self):
    config = tiny_config()
    num_steps, every = config.train.num_steps, config.train.checkpoint_every
    ref_dir, ref_summary = reference_run(num_steps)  # In-process, same config and seed.
    workdir = os.path.join(_fresh_dir("killed"), "run")

    # Run A: SIGKILL once a checkpoint past the first one exists.
    proc, *logs = self._start(workdir, "a")
    self._wait_for_checkpoint_after(proc, workdir, every, logs)
    # A second run on the busy workdir is refused while A lives.
    with self.assertRaisesRegex(workdir_lib.WorkdirBusyError, rf"pid {proc.pid}\b"):
      experiment.train_and_evaluate(tiny_config(), workdir)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    self.assertEqual(proc.returncode, -signal.SIGKILL, "run A finished before it was killed")
    killed_at = _checkpoint_steps(workdir)[-1]
    self.assertLess(killed_at, num_steps)
    # The moment a checkpoint exists, the rows up to its step are on disk.
    if killed_at >= 5:  # log_every = 5.
      self.assertIn(killed_at - killed_at % 5, [r["step"] for r in _log_records(workdir)])

    # Run B: resumes from A's newest checkpoint (A's lock died with it); SIGTERM.
    proc, *logs = self._start(workdir, "b")
    self._wait_for_checkpoint_after(proc, workdir, killed_at, logs)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    out_b, err_b = open(logs[0]).read(), open(logs[1]).read()
    self.assertEqual(proc.returncode, 143, out_b + err_b)  # 128 + SIGTERM.
    self.assertIn(f"Resuming from step {killed_at} ", out_b)
    match = re.search(r"SIGTERM received: checkpoint saved at step (\d+)", out_b)
    self.assertIsNotNone(match, out_b)
    stopped_at = int(match.group(1))
    self.assertGreater(stopped_at, killed_at)
    self.assertLess(stopped_at, num_steps)
    self.assertIn(stopped_at, _checkpoint_steps(workdir))
    self.assertEqual(int(_restore_raw(workdir, stopped_at)["step"]), stopped_at)
    self.assertTrue(_lock_is_free(workdir))  # Released on exit.

    # Run C: resumes from the SIGTERM checkpoint and finishes.
    proc, *logs = self._start(workdir, "c")
    proc.wait(timeout=600)
    out_c, err_c = open(logs[0]).read(), open(logs[1]).read()
    self.assertEqual(proc.returncode, 0, out_c + err_c)
    self.assertIn(f"Resuming from step {stopped_at} ", out_c)
    self.assertNotIn("Traceback", err_c)

    # Final summary, final train state and training log equal the uninterrupted run.
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    self.assertEqual(set(summary), set(ref_summary))
    for key, value in ref_summary.items():
      if isinstance(value, str):
        self.assertEqual(summary[key], value, key)
      else:
        np.testing.assert_allclose(summary[key], value, rtol=1e-6, err_msg=key)
    chex.assert_trees_all_close(_restore_raw(workdir, num_steps),
                                _restore_raw(ref_dir, num_steps), rtol=1e-6, atol=0)
    # Every row exactly once, in metrics.jsonl and TensorBoard, equal to the
    # uninterrupted run's (but for the wall-clock fields).
    self.assertEqual(test_runlog.exactly_once(workdir), test_runlog.exactly_once(ref_dir))
    resumed_log = {r["step"]: r for r in _log_records(workdir)}
    ref_log = {r["step"]: r for r in _log_records(ref_dir)}
    for step, record in resumed_log.items():
      self.assertEqual(set(record), set(ref_log[step]))
      for key, value in record.items():
        if key not in ("kind",) + WALL_CLOCK:
          np.testing.assert_allclose(value, ref_log[step][key], rtol=1e-6,
                                     err_msg=f"{key} at step {step}")
    tensorboard = runlog.read_scalars(workdir)
    self.assertEqual([s for s, _ in tensorboard["train/loss"]], sorted(ref_log))
    np.testing.assert_allclose([v for _, v in tensorboard["train/loss"]],
                               [ref_log[s]["loss"] for s in sorted(ref_log)], rtol=1e-6)


class _Killed(BaseException):
  """Stands for SIGKILL: nothing after it runs but ``finally`` blocks."""


class DeathAtACheckpointTest(parameterized.TestCase):

  def test_a_run_dying_as_its_checkpoint_completes_loses_no_row(self):
    workdir = _fresh_dir("death")
    config = tiny_config()
    config.train.num_steps, config.train.checkpoint_every = 20, 10
    real_save = checkpointing.save

    def save_then_die(manager, step, *args, **kwargs):
      saved = real_save(manager, step, *args, **kwargs)
      if saved and step == 10:
        raise _Killed()
      return saved

    with mock.patch.object(checkpointing, "save", save_then_die), \
        contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaises(_Killed):
        experiment.train_and_evaluate(config, workdir)
    self.assertEqual(checkpointing.checkpoint_steps(workdir), [10])
    self.assertIn(10, [r["step"] for r in runlog.read_rows(workdir)])  # Before the checkpoint.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      experiment.train_and_evaluate(config, workdir)
    self.assertIn("Resuming from step 10 ", out.getvalue())
    self.assertEqual(test_runlog.exactly_once(workdir), dict(train=[5, 10, 15, 20], eval=[20]))
    # A rerun of the finished run evaluates again but logs no second row.
    with contextlib.redirect_stdout(io.StringIO()):
      experiment.train_and_evaluate(config, workdir)
    self.assertEqual(test_runlog.exactly_once(workdir), dict(train=[5, 10, 15, 20], eval=[20]))
    self.assertEqual([s for s, _ in runlog.read_scalars(workdir)["train/learning_rate"]],
                     [5, 10, 15, 20])



def _interrupt_at(step_to_interrupt, signum=signal.SIGINT):
  """Patches make_train_step so that the process signals itself after that step."""
  real = train.make_train_step

  def patched(setup, *args, **kwargs):
    step_fn = real(setup, *args, **kwargs)

    def wrapped(state):
      state, aux = step_fn(state)
      if int(state.step) == step_to_interrupt:
        os.kill(os.getpid(), signum)
      return state, aux

    return wrapped

  return mock.patch.object(train, "make_train_step", patched)


class InterruptTest(parameterized.TestCase):

  def test_sigint_saves_the_step_reached_and_the_resume_is_exact(self):
    ref_dir, ref_summary = reference_run(20)
    workdir = _fresh_dir("sigint")
    config = tiny_config()
    config.train.num_steps = 20
    config.train.checkpoint_every = 4  # Step 10 is not a periodic checkpoint.
    out = io.StringIO()
    handler_before = signal.getsignal(signal.SIGINT)
    with _interrupt_at(10), contextlib.redirect_stdout(out):
      with self.assertRaisesRegex(loop.Interrupted, r"SIGINT at step 10"):
        experiment.train_and_evaluate(config, workdir)
    self.assertIn("checkpoint saved at step 10", out.getvalue())
    self.assertEqual(_checkpoint_steps(workdir)[-1], 10)
    self.assertTrue(_lock_is_free(workdir))
    self.assertIs(signal.getsignal(signal.SIGINT), handler_before)  # Restored.
    with contextlib.redirect_stdout(out):
      summary = experiment.train_and_evaluate(config, workdir)
    self.assertIn("Resuming from step 10 ", out.getvalue())
    for key in ("nll", "token_jsd", "validity", "latent_usage", "seq_kl", "coverage"):
      np.testing.assert_allclose(summary[key], ref_summary[key], rtol=1e-6, err_msg=key)
    chex.assert_trees_all_close(_restore_raw(workdir, 20), _restore_raw(ref_dir, 20),
                                rtol=1e-6, atol=0)

  def test_interrupt_keeps_the_last_log_record(self):
    workdir = _fresh_dir("sigint_log")
    config = tiny_config()
    config.train.num_steps = 20
    with _interrupt_at(10), contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaises(loop.Interrupted):
        experiment.train_and_evaluate(config, workdir)
    self.assertIn(10, [r["step"] for r in _log_records(workdir)])  # log_every = 5.


# ----------------------------------------------------------------------------
# 4. Checkpoint safety (the workdir lock, config changes on resume and the log
#    of a resumed run: tests/test_workdir.py).
# ----------------------------------------------------------------------------


def _corrupt(step_dir, how):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(f)]
  assert files, step_dir
  for path in files:
    if how == "garbage":
      with open(path, "wb") as f:
        f.write(b"\x00garbage\xff" * 7)
    elif how == "truncated" and f"{os.sep}d{os.sep}" in path:
      with open(path, "r+b") as f:
        f.truncate(5)
    elif how == "partial" and f"{os.sep}d{os.sep}" in path:
      os.remove(path)


class CheckpointSafetyTest(parameterized.TestCase):

  def test_unreadable_checkpoints_are_set_aside_never_deleted_or_overwritten(self):
    workdir = _fresh_dir("corrupt")
    ckpt, aside = os.path.join(workdir, "checkpoints"), os.path.join(workdir,
                                                                    "checkpoints_unreadable")
    config = tiny_config()
    config.train.num_steps = 8
    config.train.checkpoint_every = 4
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      experiment.train_and_evaluate(config, workdir)
    self.assertEqual(_checkpoint_steps(workdir), [4, 8])

    # Newest checkpoint overwritten with garbage: reported, older one used, kept aside.
    _corrupt(os.path.join(ckpt, "8"), "garbage")
    garbage = _files_under(os.path.join(ckpt, "8"))
    config.train.num_steps = 12
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      summary = experiment.train_and_evaluate(config, workdir, accept_changes=True)
    self.assertIn("WARNING: checkpoint at step 8 could not be restored", out.getvalue())
    self.assertIn("Resuming from step 4 ", out.getvalue())
    self.assertEqual(summary["steps"], 12)
    self.assertEqual(_files_under(os.path.join(aside, "8")), garbage)
    # The resumed run saved step 8 again, in checkpoints/, readable.
    self.assertEqual(_checkpoint_steps(workdir), [4, 8, 12])
    self.assertEqual(int(_restore_raw(workdir, 8)["step"]), 8)

    # A partial step 8 and a truncated step 12: both set aside, the first 8 untouched.
    _corrupt(os.path.join(ckpt, "8"), "partial")
    _corrupt(os.path.join(ckpt, "12"), "truncated")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      experiment.train_and_evaluate(config, workdir)
    self.assertIn("Resuming from step 4 ", out.getvalue())
    self.assertEqual(sorted(os.listdir(aside)), ["12", "8", "8.1"])
    self.assertEqual(_files_under(os.path.join(aside, "8")), garbage)

    # Every checkpoint unreadable: a clear error, and still nothing deleted.
    for step in _checkpoint_steps(workdir):
      _corrupt(os.path.join(ckpt, str(step)), "garbage")
    with contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaisesRegex(checkpointing.CheckpointError,
                                  r"(?s)None of the checkpoints.*step 12.*step 8.*step 4.*"
                                  r"checkpoints_unreadable"):
        experiment.train_and_evaluate(config, workdir)
    self.assertEqual(sorted(os.listdir(aside)), ["12", "12.1", "4", "8", "8.1", "8.2"])
    self.assertEqual(_checkpoint_steps(workdir), [])
    self.assertTrue(_lock_is_free(workdir))


class MemoryCheckTest(parameterized.TestCase):

  def test_a_step_that_cannot_fit_is_refused_before_the_first_step(self):
    workdir = _fresh_dir("too_big")
    config = tiny_config()
    with mock.patch.object(memory, "available_bytes", return_value=1024), \
        contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaisesRegex(memory.DeviceMemoryError,
                                  r"The train step needs about .* but only 0\.00 GiB is free\. "
                                  r"Lower config\.train\.batch_size \(now 8\)"):
        experiment.train_and_evaluate(config, workdir)
    self.assertEqual(_checkpoint_steps(workdir), [])
    self.assertFalse(os.path.exists(os.path.join(workdir, "metrics.jsonl")))
    self.assertFalse(os.path.exists(os.path.join(workdir, "config.json")))


# ----------------------------------------------------------------------------
# 5. Numerics.
# ----------------------------------------------------------------------------


def _with_nan(params):
  """``params`` with a NaN as the first entry of every weight (some are always used)."""
  return jax.tree_util.tree_map(lambda w: w.at[(0,) * w.ndim].set(jnp.nan), params)


def _assert_trees_identical(test, a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # NaN == NaN here.
  test.assertEqual(jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b))


class NonFiniteTest(parameterized.TestCase):

  def test_a_nonfinite_step_leaves_the_state_unchanged_and_is_counted(self):
    setup, objective = experiment.build(tiny_config())
    step = train.make_train_step(setup, objective)
    state = train.init_state(setup, objective)
    for _ in range(3):
      state, _ = step(state)
    self.assertTrue(state.extra)  # The EMA baseline: estimator state to protect too.
    clean = state
    poisoned = clean.replace(params=_with_nan(clean.params))
    state, metrics = step(poisoned)
    self.assertFalse(np.isfinite(float(metrics["loss"])))  # The fault took effect.
    _assert_trees_identical(self, state.params, poisoned.params)
    _assert_trees_identical(self, state.opt_state, clean.opt_state)
    _assert_trees_identical(self, state.extra, clean.extra)
    self.assertEqual(int(state.step), 4)
    self.assertFalse(np.array_equal(state.rng, clean.rng))
    self.assertEqual((int(state.nonfinite_streak), int(state.nonfinite_total)), (1, 1))
    self.assertEqual(int(metrics["nonfinite_steps"]), 1)
    state, metrics = step(state)
    self.assertEqual((int(state.nonfinite_streak), int(state.nonfinite_total)), (2, 2))
    # Finite again: the update applies, the streak resets, the total stays.
    before = state.replace(params=clean.params)
    state, metrics = step(before)
    self.assertEqual((int(state.nonfinite_streak), int(state.nonfinite_total)), (0, 2))
    self.assertTrue(np.isfinite(float(metrics["loss"])))
    self.assertFalse(np.array_equal(jax.tree_util.tree_leaves(state.params)[0],
                                    jax.tree_util.tree_leaves(clean.params)[0]))
    chex.assert_tree_all_finite((state.params, state.opt_state, state.extra))

  def test_a_run_that_stays_nonfinite_checkpoints_none_of_the_streak(self):
    workdir = _fresh_dir("nan_run")
    config = tiny_config()
    config.train.num_steps = 20
    config.train.max_nonfinite_steps = 3
    config.train.checkpoint_every = 2
    real_init = train.init_state
    poisoned_init = lambda *args: (lambda s: s.replace(params=_with_nan(s.params)))(  # noqa: E731
        real_init(*args))
    # Steps 1, 2, 3 are non-finite: step 2 is not checkpointed.
    with mock.patch.object(train, "init_state", poisoned_init), \
        contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaisesRegex(loop.NonFiniteError,
                                  r"3 consecutive steps ending at step 3 .*none was checkpointed"
                                  r".*--config\.optim\.learning_rate=0\.001: the run starts "
                                  r"afresh"):
        experiment.train_and_evaluate(config, workdir)
    self.assertEqual(_checkpoint_steps(workdir), [])
    self.assertTrue(_lock_is_free(workdir))

  def test_after_a_streak_a_lower_learning_rate_recovers_from_the_last_healthy_checkpoint(self):
    workdir = _fresh_dir("nan_recovery")
    config = tiny_config()
    config.optim.learning_rate = 1e6  # Steps 1-5 finite, then the parameters overflow.
    config.train.num_steps, config.train.max_nonfinite_steps = 16, 3
    config.train.checkpoint_every, config.train.keep_checkpoints = 1, 3
    ckpt_dir = re.escape(os.path.join(workdir, "checkpoints"))
    with contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaisesRegex(
          loop.NonFiniteError,
          rf"3 consecutive steps ending at step 8 .*The checkpoint at step 5, whose parameters "
          rf"gave the first non-finite step, was moved to .*checkpoints_nonfinite/5\. Rerun "
          rf"with a lower learning rate, e.g\. --config\.optim\.learning_rate=100000: the run "
          rf"resumes from step 4, the newest healthy checkpoint in {ckpt_dir}"):
        experiment.train_and_evaluate(config, workdir)
    # The streak rotated out no healthy checkpoint, and none of its states was saved.
    self.assertEqual(_checkpoint_steps(workdir), [3, 4])
    self.assertEqual(int(_restore_raw(workdir, 4)["nonfinite_streak"]), 0)
    # The advice works: a lower learning rate, no other flag.
    config.optim.learning_rate = 1e-2
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      summary = experiment.train_and_evaluate(config, workdir)
    self.assertIn("Resuming from step 4 ", out.getvalue())
    self.assertIn("changed: optim.learning_rate: 1000000.0 -> 0.01", out.getvalue())
    self.assertEqual((summary["steps"], summary["nonfinite_steps"]), (16, 0))

  def test_a_train_step_on_the_smallest_shapes_is_finite(self):
    # tests/configs/tiny.py already is the smallest case (so this step comes from
    # the compilation cache): V = 2 content tokens, K = 2, rollouts of L = 1.
    config = tiny_config()
    config.task.alphabet_size = 2
    config.task.num_strategies = 2
    config.model.num_latents = 2
    config.objective.sequence_term.rollout_len = 1
    self.assertGreater(config.objective.sequence_term.weight, 0)
    setup, objective = experiment.build(config)
    self.assertEqual(setup.task.vocab_size, 5)  # PAD, BOS, EOS and two content tokens.
    state = train.init_state(setup, objective)
    step = train.make_train_step(setup, objective)
    for _ in range(2):
      state, metrics = step(state)
    self.assertEqual(int(metrics["nonfinite_steps"]), 0)
    self.assertGreater(float(metrics["seq_kl"]), 0.0)
    chex.assert_tree_all_finite((state.params, state.opt_state, state.extra, metrics))


def _extreme_cases(vocab):
  """Four [K=2, T=1, V] logit arrays of ±1e4 and their [T=1] masks, stacked.

  Latent 0 puts its mass on token 0; latent 1 on token V-1 (``disjoint``) or
  on token 0 too; each with the one position scored or masked out.
  """
  disjoint = jnp.array([True, True, False, False])
  masked = jnp.array([False, True, False, True])
  peaks = jnp.stack([jnp.zeros(4, jnp.int32), jnp.where(disjoint, vocab - 1, 0)], axis=1)
  logits = jnp.where(jax.nn.one_hot(peaks, vocab, dtype=bool), 1e4, -1e4)[:, :, None, :]
  mask = jnp.where(masked, 0.0, 1.0)[:, None]
  return logits, mask, disjoint, masked


class ExtremeLogitsTest(chex.TestCase):
  """Losses and their gradients stay finite for logits of ±1e4, V = 2, K = 2, L = 1.

  Jitted only: op-by-op execution of these ~20 value-and-gradient pairs costs
  ~20 s of CPU and checks nothing jit does not (no fusion-dependent maths here).
  """

  @chex.variants(with_jit=True)
  @parameterized.parameters(2, 5)
  def test_losses_and_gradients_are_finite(self, vocab):
    logits, mask, disjoint, masked = _extreme_cases(vocab)
    unlikely = jnp.full((1,), vocab - 1, jnp.int32)

    def losses(mask_T):
      """name -> loss as a function of the [K, T, V] logits."""
      out = {}
      for weighting in divergences.WEIGHTINGS:
        out[f"token_jsd/{weighting}"] = lambda l, w=weighting: divergences.token_jsd(
            l, mask_T, w, prefix_len=1).value
        out[f"pairwise_jsd/{weighting}"] = lambda l, w=weighting: divergences.pairwise_token_jsd(
            l, mask_T, w, prefix_len=1).value[0, 1]
      out["gkd"] = lambda l: opd.gkd_loss(l[1][None], l[0][None], mask_T[None])
      loglik = lambda l: jnp.stack([  # noqa: E731
          logprobs.sequence_log_likelihood(l[k], unlikely, mask_T)
          for k in (0, 1)])[None, :]
      for kind in reconstruction.RECONSTRUCTION_KINDS:
        out[f"rec/{kind}"] = lambda l, kind=kind: reconstruction.reconstruction_loss(
            kind, loglik(l)).loss
      out["label_smoothing"] = lambda l: raml.label_smoothing_loss(
          l[0], unlikely, mask_T, 0.1, alphabet=(0, vocab))
      # The rollout token is the one latent 0 gives log-probability ≈ −2e4.
      for name in estimators.ALL_ESTIMATORS:
        baseline = 0.0 if estimators.uses_baseline(name) else None
        out[f"seq_kl/{name}"] = (
            lambda l, n=name, b=baseline: surrogates.sequence_kl_surrogate_from_logits(
                n, l[0], l[1], unlikely, mask_T, baseline_t=b))
        out[f"opd/{name}"] = lambda l, n=name, b=baseline: surrogates.opd_surrogate(
            n, l[0], l[1], unlikely, mask_T, baseline_t=b)
      return out

    def values_and_grads(logits_KxTxV, mask_T):
      pairs = {name: jax.value_and_grad(fn)(logits_KxTxV)
               for name, fn in losses(mask_T).items()}
      return ({name: v for name, (v, _) in pairs.items()},
              {name: g for name, (_, g) in pairs.items()})

    values, grads = self.variant(jax.vmap(values_and_grads))(logits, mask)
    chex.assert_tree_all_finite(values)
    chex.assert_tree_all_finite(grads)
    # JSD of two point masses: log 2 if disjoint, 0 if equal; 0 when masked.
    expected = np.where(disjoint & ~masked, math.log(2), 0.0)
    for weighting in divergences.WEIGHTINGS:
      np.testing.assert_allclose(values[f"token_jsd/{weighting}"], expected, atol=1e-5)
      np.testing.assert_allclose(values[f"pairwise_jsd/{weighting}"], expected, atol=1e-5)
    # Nothing scored: every loss is 0 with a zero gradient.
    for name in values:
      np.testing.assert_array_equal(values[name][masked], 0.0, err_msg=name)
      np.testing.assert_array_equal(grads[name][masked], 0.0, err_msg=name)


# ----------------------------------------------------------------------------
# 6. Determinism.
# ----------------------------------------------------------------------------


class DeterminismTest(parameterized.TestCase):

  def test_same_config_and_seed_give_the_same_metrics(self):
    first_dir, first = reference_run(20)
    second_dir = _fresh_dir("determinism")
    config = tiny_config()
    config.train.num_steps = 20
    with contextlib.redirect_stdout(io.StringIO()):
      second = experiment.train_and_evaluate(config, second_dir)
    self.assertEqual(second, first)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK}  # noqa: E731
                          for r in rows]
    self.assertEqual(strip(_log_records(second_dir, "train")),
                     strip(_log_records(first_dir, "train")))
    chex.assert_trees_all_equal(_restore_raw(second_dir, 20), _restore_raw(first_dir, 20))


if __name__ == "__main__":
  absltest.main()
