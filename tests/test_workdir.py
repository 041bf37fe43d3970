"""The workdir rules (latentdiv/workdir.py): names, one run at a time, the resume rules.

* the default run folder is named after the whole config argument and its
  overrides: the README's commands never share a folder unless they are the
  same config;
* an unusable --workdir is a one-line WorkdirError;
* the lock is an ``fcntl.flock``: two processes racing for a stale lock file
  never both hold it, and no stale file (pid 1 in a container, another host,
  a dead pid, garbage) blocks a run;
* a run whose config differs from its workdir's is refused, listing every
  changed field; structural changes always, others without
  ``accept_changes``; ``config.json`` changes only with it and the history
  keeps every start; a missing ``config.json`` is read from the checkpoint.

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
import signal
import socket
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import pytest
import jax
from jax.experimental.compilation_cache import compilation_cache

from latentdiv import cli
from latentdiv import experiment
from latentdiv import workdir as workdir_lib
from latentdiv.objectives import diversity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from experiments.fault_matrix import race_for_stale_locks, readme_commands  # noqa: E402,E501
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


def _quiet(fn, *args, **kwargs):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = fn(*args, **kwargs)
  return result, out.getvalue()


# ----------------------------------------------------------------------------
# Names.


def _config_of(args):
  """(config, default run folder or --workdir) of run.py's arguments, as run.py builds them."""
  spec, overrides, workdir = os.path.join(REPO, "experiments/configs/default.py"), {}, None
  for arg in args:
    name, _, value = arg[2:].partition("=")
    if name == "config":
      spec = value
    elif name == "workdir":
      workdir = value
    elif name.startswith("config."):
      overrides[name[len("config."):]] = value
  path, sep, arg = spec.partition(":")
  config = cli.load_config_file(os.path.join(REPO, path) + sep + arg)
  typed = {}
  for path_, text in overrides.items():
    node = config
    *parents, leaf = path_.split(".")
    for part in parents:
      node = node[part]
    old = node[leaf]
    value = (text in ("True", "true", "1")) if isinstance(old, bool) else type(old)(text)
    node[leaf] = typed[path_] = value
  return config, workdir or cli.run_folder(spec, typed)


class NameTest(parameterized.TestCase):

  @parameterized.parameters(
      ("experiments/configs/raml.py:hamming,0.8", {}, "raml_hamming_0.8"),
      ("experiments/configs/raml.py:hamming,0.95", {}, "raml_hamming_0.95"),
      ("experiments/configs/distill.py:gkd", {}, "distill_gkd"),
      ("/abs/experiments/configs/default.py", {"train.num_steps": 300,
                                               "objective.lambda_jsd": 0.5},
       "default_lambda_jsd_0.5_num_steps_300"),
      ("default.py", {"optim.warmup_steps": 5, "objective.sequence_term.warmup_steps": 9},
       "default_objective.sequence_term.warmup_steps_9_optim.warmup_steps_5"),
      ("distill.py", {"objective.teacher_workdir": "workdir/a b"},
       "distill_teacher_workdir_workdir-a-b"),
  )
  def test_default_names_come_from_the_whole_argument_and_the_overrides(self, spec, overrides,
                                                                        name):
    self.assertEqual(workdir_lib.default_name(spec, overrides), name)

  def test_long_names_are_cut_with_a_hash(self):
    long = {f"objective.f{i}": "x" * 20 for i in range(8)}
    name = workdir_lib.default_name("default.py", long)
    self.assertLessEqual(len(name), 100)
    self.assertNotEqual(name, workdir_lib.default_name("default.py", dict(long, extra=1)))

  def test_the_readme_commands_never_share_a_folder_of_another_config(self):
    commands = readme_commands(REPO)
    self.assertGreaterEqual(len(commands), 5)
    seen = {}
    for args in commands:
      config, folder = _config_of(args)
      record = workdir_lib.config_record(config)
      if folder in seen:
        self.assertEqual(seen[folder][1], record,
                         f"{args} and {seen[folder][0]} share {folder} with other configs")
      seen[folder] = (args, record)
    self.assertGreaterEqual(len(seen), 5)
    # The distillation example reads the teacher the first command trains.
    distill = [a for a in commands if any("distill.py" in x for x in a)]
    self.assertEqual(_config_of(distill[0])[0].objective.teacher_workdir,
                     _config_of([])[1])

  def test_an_unusable_workdir_is_one_line_naming_it(self):
    root = _fresh_dir("usable")
    a_file = os.path.join(root, "file")
    open(a_file, "w").close()
    for workdir, pattern in (("", r"--workdir is empty"),
                             (a_file, rf"--workdir={re.escape(a_file)} is a file"),
                             (os.path.join(a_file, "run"), r"is not usable")):
      with self.assertRaisesRegex(workdir_lib.WorkdirError, pattern) as caught:
        workdir_lib.check_usable(workdir)
      self.assertNotIn("\n", str(caught.exception))
    workdir_lib.check_usable(os.path.join(root, "new", "run"))
    self.assertTrue(os.path.isdir(os.path.join(root, "new", "run")))


