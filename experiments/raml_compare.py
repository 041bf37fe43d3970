"""RAML vs maximum likelihood vs label smoothing on a rewarded transduction (Norouzi et al. 2016).

    python experiments/raml_compare.py --root=workdir/raml

trains, on the task of ``experiments/configs/raml.py`` (reverse a sequence of
4–12 symbols, one latent, λ_jsd = 0), every arm

* ``ml`` — maximum likelihood on y*;
* ``ls,ε`` — token-level label smoothing (uniform prior over the content
  tokens) for ε in ``--epsilons``;
* ``hamming,τ`` and ``edit,τ`` — RAML with N = 4 samples per example from the
  Hamming (exact) and the edit-distance (approximate) payoff distribution,
  for τ in ``--taus``, **convention "rescaled"** (the public implementations'
  τ, the one the paper's 0.6–0.95 refer to; DESIGN.md §8),

(defaults: ε ∈ {0.1, 0.3}, τ ∈ {0.6, 0.8}: 7 arms, 21 runs; 1403 s on 2 CPU
cores shared with other jobs at load average ~16), with ``--seeds`` seeds
each, through ``latentdiv.experiment.train_and_evaluate``,
into ``ROOT/<arm>/seed<n>`` (``<arm>`` is ``ml``, ``ls_0.1``, ``hamming_0.65``,
...). Rerunning the command skips runs that have a ``summary.json`` (an
interrupted run resumes from its checkpoint). Then it aggregates:

* a Markdown table (printed, and written to ``ROOT/table.md``): greedy exact
  match and mean edit distance of the greedy decodes to the reference (each
  also as a difference to the ML run of the same seed, which shares its
  initialisation, training batches and evaluation prompts), NLL per token of
  y*, ``KL(q ‖ p_θ)`` and wall time, mean ± standard deviation (ddof 1) over
  seeds;
* ``DOCS/raml_compare.png``: exact match, edit distance, NLL and KL against τ
  (RAML, both rewards) and against ε (label smoothing), ML as a horizontal
  line (shaded: ± one standard deviation over seeds).

``KL(q ‖ p_θ)`` is recomputed here for every arm against ONE payoff
distribution, the Hamming one at ``--kl_tau`` (rescaled), with
``--kl_samples`` samples per evaluation example: the summary's
``kl_payoff_to_model`` uses each arm's own ``raml.tau``, so it is not
comparable across arms. The evaluation prompts are those of
``objective.make_evaluate``; the recomputation is checked against the summary by
also evaluating it with the summary's τ, samples and key
(``kl_own_recomputed`` in ``ROOT/<arm>/seed<n>/raml.json``). The edit-distance
payoff has no tractable density, hence the Hamming q for every arm.

Speed: compilation dominates these small runs on a CPU (a train step and the
evaluation compile in ~20–60 s each, training 300 steps takes ~10–30 s). Runs
that differ only in seed compile to the same programs (keys and the
evaluation batch are arguments, not constants) and share them through the
persistent compilation cache ``ROOT/.jax_cache``; τ and ε are constants of
the step, so each arm compiles once. ``--xla_fast_compile`` (default
on) sets ``XLA_FLAGS=--xla_backend_optimization_level=0
--xla_llvm_disable_expensive_passes=true`` in the worker processes, which
halves compilation on a CPU; turn it off on an accelerator. Runs execute in
``--workers`` processes (default 2); wall times include compilation.
"""

from __future__ import annotations

import functools
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
import chex  # noqa: E402
import jax  # noqa: E402  (the XLA backend starts at first use, after XLA_FLAGS is set)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import sweep  # noqa: E402
from experiments.configs import raml as raml_config  # noqa: E402
from latentdiv import logprobs  # noqa: E402
from latentdiv import model as model_lib  # noqa: E402
from latentdiv import payoff  # noqa: E402
from latentdiv import raml  # noqa: E402
from latentdiv import train  # noqa: E402

FAST_COMPILE_FLAGS = sweep.FAST_COMPILE_FLAGS
_define_shared = sweep.define_shared_flag


