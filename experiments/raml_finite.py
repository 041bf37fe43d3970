"""RAML vs maximum likelihood vs label smoothing on finite training sets (Norouzi et al. 2016).

    python experiments/raml_finite.py --root=workdir/raml_finite      # resumable
    python experiments/raml_finite.py --root=workdir/raml_finite --timing   # per-step cost

trains every (task, training-set size N, arm, seed) of
``experiments/configs/raml_finite.py:TASK,N,ARM`` into
``ROOT/TASK/nN/<arm>[_lrLR]/seed<s>`` through ``experiment.train_and_evaluate``
(a run with a ``summary.json`` is not trained again; an interrupted one
resumes), then writes

* ``ROOT/table.md`` (printed): per task, N and arm, the held-out greedy exact
  match and edit distance at the end of the fixed budget, mean ± s.d. over
  seeds, the paired difference to ML (same seed: same initialisation,
  training set, batches order and held-out set) and the number of seeds in
  which the arm beats ML; the same at the evaluation with the lowest held-out
  NLL ("early stopping"); training-set and held-out NLL; wall time;
* ``DOCS/raml_finite.png``: held-out exact match and edit distance against N,
  per arm (mean ± s.d.);
* ``DOCS/raml_finite_curves.png``: training-set and held-out NLL per token
  against the step, per N, for ML and the best label-smoothing and RAML arms.

``--timing`` instead measures each arm's train step (ms per step, median of
``--timing_steps`` after compilation, on one task and size, all arms in one
process) into ``ROOT/timing.json``; the table then shows it.

Runs share compiled programs across seeds through the persistent cache
``ROOT/.jax_cache``. Runs that differ only in the learning rate
(``--learning_rates``, for the pilot's per-arm tuning) get their own
directories.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

_ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT_DIR not in sys.path:
  sys.path.insert(0, _ROOT_DIR)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from experiments import sweep  # noqa: E402
from experiments.configs import raml as raml_config  # noqa: E402
from experiments.configs import raml_finite as finite_config  # noqa: E402

DEFAULT_ARMS = ("ml", "ls,0.1", "ls,0.3", "hamming,0.6", "hamming,0.8", "hamming_exact,0.2",
                "hamming_exact,0.3", "edit,0.6", "edit,0.8", "edit_is,0.8")
RECORD = "raml_finite.json"

_ROOT = sweep.define_shared_flag(flags.DEFINE_string, "root", "workdir/raml_finite",
                                 "Directory of the runs.")
_DOCS = sweep.define_shared_flag(flags.DEFINE_string, "docs", os.path.join(_ROOT_DIR, "docs"),
                                 "Directory for the PNG plots.")
_SEEDS = sweep.define_shared_flag(flags.DEFINE_integer, "seeds", 5, "Seeds per arm: 0..seeds-1.")
_WORKERS = sweep.define_shared_flag(flags.DEFINE_integer, "workers", 1,
                                    "Parallel training processes (1: in-process).")
_NUM_STEPS = sweep.define_shared_flag(flags.DEFINE_integer, "num_steps", 0,
                                      "Override train.num_steps (0: the config's). Smoke tests.")
_AGGREGATE_ONLY = sweep.define_shared_flag(flags.DEFINE_bool, "aggregate_only", False,
                                           "Only aggregate the finished runs under --root.")
_TASKS = sweep.define_shared_flag(flags.DEFINE_list, "tasks", list(finite_config.TASKS),
                                  "Task variants.")
_SIZES = flags.DEFINE_list("sizes", ["128", "512", "2048"], "Training-set sizes N.")
_ARMS = flags.DEFINE_string("arms", ";".join(DEFAULT_ARMS),
                            "Arms, ';'-separated (see experiments/configs/raml.py).")
_LRS = flags.DEFINE_list("learning_rates", ["0"],
                         "Learning rates to run every arm with (0: the config's, 3e-3).")
_TIMING = flags.DEFINE_bool("timing", False, "Measure each arm's step time instead.")
_TIMING_STEPS = flags.DEFINE_integer("timing_steps", 200, "Timed steps per arm (--timing).")


# --------------------------------------------------------------------- runs


def run_dir(root: str, task: str, size: int, arm: str, seed: int, lr: float = 0.0) -> str:
  name = raml_config.arm_dir(arm) + (f"_lr{lr:g}" if lr else "")
  return os.path.join(root, task, f"n{size}", name, f"seed{seed}")


def get_config(task: str, size: int, arm: str, seed: int, lr: float = 0.0, num_steps: int = 0):
  config = finite_config.get_config(f"{task},{size},{arm}")
  config.seed = seed
  if lr:
    config.optim.learning_rate = lr
  if num_steps:
    config.train.num_steps = num_steps
  return config


def read_curves(workdir: str) -> dict:
  """The run's evaluation rows (``metrics.jsonl``) as lists, and the mean IS effective sample size."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if r["kind"] == "eval"]
  keys = ("step", "nll", "train_nll", "exact_match", "train_exact_match", "edit_distance",
          "train_edit_distance")
  curves = {k: [r.get(k) for r in evals] for k in keys}
  ess = [r["is_ess"] for r in rows if r["kind"] == "train" and "is_ess" in r]
  return dict(curves=curves, is_ess=float(np.mean(ess)) if ess else None)


