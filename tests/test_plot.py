"""Tests for experiments/plot.py on synthetic metrics files."""

import json
import os
import sys

import numpy as np
from absl.testing import absltest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from experiments import plot  # noqa: E402


def _write_run(folder, scale, extra_lines=()):
  """A run folder whose metrics.jsonl has train rows every 10 steps and eval rows every 20."""
  os.makedirs(folder, exist_ok=True)
  lines = []
  for step in range(10, 101, 10):
    lines.append(dict(step=step, kind="train", loss=scale / step, token_jsd=0.1 * scale,
                      grad_norm=1.0, rollout_len_mean=4.0, **{"usage/0": 0.5, "usage/1": 0.5}))
    if step % 20 == 0:
      lines.append(dict(step=step, kind="eval", token_jsd=0.2 * scale, nll=1.0 / step,
                        seq_kl=scale, seq_kl_stderr=0.1,
                        validity=[0.9, 0.8, 0.7], confusion=[[1.0, 0.0], [0.0, 1.0]],
                        assignment=[0, 1]))
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    for record in lines:
      f.write(json.dumps(record) + "\n")
    for line in extra_lines:
      f.write(line)
  return folder


class PlotTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = self.create_tempdir().full_path
    self.run_a = _write_run(os.path.join(self.root, "sweep", "tau_0.8"), 1.0)
    self.run_b = _write_run(os.path.join(self.root, "sweep", "tau_0.95"), 2.0)

  def test_one_figure_per_group_one_panel_per_metric_runs_as_lines(self):
    runs = {label: plot.read_metrics(plot.metrics_path(r))
            for label, r in zip(["a", "b"], [self.run_a, self.run_b])}
    figs = plot.figures(runs)
    self.assertEqual(sorted(figs), ["divergence", "latent usage", "objective", "optimisation",
                                    "other", "validity"])
    titles = lambda fig: [ax.get_title() for ax in fig.axes if ax.get_visible()]  # noqa: E731
    self.assertEqual(titles(figs["validity"]), ["validity/0", "validity/1", "validity/2"])
    self.assertEqual(titles(figs["latent usage"]), ["usage/0", "usage/1"])
    self.assertEqual(titles(figs["objective"]), ["loss", "nll"])
    self.assertEqual(titles(figs["other"]), ["rollout_len_mean"])
    # seq_kl_stderr is a band around seq_kl, not a panel of its own.
    self.assertEqual(titles(figs["divergence"]), ["seq_kl", "token_jsd"])
    self.assertLen(figs["divergence"].axes[0].collections, 2)  # One band per run.
    # token_jsd is logged by train and eval: per run a solid train line and a
    # dashed eval line, with the run's values.
    ax = figs["divergence"].axes[1]
    lines = {line.get_label(): line for line in ax.get_lines()}
    self.assertEqual(sorted(lines), ["a (eval)", "a (train)", "b (eval)", "b (train)"])
    self.assertEqual(lines["a (train)"].get_linestyle(), "-")
    self.assertEqual(lines["a (eval)"].get_linestyle(), "--")
    np.testing.assert_array_equal(lines["b (eval)"].get_xdata(), [20, 40, 60, 80, 100])
    np.testing.assert_allclose(lines["b (eval)"].get_ydata(), 0.4)
    np.testing.assert_allclose(lines["a (train)"].get_ydata(), 0.1)
    self.assertEqual(lines["a (train)"].get_color(), lines["a (eval)"].get_color())
    self.assertNotEqual(lines["a (train)"].get_color(), lines["b (train)"].get_color())

  def test_the_legend_sits_outside_the_panels(self):
    runs = {"a": plot.read_metrics(plot.metrics_path(self.run_a))}
    fig = plot.figures(runs, groups=["divergence"])["divergence"]
    fig.canvas.draw()
    (legend,) = fig.legends
    self.assertEqual([t.get_text() for t in legend.get_texts()], ["a (train)", "a (eval)"])
    panel = fig.axes[1].get_window_extent()
    box = legend.get_window_extent()
    self.assertGreaterEqual(box.x0, panel.x1)  # Right of the panel, not over the curves.

  def test_extra_groups_come_first(self):
    runs = {"a": plot.read_metrics(plot.metrics_path(self.run_a))}
    figs = plot.figures(runs, extra_groups=[("lengths", "^rollout_len")])
    self.assertIn("lengths", figs)
    self.assertNotIn("other", figs)

  def test_main_writes_a_png_per_group_with_labels_from_the_paths(self):
    out = os.path.join(self.root, "plots")
    written = plot.main([self.run_a, os.path.join(self.run_b, "metrics.jsonl"),
                         "--out", out, "--groups", "objective,latent usage",
                         "--group", "lengths=^rollout_len"])
    self.assertEqual(written, [os.path.join(out, "objective.png"),
                               os.path.join(out, "latent_usage.png")])
    for path in written:
      with open(path, "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertEqual(plot.default_labels([self.run_a, self.run_b]), ["tau_0.8", "tau_0.95"])

  def test_repeated_steps_keep_the_last_record_and_a_cut_last_line_is_skipped(self):
    repeat = json.dumps(dict(step=100, kind="eval", token_jsd=9.0, nll=0.0)) + "\n"
    run = _write_run(os.path.join(self.root, "rerun"), 1.0,
                     extra_lines=[repeat, '{"step": 110, "kind": "tra'])
    s = plot.series(plot.read_metrics(plot.metrics_path(run)))
    steps, values = s[("eval", "token_jsd")]
    self.assertEqual(steps, [20, 40, 60, 80, 100])
    self.assertEqual(values[-1], 9.0)
    self.assertEqual(s[("train", "loss")][0][-1], 100)

  def test_bad_input_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, "no metrics.jsonl"):
      plot.main([os.path.join(self.root, "missing")])
    bad = _write_run(os.path.join(self.root, "bad"), 1.0, extra_lines=["not json\n", "{}\n"])
    with self.assertRaisesRegex(ValueError, r"metrics.jsonl:16: not a JSON line"):
      plot.read_metrics(plot.metrics_path(bad))
    with self.assertRaisesRegex(ValueError, "2 labels for 1 runs"):
      plot.main([self.run_a, "--labels", "x,y"])
    with self.assertRaisesRegex(ValueError, "groups with no data"):
      plot.main([self.run_a, "--groups", "bleu", "--out", os.path.join(self.root, "p")])
    with self.assertRaisesRegex(ValueError, "NAME=REGEX"):
      plot.main([self.run_a, "--group", "lengths"])


if __name__ == "__main__":
  absltest.main()