_ROOT = _define_shared(flags.DEFINE_string, "root", "workdir/raml", "Directory of the runs.")
_DOCS = _define_shared(flags.DEFINE_string, "docs", os.path.join(_ROOT_DIR, "docs"),
                            "Directory for the PNG plot.")
_SEEDS = _define_shared(flags.DEFINE_integer, "seeds", 3, "Seeds per arm: 0..seeds-1.")
_EPSILONS = flags.DEFINE_list("epsilons", ["0.1", "0.3"], "Label-smoothing weights ε.")
_TAUS = flags.DEFINE_list("taus", ["0.6", "0.8"],
                          "RAML temperatures τ (convention 'rescaled').")
_REWARDS = flags.DEFINE_list("rewards", ["hamming", "edit"], "RAML payoffs to run.")
_WORKERS = _define_shared(flags.DEFINE_integer, "workers", 2, "Parallel training processes (1: in-process).")
_NUM_STEPS = _define_shared(flags.DEFINE_integer, "num_steps", 0, "Override train.num_steps (0: the config's value). For smoke tests.")
_KL_TAU = flags.DEFINE_float("kl_tau", 0.8,
                             "τ (rescaled) of the Hamming payoff q of the table's KL(q || p).")
_KL_SAMPLES = flags.DEFINE_integer("kl_samples", 16,
                                   "Samples of q per evaluation example for KL(q || p).")
_XLA_FAST_COMPILE = flags.DEFINE_bool(
    "xla_fast_compile", True, f"Run the workers with XLA_FLAGS='{FAST_COMPILE_FLAGS}' "
    "(faster CPU compilation; turn off on an accelerator).")
_AGGREGATE_ONLY = _define_shared(flags.DEFINE_bool, "aggregate_only", False,
                                    "Only aggregate the finished runs under --root.")

# Columns of the table: (key of the aggregated record, header, format).
COLUMNS = (
    ("exact_match", "exact match", "{:.3f}"),
    ("d_exact_match", "Δ exact match vs ML (paired)", "{:+.3f}"),
    ("edit_distance", "edit distance", "{:.3f}"),
    ("d_edit_distance", "Δ edit distance vs ML (paired)", "{:+.3f}"),
    ("nll", "NLL / token", "{:.3f}"),
    ("kl", "KL(q ‖ p_θ) (nats)", "{:.2f}"),
    ("wall_s", "wall (s)", "{:.0f}"),
)
KINDS = ("ml", "ls", "hamming", "edit")
KIND_LABELS = raml_config.KIND_LABELS


# ------------------------------------------------------------------ arms


def arms(epsilons, taus, rewards=("hamming", "edit")) -> list[str]:
  """The arm names, ML first: ``["ml", "ls,ε"…, "hamming,τ"…, "edit,τ"…]``."""
  for reward in rewards:
    if reward not in ("hamming", "edit"):
      raise ValueError(f"rewards must be among ('hamming', 'edit'), got {reward!r}.")
  names = ["ml"] + [f"ls,{float(e):g}" for e in epsilons]
  for reward in rewards:
    names += [f"{reward},{float(t):g}" for t in taus]
  for name in names:
    raml_config.parse_arm(name)  # Raises on a malformed value.
  return names


arm_dir = raml_config.arm_dir


def run_dir(root: str, arm: str, seed: int) -> str:
  return os.path.join(root, arm_dir(arm), f"seed{seed}")


def get_config(arm: str, seed: int = 0, num_steps: int = 0):
  """The config of ``arm`` with ``seed`` (``num_steps > 0`` overrides the steps)."""
  config = raml_config.get_config(arm)
  config.seed = seed
  if num_steps:
    config.train.num_steps = num_steps
  return config


# ------------------------------------------------------------ KL(q || p)


