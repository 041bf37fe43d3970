"""The founding question: when does the sequence-level KL beat the token-level JSD?

    python experiments/research.py --root=workdir/research

trains every arm of ``experiments/configs/research_<arm>.py`` (reconstruction
only; + token JSD; + sequence term with ``rao_blackwell``; + sequence term with
``trajectory``; + sequence term with the JSD control variate; and, as a control, the sequence term
with ``rao_blackwell`` without the token JSD) on the early- and the
late-divergence task with ``--seeds`` seeds each, through
``latentdiv.experiment.train_and_evaluate``, into ``ROOT/<task>/<arm>/seed<n>``.
Rerunning the command skips runs that have a ``summary.json`` (and an
interrupted run resumes from its checkpoint). Then it aggregates:

* a Markdown table (printed, and written to ``ROOT/table.md``): strategy
  coverage, minimum validity over latents, latent/strategy NMI, per-example
  coverage, Monte-Carlo sequence KL between latents, token JSD and wall time,
  mean ± standard deviation (ddof 1) over seeds;
* ``DOCS/research_curves.png``: evaluation metrics against training steps
  (mean over seeds, shaded min–max), from each run's ``metrics.jsonl``;
* ``DOCS/research_confusion.png``: the latent × strategy confusion matrix of
  every run (one row per task and seed, one column per arm).

Per-example coverage is computed here, not by the library: for every
evaluation prompt x, the share of the S valid outputs that at least one of the
K latents' samples reproduces, averaged over prompts,

    cov_x = (1/B) Σ_b |{m_{b,k} : k = 1..K, m_{b,k} ≥ 0}| / S.

Unlike coverage and NMI, which ask each latent to produce the *same* strategy
index for every x, it does not change when a latent's choice of strategy
depends on x; on the ``permute`` late task such x-dependent labellings are
exactly as valid a decomposition of the data as the hidden rotation index.
It uses the same evaluation prompts and sampling key as
``objective.make_evaluate``, so its samples are those the summary's metrics saw
(checked: the validity recomputed here must match the summary's).

Runs execute in ``--workers`` processes (default 2, one per core of a small
machine); the wall time of a run includes its compilation.
"""

from __future__ import annotations

import functools
import importlib
import json
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
from experiments.configs import research_common  # noqa: E402


_define_shared = sweep.define_shared_flag


_ROOT = _define_shared(flags.DEFINE_string, "root", "workdir/research", "Directory of the runs.")
_DOCS = _define_shared(flags.DEFINE_string, "docs", os.path.join(_ROOT_DIR, "docs"),
                            "Directory for the PNG plots.")
_SEEDS = _define_shared(flags.DEFINE_integer, "seeds", 3, "Seeds per (task, arm): 0..seeds-1.")
_TASKS = flags.DEFINE_list("tasks", list(research_common.TASKS), "Tasks to run.")
_ARMS = flags.DEFINE_list("arms", list(research_common.ARMS), "Arms to run.")
_WORKERS = _define_shared(flags.DEFINE_integer, "workers", 2, "Parallel training processes (1: in-process).")
_NUM_STEPS = _define_shared(flags.DEFINE_integer, "num_steps", 0, "Override train.num_steps (0: the configs' value). For smoke tests.")
_AGGREGATE_ONLY = _define_shared(flags.DEFINE_bool, "aggregate_only", False,
                                    "Only aggregate the finished runs under --root.")

# Columns of the table: (key of the aggregated record, header, format).
COLUMNS = (
    ("coverage", "coverage", "{:.2f}"),
    ("min_validity", "min validity", "{:.3f}"),
    ("nmi", "NMI", "{:.2f}"),
    ("per_example_coverage", "per-example coverage", "{:.3f}"),
    ("seq_kl", "sequence KL (nats)", "{:.1f}"),
    ("token_jsd", "token JSD (nats)", "{:.3f}"),
    ("wall_s", "wall (s)", "{:.0f}"),
)


# ------------------------------------------------------------------ configs