def run_one(task: str, size: int, arm: str, lr: float, seed: int, workdir: str,
            num_steps: int = 0) -> dict:
  """Trains one run (unless finished) and records its evaluation curves."""
  config = get_config(task, size, arm, seed, lr, num_steps)
  return sweep.train_once(config, workdir, RECORD, needs_extra=lambda r: "curves" not in r,
                          extra_eval=lambda: read_curves(workdir))


def jobs_for(root, tasks, sizes, arm_names, lrs, seeds):
  jobs = []
  for seed in range(seeds):
    for task in tasks:
      for size in sizes:
        for arm in arm_names:
          for lr in lrs:
            workdir = run_dir(root, task, size, arm, seed, lr)
            if not os.path.exists(os.path.join(workdir, RECORD)):
              jobs.append((task, size, arm, lr, seed, workdir))
  return jobs


def run_all(root, tasks, sizes, arm_names, lrs, seeds, workers, num_steps=0) -> None:
  jobs = jobs_for(root, tasks, sizes, arm_names, lrs, seeds)

  def report(job, record, elapsed):
    task, size, arm, lr, seed, workdir = job
    with open(os.path.join(workdir, "summary.json")) as f:
      s = json.load(f)
    print(f"[{elapsed:6.0f}s] {task} N={size} {arm}{f' lr={lr:g}' if lr else ''} seed {seed}: "
          f"{sweep.wall_text(record)}, held-out exact match {s['exact_match']:.3f} (train "
          f"{s['train_exact_match']:.3f}), NLL {s['nll']:.3f} (train {s['train_nll']:.3f})",
          flush=True)

  sweep.run_jobs(jobs, run_one, root, workers, report, num_steps=num_steps)


# ------------------------------------------------------------------ timing


def time_arms(root: str, task: str, size: int, arm_names, steps: int) -> dict:
  """Median seconds per train step of every arm (one process, after compilation)."""
  import jax  # pylint: disable=import-outside-toplevel
  from latentdiv import experiment, train  # pylint: disable=import-outside-toplevel
  out = {}
  for arm in arm_names:
    setup, objective = experiment.build(get_config(task, size, arm, 0))
    state = train.init_state(setup, objective)
    step = train.make_train_step(setup, objective)
    state, _ = step(state)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, _ = step(state)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - start)
    out[arm] = dict(ms_per_step=1e3 * float(np.median(times)), task=task, size=size)
    print(f"{arm}: {out[arm]['ms_per_step']:.2f} ms/step", flush=True)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "timing.json"), "w") as f:
    json.dump(out, f, indent=2)
  return out


# ------------------------------------------------------------- aggregation


def run_values(run: dict) -> dict:
  """Final and early-stopped metrics of one run (early stopping: lowest held-out NLL)."""
  s, c = run["summary"], run["record"]["curves"]
  best = int(np.nanargmin(np.array(c["nll"], float)))
  return dict(exact_match=s["exact_match"], edit_distance=s["edit_distance"], nll=s["nll"],
              train_nll=s["train_nll"], train_exact_match=s["train_exact_match"],
              es_exact_match=c["exact_match"][best], es_edit_distance=c["edit_distance"][best],
              es_step=c["step"][best], min_nll=c["nll"][best],
              wall_s=run["record"].get("wall_s") or float("nan"),
              is_ess=run["record"].get("is_ess") or float("nan"))


