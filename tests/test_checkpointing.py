"""Checkpoints (latentdiv/checkpointing.py): checksums, fallback, refusals, quiet failures.

On a small state (no model): a flipped byte in a checkpoint's array data is
caught by its checksum and the previous checkpoint restored; a checkpoint of
another structure is refused and left alone; an unreadable directory is set
aside (renamed in place when it cannot be moved); a failed save is one line;
tensorstore's "Event loop is closed" reports are dropped, nothing else.
"""

import contextlib
import errno
import glob
import logging
import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
from unittest import mock

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from latentdiv import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(value: float):
  return dict(w=jnp.arange(2048, dtype=jnp.float32) * value, step=jnp.int32(value))


def _saved(steps=(1, 2)) -> str:
  """A checkpoint directory with ``_state(s)`` at each step ``s``."""
  directory = os.path.join(tempfile.mkdtemp(), "checkpoints")
  manager = checkpointing.make_manager(directory, keep=5, save_every=1)
  for step in steps:
    checkpointing.save(manager, step, _state(step), dict(step=step, config={"seed": step}),
                       force=True)
  manager.close()
  return directory


def _restore(directory, target=None):
  manager = checkpointing.make_manager(directory, keep=5, save_every=1)
  try:
    with contextlib.redirect_stdout(io.StringIO()) as out:
      restored = checkpointing.restore_latest(
          manager, checkpointing.abstract_like(target or _state(0)))
  finally:
    manager.close()
  return restored, out.getvalue()


