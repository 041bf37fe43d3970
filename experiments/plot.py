"""Curves of one or several runs: train and eval scalars against the step, one figure per metric group.

    python experiments/plot.py workdir/raml_hamming_0.8 workdir/raml_hamming_0.95
    python experiments/plot.py workdir/research/*/s0 --out plots --groups objective,divergence
    python experiments/plot.py a/metrics.jsonl b/metrics.jsonl --labels "τ = 0.8,τ = 0.95"

Each RUN is a run folder (its ``metrics.jsonl``) or a ``metrics.jsonl`` file.
Every numeric scalar of the train and eval records is plotted against
``step``; a list of floats (``latent_usage``, ``validity``) becomes one
scalar per entry (``validity/0``, ``validity/1``, ...); anything else
(``confusion``, ``assignment``) is left out. Metrics are grouped by name
(``GROUPS``: objective, divergence, diversity, validity, latent usage,
optimisation, and 'other' for the rest; ``--group NAME=REGEX`` adds one):
one figure per group, one panel per metric, one colour per run (labelled
with what tells the runs apart in their paths, or ``--labels``), train
records as solid lines, eval records as dashed lines with markers, a
metric's ``_stderr`` companion as a band around it. The legend sits outside
the panels, on the right. A step logged twice (a rerun that appended a row)
keeps its last record. Figures are written as
``OUT/<group>.png`` (spaces as '_'); their paths are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOG_FILE = "metrics.jsonl"  # latentdiv.workdir.LOG_FILE (not imported: no JAX needed here).
KINDS = ("train", "eval")
STYLE = {"train": dict(linestyle="-", marker=None), "eval": dict(linestyle="--", marker="o",
                                                                   markersize=3)}


def metrics_path(run: str) -> str:
  """``run`` itself if it is a file, else ``run/metrics.jsonl``; ValueError if neither exists."""
  path = run if os.path.isfile(run) else os.path.join(run, LOG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{run}: no {LOG_FILE} there (pass a run folder or a {LOG_FILE} file).")
  return path


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of one ``metrics.jsonl``: dicts with ``step`` (int) and ``kind``.

  A last line cut short (a run killed while writing) is skipped; any other
  line that is not a JSON object with an integer ``step`` is a ValueError
  naming the file and line.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      if number == len(lines):  # No newline after it: cut short.
        continue
      raise ValueError(f"{path}:{number}: not a JSON line ({e}).") from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      raise ValueError(f"{path}:{number}: a metrics record needs an integer 'step', "
                       f"got {line[:80]!r}.")
    records.append(record)
  return records


def scalars(record: dict[str, Any]) -> dict[str, float]:
  """The record's numeric scalars, without step and kind.

  A list of floats becomes ``name/i`` per entry; lists of integers (an
  assignment of latents to strategies, say) and nested lists are left out.
  """
  out = {}
  for name, value in record.items():
    if name in ("step", "kind"):
      continue
    if isinstance(value, bool):
      value = float(value)
    if isinstance(value, (int, float)):
      out[name] = float(value)
    elif isinstance(value, list) and value and all(isinstance(v, float) for v in value):
      out.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
  return out


def series(records: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[list, list]]:
  """{(kind, metric): (steps, values)}, sorted by step, the last record of a repeated step kept."""
  last: dict[tuple[str, int], dict[str, float]] = {}
  for record in records:
    kind = record.get("kind", "train")
    if kind in KINDS:
      last[(kind, record["step"])] = scalars(record)
  out: dict[tuple[str, str], tuple[list, list]] = {}
  for (kind, step), values in sorted(last.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    for name, value in values.items():
      steps, ys = out.setdefault((kind, name), ([], []))
      steps.append(step)
      ys.append(value)
  return out


# Metric groups, first match wins (a metric no pattern matches goes to 'other').
GROUPS = (
    ("objective", r"^(loss|rec_loss|nll|nll_per_token|pg_surrogate|.*_loss)$"),
    ("divergence", r"^(token_jsd|seq_kl|seq_mi|kl_.*|.*_kl|.*_jsd|.*_mi)$"),
    ("diversity", r"^(coverage|per_example_coverage|nmi|dead_latents|exact_match|"
                  r"edit_distance|.*bleu.*|.*covered.*)$"),
    ("validity", r"^validity(/\d+)?$"),
    ("latent usage", r"^(latent_usage|usage)(/\d+)?$"),
    ("optimisation", r"^(grad_norm|learning_rate|nonfinite_steps|.*_weight|"
                     r"baseline_explained_variance)$"),
)
STDERR = "_stderr"  # ``X_stderr`` is drawn as a band around X, not as a panel.


def group_of(metric: str, groups=GROUPS) -> str:
  """The first group of ``groups`` ((name, regex) pairs) whose regex matches, else 'other'."""
  for name, pattern in groups:
    if re.search(pattern, metric):
      return name
  return "other"


def default_labels(runs: list[str]) -> list[str]:
  """Short labels: the parts of the runs' paths that differ (the whole path if none do)."""
  parts = [os.path.normpath(os.path.abspath(r)).split(os.sep) for r in runs]
  parts = [p[:-1] if p[-1] == LOG_FILE else p for p in parts]
  if len(parts) == 1:
    return [parts[0][-1]]
  width = max(len(p) for p in parts)
  padded = [p + [""] * (width - len(p)) for p in parts]
  differing = [i for i in range(width) if len({p[i] for p in padded}) > 1]
  labels = ["/".join(x for x in (p[i] for i in differing) if x) for p in padded]
  if len(set(labels)) < len(labels):
    labels = [os.path.join(*p[-2:]) for p in parts]
  return labels