def payoff_kl_terms(model, params, prompt_BxP, target_BxT, key, tau, num_samples: int,
                    alphabet: tuple[int, int], convention: str = "rescaled"):
  """Samples of ``log q(y | y*; τ) − log p_θ(y | x)`` with y ~ q (the Hamming payoff).

      KL(q ‖ p_θ) = E_{y ~ q(·|y*; τ)} [log q(y | y*; τ) − log p_θ(y | x)]

  q is the exact Hamming payoff distribution (``payoff.sample_hamming`` over
  ``logprobs.content_mask(y*)``, density ``payoff.hamming_log_prob``); p_θ scores
  the whole output up to and including its EOS with latent 0 (K = 1).
  Jitted with the model, ``num_samples``, ``alphabet`` and ``convention``
  static and τ traced, so one compilation serves every τ and every run.

  Args:
    model: the ``LatentTransformer``.
    params: its parameters.
    prompt_BxP: int prompts x [B, P].
    target_BxT: int references y* [B, T].
    key: PRNG key of the samples.
    tau: scalar τ.
    num_samples: static N.
    alphabet: static ``(lo, hi)`` content-token range.
    convention: static ``"exact"`` or ``"rescaled"``.

  Returns:
    ``(diff_BxN, samples_BxNxT)``: float [B, N] ``log q − log p`` and the samples.

  References:
    DESIGN.md §8 (``KL(q ‖ p_θ)``, the distillation view); Norouzi et al. (2016).
  """
  return _payoff_kl_jit(model, params, prompt_BxP, target_BxT, key, tau, num_samples,
                        tuple(int(a) for a in alphabet), convention)


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "alphabet", "convention"))
def _payoff_kl_jit(model, params, prompt_BxP, target_BxT, key, tau, num_samples, alphabet,
                   convention):
  chex.assert_rank([prompt_BxP, target_BxT], 2)
  editable = logprobs.content_mask(target_BxT)
  samples = raml.sample_raml_targets(key, target_BxT, editable, num_samples, alphabet, tau,
                                     convention).tokens  # [B, N, T]
  log_q_one = functools.partial(payoff.hamming_log_prob, alphabet=alphabet, tau=tau,
                                convention=convention)
  log_q = jax.vmap(jax.vmap(log_q_one, (0, None, None)))(samples, target_BxT, editable)
  batch, n, t_len = samples.shape
  flat = samples.reshape((batch * n, t_len))
  logits = model_lib.teacher_forced_logits(model, params, jnp.repeat(prompt_BxP, n, axis=0),
                                           flat, jnp.zeros((batch * n,), jnp.int32))
  log_p = jax.vmap(logprobs.sequence_log_likelihood)(logits, flat, logprobs.output_mask(flat))
  return log_q - log_p.reshape((batch, n)), samples


def extra_eval(config, workdir: str, kl_tau: float, kl_samples: int) -> dict:
  """``KL(q_{kl_tau} ‖ p_θ)`` of the newest checkpoint, and the summary's KL recomputed."""
  setup, objective, params = sweep.restore_newest_params(config, workdir)
  batch = objective.make_evaluate().eval_batch  # The evaluation batch; nothing compiles.
  alphabet = objective.content_alphabet()
  eval_key = train.eval_key(config)
  diff, _ = payoff_kl_terms(setup.model, params, batch.prompt, batch.target,
                            jax.random.fold_in(eval_key, 7), kl_tau, kl_samples, alphabet)
  own, _ = payoff_kl_terms(setup.model, params, batch.prompt, batch.target,
                           jax.random.fold_in(eval_key, 2), config.objective.raml.tau, 4, alphabet,
                           config.objective.raml.convention)
  diff = np.asarray(diff, np.float64)
  return dict(kl=float(diff.mean()), kl_stderr=float(diff.std(ddof=1) / math.sqrt(diff.size)),
              kl_tau=kl_tau, kl_samples=kl_samples,
              kl_own_recomputed=float(np.asarray(own, np.float64).mean()))


# --------------------------------------------------------------------- runs


def run_one(arm: str, seed: int, workdir: str, num_steps: int = 0, kl_tau: float = 0.8,
            kl_samples: int = 16) -> dict:
  """Trains one run (unless its summary exists) and writes ``raml.json`` beside it."""
  config = get_config(arm, seed, num_steps)
  return sweep.train_once(
      config, workdir, "raml.json",
      needs_extra=lambda r: r.get("kl_tau") != kl_tau or r.get("kl_samples") != kl_samples,
      extra_eval=lambda: extra_eval(config, workdir, kl_tau, kl_samples))


