"""On-policy distillation: methods and discounts compared, same student, same budget, on two tasks.

    python experiments/distill_compare.py --study=discount --seeds=5     # the discount study
    python experiments/distill_compare.py --seeds=5 --methods=opd_rb,opd_rb_cold,gkd,seq_kd

For each task of ``--tasks`` (``early_divergence``: the default K = 3
teacher, ``experiments/configs/distill.py``; ``branch``: the task where the
future matters, ``experiments/configs/distill_branch.py``, DESIGN.md §6.4):

1. Trains the teacher with ``experiment.train_and_evaluate`` into
   ``ROOT/<task>/teacher`` unless it has a ``summary.json``.
2. Distils it with each method of ``--methods`` (``--study=discount``:
   ``distill.DISCOUNT_STUDY``, OPD with ``rao_blackwell`` and ``kl_to_go`` at
   γ ∈ {0, 0.5, 0.9, 1}, warm-started by seq-KD, plus GKD and seq-KD), seeds
   0..``--seeds``−1, into ``ROOT/<task>/<method>/seed<n>``. Runs with a
   ``summary.json`` are skipped (rerunning resumes or aggregates). OPD runs
   keep a checkpoint at the end of their warm start.
3. Measures, at that shared warm-start point of each seed, every OPD arm's
   per-response gradient estimator on the same 256 student responses
   (``opd_exact.row_gradient_moments``: ‖mean‖ and total variance), cached in
   ``ROOT/<task>/variance.json``.
4. Writes a Markdown table per task (printed, and ``ROOT/<task>/table.md``):
   final Monte-Carlo sequence reverse KL(student ‖ teacher) with its 95% CI
   per seed, the seeds where γ = 1 beats γ = 0 with non-overlapping CIs,
   validity, response length, gradient norm in the OPD phase, the estimator's
   variance at the warm start, ms per train step; and the learning curves
   ``DOCS/distill_curves.png`` (``distill_<task>_curves.png``; with
   ``--study=discount``: ``distill_discount_<task>_curves.png``; mean over
   seeds, shaded min–max).

Runs are sequential in one process (the per-step wall times are
comparable); compiled programs are cached on disk (``ROOT/.jax_cache``).
"""

from __future__ import annotations

import contextlib
import functools
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

from experiments import sweep  # noqa: E402
from experiments.configs import branch_teacher  # noqa: E402
from experiments.configs import default as default_config  # noqa: E402
from experiments.configs import distill as distill_config  # noqa: E402
from experiments.configs import distill_branch  # noqa: E402

TASKS = ("branch", "early_divergence")
STUDIES = ("none", "discount")

# Flags that other experiment scripts also define: see sweep.define_shared_flag.
_ROOT = sweep.define_shared_flag(flags.DEFINE_string, "root", "workdir/distill_compare",
                                 "Directory of the runs.")
_DOCS = sweep.define_shared_flag(flags.DEFINE_string, "docs", os.path.join(_ROOT_DIR, "docs"),
                                 "Directory for the PNG plots.")
_STUDY = flags.DEFINE_enum("study", "none", STUDIES,
                           "'discount': --methods = distill.DISCOUNT_STUDY on both tasks.")
_TASKS = sweep.define_shared_flag(flags.DEFINE_list, "tasks", ["early_divergence"],
                                  f"Tasks, among {TASKS}.")
_SEEDS = sweep.define_shared_flag(flags.DEFINE_integer, "seeds", 3, "Seeds per method: 0..seeds-1.")
_STEPS = flags.DEFINE_integer("steps", 0, "Student train steps (0: the task's config).")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 0,
                                      "Teacher train steps (0: 300, or 1000 for branch).")
_METHODS = flags.DEFINE_list("methods", list(distill_config.METHODS), "Methods to run.")
_GRAD_CLIP = flags.DEFINE_float("grad_clip_norm", -1.0,
                                 "Override config.optim.grad_clip_norm (0: no clipping; "
                                 "-1: the config's).")
_VARIANCE_ROWS = flags.DEFINE_integer("variance_rows", 256,
                                      "Student responses for the variance at the warm start.")

OTHER_COLORS = {"gkd": "tab:red", "seq_kd": "tab:orange", "per_token_reward": "tab:gray",
                "opd_rb_cold": "tab:brown"}
