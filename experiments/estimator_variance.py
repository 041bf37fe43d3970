"""Mean, variance, SNR and bias of the sequence-KL gradient estimators on a Transformer.

For a checkpoint (or a fresh model) and a batch of prompts, every estimator ×
baseline combination is evaluated as an estimator of the inter-latent KL
gradient ``∇_θ D_ij`` by ``latentdiv.diagnostics`` (DESIGN.md §5.3, §5.4,
§7); this script holds the flags, the model loading, the table and the plot::

    python experiments/estimator_variance.py                        # tiny fresh model, exact
    python experiments/estimator_variance.py --workdir=workdir/default          # a run.py run
    python experiments/estimator_variance.py \\
        --config=experiments/configs/default.py --mode=mc           # a fresh default model

Exact mode (``--mode=exact``, float64 by default) weighs every output by its
exact probability against the exact ∇D_ij (the Transformer's float32 logits
bound the agreement to ~1e-7 relative); Monte-Carlo mode (``--mode=mc``)
compares sample moments over ``--num_samples`` rollouts with the mean of
``rao_blackwell`` over ``--num_reference`` others. ``leave_one_out`` uses 2
rollouts per estimate: compare ``var×rollouts`` at equal cost.

Outputs (``--output_dir``): ``estimator_variance.md`` (the table),
``estimator_variance.json`` (rows, per-cell metrics, settings) and
``estimator_variance.png`` (variance per estimator × baseline on a log scale,
and the cosines to the reference).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

try:
  import latentdiv  # noqa: F401  pylint: disable=unused-import
except ImportError:  # Run from a checkout without `pip install -e .`.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentdiv import baselines  # noqa: E402
from latentdiv import diagnostics  # noqa: E402
from latentdiv import estimators as est  # noqa: E402
from latentdiv import experiment  # noqa: E402
from latentdiv import mi_diagnostics  # noqa: E402
from latentdiv import objectives  # noqa: E402
from latentdiv import train  # noqa: E402


# ----------------------------------------------------------------------------
# Models: a checkpoint or a fresh one.
# ----------------------------------------------------------------------------


def tiny_config():
  """A fresh model small enough for exact enumeration: A = 2, L = 3, K = 3.

  Effective vocabulary EOS + 2 content tokens, 15 possible outputs of L = 3;
  a 1-layer, d = 16 Transformer.
  """
  c = objectives.base_config()
  c.task.name = "early_divergence"
  c.task.alphabet_size = 2
  c.task.prompt_len = 2
  c.task.num_strategies = 2
  c.model.num_latents = 3
  c.model.d_model = 16
  c.model.num_heads = 2
  c.model.num_layers = 1
  c.model.d_ff = 32
  c.objective.jsd_prefix_len = 3
  c.objective.sequence_term.rollout_len = 3
  return c


def load(config=None, workdir: Optional[str] = None, step: Optional[int] = None,
         seed: int = 0):
  """The Setup and parameters to diagnose: a run's checkpoint or a fresh model.

  Args:
    config: a ConfigDict (ignored with ``workdir``); None = :func:`tiny_config`.
    workdir: a run.py workdir: its ``config.json`` and newest checkpoint
      (``experiment.load``, read-only).
    step: checkpoint step (with ``workdir``).
    seed: parameter seed of a fresh model (``config.seed`` is overridden).

  Returns:
    (setup, params, description string).

  Raises:
    FileNotFoundError: no checkpoint (or not ``step``) in ``workdir``.
  """
  if workdir:
    try:
      run = experiment.load(workdir, step)
    except ValueError as err:
      raise FileNotFoundError(str(err)) from None
    setup = train.build_setup(run.config)
    # Plain host-backed arrays, like a fresh model's (restored arrays are
    # committed to a device, which would make every jitted function recompile).
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), run.params)
    return setup, params, f"checkpoint {workdir} @ step {run.step}"
  config = tiny_config() if config is None else config
  config = ml_collections.ConfigDict(config.to_dict())
  config.seed = seed
  setup, objective = experiment.build(config)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)),
                                  train.init_state(setup, objective).params)
  return setup, params, f"fresh model (seed {seed})"


# ----------------------------------------------------------------------------
# The table, the plot and the command line.
# ----------------------------------------------------------------------------


def format_table(rows: Sequence[dict], exact: bool) -> str:
  """The summary rows as a Markdown table."""
  head = ["estimator", "baseline", "rollouts", "‖E g‖/‖∇D‖", "cos(E g, ∇D)",
          "rel. err" if exact else "rel. err (± noise)", "variance", "var/traj",
          "var×rollouts", "SNR", "E cos(g, ∇D)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    err = f"{r['rel_err']:.1e}" if exact else f"{r['rel_err']:.3f} (± {r['noise']:.3f})"
    lines.append("| " + " | ".join([
        r["estimator"], r["baseline"], str(r["rollouts"]), f"{r['norm_ratio']:.3f}",
        f"{r['cosine']:.4f}", err, f"{r['variance']:.3e}", f"{r['var_ratio']:.3f}",
        f"{r['var_x_rollouts']:.3e}", f"{r['snr']:.3g}", f"{r['cos_one']:.3f}"]) + " |")
  return "\n".join(lines)


def format_mi_table(rows: Sequence[dict]) -> str:
  """The mutual-information rows (``mi_diagnostics``) as a Markdown table."""
  head = ["estimator", "baseline", "pathwise", "rollouts", "cos(E g, ∇I)", "rel. err",
          "variance", "var/traj", "var×rollouts"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join([
        r["estimator"], r["baseline"], "yes" if r["pathwise"] else "no", str(r["rollouts"]),
        f"{r['cosine']:.4f}", f"{r['rel_err']:.1e}", f"{r['variance']:.3e}",
        f"{r['var_ratio']:.3f}", f"{r['variance'] * r['rollouts']:.3e}"]) + " |")
  return "\n".join(lines)


def plot(rows: Sequence[dict], path: str, title: str = "") -> None:
  """Variance (log scale) and cosine to the reference per estimator × baseline.

  Left: total variance of one estimate (bars) and variance × rollouts (ticks,
  equal-cost comparison for leave_one_out). Right: cos(E g, ∇D) (bars) and
  E cos(g, ∇D) of one estimate (dots).

  Args:
    rows: from :func:`summarize`.
    path: PNG file to write.
    title: figure title.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.patches  # pylint: disable=import-outside-toplevel
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel

  colors = {"none": "tab:gray", "ema": "tab:blue", "jsd": "tab:orange",
             "leave_one_out": "tab:green"}
  labels = [f"{r['estimator']} / {r['baseline']}" for r in rows]
  y = np.arange(len(rows))[::-1]
  fig, (ax_var, ax_cos) = plt.subplots(1, 2, figsize=(13, 0.42 * len(rows) + 2.6),
                                       sharey=True)
  variances = np.asarray([r["variance"] for r in rows])
  scaled = np.asarray([r["var_x_rollouts"] for r in rows])
  positive = np.concatenate([variances, scaled])
  positive = positive[positive > 0]
  lo = positive.min() / 2 if positive.size else 1e-12
  ax_var.barh(y, np.maximum(variances, lo) - lo, left=lo,
              color=[colors[r["baseline"]] for r in rows])
  ax_var.scatter(scaled, y, marker="|", s=250, color="k", zorder=3,
                 label="variance × rollouts (equal cost)")
  ax_var.set_xscale("log")
  ax_var.set_xlim(lo, positive.max() * 2 if positive.size else 1.0)
  ax_var.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax_var.set_xlabel("total variance of one estimate (mean over cells, log scale)")
  ax_var.set_yticks(y)
  ax_var.set_yticklabels(labels)
  handles = [matplotlib.patches.Patch(color=v, label=k) for k, v in colors.items()]
  handles.append(ax_var.collections[0])
  ax_var.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.09),
                ncol=3, fontsize=8)
  ax_cos.barh(y, [r["cosine"] for r in rows], color=[colors[r["baseline"]] for r in rows],
              alpha=0.5, label="cos(E g, ∇D)  [text: rel. error ‖E g − ∇D‖/‖∇D‖]")
  ax_cos.scatter([r["cos_one"] for r in rows], y, color="k", zorder=3,
                 label="E cos(g, ∇D) of one estimate")
  for yy, r in zip(y, rows):
    ax_cos.text(0.02, yy, f"{r['rel_err']:.1e}", va="center", fontsize=7)
  ax_cos.set_xlim(min(0.0, min(r["cos_one"] for r in rows) - 0.05), 1.05)
  ax_cos.axvline(1.0, color="k", lw=0.5)
  ax_cos.set_xlabel("cosine to the reference gradient ∇D_ij (mean over cells)")
  ax_cos.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=1, fontsize=8)
  for ax in (ax_var, ax_cos):
    ax.grid(axis="x", alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def define_flags(flag_values=None):
  """Defines the absl flags on ``flag_values`` (default: the global FLAGS)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  fv = flags.FLAGS if flag_values is None else flag_values
  config_flags.DEFINE_config_file(
      "config", None, "Config file with get_config() for a FRESH model "
      "(experiments/configs/*.py); default: the tiny built-in config (exact mode).",
      lock_config=False, flag_values=fv)
  for kind, name, default, *rest in _FLAGS:
    getattr(flags, f"DEFINE_{kind}")(name, default, *rest, flag_values=fv)


_FLAGS = (  # (kind, name, default, [enum values,] help)
    ("string", "workdir", None, "A run.py workdir: diagnose its newest checkpoint with "
     "the config in its config.json (overrides --config)."),
    ("integer", "checkpoint_step", None, "Checkpoint step (default: the newest)."),
    ("enum", "mode", "auto", diagnostics.MODES, "exact: enumerate all outputs; mc: sample; auto: "
     "exact when there are at most --max_exact_sequences outputs."),
    ("integer", "max_exact_sequences", 64, "Threshold of --mode=auto."),
    ("integer", "batch_size", 2, "Prompts."),
    ("integer", "num_pairs", 0, "Ordered latent pairs per prompt (0 = all K(K-1))."),
    ("integer", "rollout_len", None, "L (default: config.objective.sequence_term.rollout_len)."),
    ("list", "estimators", list(est.ALL_ESTIMATORS), "Estimators."),
    ("list", "baselines", list(baselines.BASELINES), "Baselines."),
    ("integer", "num_samples", 512, "MC: rollouts per (prompt, latent) for the "
     "estimators (leave_one_out pairs consecutive ones)."),
    ("integer", "num_reference", 4096, "MC: rollouts per (prompt, latent) for the "
     "rao_blackwell reference."),
    ("integer", "chunk", 32, "Items (pairs of rollouts) per compiled call."),
    ("enum", "precision", "auto", diagnostics.PRECISIONS, "auto: float64 in exact mode, else float32."),
    ("integer", "seed", 0, "Prompts, rollouts and a fresh model's parameters."),
  ("bool", "mutual_information", True, "Exact mode: also the mutual-information estimators "
   "(DESIGN.md §5.6), every estimator with the none and leave_one_out baselines, with and "
   "without the pathwise term."),
    ("string", "output_dir", None, "Where estimator_variance.{md,json,png} go (default: "
     "WORKDIR/estimator_variance, or workdir/estimator_variance)."),
)


def main(argv, flag_values=None):
  """Runs the diagnostic with the flags of :func:`define_flags` (parsed
  ``flag_values``, default the global FLAGS) and writes the report."""
  from absl import app  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS if flag_values is None else flag_values
  try:
    setup, params, source = load(f.config, f.workdir, f.checkpoint_step, f.seed)
    batch = setup.task.sample(jax.random.fold_in(jax.random.PRNGKey(f.seed), 4),
                              f.batch_size)
    result = diagnostics.diagnose(
        setup.model, params, batch, f.rollout_len or setup.config.objective.sequence_term.rollout_len,
        mode=f.mode, num_pairs=f.num_pairs, estimators=f.estimators,
        baselines=f.baselines, num_samples=f.num_samples, num_reference=f.num_reference,
        max_exact_sequences=f.max_exact_sequences, chunk=f.chunk,
        precision=f.precision, seed=f.seed)
  except (ValueError, FileNotFoundError) as err:
    raise app.UsageError(str(err)) from None
  out_dir = f.output_dir or os.path.join(f.workdir or "workdir", "estimator_variance")
  os.makedirs(out_dir, exist_ok=True)
  exact = result["mode"] == "exact"
  m = setup.model.config
  if exact:
    reference = (f"exact (enumeration of {result['num_outputs']} outputs, "
                 f"{result['precision']})")
  else:
    ref_se = float(np.mean([c["ref_stderr"] for c in result["cells"]]))
    reference = (f"Monte-Carlo: rao_blackwell over {result['num_reference']} rollouts "
                 f"(relative standard error {ref_se:.3f}); estimators over "
                 f"{result['num_samples']} other rollouts, {result['precision']}")
  kls = [c["kl"] for c in result["cells"]]
  header = (f"{source}; task {setup.task.name} (A={setup.task.alphabet_size}), K="
            f"{m.num_latents}, d={m.d_model}, layers={m.num_layers}, "
            f"{result['num_params']} parameters; L={result['rollout_len']}; "
            f"{result['batch_size']} prompts × pairs = {result['num_cells']} cells "
            f"(D_ij from {min(kls):.3g} to {max(kls):.3g}); reference: {reference}; "
            f"{result['seconds']:.0f} s.")
  table = format_table(result["rows"], exact)
  if exact and f.mutual_information:
    rollout_len = result["rollout_len"]
    mi = mi_diagnostics.exact_mi_diagnostics(
        setup.model, params, batch.prompt, rollout_len,
        mi_diagnostics.mi_combinations(
            [e for e in f.estimators if e in est.ALL_ESTIMATORS],
            [b for b in f.baselines if b in ("none", "leave_one_out")]))
    result["mutual_information"] = mi
    table += ("\n\nMutual information I(Z; Y | x) (DESIGN.md §5.6), exact, one draw k ~ U, "
              f"y ~ p_k; I from {min(mi['mi']):.3g} to {max(mi['mi']):.3g} nats over the "
              f"{len(mi['mi'])} prompts:\n\n" + format_mi_table(mi["rows"]))
  base = os.path.join(out_dir, "estimator_variance")
  with open(base + ".md", "w") as fh:
    fh.write(header + "\n\n" + table + "\n\nMetrics are means over the cells; "
             "rel. err = ‖E g − ∇D‖/‖∇D‖"
             + ("" if exact else " (noise: its RMS if the estimator were unbiased)")
             + "; SNR = mean ‖E g‖² / mean Var.\n")
  with open(base + ".json", "w") as fh:
    json.dump(dict(source=source, header=header, **result), fh, indent=1)
  plot(result["rows"], base + ".png",
       title=f"{result['mode']} mode, L={result['rollout_len']}, "
       f"{result['num_cells']} cells, {source}")
  print(header)
  print(table)
  print(f"Wrote {base}.md, {base}.json, {base}.png")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  define_flags()
  _app.run(main)