# ----------------------------------------------------------------------------
# The lock.

class LockTest(parameterized.TestCase):

  def test_two_processes_racing_for_stale_locks_never_both_hold_one(self):
    result = race_for_stale_locks(_fresh_dir("race"), rounds=30, python_path=REPO)
    self.assertEqual(result["errors"], [])
    self.assertEqual(result["overlaps"], 0)
    self.assertEqual(result["won"], 30)  # Every round someone ran.

  def test_a_lock_taken_while_a_racer_reads_the_stale_one_is_not_stolen(self):
    # The interleaving that breaks read/check/remove locks, forced: a second
    # taker acquires the lock just after the first one read the stale owner.
    workdir = _fresh_dir("interleaved")
    with open(os.path.join(workdir, ".lock"), "w") as f:
      json.dump(dict(pid=2**22 + 1, host=socket.gethostname()), f)  # Beyond pid_max.
    others, real_load = [], json.load

    def load_then_race(*args, **kwargs):
      out = real_load(*args, **kwargs)
      if not others:
        others.append(workdir_lib.lock(workdir))
        try:
          others[0].__enter__()
        except workdir_lib.WorkdirBusyError:
          others[0] = None
      return out

    with mock.patch.object(json, "load", load_then_race):
      try:
        with workdir_lib.lock(workdir):
          both = bool(others and others[0] is not None)
      except workdir_lib.WorkdirBusyError:
        both = False
    if others and others[0] is not None:
      others[0].__exit__(None, None, None)
    self.assertFalse(both, "two takers held the lock at once")

  @parameterized.named_parameters(
      ("pid_1_in_a_container", lambda: dict(pid=1, host=socket.gethostname())),
      ("this_pid_reused", lambda: dict(pid=os.getpid(), host=socket.gethostname())),
      ("another_host", lambda: dict(pid=1, host="another-host.invalid")),
      ("garbage", lambda: "not json"),
  )
  def test_a_stale_lock_file_never_blocks(self, make_owner):
    workdir = _fresh_dir("stale")
    owner = make_owner()
    with open(os.path.join(workdir, ".lock"), "w") as f:
      f.write(owner if isinstance(owner, str) else json.dumps(owner))
    with workdir_lib.lock(workdir):
      with open(os.path.join(workdir, ".lock")) as f:
        self.assertEqual(json.load(f)["pid"], os.getpid())

  def test_a_live_holder_refuses_and_its_death_releases(self):
    workdir = _fresh_dir("held")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom latentdiv import workdir\n"
         "with workdir.lock(sys.argv[1]):\n  print('held', flush=True); time.sleep(600)",
         workdir], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    self.addCleanup(lambda: holder.poll() is None and holder.kill())
    self.assertEqual(holder.stdout.readline().strip(), "held")
    with self.assertRaisesRegex(workdir_lib.WorkdirBusyError, rf"pid {holder.pid} on "):
      experiment.train_and_evaluate(tiny_config(), workdir)
    self.assertEqual(_checkpoint_steps(workdir), [])  # Refused before doing anything.
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workdir_lib.lock(workdir):  # The kernel released it.
      pass


# ----------------------------------------------------------------------------
# The resume rules.


