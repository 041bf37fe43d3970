"""Build, train and load an experiment: the functions ``run.py`` and users call.

``train_and_evaluate(config, workdir)`` validates the config, builds the loop's
setup and the objective named by ``config.objective.name``, and runs the shared
loop (``latentdiv.train``). ``load(workdir)`` returns what is needed to sample
from and score a trained run.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import ml_collections

from latentdiv import checkpointing
from latentdiv import config as config_lib
from latentdiv import model as model_lib
from latentdiv import objectives
from latentdiv import tasks as tasks_lib
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the configured objective in ``workdir`` (resuming it), evaluates, returns the summary.

  See ``train.train_and_evaluate`` for what is written and the reliability rules.
  """
  setup, objective = build(config, workdir)
  return train.train_and_evaluate(setup, objective, workdir)


class Loaded(NamedTuple):
  """A trained run: enough to sample (``sampling.sample_latents``) and score.

  Attributes:
    config: the run's config (defaults updated from its ``config.json``).
    task: its task.
    model: its ``LatentTransformer``.
    params: the parameters of its newest (or the requested) checkpoint.
    step: that checkpoint's step.
  """

  config: ml_collections.ConfigDict
  task: tasks_lib.Task
  model: model_lib.LatentTransformer
  params: object
  step: int


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
  return Loaded(config, setup.task, setup.model, params, step)

