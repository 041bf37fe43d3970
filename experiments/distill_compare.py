"""On-policy distillation: every method, same student, same budget, three seeds.

    python experiments/distill_compare.py --root=workdir/distill_compare

1. Trains the teacher with ``experiment.train_and_evaluate`` (the default
   early-divergence config, ``experiments/configs/default.py``: K = 3, a
   2-layer d_model = 64 Transformer) into ``ROOT/teacher``, unless it has a
   ``summary.json`` already.
2. Distils it per latent into a 1-layer d_model = 32 student
   (``experiments/configs/distill.py``) with each method of its
   ``METHODS``: OPD with ``rao_blackwell``, OPD with ``kl_to_go``, the
   per-token reward, GKD and sequence-level KD, for the same number of steps,
   seeds 0..``--seeds``−1, into ``ROOT/<method>/seed<n>``. Runs with a
   ``summary.json`` are skipped (rerunning resumes or aggregates).
3. Writes a Markdown table (printed, and ``ROOT/table.md``) — final
   Monte-Carlo sequence reverse KL(student ‖ teacher) with its 95% CI, token KL
   on the data, student and teacher validity, the student's mean response
   length, milliseconds per train step — and the learning curves
   ``DOCS/distill_curves.png`` (reverse KL, validity and response length
   against steps, mean over seeds, shaded min–max).

Runs are sequential in one process, so the per-step wall times are
comparable; compiled programs are cached on disk (``ROOT/.jax_cache``), so
seeds after the first reuse their method's program.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

_ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT_DIR not in sys.path:
  sys.path.insert(0, _ROOT_DIR)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs import default as default_config  # noqa: E402
from experiments.configs import distill as distill_config  # noqa: E402

_ROOT = flags.DEFINE_string("root", "workdir/distill_compare", "Directory of the runs.")
_DOCS = flags.DEFINE_string("docs", os.path.join(_ROOT_DIR, "docs"),
                            "Directory for the PNG plot.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method: 0..seeds-1.")
_STEPS = flags.DEFINE_integer("steps", 300, "Student train steps (every method).")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 300, "Teacher train steps.")
_METHODS = flags.DEFINE_list("methods", list(distill_config.METHODS), "Methods to run.")

LABELS = {
    "opd_rb": "OPD, rao_blackwell, warm-started (100 steps seq-KD)",
    "opd_rb_cold": "OPD, rao_blackwell, from the random student",
    "opd_kl_to_go": "OPD, kl_to_go (iv), warm-started",
    "per_token_reward": "per-token reward (biased)",
    "gkd": "GKD, JSD(0.5), λ=0.5",
    "seq_kd": "seq-KD (forward KL)",
}


def teacher_config(num_steps: int):
  """The default config with ``num_steps`` (evaluated and checkpointed every 150 steps)."""
  config = default_config.get_config()
  config.train.num_steps = num_steps
  config.train.eval_every = 150
  config.train.checkpoint_every = 150
  return config


def student_config(method: str, teacher_dir: str, seed: int, num_steps: int):
  config = distill_config.get_config(method)
  config.objective.teacher_workdir = teacher_dir
  config.seed = seed
  config.train.num_steps = num_steps
  config.train.checkpoint_every = num_steps
  return config


def _quiet(workdir: str):
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, "train.log"), "a")  # pylint: disable=consider-using-with
  stack = contextlib.ExitStack()
  stack.enter_context(log)
  stack.enter_context(contextlib.redirect_stdout(log))
  stack.enter_context(contextlib.redirect_stderr(log))
  return stack


def train_teacher(root: str, num_steps: int) -> str:
  from latentdiv import experiment  # pylint: disable=import-outside-toplevel
  workdir = os.path.join(root, "teacher")
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    print(f"Training the teacher ({num_steps} steps) in {workdir} ...", flush=True)
    start = time.time()
    with _quiet(workdir):
      experiment.train_and_evaluate(teacher_config(num_steps), workdir)
    print(f"  done in {time.time() - start:.0f} s", flush=True)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  print(f"Teacher: coverage {summary['coverage']:.2f}, validity per latent "
        f"{[round(v, 3) for v in summary['validity']]}", flush=True)
  return workdir


def run_one(method: str, teacher_dir: str, seed: int, workdir: str, num_steps: int) -> dict:
  from latentdiv import experiment  # pylint: disable=import-outside-toplevel
  summary_path = os.path.join(workdir, "summary.json")
  if not os.path.exists(summary_path):
    start = time.time()
    with _quiet(workdir):
      experiment.train_and_evaluate(student_config(method, teacher_dir, seed, num_steps),
                                    workdir)
    print(f"  {method} seed {seed}: {time.time() - start:.0f} s", flush=True)
  with open(summary_path) as f:
    return json.load(f)


def read_evals(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "eval"]


def _mean_sd(values, fmt="{:.3f}") -> str:
  values = np.asarray(values, float)
  sd = values.std(ddof=1) if len(values) > 1 else 0.0
  return f"{fmt.format(values.mean())} ± {fmt.format(sd)}"


def make_table(results: dict, initial: list[float]) -> str:
  """Markdown table: one row per method, mean ± s.d. over seeds."""
  lines = [
      "| method | final reverse KL (nats), mean ± s.d. over seeds | 95% MC CI per seed "
      "| token KL on data | student validity | response length | teacher validity "
      "| ms / step |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for method, summaries in results.items():
    kl = [s["reverse_kl"] for s in summaries]
    cis = ", ".join(f"[{s['reverse_kl_ci_low']:.3f}, {s['reverse_kl_ci_high']:.3f}]"
                    for s in summaries)
    lines.append("| " + " | ".join([
        LABELS.get(method, method), _mean_sd(kl), cis,
        _mean_sd([s["token_kl"] for s in summaries]),
        _mean_sd([np.mean(s["validity"]) for s in summaries]),
        _mean_sd([s["response_len"] for s in summaries], "{:.2f}"),
        f"{np.mean([np.mean(s['teacher_validity']) for s in summaries]):.3f}",
        _mean_sd([1e3 * s["seconds_per_step"] for s in summaries], "{:.1f}"),
    ]) + " |")
  lines.append("")
  lines.append(f"Reverse KL of the untrained students (step 0): {_mean_sd(initial)} nats.")
  return "\n".join(lines)


def plot_curves(curves: dict, path: str) -> None:
  """Reverse KL, validity and response length against steps (mean over seeds, min–max)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  panels = (("reverse_kl", "MC sequence reverse KL(student ‖ teacher), nats"),
            ("validity", "student validity (mean over latents)"),
            ("response_len", "mean response length (tokens, incl. EOS)"))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  styles = ("-", "--", "-", "-", "-")
  for (method, runs), style in zip(curves.items(), styles):
    steps = np.asarray([r["step"] for r in runs[0]])
    for ax, (key, _) in zip(axes, panels):
      values = np.asarray([[np.mean(r[key]) for r in run] for run in runs])
      line, = ax.plot(steps, values.mean(0), style, label=LABELS.get(method, method))
      ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2,
                      color=line.get_color())
  # The MC estimate of a KL near 0 can be negative: symmetric log scale.
  axes[0].set_yscale("symlog", linthresh=1e-2)
  for ax, (_, label) in zip(axes, panels):
    ax.set_xlabel("train step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle("On-policy distillation: 1-layer d=32 student ← 2-layer d=64 K=3 teacher, per "
               "latent (mean over seeds, min–max shaded)", fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  root = os.path.abspath(_ROOT.value)
  os.makedirs(root, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  start = time.time()
  teacher_dir = train_teacher(root, _TEACHER_STEPS.value)
  results, curves, initial = {}, {}, []
  for method in _METHODS.value:
    results[method], curves[method] = [], []
    for seed in range(_SEEDS.value):
      workdir = os.path.join(root, method, f"seed{seed}")
      results[method].append(run_one(method, teacher_dir, seed, workdir, _STEPS.value))
      evals = read_evals(workdir)
      curves[method].append(evals)
      initial.append(evals[0]["reverse_kl"])
  table = make_table(results, initial)
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write(table + "\n")
  plot_path = os.path.join(_DOCS.value, "distill_curves.png")
  plot_curves(curves, plot_path)
  print(table)
  print(f"\nTable: {os.path.join(root, 'table.md')}   curves: {plot_path}   "
        f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