def get_config(arm: str, task: str, seed: int = 0, num_steps: int = 0):
  """The config of ``arm`` on ``task`` with ``seed`` (``num_steps > 0`` overrides)."""
  if arm not in research_common.ARMS:
    raise ValueError(f"arm must be one of {research_common.ARMS}, got {arm!r}.")
  module = importlib.import_module(f"experiments.configs.research_{arm}")
  config = module.get_config(task)
  config.seed = seed
  if num_steps:
    config.train.num_steps = num_steps
  return config


def run_dir(root: str, task: str, arm: str, seed: int) -> str:
  return os.path.join(root, task, arm, f"seed{seed}")


# --------------------------------------------------------- per-example coverage


def per_example_coverage(matches_BxK: np.ndarray, num_strategies: int) -> float:
  """Mean over examples of the share of the S strategies some latent reproduces.

  ``cov_x = (1/B) Σ_b |{m_{b,k} ≥ 0}| / S`` with ``m`` from
  ``metrics.match_strategies`` (−1 = invalid sample).

  Args:
    matches_BxK: [B, K] int in {−1, 0..S−1}.
    num_strategies: S.

  Returns:
    A float in [0, min(K, S)/S].
  """
  matches = np.asarray(matches_BxK)
  if matches.ndim != 2:
    raise ValueError(f"matches must be [batch, K], got shape {matches.shape}.")
  hit_BxS = np.zeros((matches.shape[0], num_strategies), bool)
  rows, cols = np.nonzero(matches >= 0)
  hit_BxS[rows, matches[rows, cols]] = True
  return float(hit_BxS.mean())


@functools.lru_cache(maxsize=None)
def _sample_matches_fn():
  import jax  # pylint: disable=import-outside-toplevel
  from latentdiv import metrics, sampling  # pylint: disable=import-outside-toplevel

  @functools.partial(jax.jit, static_argnames=("model", "length"))
  def sample_matches(model, params, prompt_BxP, valid_BxSxT, key, length):
    rollout = sampling.sample_latents(model, params, prompt_BxP, key, length)
    return metrics.match_strategies(rollout.tokens, valid_BxSxT)

  return sample_matches


def extra_eval(config, workdir: str) -> dict:
  """Per-example coverage of the newest checkpoint in ``workdir`` on the evaluation set."""
  import jax  # pylint: disable=import-outside-toplevel
  from latentdiv import train  # pylint: disable=import-outside-toplevel

  setup, objective, params = sweep.restore_newest_params(config, workdir)
  batch = objective.make_evaluate().eval_batch  # The evaluation batch; nothing compiles.
  eval_key = train.eval_key(config)
  matches = np.asarray(_sample_matches_fn()(
      setup.model, params, batch.prompt, batch.valid_outputs,
      jax.random.fold_in(eval_key, 1), setup.task.target_len))
  return dict(per_example_coverage=per_example_coverage(matches, setup.task.num_strategies),
              validity_recomputed=np.mean(matches >= 0, axis=0).tolist())


# --------------------------------------------------------------------- runs


def run_one(arm: str, task: str, seed: int, workdir: str, num_steps: int = 0) -> dict:
  """Trains one run (unless its summary exists) and writes ``research.json`` beside it."""
  config = get_config(arm, task, seed, num_steps)
  return sweep.train_once(config, workdir, "research.json",
                          needs_extra=lambda r: "per_example_coverage" not in r,
                          extra_eval=lambda: extra_eval(config, workdir))


def run_all(root: str, tasks, arms, seeds: int, workers: int, num_steps: int = 0) -> None:
  """Runs every (task, arm, seed) without a ``research.json``, expensive ones first."""
  jobs = []
  for task in tasks:
    for arm in arms:
      for seed in range(seeds):
        workdir = run_dir(root, task, arm, seed)
        if not os.path.exists(os.path.join(workdir, "research.json")):
          jobs.append((arm, task, seed, workdir))
  cost = lambda job: (job[0].startswith("seq"), job[1] == "late", -job[2])  # noqa: E731
  jobs.sort(key=cost, reverse=True)

  def report(job, record, elapsed):
    arm, task, seed, _ = job
    print(f"[{elapsed:6.0f}s] {task:5s} {arm:8s} seed {seed}: done "
          f"({sweep.wall_text(record)}, per-example coverage "
          f"{record['per_example_coverage']:.3f})", flush=True)

  sweep.run_jobs(jobs, run_one, root, workers, report, num_steps=num_steps)