def _data_files(step_dir):
  """The array data files of a step (OCDBT's ``d/`` files), largest first."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  return sorted(files, key=os.path.getsize, reverse=True)


def flip_one_byte(path: str, offset: int | None = None) -> None:
  with open(path, "r+b") as f:
    data = f.read()
    at = len(data) // 2 if offset is None else offset
    f.seek(at)
    f.write(bytes([data[at] ^ 0x01]))


class ChecksumTest(absltest.TestCase):

  def test_every_checkpoint_has_a_sha256sum_listing_that_verifies(self):
    directory = _saved((1,))
    step_dir = os.path.join(directory, "1")
    listing = open(os.path.join(step_dir, checkpointing.CHECKSUM_FILE)).read().splitlines()
    self.assertTrue(any(line.endswith(os.path.relpath(_data_files(step_dir)[0], step_dir))
                        for line in listing))
    self.assertTrue(checkpointing.verify_checksums(step_dir))
    if shutil.which("sha256sum"):  # The format is sha256sum's.
      subprocess.run(["sha256sum", "--quiet", "-c", checkpointing.CHECKSUM_FILE],
                     cwd=step_dir, check=True)

  def test_a_flipped_byte_in_the_data_is_caught_and_the_previous_checkpoint_used(self):
    directory = _saved((1, 2))
    flip_one_byte(_data_files(os.path.join(directory, "2"))[0])
    (state, meta, step), out = _restore(directory)
    self.assertEqual(step, 1)
    self.assertIn("checksum mismatch", out)
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    self.assertEqual(meta["config"], {"seed": 1})
    self.assertEqual(os.listdir(os.path.join(os.path.dirname(directory),
                                             checkpointing.UNREADABLE_DIR)), ["2"])

  def test_a_checkpoint_without_checksums_restores_unverified(self):
    directory = _saved((1,))
    os.remove(os.path.join(directory, "1", checkpointing.CHECKSUM_FILE))
    with self.assertLogs(level="WARNING") as logs:
      (_, _, step), _ = _restore(directory)
    self.assertEqual(step, 1)
    self.assertTrue(any("restored unverified" in line for line in logs.output))

  def test_the_config_record_is_read_from_the_newest_checkpoint(self):
    directory = _saved((1, 2))
    self.assertEqual(checkpointing.newest_config_record(directory), {"seed": 2})


class FallbackTest(absltest.TestCase):

  def test_a_checkpoint_of_another_structure_is_refused_and_left_alone(self):
    directory = _saved((1,))
    before = sorted(glob.glob(os.path.join(directory, "**"), recursive=True))
    other = dict(w=jnp.zeros(16, jnp.float32), step=jnp.int32(0))
    with self.assertRaisesRegex(checkpointing.StructureMismatchError,
                                r"1 arrays differ: w: \(\(2048,\), 'float32'\) in the "
                                r"checkpoint, \(\(16,\), 'float32'\) now"):
      _restore(directory, other)
    self.assertEqual(sorted(glob.glob(os.path.join(directory, "**"), recursive=True)), before)

  def test_an_unreadable_step_directory_is_renamed_in_place_and_skipped(self):
    # chmod 000 denies nothing to a process with CAP_DAC_OVERRIDE (root): the
    # restore then runs in a child without that capability (capsh), or as is
    # for a user without it.
    if os.geteuid() == 0 and not shutil.which("capsh"):
      self.skipTest("root without capsh: chmod cannot deny access here")
    directory = _saved((1, 2))
    os.chmod(os.path.join(directory, "2"), 0)
    self.addCleanup(lambda: [os.chmod(p, 0o755) for p in glob.glob(directory + "/*")])
    script = textwrap.dedent(f"""
        import jax.numpy as jnp
        from latentdiv import checkpointing
        state = dict(w=jnp.zeros(2048, jnp.float32), step=jnp.int32(0))
        manager = checkpointing.make_manager({directory!r}, 5, 1)
        _, _, step = checkpointing.restore_latest(manager, checkpointing.abstract_like(state))
        manager.close()
        print("restored", step)
    """)
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:
      command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c",
                 "exec " + shlex.join(command)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn("restored 1", proc.stdout)
    self.assertNotIn("Traceback", proc.stderr)
    self.assertTrue(os.path.isdir(os.path.join(directory, "2.unreadable")))

  def test_a_failed_save_is_one_line(self):
    manager = mock.Mock()
    manager.save.side_effect = OSError(errno.ENOSPC, "No space left on device")
    manager.directory = "/runs/x/checkpoints"
    with self.assertRaisesRegex(checkpointing.CheckpointError,
                                r"^Could not save the checkpoint at step 7 in /runs/x/checkpoints:"
                                r" OSError: \[Errno 28\] No space left on device$"):
      checkpointing.save(manager, 7, _state(1), {}, force=True)


class QuietEventLoopTest(absltest.TestCase):

  def test_only_closed_event_loop_reports_are_dropped(self):
    seen = []
    record = seen.append
    with mock.patch.object(sys, "unraisablehook", record):
      with checkpointing.quiet_failure_reports():
        for err in (RuntimeError("Event loop is closed"), RuntimeError("something else"),
                    ValueError("Event loop is closed")):
          sys.unraisablehook(types.SimpleNamespace(exc_value=err))
      self.assertIs(sys.unraisablehook, record)  # Restored.
    self.assertEqual([str(u.exc_value) for u in seen], ["something else", "Event loop is closed"])
    self.assertIsInstance(seen[1].exc_value, ValueError)

  def test_orbax_thread_reports_of_a_failed_save_are_dropped_and_nothing_else(self):
    absl_logger = logging.getLogger("absl")
    orbax_future = os.path.join("orbax", "checkpoint", "_src", "futures", "future.py")

    def record(path, message):
      return logging.LogRecord("absl", logging.ERROR, path, 387, message, (), None)

    with checkpointing.quiet_failure_reports():
      self.assertFalse(absl_logger.filter(record(
          orbax_future, "_SignalingThread.run() raised an exception: OUT_OF_RANGE")))
      self.assertTrue(absl_logger.filter(record(orbax_future, "something else")))
      self.assertTrue(absl_logger.filter(record("mine.py", "raised an exception")))
    self.assertTrue(absl_logger.filter(record(
        orbax_future, "_SignalingThread.run() raised an exception")))  # Removed again.

  def test_a_save_failing_for_space_is_one_line_from_run_py(self):
    # A file-size limit (Python ignores SIGXFSZ, so writes fail with EFBIG as
    # on a full disk) that the checkpoint's array data exceeds.
    if not shutil.which("prlimit"):
      self.skipTest("no prlimit")
    script = textwrap.dedent("""
        import jax
        from latentdiv import checkpointing
        manager = checkpointing.make_manager(__import__("sys").argv[1], 5, 1)
        with checkpointing.quiet_failure_reports():
          try:
            w = jax.random.normal(jax.random.PRNGKey(0), (65536,))  # Incompressible.
            checkpointing.save(manager, 1, dict(w=w), {}, force=True)
          except checkpointing.CheckpointError as err:
            print("CheckpointError", err)
    """)
    directory = os.path.join(tempfile.mkdtemp(), "checkpoints")
    proc = subprocess.run(["prlimit", "--fsize=16384", "--", sys.executable, "-c", script,
                           directory], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    self.assertIn("CheckpointError Could not save the checkpoint at step 1", proc.stdout)
    self.assertNotIn("Traceback", proc.stderr)
    self.assertNotIn("Event loop is closed", proc.stderr)


if __name__ == "__main__":
  absltest.main()
