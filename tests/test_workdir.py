"""The workdir rules (latentdiv/workdir.py): one run at a time, the resume check, the log.

* a busy workdir lock refuses a second run, a stale one is taken over;
* a resume whose config changes the structure of the checkpointed state
  (``train.STRUCTURAL_FIELDS`` and the objective's ``structure``) is refused
  before anything is restored, naming the fields; other changes continue;
* a log line cut short by a kill does not stop the resume.

The in-process runs of ``tests/configs/tiny.py`` share a persistent compilation
cache (a temporary directory, removed afterwards), as in
``tests/test_reliability.py``.
"""

import contextlib
import glob
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.experimental.compilation_cache import compilation_cache

from latentdiv import experiment
from latentdiv import workdir as workdir_lib
from latentdiv.objectives import diversity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "configs", "tiny.py")

_MODULE = {}
_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


def setUpModule():  # pylint: disable=invalid-name
  _MODULE["tmp"] = tempfile.mkdtemp(prefix="latentdiv_workdir_")
  _MODULE["old_flags"] = {name: getattr(jax.config, name) for name in _CACHE_FLAGS}
  jax.config.update("jax_compilation_cache_dir", os.path.join(_MODULE["tmp"], "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()


def tearDownModule():  # pylint: disable=invalid-name
  for name, value in _MODULE["old_flags"].items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  shutil.rmtree(_MODULE["tmp"], ignore_errors=True)


def tiny_config():
  """``get_config()`` of tests/configs/tiny.py."""
  spec = importlib.util.spec_from_file_location("tiny_config", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _fresh_dir(name: str) -> str:
  return tempfile.mkdtemp(prefix=name + "_", dir=_MODULE["tmp"])


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _files_under(directory):
  return {os.path.relpath(f, directory): open(f, "rb").read()
          for f in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(f)}


class LockTest(parameterized.TestCase):

  def test_a_live_lock_refuses_and_a_stale_lock_is_taken_over(self):
    workdir = _fresh_dir("lock")
    lock = os.path.join(workdir, ".lock")
    config = tiny_config()
    config.train.num_steps = 2
    sleeper = subprocess.Popen(["sleep", "60"])
    self.addCleanup(sleeper.wait)
    self.addCleanup(sleeper.kill)
    with open(lock, "w") as f:
      json.dump(dict(pid=sleeper.pid, host=socket.gethostname()), f)
    with self.assertRaisesRegex(workdir_lib.WorkdirBusyError,
                                rf"pid {sleeper.pid} .*{re.escape(lock)}"):
      experiment.train_and_evaluate(config, workdir)
    with open(lock, "w") as f:  # A run on another host cannot be checked: refused too.
      json.dump(dict(pid=1, host="another-host.invalid"), f)
    with self.assertRaises(workdir_lib.WorkdirBusyError):
      experiment.train_and_evaluate(config, workdir)
    self.assertEqual(_checkpoint_steps(workdir), [])  # Refused before doing anything.

    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(lock, "w") as f:
      json.dump(dict(pid=dead.pid, host=socket.gethostname()), f)
    with self.assertLogs(level="WARNING") as logs, contextlib.redirect_stdout(io.StringIO()):
      summary = experiment.train_and_evaluate(config, workdir)
    self.assertEqual(summary["steps"], 2)
    self.assertTrue(any("stale lock" in line for line in logs.output), logs.output)
    self.assertFalse(os.path.exists(lock))


class ConfigRecordTest(parameterized.TestCase):

  def test_resume_refuses_a_structural_config_change_and_accepts_others(self):
    workdir = _fresh_dir("mismatch")
    config = tiny_config()
    config.train.num_steps = 2
    with contextlib.redirect_stdout(io.StringIO()):
      experiment.train_and_evaluate(config, workdir)
    before = _files_under(os.path.join(workdir, "checkpoints"))
    changed = tiny_config()
    changed.model.d_model = 32
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError, r"model\.d_model: 16 -> 32"):
      experiment.train_and_evaluate(changed, workdir)
    changed = tiny_config()
    changed.objective.sequence_term.weight = 0.0
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError,
                                r"objective\.sequence_term\.weight > 0: True -> False"):
      experiment.train_and_evaluate(changed, workdir)
    self.assertEqual(_files_under(os.path.join(workdir, "checkpoints")), before)
    config.train.num_steps = 4  # Not structural: continues.
    config.train.log_every = 1
    with contextlib.redirect_stdout(io.StringIO()):
      self.assertEqual(experiment.train_and_evaluate(config, workdir)["steps"], 4)

  def test_structural_differences_names_every_differing_field(self):
    old = workdir_lib.config_record(tiny_config())
    new = tiny_config()
    new.model.d_model, new.model.num_layers, new.train.num_steps = 32, 2, 7
    diffs = workdir_lib.differences(diversity.Diversity.structure(old),
                                    diversity.Diversity.structure(
                                        workdir_lib.config_record(new)))
    self.assertEqual(diffs, ["model.d_model: 16 -> 32", "model.num_layers: 1 -> 2"])

  def test_the_structure_is_the_loops_fields_and_the_objectives(self):
    structure = lambda c: diversity.Diversity.structure(workdir_lib.config_record(c))  # noqa: E731
    old = structure(tiny_config())

    def diffs(**changes):
      new = tiny_config()
      for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = new
        for part in parents:
          node = node[part]
        node[leaf] = value
      return workdir_lib.differences(old, structure(new))

    # Not structural: the loop's schedule, the optimiser's step size, the loss weights.
    self.assertEqual(diffs(train__num_steps=7, optim__learning_rate=0.5,
                           objective__lambda_jsd=0.3, objective__sequence_term__weight=0.2),
                     [])
    # Only whether the sequence-level term is on (its estimator state) is structural.
    self.assertEqual(diffs(objective__sequence_term__weight=0.0),
                     ["objective.sequence_term.weight > 0: True -> False"])
    self.assertEqual(diffs(optim__grad_clip_norm=0.5), ["optim.grad_clip_norm: 1.0 -> 0.5"])
    self.assertEqual(diffs(task__prompt_len=3), ["task.prompt_len: 2 -> 3"])
    self.assertEqual(diffs(objective__sequence_term__baseline="leave_one_out"),
                     ["objective.sequence_term.baseline: 'ema' -> 'leave_one_out'"])
    self.assertEqual(diffs(objective__sequence_term__rollout_len=2),
                     ["objective.sequence_term.rollout_len: 1 -> 2"])
    renamed = workdir_lib.config_record(tiny_config())
    renamed["objective"]["name"] = "distillation"
    self.assertEqual(workdir_lib.differences(old, diversity.Diversity.structure(renamed)),
                     ["objective.name: 'diversity' -> 'distillation'"])


class LogTest(parameterized.TestCase):

  def test_resume_survives_a_partial_log_line(self):
    workdir = _fresh_dir("partial_log")
    config = tiny_config()
    config.train.num_steps = 4
    with contextlib.redirect_stdout(io.StringIO()):
      experiment.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "kind": "tra')  # Cut short by a kill.
      config.train.num_steps = 6
      self.assertEqual(experiment.train_and_evaluate(config, workdir)["steps"], 6)


if __name__ == "__main__":
  absltest.main()