# -------------------------------------------------------------- aggregation


def load_run(workdir: str) -> dict | None:
  """``summary.json``, ``research.json`` and the ``metrics.jsonl`` lines of one run."""
  run = sweep.load_run(workdir, "research.json")
  if run is None:
    return None
  lines = []
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [json.loads(line) for line in f if line.strip()]
  return dict(run, lines=lines)


def run_metrics(run: dict) -> dict:
  """The table's metrics of one run (NaN where missing)."""
  s, r = run["summary"], run["record"]
  nan = float("nan")
  return dict(
      coverage=s["coverage"], min_validity=min(s["validity"]), nmi=s["nmi"],
      per_example_coverage=r.get("per_example_coverage", nan), seq_kl=s["seq_kl"],
      token_jsd=s["token_jsd"],
      wall_s=nan if r.get("wall_s") is None else r["wall_s"])


def aggregate(root: str, tasks, arms, seeds: int) -> dict:
  """``{(task, arm): {metric: (mean, std, n)}}`` over the finished seeds."""
  table = {}
  for task in tasks:
    for arm in arms:
      runs = [load_run(run_dir(root, task, arm, seed)) for seed in range(seeds)]
      values = [run_metrics(run) for run in runs if run is not None]
      if not values:
        continue
      cell = {}
      for key, _, _ in COLUMNS:
        x = np.array([v[key] for v in values], float)
        x = x[np.isfinite(x)]
        mean = float(x.mean()) if x.size else float("nan")
        std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
        cell[key] = (mean, std, int(x.size))
      table[(task, arm)] = cell
  return table


def markdown_table(table: dict, tasks, arms) -> str:
  """The aggregated metrics as a Markdown table, one row per (task, arm)."""
  header = "| task | arm | seeds | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
  lines = [header, "|" + "---|" * (3 + len(COLUMNS))]
  for task in tasks:
    for arm in arms:
      if (task, arm) not in table:
        continue
      cell = table[(task, arm)]
      seeds = max(n for _, _, n in cell.values())
      values = " | ".join(sweep.format_mean_std(cell[k][0], cell[k][1], fmt) for k, _, fmt in COLUMNS)
      lines.append(f"| {task} | {research_common.ARM_LABELS[arm]} | {seeds} | {values} |")
  return "\n".join(lines)


CURVES = (("coverage", "strategy coverage", False),
          ("min_validity", "min validity over latents", False),
          ("nmi", "latent/strategy NMI", False),
          ("seq_kl", "MC sequence KL between latents (nats)", True))


def eval_curves(run: dict) -> dict:
  """``{metric: (steps, values)}`` from the evaluation lines of ``metrics.jsonl``."""
  evals = [line for line in run["lines"] if line.get("kind") == "eval"]
  steps = np.array([line["step"] for line in evals])
  curves = dict(coverage=[e["coverage"] for e in evals],
                min_validity=[min(e["validity"]) for e in evals],
                nmi=[e["nmi"] for e in evals], seq_kl=[e["seq_kl"] for e in evals])
  return {k: (steps, np.array(v, float)) for k, v in curves.items()}


