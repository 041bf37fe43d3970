"""Runs a latentdiv experiment from a config file.

  python run.py                                   # default config, ./workdir/default
  python run.py --config=experiments/configs/early_jsd.py --workdir=/tmp/run1
  python run.py --config.train.num_steps=200 --config.model.num_latents=4

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
from latentdiv import train

_HERE = os.path.dirname(os.path.abspath(__file__))


def _unknown_field(err: Exception) -> str:
  bad = [a for a in sys.argv[1:] if a.startswith("--config.")]
  message = str(err).strip("'\"").replace("\\n", " ").replace("\\'", "'")
  return (f"FATAL Unknown config field in {bad}: {message}\n"
          f"Every field and its default: latentdiv/config.py (base_config).")


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


def _format_summary(summary: dict) -> str:
  lines = [
      f"Finished {summary['steps']} steps on '{summary['task']}'.",
      f"  strategy coverage : {summary['coverage']:.2f}",
      "  validity per latent: " + ", ".join(f"{v:.1%}" for v in summary["validity"]),
      "  latent -> strategy : " + ", ".join(
          f"z={k}->s={s}" if s >= 0 else f"z={k}->none"
          for k, s in enumerate(summary["assignment"])),
      "  latent usage       : " + ", ".join(f"{u:.2f}" for u in summary["latent_usage"]),
      f"  latent/strategy NMI: {summary['nmi']:.3f}",
      f"  sequence KL between latents (MC): {summary['seq_kl']:.3f} "
      f"± {summary['seq_kl_stderr']:.3f}",
      f"  token JSD: {summary['token_jsd']:.4f}   NLL/token: {summary['nll']:.4f}",
  ]
  if summary["task"] == "transduction":
    lines.append(f"  greedy exact match: {summary['exact_match']:.1%}   mean edit distance: "
                 f"{summary['edit_distance']:.3f}   KL(q || p): "
                 f"{summary['kl_payoff_to_model']:.3f}")
  return "\n".join(lines)


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
  if "distill" in config:  # On-policy distillation (latentdiv/distill.py).
    from latentdiv import distill  # pylint: disable=import-outside-toplevel
    build, train_and_evaluate, format_summary = (
        distill.build, distill.train_and_evaluate, distill.format_summary)
  else:
    build, train_and_evaluate, format_summary = (
        train.build, train.train_and_evaluate, _format_summary)
  try:
    build(config)  # Validates every field before anything compiles.
    if "distill" not in config:
      train.make_data_mesh(config)  # Batch sizes against the devices.
  except ValueError as err:
    raise app.UsageError(str(err)) from None
  try:
    summary = train_and_evaluate(config, workdir)
  except train.Interrupted as err:
    print(f"Stopped: {err}", file=sys.stderr)
    sys.exit(130)
  except (train.ConfigMismatchError, train.WorkdirBusyError, train.NonFiniteError,
          checkpointing.CheckpointError) as err:
    print(f"Error: {err}", file=sys.stderr)
    sys.exit(1)
  print(format_summary(summary))
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