def _job_cost(job) -> tuple:
  """Most expensive first: the edit sampler, then RAML, then the rest."""
  kind = raml_config.parse_arm(job[0])[0]
  return ({"edit": 3, "hamming": 2}.get(kind, 1), -job[1])


def run_all(root: str, arm_names, seeds: int, workers: int, num_steps: int = 0,
            kl_tau: float = 0.8, kl_samples: int = 16, fast_compile: bool = True) -> None:
  """Runs every (arm, seed) whose ``raml.json`` is missing or for another KL setting."""
  jobs = []
  for arm in arm_names:
    for seed in range(seeds):
      workdir = run_dir(root, arm, seed)
      record_path = os.path.join(workdir, "raml.json")
      if os.path.exists(record_path):
        with open(record_path) as f:
          record = json.load(f)
        if record.get("kl_tau") == kl_tau and record.get("kl_samples") == kl_samples:
          continue
      jobs.append((arm, seed, workdir))
  jobs.sort(key=_job_cost, reverse=True)

  def report(job, record, elapsed):
    arm, seed, workdir = job
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    print(f"[{elapsed:6.0f}s] {arm:14s} seed {seed}: done ({sweep.wall_text(record)}, exact "
          f"match {summary['exact_match']:.3f}, edit distance {summary['edit_distance']:.3f})",
          flush=True)

  sweep.run_jobs(jobs, run_one, root, workers, report, fast_compile=fast_compile,
                 num_steps=num_steps, kl_tau=kl_tau, kl_samples=kl_samples)


# -------------------------------------------------------------- aggregation


def load_run(workdir: str) -> dict | None:
  """``summary.json`` and ``raml.json`` of one run (None if it has no summary)."""
  return sweep.load_run(workdir, "raml.json")


def run_metrics(run: dict) -> dict:
  """The table's metrics of one run (NaN where missing)."""
  s, r = run["summary"], run["record"]
  nan = float("nan")
  return dict(exact_match=s["exact_match"], edit_distance=s["edit_distance"], nll=s["nll"],
              kl=r.get("kl", nan), wall_s=nan if r.get("wall_s") is None else r["wall_s"])


def aggregate(root: str, arm_names, seeds: int) -> dict:
  """``{arm: {metric: (mean, std, n)}}`` over the finished seeds (std: ddof 1).

  ``d_exact_match`` and ``d_edit_distance`` are paired differences to the ML
  run of the same seed (same initialisation, training batches and evaluation
  set), ``(1/n) Σ_seed (m_arm − m_ML)``, over the seeds where both finished;
  NaN for the ML arm itself.
  """
  ml_runs = [load_run(run_dir(root, "ml", seed)) for seed in range(seeds)]
  table = {}
  for arm in arm_names:
    runs = [load_run(run_dir(root, arm, seed)) for seed in range(seeds)]
    values = []
    for run, ml in zip(runs, ml_runs):
      if run is None:
        continue
      metrics = run_metrics(run)
      for key in ("exact_match", "edit_distance"):
        paired = ml is not None and raml_config.parse_arm(arm)[0] != "ml"
        metrics[f"d_{key}"] = (metrics[key] - ml["summary"][key]) if paired else float("nan")
      values.append(metrics)
    if not values:
      continue
    cell = {}
    for key, _, _ in COLUMNS:
      x = np.array([v[key] for v in values], float)
      x = x[np.isfinite(x)]
      mean = float(x.mean()) if x.size else float("nan")
      std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
      cell[key] = (mean, std, int(x.size))
    table[arm] = cell
  return table


arm_label = raml_config.arm_label


def markdown_table(table: dict, arm_names) -> str:
  """The aggregated metrics as a Markdown table, one row per arm (in ``arm_names`` order)."""
  header = "| arm | seeds | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
  lines = [header, "|" + "---|" * (2 + len(COLUMNS))]
  for arm in arm_names:
    if arm not in table:
      continue
    cell = table[arm]
    seeds = max(n for _, _, n in cell.values())
    values = " | ".join(sweep.format_mean_std(cell[k][0], cell[k][1], fmt) for k, _, fmt in COLUMNS)
    lines.append(f"| {arm_label(arm)} | {seeds} | {values} |")
  return "\n".join(lines)


