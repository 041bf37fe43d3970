"""Table rows from the estimator diagnostics' moments (``latentdiv/diagnostics.py``).

Per cell (:func:`cell_metrics`) and aggregated over cells (:func:`summarize`):
``‖E g‖/‖∇D‖``, ``cos(E g, ∇D)``, the relative error (bias), the total
variance, the SNR and ``E cos(g, ∇D)`` of every estimator × baseline.

References:
  DESIGN.md §5.3–§5.4, §7.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from latentdiv import baselines as baselines_lib
from latentdiv import estimators as est


def cell_metrics(stats, combos) -> list[dict]:
  """Per-combo metrics of one cell.

  ``norm_ratio = ‖E g‖/‖∇D‖``, ``cosine = cos(E g, ∇D)``,
  ``rel_err = ‖E g − ∇D‖/‖∇D‖``, ``noise`` = the RMS relative error an
  unbiased estimator would show from sampling alone,
  ``sqrt(Var/n + ref_stderr²)`` (0 in exact mode), ``variance``,
  ``signal = ‖E g‖²`` (in MC mode estimated by ``‖ḡ‖² − Var/n``),
  ``snr = signal/Var``, ``cos_one = E cos(g, ∇D)``.
  """
  ref = np.asarray(stats.ref, np.float64)
  tiny = np.finfo(np.float64).tiny
  ref_norm = max(float(np.linalg.norm(ref)), tiny)
  rows = []
  for c, combo in enumerate(combos):
    mean = np.asarray(stats.mean[c], np.float64)
    var = max(float(stats.variance[c]), 0.0)
    n = float(stats.num_estimates[c])
    sampling_var = var / n if np.isfinite(n) else 0.0  # Var of the sample mean.
    norm = float(np.linalg.norm(mean))
    signal = max(norm**2 - sampling_var, 0.0)
    rows.append(dict(
        estimator=combo.estimator, baseline=combo.baseline, rollouts=combo.rollouts,
        norm_ratio=norm / ref_norm, cosine=float(mean @ ref) / max(norm * ref_norm, tiny),
        rel_err=float(np.linalg.norm(mean - ref)) / ref_norm,
        noise=float(np.sqrt(sampling_var / ref_norm**2 + stats.ref_stderr**2)),
        variance=var, signal=signal, snr=signal / var if var > 0 else float("inf"),
        cos_one=float(stats.cos_one[c])))
  return rows


def summarize(cell_stats: Sequence, combos) -> list[dict]:
  """One row per combo, aggregated over the cells.

  Means over the cells, except: ``rel_err_max`` is the largest relative
  error; ``snr`` = mean ‖E g‖² / mean Var (a ratio of means: one
  near-deterministic cell with Var ≈ 0 would dominate a mean of ratios);
  ``var_ratio`` = mean variance / that of ``trajectory`` (NaN when not
  evaluated); ``var_x_rollouts`` = variance × rollouts per estimate (the
  variance at equal rollout cost).
  """
  per_cell = [cell_metrics(s, combos) for s in cell_stats]
  rows = []
  for c, first in enumerate(per_cell[0]):
    cells = [m[c] for m in per_cell]
    avg = lambda k: float(np.mean([m[k] for m in cells]))  # noqa: E731
    variance = avg("variance")
    rows.append(dict(
        estimator=first["estimator"], baseline=first["baseline"],
        rollouts=first["rollouts"], norm_ratio=avg("norm_ratio"), cosine=avg("cosine"),
        rel_err=avg("rel_err"), rel_err_max=float(np.max([m["rel_err"] for m in cells])),
        noise=avg("noise"), variance=variance, var_x_rollouts=variance * first["rollouts"],
        snr=avg("signal") / variance if variance > 0 else float("inf"),
        cos_one=avg("cos_one")))
  traj = [r["variance"] for r in rows
          if r["estimator"] == est.TRAJECTORY and r["baseline"] == baselines_lib.NONE]
  for r in rows:
    r["var_ratio"] = r["variance"] / traj[0] if traj and traj[0] > 0 else float("nan")
  return rows
