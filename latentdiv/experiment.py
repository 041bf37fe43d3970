"""Build, train and load an experiment: the functions ``run.py`` and users call.

``train_and_evaluate(config, workdir)`` validates the config, builds the loop's
setup and the objective named by ``config.objective.name``, and runs the shared
loop (``latentdiv.train``). ``load(workdir)`` returns what is needed to sample
from and score a trained run; ``sample(run, prompts)`` and
``score(run, prompts, outputs)`` do it, on strings for text runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latentdiv import checkpointing
from latentdiv import config as config_lib
from latentdiv import logprobs
from latentdiv import model as model_lib
from latentdiv import objectives
from latentdiv import sampling
from latentdiv import tasks as tasks_lib
from latentdiv import text_data
from latentdiv import train
from latentdiv import workdir as workdir_lib


def build(config: ml_collections.ConfigDict,
          workdir: str | None = None) -> tuple[train.Setup, train.Objective]:
  """Validates ``config`` and builds the setup and the objective (nothing compiles).

  Args:
    config: the experiment's config.
    workdir: the run's directory, where a text task keeps its tokenizer.

  Raises:
    ValueError: naming the invalid field, its value and what is allowed (or,
      for a data file, the file and line).
  """
  objectives.validate(config)
  setup = train.build_setup(config, workdir)
  return setup, objectives.get(config.objective.name)(setup)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       accept_changes: bool = False) -> dict:
  """Trains the configured objective in ``workdir`` (resuming it), evaluates, returns the summary.

  See ``train.train_and_evaluate`` for what is written and the reliability
  rules (``accept_changes``: continue a run whose config changed in
  non-structural fields).
  """
  setup, objective = build(config, workdir)
  return train.train_and_evaluate(setup, objective, workdir, accept_changes=accept_changes)


class Loaded(NamedTuple):
  """A trained run: enough to sample (``sample``, ``sampling.sample_latents``) and score (``score``).

  Attributes:
    config: the run's config (defaults updated from its ``config.json``).
    task: its task.
    model: its ``LatentTransformer``.
    params: the parameters of its newest (or the requested) checkpoint.
    step: that checkpoint's step.
    tokenizer: a text task's tokenizer (``encode(str) -> ids``,
      ``decode(ids) -> str``; read from the workdir), else None.
  """

  config: ml_collections.ConfigDict
  task: tasks_lib.Task
  model: model_lib.LatentTransformer
  params: object
  step: int
  tokenizer: object = None


def load(workdir: str, step: int | None = None) -> Loaded:
  """The model and parameters of a trained run, read-only.

  Raises:
    ValueError: no readable config.json or no checkpoint in ``workdir``.
  """
  record = workdir_lib.read_config_record(workdir)
  if record is None:
    raise ValueError(f"{workdir}/config.json is missing or unreadable: is it a run's workdir?")
  name = record.get("objective", {}).get("name", "diversity")
  config = objectives.base_config(name if name in objectives.NAMES else "diversity")
  config_lib.update_from_record(config, record)
  config_lib.validate_loop(config)
  setup = train.build_setup(config, workdir, load_data=False)
  abstract = jax.eval_shape(functools.partial(model_lib.init_params, setup.model),
                            jax.random.PRNGKey(0))
  if step is None:
    steps = checkpointing.checkpoint_steps(workdir)
    step = steps[-1] if steps else None
  params = checkpointing.restore_params(workdir, abstract, step)
  return Loaded(config, setup.task, setup.model, params, step, setup.task.tokenizer)


def _is_text(values) -> bool:
  return isinstance(values, (list, tuple)) and len(values) > 0 and isinstance(values[0], str)


def _rows(run: Loaded, values, outputs: bool) -> np.ndarray:
  """Token rows of strings (a text run) or of an int array, checked against the model's lengths."""
  if _is_text(values):
    if run.tokenizer is None:
      raise ValueError("Strings need a text run (config.task.name = 'text'); pass token ids.")
    return text_data.encode_strings(run.task, list(values), outputs)
  rows = np.asarray(values, np.int32)
  length = run.task.target_len if outputs else run.task.prompt_len
  if rows.ndim != 2 or rows.shape[1] != length:
    raise ValueError(f"{'outputs' if outputs else 'prompts'} must be strings or an int array "
                     f"[B, {length}], got shape {rows.shape}.")
  return rows


def sample(run: Loaded, prompts, seed: int = 0, greedy: bool = False,
           temperature: float = 1.0):
  """One output per (prompt, latent) from a loaded run.

  Args:
    run: from ``load``.
    prompts: strings (a text run) or int token ids [B, P].
    seed: the sampling seed.
    greedy: the argmax token at every step instead of a sample.
    temperature: the softmax temperature (1 = the model's distribution).

  Returns:
    For strings, a list of B lists of K strings; for ids, int32 [B, K, T]
    tokens (content, EOS, PAD).

  Raises:
    ValueError: strings for a synthetic run, or a prompt longer than the model's.
  """
  prompt_BxP = _rows(run, prompts, outputs=False)
  rollout = sampling.sample_latents(run.model, run.params, jnp.asarray(prompt_BxP),
                                    jax.random.PRNGKey(seed), run.task.target_len,
                                    temperature=temperature, greedy=greedy)
  tokens = np.asarray(rollout.tokens)
  if not _is_text(prompts):
    return tokens
  return [[run.tokenizer.decode(t) for t in row] for row in tokens]


def score(run: Loaded, prompts, outputs) -> np.ndarray:
  """``log p_θ(y_b | x_b, z = k)`` of each output under every latent: float [B, K].

  The sum of the token log-probabilities of the output's content and its EOS
  (``logprobs.sequence_log_likelihood``).

  Args:
    run: from ``load``.
    prompts: B strings, or int ids [B, P].
    outputs: B strings, or int ids [B, T] (content, EOS, PAD).
  """
  prompt_BxP = jnp.asarray(_rows(run, prompts, outputs=False))
  tokens_BxT = jnp.asarray(_rows(run, outputs, outputs=True))
  logits = sampling.score_latents(run.model, run.params, prompt_BxP, tokens_BxT[:, None, :])
  per_latent = jax.vmap(logprobs.sequence_log_likelihood, in_axes=(0, None, None))
  loglik = jax.vmap(per_latent)(logits[:, 0], tokens_BxT, jax.vmap(logprobs.output_mask)(
      tokens_BxT))
  return np.asarray(loglik)

