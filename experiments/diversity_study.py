"""The diversity study: which objective keeps every latent alive and covers the strategies.

    python experiments/diversity_study.py --root=workdir/diversity_study

trains every cell of ``experiments/configs/diversity_study.py`` — tasks
(early, late, placement) × objectives (reconstruction only, + token JSD,
+ sequence-level KL, + sequence-level MI) × reconstructions (hard-EM and the
remedies of DESIGN.md §5.7) — with ``--seeds`` seeds each (the seeds are
paired: a seed fixes the initialisation, the data and the evaluation batch
in every cell), into ``ROOT/<task>/<objective>/<reconstruction>/seed<n>``.
Rerunning skips finished runs and resumes interrupted ones. Then it
aggregates, from each run's ``summary.json`` and ``metrics.jsonl``:

* a Markdown table (printed and written to ``ROOT/table.md``): coverage,
  per-example coverage, dead latents, the minimum validity over latents,
  latent/strategy NMI, the Monte-Carlo mutual information and sequence KL
  between latents, the seconds per step and the wall time per run, mean ±
  s.d. over seeds, and how many seeds reach coverage 1 and the goal
  (per-example coverage ≥ 0.95, every latent's validity ≥ 0.9, no dead
  latent);
* ``DOCS/diversity_curves.png``: per-example coverage, dead latents and the
  MC mutual information against training steps, mean over seeds per cell.

Runs execute in ``--workers`` processes; wall times include compilation and
were measured on whatever else the machine was running.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys

_ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT_DIR not in sys.path:
  sys.path.insert(0, _ROOT_DIR)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from experiments import sweep  # noqa: E402
from experiments.configs import diversity_study as study  # noqa: E402

_define_shared = sweep.define_shared_flag
_ROOT = _define_shared(flags.DEFINE_string, "root", "workdir/diversity_study",
                       "Directory of the runs.")
_DOCS = _define_shared(flags.DEFINE_string, "docs", os.path.join(_ROOT_DIR, "docs"),
                       "Directory for the PNG plots.")
_SEEDS = _define_shared(flags.DEFINE_integer, "seeds", 5, "Seeds per cell: 0..seeds-1.")
_TASKS = _define_shared(flags.DEFINE_list, "tasks", list(study.TASKS), "Tasks to run.")
_OBJECTIVES = flags.DEFINE_list(
    "objectives", list(study.OBJECTIVES),
    "Objectives to run; OBJECTIVE@WEIGHT overrides the divergence term's weight (a weight "
    "sweep, e.g. jsd@0.03,mi@2).")
_RECONSTRUCTIONS = flags.DEFINE_list("reconstructions", ["hard_em", "annealed_em"],
                                     "Reconstructions to run.")
_WORKERS = _define_shared(flags.DEFINE_integer, "workers", 2,
                          "Parallel training processes (1: in-process).")
_NUM_STEPS = _define_shared(flags.DEFINE_integer, "num_steps", 0,
                            "Override train.num_steps (0: the config's). For smoke tests.")
_AGGREGATE_ONLY = _define_shared(flags.DEFINE_bool, "aggregate_only", False,
                                 "Only aggregate the finished runs under --root.")

RECORD = "study.json"
OBJECTIVE_LABELS = {"recon": "reconstruction only", "jsd": "+ token JSD",
                    "kl": "+ sequence KL", "mi": "+ sequence MI"}
# (key, header, format) of the table's mean ± s.d. columns.
COLUMNS = (
    ("coverage", "coverage", "{:.2f}"),
    ("per_example_coverage", "per-example coverage", "{:.3f}"),
    ("dead_latents", "dead latents", "{:.1f}"),
    ("min_validity", "min validity", "{:.3f}"),
    ("nmi", "NMI", "{:.2f}"),
    ("seq_mi", "MC MI (nats)", "{:.3f}"),
    ("seq_kl", "MC KL (nats)", "{:.1f}"),
    ("ms_per_step", "ms / step", "{:.0f}"),
    ("wall_s", "wall (s)", "{:.0f}"),
)


def reaches_goal(summary: dict) -> bool:
  """Per-example coverage ≥ 0.95, validity ≥ 0.9 for every latent and no dead latent."""
  return (summary["per_example_coverage"] >= 0.95 and min(summary["validity"]) >= 0.9
          and summary["dead_latents"] == 0)


def split_objective(objective: str) -> tuple[str, str | None]:
  """``'jsd@0.03'`` → ``('jsd', '0.03')``: an objective with its weight overridden."""
  name, _, weight = objective.partition("@")
  return name, weight or None


def objective_label(objective: str) -> str:
  name, weight = split_objective(objective)
  label = OBJECTIVE_LABELS[name]
  if weight is not None:
    label += f" (λ_jsd = {weight})" if name == "jsd" else f" (weight {weight})"
  return label


def get_config(task: str, objective: str, recon: str, seed: int, num_steps: int = 0):
  name, weight = split_objective(objective)
  config = study.get_config(f"{task},{name},{recon}" + (f",{weight}" if weight else ""))
  config.seed = seed
  if num_steps:
    config.train.num_steps = num_steps
  return config


def run_dir(root: str, task: str, objective: str, recon: str, seed: int) -> str:
  return os.path.join(root, task, objective, recon, f"seed{seed}")


def run_one(task: str, objective: str, recon: str, seed: int, workdir: str,
            num_steps: int = 0) -> dict:
  """Trains one run (unless finished) and records its wall time and seconds per step."""
  config = get_config(task, objective, recon, seed, num_steps)

  def timing() -> dict:
    return dict(ms_per_step=1e3 * _seconds_per_step(workdir))

  return sweep.train_once(config, workdir, RECORD, needs_extra=lambda r: "ms_per_step" not in r,
                          extra_eval=timing)


def _seconds_per_step(workdir: str) -> float:
  """Median seconds per step between logged train rows (``metrics.jsonl`` times).

  The row of step s is written after the evaluation at s, so intervals
  ``(s0, s1]`` that hold an evaluation step are left out, and so is the first
  (compilation); NaN when no interval is left.
  """
  rows = read_metrics(workdir)
  evals = [r["step"] for r in rows if r.get("kind") == "eval"]
  times = [(r["step"], r["time"]) for r in rows if r.get("kind") == "train" and "time" in r]
  gaps = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(times[1:], times[2:])
          if s1 > s0 and not any(s0 < e <= s1 for e in evals)]
  return float(np.median(gaps)) if gaps else float("nan")


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def cells(tasks, objectives, recons):
  return list(itertools.product(tasks, objectives, recons))


def run_all(root: str, tasks, objectives, recons, seeds: int, workers: int,
            num_steps: int = 0) -> None:
  jobs = []
  for (task, objective, recon), seed in itertools.product(cells(tasks, objectives, recons),
                                                          range(seeds)):
    workdir = run_dir(root, task, objective, recon, seed)
    loaded = sweep.load_run(workdir, RECORD)
    if loaded is None or "ms_per_step" not in loaded["record"]:
      jobs.append((task, objective, recon, seed, workdir))
  # The sequence-level cells first: they are the slowest.
  jobs.sort(key=lambda job: split_objective(job[1])[0] not in ("kl", "mi"))

  def report(job, record, elapsed):
    print(f"[{elapsed:6.0f}s] {job[0]}/{job[1]}/{job[2]}/seed{job[3]} done "
          f"({sweep.wall_text(record)})", flush=True)

  sweep.run_jobs(jobs, run_one, root, workers, report, fast_compile=True, num_steps=num_steps)


def aggregate(root: str, tasks, objectives, recons, seeds: int) -> list[dict]:
  """One row per cell with every run's values, their mean and s.d., and the goal counts."""
  rows = []
  for task, objective, recon in cells(tasks, objectives, recons):
    runs = [sweep.load_run(run_dir(root, task, objective, recon, s), RECORD)
            for s in range(seeds)]
    runs = [r for r in runs if r is not None]
    values = {key: [] for key, _, _ in COLUMNS}
    for run in runs:
      s, record = run["summary"], run["record"]
      for key in ("coverage", "per_example_coverage", "dead_latents", "nmi", "seq_mi",
                  "seq_kl"):
        values[key].append(float(s[key]))
      values["min_validity"].append(float(min(s["validity"])))
      values["ms_per_step"].append(float(record.get("ms_per_step", math.nan)))
      values["wall_s"].append(float(record.get("wall_s") or math.nan))
    row = dict(task=task, objective=objective, recon=recon, seeds=len(runs), values=values,
               coverage_1=sum(r["summary"]["coverage"] >= 1.0 for r in runs),
               goal=sum(reaches_goal(r["summary"]) for r in runs))
    for key, vals in values.items():
      finite = [v for v in vals if not math.isnan(v)]
      row[key] = float(np.mean(finite)) if finite else math.nan
      row[key + "_std"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  headers = (["task", "objective", "reconstruction", "seeds"] + [h for _, h, _ in COLUMNS]
             + ["coverage 1", "goal"])
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for row in rows:
    if not row["seeds"]:
      continue
    cols = [row["task"], objective_label(row["objective"]), row["recon"], str(row["seeds"])]
    cols += [sweep.format_mean_std(row[k], row[k + "_std"], fmt) for k, _, fmt in COLUMNS]
    cols += [f"{row['coverage_1']}/{row['seeds']}", f"{row['goal']}/{row['seeds']}"]
    lines.append("| " + " | ".join(cols) + " |")
  return "\n".join(lines)


def plot_curves(root: str, rows: list[dict], seeds: int, path: str) -> None:
  """Per-example coverage, dead latents and MC MI against steps: one column per task."""
  plt = sweep.pyplot()
  tasks = sorted({r["task"] for r in rows if r["seeds"]}, key=study.TASKS.index)
  metrics = (("per_example_coverage", "per-example coverage"), ("dead_latents", "dead latents"),
             ("seq_mi", "MC mutual information (nats)"))
  fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(4.6 * len(tasks), 8.5),
                           squeeze=False, sharex=True)
  colors = dict(zip(study.OBJECTIVES, ("tab:gray", "tab:blue", "tab:orange", "tab:green")))
  styles = {"hard_em": "--", "relaxed_wta": "-", "annealed_em": ":"}
  handles = {}
  for c, task in enumerate(tasks):
    for row in (r for r in rows if r["task"] == task and r["seeds"]):
      curves = []
      for s in range(seeds):
        evals = [m for m in read_metrics(run_dir(root, task, row["objective"], row["recon"], s))
                 if m.get("kind") == "eval"]
        if evals:
          curves.append(evals)
      if not curves:
        continue
      steps = [m["step"] for m in curves[0]]
      label = f"{objective_label(row['objective'])}, {row['recon']}"
      for r_, (key, _) in enumerate(metrics):
        series = [[m[key] for m in run[:len(steps)]] for run in curves
                  if len(run) >= len(steps) and key in run[0]]
        if not series:
          continue
        line, = axes[r_, c].plot(steps, np.mean(series, axis=0), styles.get(row["recon"], "-"),
                                 color=colors[split_objective(row["objective"])[0]],
                                 label=label, linewidth=1.6)
        handles[label] = line
    axes[0, c].set_title(task)
    for r_, (_, name) in enumerate(metrics):
      axes[r_, c].set_ylabel(name if c == 0 else "")
      axes[r_, c].grid(alpha=0.3)
    axes[-1, c].set_xlabel("training step")
  fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=9,
             frameon=False)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  root = _ROOT.value
  for name, values, allowed in (("tasks", _TASKS.value, study.TASKS),
                                ("objectives", [split_objective(o)[0] for o in _OBJECTIVES.value],
                                 study.OBJECTIVES),
                                ("reconstructions", _RECONSTRUCTIONS.value,
                                 study.RECONSTRUCTIONS)):
    bad = [v for v in values if v not in allowed]
    if bad:
      raise app.UsageError(f"--{name}: unknown {bad}; allowed: {allowed}.")
  if not _AGGREGATE_ONLY.value:
    run_all(root, _TASKS.value, _OBJECTIVES.value, _RECONSTRUCTIONS.value, _SEEDS.value,
            _WORKERS.value, _NUM_STEPS.value)
  rows = aggregate(root, _TASKS.value, _OBJECTIVES.value, _RECONSTRUCTIONS.value, _SEEDS.value)
  text = table(rows)
  print(text)
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(root, "rows.json"), "w") as f:
    json.dump(rows, f, indent=1)
  if any(r["seeds"] for r in rows):
    os.makedirs(_DOCS.value, exist_ok=True)
    plot_curves(root, rows, _SEEDS.value, os.path.join(_DOCS.value, "diversity_curves.png"))


if __name__ == "__main__":
  app.run(main)