def aggregate(root, tasks, sizes, arm_names, seeds, lr: float = 0.0) -> dict:
  """``{(task, size, arm): {metric: (mean, std, n)}}`` plus paired differences to ML.

  ``d_<m>`` is the mean over seeds of ``m_arm − m_ML`` (same seed), ``wins_<m>``
  the number of seeds where the arm is better than ML (higher exact match,
  lower edit distance).
  """
  table = {}
  for task in tasks:
    for size in sizes:
      ml = {s: sweep.load_run(run_dir(root, task, size, "ml", s, lr), RECORD)
            for s in range(seeds)}
      for arm in arm_names:
        values, paired = [], {}
        for seed in range(seeds):
          run = sweep.load_run(run_dir(root, task, size, arm, seed, lr), RECORD)
          if run is None or "curves" not in run["record"]:
            continue
          v = run_values(run)
          values.append(v)
          if arm != "ml" and ml.get(seed) is not None and "curves" in ml[seed]["record"]:
            m = run_values(ml[seed])
            for key, sign in (("exact_match", 1), ("edit_distance", -1),
                              ("es_exact_match", 1), ("es_edit_distance", -1)):
              paired.setdefault(key, []).append(v[key] - m[key])
              paired.setdefault(f"win_{key}", []).append(sign * (v[key] - m[key]) > 0)
        if not values:
          continue
        cell = {}
        for key in values[0]:
          x = np.array([v[key] for v in values], float)
          x = x[np.isfinite(x)]
          cell[key] = (float(x.mean()) if x.size else math.nan,
                       float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))
        for key in ("exact_match", "edit_distance", "es_exact_match", "es_edit_distance"):
          d = np.array(paired.get(key, []), float)
          cell[f"d_{key}"] = (float(d.mean()) if d.size else math.nan,
                              float(d.std(ddof=1)) if d.size > 1 else math.nan, int(d.size))
          cell[f"wins_{key}"] = int(np.sum(paired.get(f"win_{key}", [])))
        cell["seeds"] = len(values)
        table[(task, size, arm)] = cell
  return table


def _fmt(cell, key, fmt):
  mean, std, _ = cell[key]
  return sweep.format_mean_std(mean, std, fmt)


def markdown_tables(table: dict, tasks, sizes, arm_names, timing: dict | None = None) -> str:
  """One Markdown table per task: a row per (N, arm)."""
  out = []
  for task in tasks:
    out.append(f"\n**{task}** (A = {finite_config.TASKS[task]})\n")
    out.append("| N | arm | seeds | held-out exact match | Δ vs ML (wins) | held-out edit "
               "distance | Δ vs ML (wins) | early-stopped exact match | Δ vs ML (wins) | "
               "NLL train / held-out | wall per run (s) |")
    out.append("|" + "---|" * 11)
    for size in sizes:
      for arm in arm_names:
        cell = table.get((task, size, arm))
        if cell is None:
          continue
        n = cell["seeds"]
        d = lambda k, f: ("—" if arm == "ml" else  # noqa: E731
                          f"{_fmt(cell, 'd_' + k, f)} ({cell['wins_' + k]}/{cell['d_' + k][2]})")
        out.append(
            f"| {size} | {raml_config.arm_label(arm)} | {n} | "
            f"{_fmt(cell, 'exact_match', '{:.3f}')} | {d('exact_match', '{:+.3f}')} | "
            f"{_fmt(cell, 'edit_distance', '{:.3f}')} | {d('edit_distance', '{:+.3f}')} | "
            f"{_fmt(cell, 'es_exact_match', '{:.3f}')} | {d('es_exact_match', '{:+.3f}')} | "
            f"{cell['train_nll'][0]:.3f} / {cell['nll'][0]:.3f} | "
            f"{_fmt(cell, 'wall_s', '{:.0f}')} |")
  if timing:
    out.append("\n| arm | ms per step | total wall of its runs (s) |\n|---|---|---|")
    for arm in arm_names:
      if arm in timing:
        total = sum(c["wall_s"][0] * c["wall_s"][2] for (t, s, a), c in table.items()
                    if a == arm and not math.isnan(c["wall_s"][0]))
        out.append(f"| {raml_config.arm_label(arm)} | {timing[arm]['ms_per_step']:.2f} | "
                   f"{total:.0f} |")
  return "\n".join(out)


COLORS = {"ml": "black", "ls": "tab:green", "hamming": "tab:blue", "hamming_exact": "tab:purple",
          "hamming_n4": "tab:cyan", "edit": "tab:orange", "edit_is": "tab:red"}


def _style(arm, arm_names):
  kind, _ = raml_config.parse_arm(arm)
  same = [a for a in arm_names if raml_config.parse_arm(a)[0] == kind]
  return COLORS[kind], ("-", "--", ":", "-.")[same.index(arm) % 4]