def figures(runs: dict[str, list[dict[str, Any]]], groups: list[str] | None = None,
            extra_groups=(), max_columns: int = 3) -> dict[str, plt.Figure]:
  """{group: figure} of the runs' curves (see the module docstring).

  Args:
    runs: {label: records}, in the order the legend lists them.
    groups: only these metric groups (default: every group with data).
    extra_groups: (name, regex) pairs tried before ``GROUPS``.
    max_columns: panels per row.
  """
  rules = tuple(extra_groups) + GROUPS
  by_run = {label: series(records) for label, records in runs.items()}
  names = {name for s in by_run.values() for _, name in s}
  metrics: dict[str, list[str]] = {}
  for name in sorted(names, key=_natural):
    if name.endswith(STDERR) and name[:-len(STDERR)] in names:
      continue
    metrics.setdefault(group_of(name, rules), []).append(name)
  if groups:
    unknown = [g for g in groups if g not in metrics]
    if unknown:
      raise ValueError(f"--groups names groups with no data: {unknown}; "
                       f"the runs have {sorted(metrics)}.")
    metrics = {g: metrics[g] for g in groups}
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  out = {}
  for group, group_names in metrics.items():
    columns = min(max_columns, len(group_names))
    rows = math.ceil(len(group_names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows),
                             squeeze=False, constrained_layout=True)
    handles = {}
    for ax, name in zip(axes.flat, group_names):
      for i, (label, s) in enumerate(by_run.items()):
        colour = colours[i % len(colours)]
        for kind in KINDS:
          if (kind, name) not in s:
            continue
          steps, ys = s[(kind, name)]
          (line,) = ax.plot(steps, ys, color=colour, linewidth=1.4,
                            label=f"{label} ({kind})", **STYLE[kind])
          handles.setdefault(f"{label} ({kind})", line)
          band = s.get((kind, name + STDERR))
          if band is not None and band[0] == steps:
            y, e = np.asarray(ys), np.asarray(band[1])
            ax.fill_between(steps, y - e, y + e, color=colour, alpha=0.15, linewidth=0)
      ax.set_title(name, fontsize=10)
      ax.set_xlabel("step", fontsize=9)
      ax.tick_params(labelsize=8)
      ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(group_names):]:
      ax.set_visible(False)
    fig.suptitle(group, fontsize=12)
    order = [f"{label} ({kind})" for label in by_run for kind in KINDS
             if f"{label} ({kind})" in handles]  # By run, train before eval.
    fig.legend([handles[k] for k in order], order, loc="outside right upper", fontsize=9,
               frameon=False)
    out[group] = fig
  return out


def _natural(name: str):
  """Sort key putting ``x/2`` before ``x/10``."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def main(argv=None) -> list[str]:
  """Writes one PNG per metric group; returns (and prints) their paths."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="run folders or metrics.jsonl files")
  parser.add_argument("--out", default="plots", help="folder for the PNGs (default: plots)")
  parser.add_argument("--labels", default="",
                      help="comma-separated legend labels, one per run (default: from the paths)")
  parser.add_argument("--groups", default="",
                      help="comma-separated metric groups to plot (default: all)")
  parser.add_argument("--group", action="append", default=[], metavar="NAME=REGEX",
                      help="an extra metric group (tried before the built-in ones); repeatable")
  parser.add_argument("--dpi", type=int, default=120)
  args = parser.parse_args(argv)
  paths = [metrics_path(r) for r in args.runs]  # Every path checked before any plotting.
  labels = [x.strip() for x in args.labels.split(",")] if args.labels else default_labels(args.runs)
  if len(labels) != len(paths):
    raise ValueError(f"--labels gives {len(labels)} labels for {len(paths)} runs.")
  if len(set(labels)) != len(labels):
    raise ValueError(f"--labels must be distinct, got {labels}.")
  runs = {label: read_metrics(path) for label, path in zip(labels, paths)}
  if not any(runs.values()):
    raise ValueError(f"no records in {paths}.")
  groups = [g for g in args.groups.split(",") if g]
  extra = []
  for spec in args.group:
    name, sep, pattern = spec.partition("=")
    if not sep or not name or not pattern:
      raise ValueError(f"--group must be NAME=REGEX, got {spec!r}.")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"--group {spec!r}: bad regex ({e}).") from None
    extra.append((name, pattern))
  os.makedirs(args.out, exist_ok=True)
  written = []
  for group, fig in figures(runs, groups or None, extra).items():
    path = os.path.join(args.out, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', group)}.png")
    fig.savefig(path, dpi=args.dpi, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    print(path)
  return written


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
