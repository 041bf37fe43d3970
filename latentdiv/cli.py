"""What ``run.py`` needs besides the training function: the config file, the run folder, the listing.

* ``load_config_file`` — a ``--config`` file's ``get_config()``, or a
  one-line ``ConfigFileError`` naming the file and line (missing file,
  syntax error, no ``get_config``, ``get_config`` raising or returning
  something else than a ``ConfigDict``, a bool assigned to a float field);
* ``run_folder`` — the default ``--workdir``: ``workdir/<name>`` with the
  name built from the whole config argument and the overrides
  (``workdir.default_name``);
* ``describe`` — every config field with its value, default and meaning
  (``run.py --print_config``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import traceback

import ml_collections
from ml_collections.config_dict import config_dict as config_dict_lib

from latentdiv import config as config_lib
from latentdiv import objectives
from latentdiv import workdir as workdir_lib
from latentdiv.objectives import field_help

RUNS_ROOT = "workdir"


class ConfigFileError(ValueError):
  """A config file that cannot give a config (the message is one line, naming the file)."""


@contextlib.contextmanager
def _bools_are_not_numbers():
  """Makes ``ConfigDict`` refuse True/False for a float field while a config file runs.

  ``ml_collections`` casts an int to a float field, and a bool is an int:
  ``config.optim.learning_rate = True`` would silently train at 1.0.
  """
  original = getattr(config_dict_lib, "_safe_cast", None)
  if original is None:  # Another ml_collections: nothing to patch.
    yield
    return

  def strict(value, field_type, type_safe=False):
    if isinstance(value, bool) and field_type is float:
      raise TypeError(f"{value!r} is a bool, not a number, for a float field")
    return original(value, field_type, type_safe)

  config_dict_lib._safe_cast = strict  # pylint: disable=protected-access
  try:
    yield
  finally:
    config_dict_lib._safe_cast = original  # pylint: disable=protected-access


def _where(path: str, err: BaseException) -> str:
  """``'FILE, line N'`` of the innermost frame of ``err`` in the config file (else ``'FILE'``)."""
  target = os.path.abspath(path)
  line = None
  for frame, lineno in traceback.walk_tb(err.__traceback__):
    if os.path.abspath(frame.f_code.co_filename) == target:
      line = lineno
  if isinstance(err, SyntaxError) and err.lineno and os.path.abspath(err.filename or "") == target:
    line = err.lineno
  return f"{path}, line {line}" if line else path


def _one_line(err: BaseException) -> str:
  text = (err.msg if isinstance(err, SyntaxError) else str(err)).strip()
  return f"{type(err).__name__}: {' '.join(text.split())}" if text else type(err).__name__


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``get_config()`` (or ``get_config(ARG)``) of the config file ``PATH[:ARG]``.

  Raises:
    ConfigFileError: a one-line message naming the file (and line) and what is wrong.
  """
  path, sep, arg = str(spec).partition(":")
  if not path:
    raise ConfigFileError("--config is empty: give a config file, e.g. "
                          "--config=experiments/configs/default.py.")
  if not os.path.isfile(path):
    raise ConfigFileError(f"--config={spec}: no such file {path!r} (config files live in "
                          "experiments/configs/).")
  module_spec = importlib.util.spec_from_file_location("latentdiv_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  with _bools_are_not_numbers():
    try:
      module_spec.loader.exec_module(module)
    except Exception as err:  # pylint: disable=broad-except
      raise ConfigFileError(f"{_where(path, err)}: {_one_line(err)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
      raise ConfigFileError(
          f"{path} defines no get_config() function: a config file defines get_config() "
          "returning an ml_collections.ConfigDict (see experiments/configs/default.py).")
    call = f"get_config({arg!r})" if sep else "get_config()"
    try:
      config = get_config(arg) if sep else get_config()
    except Exception as err:  # pylint: disable=broad-except
      raise ConfigFileError(f"{_where(path, err)}: {call} raised {_one_line(err)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigFileError(
        f"{path}: get_config() returned a {type(config).__name__}, not an "
        "ml_collections.ConfigDict: start from latentdiv.objectives.base_config(NAME) and set "
        "its fields.")
  return config


def config_spec(argv: list[str], default: str) -> str:
  """The ``--config`` value in ``argv`` (``--config=X`` or ``--config X``), else ``default``."""
  spec = default
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def run_folder(spec: str, overrides: dict) -> str:
  """The default workdir: ``workdir/<config file>[_<arg>][_<field>_<value>...]``."""
  return os.path.join(RUNS_ROOT, workdir_lib.default_name(spec, overrides))


def field_meaning(name: str, path: str) -> str:
  """The help text of config field ``path`` (dotted, without ``config.``) of objective ``name``."""
  if path.startswith("objective."):
    return field_help.HELP.get(name, {}).get(path[len("objective."):], "")
  return config_lib.FIELD_HELP.get(path, "")


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field: ``config.PATH = VALUE  [default D]  meaning`` (``*`` where it differs)."""
  name = config.objective.name if "objective" in config else "diversity"
  try:
    defaults = workdir_lib.flatten(workdir_lib.config_record(objectives.base_config(name)))
  except ValueError:
    defaults = {}
  values = workdir_lib.flatten(workdir_lib.config_record(config))
  width = max(len(p) + len(repr(v)) for p, v in values.items()) + 12
  lines = [f"Config of objective {name!r} ('*': not the default; any field can be set with "
           "--config.FIELD=VALUE):"]
  for path, value in values.items():
    default = defaults.get(path, "(no default)")
    mark = " " if value == default else "*"
    head = f"{mark} config.{path} = {value!r}"
    lines.append(f"{head:<{width}} [default {default!r}]  {field_meaning(name, path)}")
  return "\n".join(lines)


def fatal(message: str, code: int = 2):
  """Prints ``FATAL message`` on one line to stderr and exits with ``code``."""
  print(f"FATAL {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(code)