class ConfigRecordTest(parameterized.TestCase):

  @pytest.mark.slow
  def test_resume_refuses_structural_changes_and_others_unless_accepted(self):
    workdir = _fresh_dir("mismatch")
    config = tiny_config()
    config.train.num_steps = 2
    _quiet(experiment.train_and_evaluate, config, workdir)
    before = _files_under(os.path.join(workdir, "checkpoints"))
    saved = workdir_lib.read_config_record(workdir)
    changed = tiny_config()
    changed.model.d_model = 32
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError, r"model\.d_model: 16 -> 32"):
      experiment.train_and_evaluate(changed, workdir, accept_changes=True)
    changed = tiny_config()
    changed.objective.sequence_term.weight = 0.0
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError,
                                r"objective\.sequence_term\.weight > 0: True -> False"):
      experiment.train_and_evaluate(changed, workdir, accept_changes=True)
    # Not structural: refused without the flag, listing every change.
    config.seed, config.train.num_steps, config.train.log_every = 3, 4, 1
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError,
                                r"seed: 0 -> 3; train\.log_every: 5 -> 1; "
                                r"train\.num_steps: 2 -> 4\. Pass --accept_config_changes"):
      experiment.train_and_evaluate(config, workdir)
    self.assertEqual(_files_under(os.path.join(workdir, "checkpoints")), before)
    self.assertEqual(workdir_lib.read_config_record(workdir), saved)
    summary, out = _quiet(experiment.train_and_evaluate, config, workdir, accept_changes=True)
    self.assertEqual(summary["steps"], 4)
    self.assertIn("changed: seed: 0 -> 3", out)
    self.assertEqual(workdir_lib.read_config_record(workdir)["seed"], 3)
    history = workdir_lib.read_history(workdir)
    self.assertEqual([h["event"] for h in history], ["start", "start"])
    self.assertEqual(history[0]["config"], saved)
    self.assertIn("train.num_steps: 2 -> 4", history[1]["changes"])

  def _made(self, record, checkpoint_meta=None, config_json=True):
    """A workdir whose run had ``record``; a checkpoint directory (step 4) if meta is given."""
    workdir = _fresh_dir("made")
    if config_json:
      workdir_lib.record_start(workdir, record, 0, [])
    if checkpoint_meta is not None:
      os.makedirs(os.path.join(workdir, "checkpoints", "4", "meta"))
      with open(os.path.join(workdir, "checkpoints", "4", "meta", "metadata"), "w") as f:
        json.dump(checkpoint_meta, f)
    return workdir

  def _check(self, workdir, config, **kwargs):
    return workdir_lib.check_resume(workdir, workdir_lib.config_record(config),
                                    diversity.Diversity.structure, **kwargs)

  def test_num_steps_under_the_cosine_schedule_is_refused(self):
    config = tiny_config()
    config.optim.schedule = "cosine"
    workdir = self._made(workdir_lib.config_record(config), checkpoint_meta={})
    config.train.num_steps = 100
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError,
                                r"num_steps changes 60 -> 100 .*cosine learning-rate"):
      self._check(workdir, config, accept_changes=True)
    config.optim.schedule = "constant"  # Both changed: still a schedule change.
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError, r"cosine"):
      self._check(workdir, config, accept_changes=True)

  def test_without_config_json_the_checkpoints_record_is_used(self):
    record = workdir_lib.config_record(tiny_config())
    workdir = self._made(record, checkpoint_meta=dict(step=4, config=record), config_json=False)
    changed = tiny_config()
    changed.model.d_model = 32
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError,
                                r"read from the newest checkpoint.*model\.d_model: 16 -> 32"):
      self._check(workdir, changed, accept_changes=True)
    self.assertEqual(self._check(workdir, tiny_config()), [])

  def test_a_folder_of_another_config_without_checkpoints_is_refused(self):
    workdir = self._made(workdir_lib.config_record(tiny_config()))
    changed = tiny_config()
    changed.objective.lambda_jsd, changed.model.d_model = 0.5, 32
    with self.assertRaisesRegex(
        workdir_lib.ConfigMismatchError,
        r"refusing to reuse it with: model\.d_model: 16 -> 32; objective\.lambda_jsd: "
        r"0\.1 -> 0\.5\. Pass --accept_config_changes"):
      self._check(workdir, changed)
    # Without checkpoints even the structure may change, if accepted.
    self.assertLen(self._check(workdir, changed, accept_changes=True), 2)

  def test_a_lower_learning_rate_is_accepted_after_a_nonfinite_stop_only(self):
    config = tiny_config()
    workdir = self._made(workdir_lib.config_record(config), checkpoint_meta={})
    config.optim.learning_rate = 1e-3
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError, r"learning_rate"):
      self._check(workdir, config)
    workdir_lib.record_nonfinite_stop(workdir, 9, 4)
    self.assertEqual(self._check(workdir, config), ["optim.learning_rate: 0.01 -> 0.001"])
    empty = self._made(workdir_lib.config_record(tiny_config()))  # No healthy checkpoint left:
    workdir_lib.record_nonfinite_stop(empty, 3, None)  # the advised rerun starts afresh.
    self.assertLen(self._check(empty, config), 1)
    config.seed = 1  # Anything else still needs the flag.
    with self.assertRaisesRegex(workdir_lib.ConfigMismatchError, r"seed: 0 -> 1"):
      self._check(workdir, config)

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

  def test_a_field_an_older_version_lacked_counts_as_its_default(self):
    workdir = _fresh_dir("older")
    record = workdir_lib.config_record(tiny_config())
    del record["train"]["max_nonfinite_steps"]  # Written before the field existed.
    workdir_lib.record_start(workdir, record, 0, [])
    defaults = workdir_lib.config_record(tiny_config())
    self.assertEqual(workdir_lib.check_resume(workdir, workdir_lib.config_record(tiny_config()),
                                              diversity.Diversity.structure,
                                              defaults=defaults), [])


if __name__ == "__main__":
  absltest.main()
