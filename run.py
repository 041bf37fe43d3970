"""Runs a latentdiv experiment from a config file.

  python run.py                                   # default config, ./workdir/default
  python run.py --config=experiments/configs/research_jsd.py:late --workdir=/tmp/run1
  python run.py --config.train.num_steps=200 --config.model.num_latents=4
  python run.py --config=experiments/configs/distill.py   # after the default run

The objective is the one named by config.objective.name (latentdiv/objectives/:
'diversity' or 'distillation'); its fields live under config.objective.

Rerunning on an existing --workdir resumes from its newest checkpoint. Any
config field can be overridden with --config.FIELD=VALUE; invalid values are
rejected before anything compiles, with a message naming the field.

The train step runs data-parallel over every visible device
(latentdiv/sharding.py; --config.train.fsdp=True shards the large parameter
arrays too); pass --distributed on each host of a multi-host run.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from latentdiv import checkpointing
from latentdiv import experiment
from latentdiv import loop
from latentdiv import train
from latentdiv import workdir as workdir_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def _unknown_field(err: Exception) -> str:
  bad = [a for a in sys.argv[1:] if a.startswith("--config.")]
  message = str(err).strip("'\"").replace("\\n", " ").replace("\\'", "'")
  return (f"FATAL Unknown config field in {bad}: {message}\n"
          f"Every field and its default: latentdiv/config.py (loop_config) and "
          f"latentdiv/objectives/<name>.py (default_config).")


try:
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(_HERE, "experiments", "configs", "default.py"),
      "Path to a config file with get_config() (experiments/configs/*.py).",
      lock_config=True)
except (AttributeError, KeyError) as _err:
  # ml_collections resolves --config.FIELD overrides when the flag is defined and
  # raises these for a field the config lacks.
  sys.exit(_unknown_field(_err))
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for checkpoints, TensorBoard events, metrics.jsonl and summary.json. "
    "Defaults to ./workdir/<config file name>. An existing workdir is resumed.")


_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first: a multi-host run (GPU or TPU pods, "
    "SLURM, ...) whose processes each run this same command; the coordinator is "
    "detected from the cluster environment. The batch is then split over every "
    "device of every host (config.train.batch_size must divide by their number).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize()
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      "workdir", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  try:
    setup, objective = experiment.build(config, workdir)  # Validates every field; nothing compiles.
    train.make_data_mesh(config)  # Batch sizes against the devices.
  except ValueError as err:
    raise app.UsageError(str(err)) from None
  try:
    summary = train.train_and_evaluate(setup, objective, workdir)
  except loop.Interrupted as err:
    print(f"Stopped: {err}", file=sys.stderr)
    sys.exit(130)
  except (workdir_lib.ConfigMismatchError, workdir_lib.WorkdirBusyError, loop.NonFiniteError,
          checkpointing.CheckpointError) as err:
    print(f"Error: {err}", file=sys.stderr)
    sys.exit(1)
  print(objective.format_summary(summary))
  print(f"Summary written to {os.path.join(workdir, 'summary.json')}")


def _parse_flags(argv):
  """absl's parser, with unknown ``--config.`` fields reported without a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    sys.exit(f"FATAL Flags parsing error: {err}\nPass --help to see the flags.")
  except (AttributeError, KeyError) as err:
    sys.exit(_unknown_field(err))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