BASE_LABELS = {
    "opd_rb": "OPD, rao_blackwell, warm-started",
    "opd_rb_cold": "OPD, rao_blackwell, from the random student",
    "opd_kl_to_go": "OPD, kl_to_go (iv), warm-started",
    "per_token_reward": "per-token reward (biased)",
    "gkd": "GKD, JSD(0.5), λ=0.5",
    "seq_kd": "seq-KD (forward KL)",
}


def label(method: str) -> str:
  base, discount = distill_config.parse_method(method)
  text = BASE_LABELS.get(base, base)
  return text + (f", γ = {discount:g}" if base in ("opd_rb", "opd_kl_to_go") else "")


def student_config_module(task: str):
  return distill_branch if task == "branch" else distill_config


def teacher_config(task: str, num_steps: int):
  """The teacher's config: the default run (early divergence) or the branch teacher."""
  config = branch_teacher.get_config() if task == "branch" else default_config.get_config()
  config.train.num_steps = num_steps
  config.train.eval_every = 150
  config.train.checkpoint_every = 150
  return config


def student_config(task: str, method: str, teacher_dir: str, seed: int, num_steps: int):
  config = student_config_module(task).get_config(method)
  config.objective.teacher_workdir = teacher_dir
  config.seed = seed
  if num_steps:
    config.train.num_steps = num_steps
  if _GRAD_CLIP.value >= 0:
    config.optim.grad_clip_norm = _GRAD_CLIP.value
  # OPD runs keep the checkpoint at the end of the warm start (the variance point).
  warm = config.objective.warm_start_steps
  config.train.checkpoint_every = warm if warm else config.train.num_steps
  return config


def _quiet(workdir: str):
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, "train.log"), "a")  # pylint: disable=consider-using-with
  stack = contextlib.ExitStack()
  stack.enter_context(log)
  stack.enter_context(contextlib.redirect_stdout(log))
  stack.enter_context(contextlib.redirect_stderr(log))
  return stack


def train_teacher(root: str, task: str, num_steps: int) -> str:
  from latentdiv import experiment  # pylint: disable=import-outside-toplevel
  workdir = os.path.join(root, "teacher")
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    print(f"Training the {task} teacher ({num_steps} steps) in {workdir} ...", flush=True)
    start = time.time()
    with _quiet(workdir):
      experiment.train_and_evaluate(teacher_config(task, num_steps), workdir)
    print(f"  done in {time.time() - start:.0f} s", flush=True)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  print(f"Teacher ({task}): coverage {summary['coverage']:.2f}, validity per latent "
        f"{[round(v, 3) for v in summary['validity']]}", flush=True)
  return workdir


def run_one(task: str, method: str, teacher_dir: str, seed: int, workdir: str,
            num_steps: int) -> dict:
  from latentdiv import experiment  # pylint: disable=import-outside-toplevel
  summary_path = os.path.join(workdir, "summary.json")
  if not os.path.exists(summary_path):
    start = time.time()
    with _quiet(workdir):
      experiment.train_and_evaluate(
          student_config(task, method, teacher_dir, seed, num_steps), workdir)
    print(f"  {task} {method} seed {seed}: {time.time() - start:.0f} s", flush=True)
  with open(summary_path) as f:
    return json.load(f)


