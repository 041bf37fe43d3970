"""Tests for experiments/estimator_variance.py: loading a model, the report, the command line.

The diagnostic itself is tests/test_diagnostics.py; here ``main`` runs end to
end on a checkpoint workdir (exact mode on the tiny default model) and the
script from the command line (Monte-Carlo mode).
"""
import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import estimator_variance as ev  # noqa: E402
from latentdiv import checkpointing  # noqa: E402
from latentdiv import estimators as est  # noqa: E402
from latentdiv import experiment  # noqa: E402
from latentdiv import train  # noqa: E402


def _fake_run(workdir):
  """A run.py workdir holding the tiny config and its step-0 state at step 7."""
  setup, params, _ = ev.load()
  # The state's structure with the fresh parameters (the rest is never read).
  _, objective = experiment.build(setup.config)
  abstract = jax.eval_shape(lambda: train.init_state(setup, objective))
  state = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                 abstract).replace(params=params)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(setup.config.to_json_best_effort()), f)
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), 3, 1)
  checkpointing.save(manager, 7, state, dict(step=7), force=True)
  manager.wait_until_finished()
  manager.close()
  return state


class MainTest(parameterized.TestCase):

  @pytest.mark.slow  # Trains a run, then the full diagnostics (about 2 minutes).
  def test_main_on_a_checkpoint_writes_table_json_and_plot(self):
    workdir = self.create_tempdir().full_path
    state = _fake_run(workdir)
    setup, params, source = ev.load(workdir=workdir)
    chex.assert_trees_all_equal(params, state.params)
    self.assertIn("step 7", source)
    self.assertEqual(setup.model, ev.load()[0].model)
    self.assertEqual(source, f"checkpoint {workdir} @ step 7")
    with self.assertRaises(FileNotFoundError):
      ev.load(workdir=workdir, step=3)

    out = self.create_tempdir().full_path
    fv = flags.FlagValues()
    ev.define_flags(fv)
    fv(["estimator_variance.py", f"--workdir={workdir}", f"--output_dir={out}",
        "--batch_size=2", "--num_pairs=1"])
    ev.main(["estimator_variance.py"], fv)
    base = os.path.join(out, "estimator_variance")
    with open(base + ".json") as f:
      result = json.load(f)
    with open(base + ".md") as f:
      table = f.read()
    with open(base + ".png", "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertEqual(result["mode"], "exact")
    self.assertEqual(result["precision"], "float64")
    self.assertEqual(result["num_outputs"], 15)
    self.assertLen(result["rows"], 14)
    self.assertLen(result["cells"], 2)
    self.assertIn("step 7", table)
    rows = {(r["estimator"], r["baseline"]): r for r in result["rows"]}
    for (name, baseline), row in rows.items():
      self.assertIn(f"| {name} | {baseline} |", table)
      if name in est.ESTIMATORS:
        self.assertLess(row["rel_err_max"], 1e-5, msg=row)
        self.assertGreater(row["cosine"], 1 - 1e-9, msg=row)
      else:
        self.assertGreater(row["rel_err"], 0.02, msg=row)
      # Table rows are the means of the per-cell metrics.
      cell_values = [m["variance"] for c in result["cells"] for m in c["combos"]
                     if (m["estimator"], m["baseline"]) == (name, baseline)]
      self.assertAlmostEqual(row["variance"], np.mean(cell_values), delta=1e-9 * row["variance"])
    self.assertLess(rows[("rao_blackwell", "none")]["variance"],
                    rows[("trajectory", "none")]["variance"])

  @pytest.mark.slow
  def test_script_runs_from_the_command_line(self):
    out = self.create_tempdir().full_path
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "estimator_variance.py"),
         "--estimators=trajectory,rao_blackwell", "--baselines=none,leave_one_out",
         "--batch_size=1", "--num_pairs=2", "--mode=mc", "--num_samples=64",
         "--num_reference=128", f"--output_dir={out}"],
        capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(proc.returncode, 0, msg=proc.stderr[-3000:])
    self.assertIn("rao_blackwell | leave_one_out", proc.stdout)
    for ext in ("md", "json", "png"):
      self.assertTrue(os.path.exists(os.path.join(out, f"estimator_variance.{ext}")))


if __name__ == "__main__":
  absltest.main()
