"""Exact bias and variance of the mutual-information gradient estimators on a Transformer.

For a model and a few prompts, every estimator of DESIGN.md §5.3 (with the
``none`` or ``leave_one_out`` baseline, with or without the pathwise term)
is evaluated as an estimator of ``∇_θ I(Z; Y | x)`` (§5.6) by enumeration
(§7): its exact mean against ``jax.grad`` of ``oracle.exact_mutual_information``
and the total variance of one draw (k ~ U, y ~ p_k), through
``mi_moments.mi_gradient_moments`` — the library's own estimator code on every
output at once. The rows sit beside the sequence-KL diagnostics of
``latentdiv.diagnostics`` in ``experiments/estimator_variance.py``.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from latentdiv import baselines as baselines_lib
from latentdiv import estimators as est
from latentdiv import model_oracle
from latentdiv import mi_moments
from latentdiv import oracle
from latentdiv import vocab


class MICombo(NamedTuple):
  """One estimator × baseline × pathwise combination of the MI gradient."""
  estimator: str
  baseline: str
  pathwise: bool

  @property
  def label(self) -> str:
    return f"{self.estimator} / {self.baseline}{' + pathwise' if self.pathwise else ''}"


def mi_combinations(estimators: Sequence[str] = est.ALL_ESTIMATORS,
                    baselines: Sequence[str] = (baselines_lib.NONE,
                                                baselines_lib.LEAVE_ONE_OUT),
                    pathwise: Sequence[bool] = (False, True)) -> tuple[MICombo, ...]:
  """The combinations where the baseline applies (``leave_one_out`` only for baselined ones)."""
  out = []
  for name, baseline, pw in itertools.product(estimators, baselines, pathwise):
    if baseline in baselines_lib.GIVEN_BASELINES:
      raise ValueError(f"MI diagnostics compute the {baselines_lib.GIVEN_BASELINES} baselines "
                       f"only in training; got {baseline!r}.")
    if baseline != baselines_lib.NONE and not est.uses_baseline(name):
      continue
    if baseline == baselines_lib.NONE and name.endswith("_baseline"):
      continue  # The same as reward_to_go / kl_to_go.
    out.append(MICombo(name, baseline, pw))
  return tuple(out)


def exact_mi_diagnostics(model, params, prompts_BxP, length: int,
                         combos: Sequence[MICombo], chunk: int = 4096) -> dict:
  """Exact rows (one per combo, means over the prompts) in float64.

  Args:
    model: the Transformer.
    params: its parameters.
    prompts_BxP: [B, P] prompts.
    length: L, the rollout length (EOS truncation).
    combos: from :func:`mi_combinations`.
    chunk: items per vmapped chunk.

  Returns:
    dict with ``rows`` (estimator, baseline, pathwise, rollouts, rel_err,
    rel_err_max, cosine, variance, var_ratio = variance / trajectory's without
    the pathwise term), ``mi`` (the exact I per prompt) and ``num_params``.

  References:
    DESIGN.md §5.6, §7.
  """
  with jax.enable_x64(True):
    model, params = model_oracle.to_float64(model, params)
    num_latents = model.config.num_latents
    args = (model.config.vocab_size, length)
    kw = dict(eos_id=vocab.EOS, pad_id=vocab.PAD)
    ravel = lambda tree: np.asarray(flatten_util.ravel_pytree(tree)[0])  # noqa: E731
    per_prompt, info = [], []
    for prompt in np.asarray(prompts_BxP):
      logits_fn = model_oracle.make_logits_fn(model, jnp.asarray(prompt))
      value, grad = jax.value_and_grad(lambda p: oracle.exact_mutual_information(
          logits_fn, p, num_latents, *args, **kw))(params)
      true = -ravel(grad)  # The surrogates are losses: their mean is −∇I.
      info.append(float(value))
      stats = []
      for combo in combos:
        m = mi_moments.mi_gradient_moments(logits_fn, params, num_latents, combo.estimator,
                                        *args, baseline=combo.baseline,
                                        pathwise=combo.pathwise, chunk_size=chunk, **kw)
        mean = ravel(m.mean)
        norm = max(np.linalg.norm(true), np.finfo(np.float64).tiny)
        stats.append(dict(rel_err=float(np.linalg.norm(mean - true) / norm),
                          cosine=float(mean @ true / max(np.linalg.norm(mean) * norm, 1e-300)),
                          variance=float(m.variance)))
      per_prompt.append(stats)
  rows = []
  for c, combo in enumerate(combos):
    cell = [p[c] for p in per_prompt]
    rows.append(dict(estimator=combo.estimator, baseline=combo.baseline,
                     pathwise=combo.pathwise,
                     rollouts=2 if combo.baseline == baselines_lib.LEAVE_ONE_OUT else 1,
                     rel_err=float(np.mean([s["rel_err"] for s in cell])),
                     rel_err_max=float(np.max([s["rel_err"] for s in cell])),
                     cosine=float(np.mean([s["cosine"] for s in cell])),
                     variance=float(np.mean([s["variance"] for s in cell]))))
  traj = [r["variance"] for r in rows if r["estimator"] == est.TRAJECTORY
          and r["baseline"] == baselines_lib.NONE and not r["pathwise"]]
  for r in rows:
    r["var_ratio"] = r["variance"] / traj[0] if traj else float("nan")
  return dict(rows=rows, mi=info, num_params=int(ravel(params).shape[0]))