def read_log(workdir: str, kind: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def opd_grad_norm(workdir: str) -> float:
  """Mean logged gradient norm over the OPD phase (after any warm start)."""
  rows = [r["grad_norm"] for r in read_log(workdir, "train") if not r.get("warm_start", 0)]
  return float(np.mean(rows)) if rows else float("nan")


def warm_start_variance(task: str, methods: list[str], teacher_dir: str, seed: int,
                        workdir: str, num_steps: int, num_rows: int) -> dict:
  """‖E ĝ‖ and the per-response total variance of each OPD method at the warm-start point.

  All OPD arms of a seed share the warm start; the step-W checkpoint of
  ``workdir`` is loaded once and every method's loss is differentiated on
  the same ``num_rows`` student responses (fresh prompts, one latent each).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from latentdiv import experiment  # pylint: disable=import-outside-toplevel
  from latentdiv import model as model_lib  # pylint: disable=import-outside-toplevel
  from latentdiv import opd  # pylint: disable=import-outside-toplevel
  from latentdiv import opd_exact  # pylint: disable=import-outside-toplevel
  from latentdiv import sampling  # pylint: disable=import-outside-toplevel

  config = student_config(task, methods[0], teacher_dir, seed, num_steps)
  warm = config.objective.warm_start_steps
  setup, objective = experiment.build(config)
  params = experiment.load(workdir, step=warm).params
  teacher_params = objective.frozen()
  student, teacher = setup.model, objective.teacher
  k = student.config.num_latents
  num_prompts = max(1, num_rows // k)
  key = jax.random.PRNGKey(1000 + seed)
  batch = setup.task.sample(key, num_prompts)
  student_r, teacher_r = objective.row_latents(num_prompts, 1)
  prompt_r = jnp.repeat(batch.prompt, k, axis=0)
  rollout = sampling.sample(student, params, prompt_r, student_r, jax.random.fold_in(key, 1),
                            objective.response_len)
  out = {}
  for method in methods:
    d = student_config(task, method, teacher_dir, seed, num_steps).objective

    def row_loss(p, prompt_P, tokens_L, mask_L, s_lat, t_lat, d=d):
      s = model_lib.teacher_forced_logits(student, p, prompt_P[None], tokens_L[None], s_lat[None])
      t = model_lib.teacher_forced_logits(teacher, teacher_params, prompt_P[None],
                                          tokens_L[None], t_lat[None])
      return opd.opd_loss(s[None], t[None], tokens_L[None, None], mask_L[None, None],
                          d.estimator, discount=float(d.discount)).loss

    norm, variance = jax.jit(functools.partial(opd_exact.row_gradient_moments, row_loss))(
        params, (prompt_r, rollout.tokens, rollout.mask, student_r, teacher_r))
    out[method] = dict(mean_norm=float(norm), variance=float(variance))
  return out


def _mean_sd(values, fmt="{:.3f}") -> str:
  values = np.asarray(values, float)
  sd = values.std(ddof=1) if len(values) > 1 else 0.0
  return f"{fmt.format(values.mean())} ± {fmt.format(sd)}"


def beats(a: dict, b: dict) -> bool:
  """Run a's 95% CI lies entirely below run b's."""
  return a["reverse_kl_ci_high"] < b["reverse_kl_ci_low"]


def overlaps(a: dict, b: dict) -> bool:
  return a["reverse_kl_ci_low"] <= b["reverse_kl_ci_high"] and (
      b["reverse_kl_ci_low"] <= a["reverse_kl_ci_high"])


def comparisons(results: dict) -> list[str]:
  """Per-seed (paired) comparisons: γ = 1 vs γ = 0, and γ = 1 vs GKD / seq-KD."""
  lines = []
  for base in ("opd_rb", "opd_kl_to_go"):
    one, zero = results.get(base), results.get(f"{base}_g0")
    if one and zero:
      n = sum(beats(a, b) for a, b in zip(one, zero))
      lines.append(f"* {base}: γ = 1 below γ = 0 with non-overlapping 95% CIs in {n} of "
                   f"{min(len(one), len(zero))} seeds.")
    for other in ("gkd", "seq_kd"):
      if one and results.get(other):
        pairs = list(zip(one, results[other]))
        lines.append(
            f"* {base} (γ = 1) vs {other}: CIs overlap in {sum(overlaps(a, b) for a, b in pairs)}"
            f" of {len(pairs)} seeds; below in {sum(beats(a, b) for a, b in pairs)}, above in "
            f"{sum(beats(b, a) for a, b in pairs)}.")
  return lines


def make_table(results: dict, initial: list[float], grad_norms: dict, variance: dict) -> str:
  """Markdown table: one row per method, mean ± s.d. over seeds."""
  lines = [
      "| method | final reverse KL (nats), mean ± s.d. | 95% MC CI per seed | student validity "
      "| response length | grad norm (OPD phase) | ‖E ĝ‖ at warm start | Var ĝ at warm start "
      "| ms / step |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for method, summaries in results.items():
    cis = ", ".join(f"[{s['reverse_kl_ci_low']:.3f}, {s['reverse_kl_ci_high']:.3f}]"
                    for s in summaries)
    var = [v[method] for v in variance.values() if method in v]
    norms = [g for g in grad_norms.get(method, []) if np.isfinite(g)]
    lines.append("| " + " | ".join([
        label(method), _mean_sd([s["reverse_kl"] for s in summaries]), cis,
        _mean_sd([np.mean(s["validity"]) for s in summaries]),
        _mean_sd([s["response_len"] for s in summaries], "{:.2f}"),
        _mean_sd(norms, "{:.1f}") if norms else "—",
        _mean_sd([v["mean_norm"] for v in var], "{:.2f}") if var else "—",
        _mean_sd([v["variance"] for v in var], "{:.0f}") if var else "—",
        _mean_sd([1e3 * s["seconds_per_step"] for s in summaries], "{:.1f}"),
    ]) + " |")
  teacher = np.mean([np.mean(s["teacher_validity"]) for v in results.values() for s in v])
  lines += ["", f"Teacher validity {teacher:.3f}; untrained students (step 0): "
            f"{_mean_sd(initial)} nats.", ""] + comparisons(results)
  return "\n".join(lines)


def plot_curves(curves: dict, path: str, title: str) -> None:
  """Reverse KL, validity and response length against steps (mean over seeds, min–max)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  panels = (("reverse_kl", "MC sequence reverse KL(student ‖ teacher), nats"),
            ("validity", "student validity (mean over latents)"),
            ("response_len", "mean response length (tokens, incl. EOS)"))
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  cmap = plt.get_cmap("viridis")
  for method, runs in curves.items():
    base, discount = distill_config.parse_method(method)
    style = dict(linestyle="--" if base == "opd_kl_to_go" else "-")
    if base in ("opd_rb", "opd_kl_to_go"):
      style["color"] = cmap(0.9 * discount)
    else:
      style.update(color=OTHER_COLORS.get(base), linestyle=":")
    steps = np.asarray([r["step"] for r in runs[0]])
    for ax, (key, _) in zip(axes, panels):
      values = np.asarray([[np.mean(r[key]) for r in run] for run in runs])
      line, = ax.plot(steps, values.mean(0), label=label(method), **style)
      ax.fill_between(steps, values.min(0), values.max(0), alpha=0.12,
                      color=line.get_color())
  axes[0].set_yscale("symlog", linthresh=1e-2)  # An MC KL near 0 can be negative.
  for ax, (_, text) in zip(axes, panels):
    ax.set_xlabel("train step")
    ax.set_ylabel(text)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_task(root: str, task: str, methods: list[str], num_seeds: int) -> str:
  teacher_steps = _TEACHER_STEPS.value or (1000 if task == "branch" else 300)
  teacher_dir = train_teacher(root, task, teacher_steps)
  results, curves, initial, grad_norms = {}, {}, [], {}
  for method in methods:
    results[method], curves[method], grad_norms[method] = [], [], []
    for seed in range(num_seeds):
      workdir = os.path.join(root, method, f"seed{seed}")
      results[method].append(run_one(task, method, teacher_dir, seed, workdir, _STEPS.value))
      evals = read_log(workdir, "eval")
      curves[method].append(evals)
      initial.append(evals[0]["reverse_kl"])
      grad_norms[method].append(opd_grad_norm(workdir))
  # The estimators' variance at the shared warm-start point of each seed.
  warm_methods = [m for m in methods if student_config(
      task, m, teacher_dir, 0, _STEPS.value).objective.warm_start != "none"]
  variance_path = os.path.join(root, "variance.json")
  variance = {}
  if os.path.exists(variance_path):
    with open(variance_path) as f:
      variance = json.load(f)
  if warm_methods:
    for seed in range(num_seeds):
      key = f"seed{seed}"
      missing = [m for m in warm_methods if m not in variance.get(key, {})]
      if missing:
        variance.setdefault(key, {}).update(warm_start_variance(
            task, missing, teacher_dir, seed, os.path.join(root, warm_methods[0], key),
            _STEPS.value, _VARIANCE_ROWS.value))
        with open(variance_path, "w") as f:
          json.dump(variance, f, indent=1)
  table = make_table(results, initial, grad_norms, variance)
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write(table + "\n")
  name = (f"distill_discount_{task}_curves" if _STUDY.value == "discount"
          else "distill_curves" if task == "early_divergence" else f"distill_{task}_curves")
  plot_path = os.path.join(_DOCS.value, name + ".png")
  plot_curves(curves, plot_path,
              f"On-policy distillation on '{task}' (mean over {num_seeds} seeds, min–max shaded)")
  return f"## {task}\n\n{table}\n\nCurves: {plot_path}\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  tasks, methods = _TASKS.value, _METHODS.value
  if _STUDY.value == "discount":
    tasks, methods = list(TASKS), list(distill_config.DISCOUNT_STUDY)
  for task in tasks:
    if task not in TASKS:
      raise app.UsageError(f"--tasks must be among {TASKS}, got {task!r}.")
  for method in methods:
    distill_config.parse_method(method)  # A bad name fails before anything runs.
  root = os.path.abspath(_ROOT.value)
  os.makedirs(root, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  start = time.time()
  reports = [run_task(os.path.join(root, task), task, methods, _SEEDS.value) for task in tasks]
  print("\n".join(reports))
  print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