def _save_with_legend(plt, fig, axes, path, ncol: int, bottom: float) -> None:
  """One legend (the first panel's entries) below the panels, then the PNG."""
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, bottom, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sizes(table, tasks, sizes, arm_names, path) -> None:
  """Held-out exact match and edit distance against N, per arm (mean ± s.d. over seeds)."""
  plt = sweep.pyplot()
  metrics = (("exact_match", "held-out greedy exact match"),
             ("edit_distance", "held-out mean edit distance"))
  fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
  for r, task in enumerate(tasks):
    for c, (key, title) in enumerate(metrics):
      ax = axes[r, c]
      for arm in arm_names:
        points = [(s, table[(task, s, arm)][key]) for s in sizes if (task, s, arm) in table]
        if not points:
          continue
        color, ls = _style(arm, arm_names)
        ax.errorbar([p[0] for p in points], [p[1][0] for p in points],
                    yerr=[0 if math.isnan(p[1][1]) else p[1][1] for p in points], color=color,
                    ls=ls, marker="o", ms=3, capsize=2, lw=1.2,
                    label=raml_config.arm_label(arm))
      ax.set_xscale("log", base=2)
      ax.set_xticks(sizes)
      ax.set_xticklabels([str(s) for s in sizes])
      ax.set_xlabel("training-set size N")
      ax.set_title(f"{task} (A = {finite_config.TASKS[task]}): {title}", fontsize=10)
      ax.grid(alpha=0.3)
  _save_with_legend(plt, fig, axes, path, ncol=4, bottom=0.1)


def plot_curves(root, task, sizes, arms, seeds, path, lr: float = 0.0) -> None:
  """Training-set and held-out NLL per token against the step, per N (mean over seeds)."""
  plt = sweep.pyplot()
  fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), squeeze=False)
  for c, size in enumerate(sizes):
    ax = axes[0, c]
    for arm in arms:
      runs = [sweep.load_run(run_dir(root, task, size, arm, s, lr), RECORD) for s in range(seeds)]
      runs = [r for r in runs if r is not None and "curves" in r["record"]]
      if not runs:
        continue
      steps = runs[0]["record"]["curves"]["step"]
      color, _ = _style(arm, arms)
      for key, ls, what in (("train_nll", "--", "train"), ("nll", "-", "held-out")):
        y = np.mean([r["record"]["curves"][key] for r in runs], axis=0)
        ax.plot(steps, y, color=color, ls=ls, lw=1.2,
                label=f"{raml_config.arm_label(arm)} ({what})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{task}, N = {size}: NLL / token", fontsize=10)
    ax.grid(alpha=0.3)
  _save_with_legend(plt, fig, axes, path, ncol=3, bottom=0.16)


def best_arm(table, task, size, kind, arm_names):
  """The arm of ``kind`` with the highest mean held-out exact match at (task, size)."""
  arms = [a for a in arm_names if raml_config.parse_arm(a)[0] == kind
          and (task, size, a) in table]
  return max(arms, key=lambda a: table[(task, size, a)]["exact_match"][0]) if arms else None


def report(root, docs, tasks, sizes, arm_names, seeds, lr: float = 0.0) -> str:
  table = aggregate(root, tasks, sizes, arm_names, seeds, lr)
  timing = None
  if os.path.exists(os.path.join(root, "timing.json")):
    with open(os.path.join(root, "timing.json")) as f:
      timing = json.load(f)
  text = markdown_tables(table, tasks, sizes, arm_names, timing)
  os.makedirs(docs, exist_ok=True)
  plot_sizes(table, tasks, sizes, arm_names, os.path.join(docs, "raml_finite.png"))
  small = min(sizes)
  curve_arms = ["ml"] + [a for a in (best_arm(table, tasks[0], small, k, arm_names)
                                     for k in ("ls", "hamming")) if a]
  plot_curves(root, tasks[0], sizes, curve_arms, seeds,
              os.path.join(docs, "raml_finite_curves.png"), lr)
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write(text + "\n")
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  arm_names = [a.strip() for a in _ARMS.value.split(";") if a.strip()]
  try:
    for arm in arm_names:
      raml_config.parse_arm(arm)
    for task in _TASKS.value:
      finite_config.parse(f"{task},1,ml")
    sizes = [int(s) for s in _SIZES.value]
    lrs = [float(x) for x in _LRS.value]
  except ValueError as err:
    raise app.UsageError(str(err)) from None
  if _TIMING.value:
    time_arms(_ROOT.value, _TASKS.value[0], sizes[len(sizes) // 2], arm_names,
              _TIMING_STEPS.value)
    return
  start = time.time()
  if not _AGGREGATE_ONLY.value:
    run_all(_ROOT.value, _TASKS.value, sizes, arm_names, lrs, _SEEDS.value, _WORKERS.value,
            _NUM_STEPS.value)
  for lr in lrs:
    print(report(_ROOT.value, _DOCS.value, _TASKS.value, sizes, arm_names, _SEEDS.value, lr))
  print(f"\nTotal wall time {time.time() - start:.0f} s.")


if __name__ == "__main__":
  app.run(main)
