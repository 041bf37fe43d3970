"""The objectives, peers on one loop, chosen by ``config.objective.name``.

Each is one file with one ``train.Objective`` subclass: its config section
(``default_config``) and validation, its extra state, its loss, its
evaluation and its summary. Adding an objective is a new file here plus one
line in ``OBJECTIVES``; nothing in the loop (``latentdiv.train``) changes.

* ``diversity`` — reconstruction − λ_jsd · token JSD − w · sequence-level KL
  (``objectives/diversity.py``; DESIGN.md §3–5, §8);
* ``distillation`` — on-policy distillation towards a frozen teacher
  (``objectives/distillation.py``; DESIGN.md §6).
"""

from __future__ import annotations

import ml_collections

from latentdiv import config as config_lib
from latentdiv.objectives import distillation
from latentdiv.objectives import diversity

OBJECTIVES = {
    diversity.Diversity.name: diversity.Diversity,
    distillation.Distillation.name: distillation.Distillation,
}
NAMES = tuple(OBJECTIVES)


def get(name: str):
  """The ``train.Objective`` subclass called ``name``.

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective.name must be one of {NAMES}, got {name!r}.")
  return OBJECTIVES[name]


def base_config(name: str = "diversity") -> ml_collections.ConfigDict:
  """Every field with its default: the loop's sections plus ``objective`` of ``name``."""
  c = config_lib.loop_config()
  c.objective = get(name).default_config()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config before anything is built or compiled.

  Unknown fields (e.g. a misspelling in a config file) are rejected with the
  closest known names; then the loop's sections, then the objective's.

  Raises:
    ValueError: naming the first invalid field, its value and what is allowed.
  """
  if "objective" not in config or not isinstance(config.objective, ml_collections.ConfigDict):
    raise ValueError("config.objective is missing: start from "
                     "latentdiv.objectives.base_config(NAME), NAME in " f"{NAMES}.")
  name = config.objective.get("name")
  objective = get(name)
  config_lib.check_known_fields(config, base_config(name))
  config_lib.validate_loop(config)
  objective.validate(config)
