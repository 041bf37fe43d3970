"""Runs a latentdiv experiment from a config file.

  python run.py                                            # default config -> workdir/default
  python run.py --config=experiments/configs/diversity_study.py:late,mi,annealed_em
  python run.py --config=experiments/configs/raml.py:hamming,0.8   # -> workdir/raml_hamming_0.8
  python run.py --config.train.num_steps=200 --config.model.num_latents=4
                                   # -> workdir/default_num_latents_4_num_steps_200
  python run.py --config=experiments/configs/distill.py    # after the default run
  python run.py --config=experiments/configs/raml.py --print_config   # every field, nothing runs

The objective is the one named by config.objective.name (latentdiv/objectives/:
'diversity' or 'distillation'); its fields live under config.objective.
--print_config lists every config field with its value, default and meaning.
Any field can be overridden with --config.FIELD=VALUE; invalid values and
broken config files are rejected on one line before anything compiles.

Without --workdir the run folder is workdir/<config file>[_<arg>][_<field>_<value>...],
named after the whole config argument and every override, so different
configs never share a folder. Rerunning the same command resumes its run; a
run whose config differs from its folder's is refused, listing every changed
field (a change of the model or the objective always; other changes unless
--accept_config_changes; a lower learning rate after a non-finite stop is
accepted). Exit codes: 0 done, 1 refused or failed, 2 bad input,
130 SIGINT, 143 SIGTERM (a checkpoint is saved first; rerun to resume).

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
from latentdiv import cli
from latentdiv import experiment
from latentdiv import loop
from latentdiv import memory
from latentdiv import train
from latentdiv import workdir as workdir_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "experiments", "configs", "default.py")


def _unknown_field(err: Exception) -> str:
  bad = [a for a in sys.argv[1:] if a.startswith("--config.")]
  message = str(err).strip("'\"").replace("\\n", " ").replace("\\'", "'")
  return (f"Unknown config field in {bad}: {message}. Every field, its default and its "
          f"meaning: python run.py --print_config.")


try:
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "Config file with get_config() (experiments/configs/*.py), optionally PATH:ARG.",
      lock_config=True)
except (AttributeError, KeyError) as _err:
  # ml_collections resolves --config.FIELD overrides when the flag is defined and
  # raises these for a field the config lacks.
  cli.fatal(_unknown_field(_err))
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for checkpoints, TensorBoard events, metrics.jsonl and summary.json. "
    "Default: workdir/<config file>[_<arg>][_<field>_<value>...]. An existing one is resumed.")
_ACCEPT = flags.DEFINE_bool(
    "accept_config_changes", False,
    "Continue a run whose config differs from its workdir's in fields that keep the "
    "checkpointed state's structure (the changes are printed and kept in "
    "config_history.jsonl).")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print every config field with its value, default and meaning; "
    "run nothing.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first: a multi-host run (GPU or TPU pods, "
    "SLURM, ...) whose processes each run this same command; the coordinator is "
    "detected from the cluster environment. The batch is then split over every "
    "device of every host (config.train.batch_size must divide by their number).")


def _overrides() -> dict:
  return {name[len("config."):]: flags.FLAGS[name].value for name in flags.FLAGS
          if name.startswith("config.") and flags.FLAGS[name].present}


def main(argv):
  if len(argv) > 1:
    cli.fatal(f"Unexpected arguments: {argv[1:]} (flags are --name=value).")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    print(cli.describe(config))
    default = cli.run_folder(flags.FLAGS["config"].config_filename, _overrides())
    print(f"Run folder: {_WORKDIR.value or default}")
    return
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize()
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = cli.run_folder(flags.FLAGS["config"].config_filename, _overrides())
  try:
    # Validates every field; nothing is drawn or compiled (a text task's data are
    # read, and its tokenizer kept in the run folder, on first use).
    setup, objective = experiment.build(config, workdir)
    train.make_data_mesh(config)  # Batch sizes against the devices.
  except ValueError as err:
    cli.fatal(err)
  try:
    workdir_lib.check_usable(workdir)
  except workdir_lib.WorkdirError as err:
    cli.fatal(err)
  print(f"Run folder: {workdir}", flush=True)
  try:
    summary = train.train_and_evaluate(setup, objective, workdir,
                                       accept_changes=_ACCEPT.value)
  except loop.Interrupted as err:
    print(f"Stopped: {err}", file=sys.stderr)
    sys.exit(128 + err.signum)
  except KeyboardInterrupt:  # SIGINT before the loop took over the signals.
    print("Stopped: SIGINT before training started; nothing was checkpointed.",
          file=sys.stderr)
    sys.exit(130)
  except (workdir_lib.ConfigMismatchError, workdir_lib.WorkdirBusyError, loop.NonFiniteError,
          checkpointing.CheckpointError, memory.DeviceMemoryError) as err:
    print(f"Error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(1)
  print(objective.format_summary(summary))
  print(f"Summary written to {os.path.join(workdir, 'summary.json')}")


def _parse_flags(argv):
  """absl's parser, after loading the config file: its faults and unknown fields in one line."""
  try:
    cli.load_config_file(cli.config_spec(argv[1:], _DEFAULT_CONFIG))
  except cli.ConfigFileError as err:
    cli.fatal(err)
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    cli.fatal(f"Flags parsing error: {err}. Pass --help to see the flags, --print_config "
              "the config fields.")
  except (AttributeError, KeyError) as err:
    cli.fatal(_unknown_field(err))


if __name__ == "__main__":
  with checkpointing.quiet_failure_reports():
    app.run(main, flags_parser=_parse_flags)