def plot_curves(root: str, tasks, arms, seeds: int, path: str) -> None:
  """Learning curves: one row per task, one column per metric, one line per arm."""
  plt = sweep.pyplot()
  fig, axes = plt.subplots(len(tasks), len(CURVES), figsize=(4.2 * len(CURVES), 3.4 * len(tasks)),
                           squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for row, task in enumerate(tasks):
    for a, arm in enumerate(arms):
      runs = [load_run(run_dir(root, task, arm, seed)) for seed in range(seeds)]
      curves = [eval_curves(run) for run in runs if run is not None]
      if not curves:
        continue
      for col, (key, title, log) in enumerate(CURVES):
        ax = axes[row, col]
        n = min(len(c[key][0]) for c in curves)
        if n == 0:
          continue
        steps = curves[0][key][0][:n]
        values = np.stack([c[key][1][:n] for c in curves])
        ax.plot(steps, values.mean(0), color=colors[a % len(colors)], marker="o", ms=2.5,
                label=research_common.ARM_LABELS[arm])
        ax.fill_between(steps, values.min(0), values.max(0), color=colors[a % len(colors)],
                        alpha=0.15)
        ax.set_title(f"{task}: {title}", fontsize=9)
        ax.set_xlabel("step")
        if log:
          ax.set_yscale("log")
  axes[0, 0].legend(fontsize=7, loc="lower right")
  fig.suptitle(f"Evaluation during training (mean over seeds, shaded min–max; {root})",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_confusion(root: str, tasks, arms, seeds: int, path: str) -> None:
  """Latent × strategy confusion (share of a latent's samples per strategy), one panel per run.

  One row per (task, seed), one column per arm; within a panel the latents are
  sorted by the strategy they produce most (a relabelling, for readability).
  """
  plt = sweep.pyplot()
  rows = [(task, seed) for task in tasks for seed in range(seeds)]
  fig, axes = plt.subplots(len(rows), len(arms), figsize=(2.3 * len(arms), 2.2 * len(rows)),
                           squeeze=False)
  for row, (task, seed) in enumerate(rows):
    for col, arm in enumerate(arms):
      ax = axes[row, col]
      run = load_run(run_dir(root, task, arm, seed))
      if run is None:
        ax.axis("off")
        continue
      confusion = np.array(run["summary"]["confusion"], float)  # [K, S]
      order = np.argsort(confusion.argmax(1), kind="stable")  # Rows by preferred strategy.
      confusion = confusion[order]
      ax.imshow(confusion, vmin=0, vmax=1, cmap="Blues")
      for k in range(confusion.shape[0]):
        for s in range(confusion.shape[1]):
          ax.text(s, k, f"{confusion[k, s]:.2f}", ha="center", va="center", fontsize=6,
                  color="white" if confusion[k, s] > 0.6 else "black")
      ax.set_xticks(range(confusion.shape[1]))
      ax.set_yticks(range(confusion.shape[0]))
      ax.set_yticklabels([f"z={k}" for k in order], fontsize=6)
      ax.tick_params(axis="x", labelsize=6)
      label = research_common.ARM_LABELS[arm].replace(" (", "\n(").replace(" without", "\nwithout")
      ax.set_title(f"{task} seed {seed}: {label}", fontsize=6)
  fig.suptitle("Latent × strategy confusion (rows: latents; columns: strategies; "
               "invalid share = 1 − row sum)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(root: str, docs: str, tasks, arms, seeds: int) -> str:
  """Writes the plots and ``ROOT/table.md``; returns the Markdown table."""
  table = markdown_table(aggregate(root, tasks, arms, seeds), tasks, arms)
  os.makedirs(docs, exist_ok=True)
  plot_curves(root, tasks, arms, seeds, os.path.join(docs, "research_curves.png"))
  plot_confusion(root, tasks, arms, seeds, os.path.join(docs, "research_confusion.png"))
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write(table + "\n")
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for task in _TASKS.value:
    if task not in research_common.TASKS:
      raise app.UsageError(f"--tasks must be among {research_common.TASKS}, got {task!r}.")
  for arm in _ARMS.value:
    if arm not in research_common.ARMS:
      raise app.UsageError(f"--arms must be among {research_common.ARMS}, got {arm!r}.")
  start = time.time()
  if not _AGGREGATE_ONLY.value:
    run_all(_ROOT.value, _TASKS.value, _ARMS.value, _SEEDS.value, _WORKERS.value,
            _NUM_STEPS.value)
  table = report(_ROOT.value, _DOCS.value, _TASKS.value, _ARMS.value, _SEEDS.value)
  print(table)
  print(f"\nPlots: {os.path.join(_DOCS.value, 'research_curves.png')}, "
        f"{os.path.join(_DOCS.value, 'research_confusion.png')}; table: "
        f"{os.path.join(_ROOT.value, 'table.md')}. Total wall time {time.time() - start:.0f} s.")


if __name__ == "__main__":
  app.run(main)