PLOTTED = (("exact_match", "greedy exact match"), ("edit_distance", "mean edit distance"),
           ("nll", "NLL / token of y*"), ("kl", "KL(q ‖ p_θ) (nats)"))


def plot(table: dict, arm_names, path: str, kl_tau: float | None = None) -> None:
  """Metrics vs τ (RAML) and vs ε (label smoothing), ML as a line; mean ± std over seeds."""
  plt = sweep.pyplot()
  by_kind = {kind: [] for kind in KINDS}
  for arm in arm_names:
    if arm in table:
      kind, value = raml_config.parse_arm(arm)
      by_kind[kind].append((value, table[arm]))
  rows = [("τ (RAML, rescaled)", ("hamming", "edit")), ("ε (label smoothing)", ("ls",))]
  fig, axes = plt.subplots(len(rows), len(PLOTTED), figsize=(3.6 * len(PLOTTED), 6.4),
                           squeeze=False)
  colors = {"ml": "black", "ls": "tab:green", "hamming": "tab:blue", "edit": "tab:orange"}
  for r, (xlabel, kinds) in enumerate(rows):
    for c, (key, title) in enumerate(PLOTTED):
      ax = axes[r, c]
      xs_all = []
      for kind in kinds:
        points = sorted(by_kind[kind], key=lambda p: p[0])
        if not points:
          continue
        xs = np.array([p[0] for p in points])
        means = np.array([p[1][key][0] for p in points])
        stds = np.nan_to_num(np.array([p[1][key][1] for p in points]))
        ax.errorbar(xs, means, yerr=stds, color=colors[kind], marker="o", ms=4, capsize=3,
                    label=KIND_LABELS[kind])
        xs_all.extend(xs)
      if "ml" in table:
        mean, std, _ = table["ml"][key]
        ax.axhline(mean, color=colors["ml"], ls="--", lw=1, label=KIND_LABELS["ml"])
        if not math.isnan(std) and xs_all:
          ax.axhspan(mean - std, mean + std, color=colors["ml"], alpha=0.08)
      suffix = f" (q: Hamming, τ = {kl_tau:g})" if key == "kl" and kl_tau is not None else ""
      ax.set_title(title + suffix, fontsize=9)
      ax.set_xlabel(xlabel, fontsize=8)
      if c == 0:
        ax.legend(fontsize=7)
  fig.suptitle("RAML vs maximum likelihood vs label smoothing: reverse, inputs of 4–12 "
               "symbols (mean ± std over seeds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(root: str, docs: str, arm_names, seeds: int, kl_tau: float | None = None) -> str:
  """Writes the plot and ``ROOT/table.md``; returns the Markdown table."""
  table = aggregate(root, arm_names, seeds)
  text = markdown_table(table, arm_names)
  os.makedirs(docs, exist_ok=True)
  plot(table, arm_names, os.path.join(docs, "raml_compare.png"), kl_tau)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write(text + "\n")
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    names = arms(_EPSILONS.value, _TAUS.value, _REWARDS.value)
  except ValueError as err:
    raise app.UsageError(str(err)) from None
  start = time.time()
  if not _AGGREGATE_ONLY.value:
    run_all(_ROOT.value, names, _SEEDS.value, _WORKERS.value, _NUM_STEPS.value, _KL_TAU.value,
            _KL_SAMPLES.value, _XLA_FAST_COMPILE.value)
  table = report(_ROOT.value, _DOCS.value, names, _SEEDS.value, _KL_TAU.value)
  print(table)
  print(f"\nPlot: {os.path.join(_DOCS.value, 'raml_compare.png')}; table: "
        f"{os.path.join(_ROOT.value, 'table.md')}. Total wall time {time.time() - start:.0f} s.")


if __name__ == "__main__":
  app.run(main)
