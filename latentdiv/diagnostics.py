"""Mean, variance, SNR and bias of the sequence-KL gradient estimators on a Transformer.

For a model and a batch of prompts, every cell (prompt x, ordered latent pair
(i, j)) and every estimator × baseline :class:`Combo`, the estimate of the
inter-latent KL gradient ``∇_θ D_ij`` (DESIGN.md §5.2–§5.4) is::

    g(y)      = ∇_θ policy_gradient(estimator, terms(y), baseline).loss      y ~ p_i
    g(y¹, y²) = ∇_θ ½ Σ_n policy_gradient(...).loss[n]       (leave_one_out, N = 2)

(``moments.policy_gradient_estimates``: the library's own primitive). Per
cell and combo the diagnostics report ``E g``, the total variance
``Var g = E‖g − E g‖²`` and ``E cos(g, ∇D)``, and from them
(:func:`cell_metrics`) ``‖E g‖/‖∇D‖``, ``cos(E g, ∇D)``, the bias
``‖E g − ∇D‖/‖∇D‖`` and ``SNR = ‖E g‖² / Var g``.

* **Exact mode** (:func:`exact_diagnostics`, DESIGN.md §7): ∇D_ij by
  ``jax.grad`` of ``oracle.exact_kl``; the moments are sums over every output
  the model can emit (and every pair of outputs for leave_one_out) weighted by
  their exact probabilities (``moments.support_moments``).
* **Monte-Carlo mode** (:func:`monte_carlo_diagnostics`): the reference is
  the mean of ``rao_blackwell`` over ``num_reference`` rollouts; the moments
  are sample moments over ``num_samples`` other, independent rollouts.

Baselines (DESIGN.md §5.4): ``none``; ``leave_one_out`` (N = 2 rollouts, each
baselined by the other's returns); ``ema``: the per-position constant a
converged EMA tends to, ``b_t = E[R_t]`` pooled over the batch and the pairs
(exact in exact mode; from the reference rollouts in MC mode); ``jsd``: the
control variate ``c · Σ_{t'≥t} w_t' JSD_t'(i, j)`` on the teacher-forced data,
with ``c = Cov(R, Ĵ) / Var(Ĵ)`` fitted on the same data as ``ema``.
"""
from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple, Optional, Sequence

import chex
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from latentdiv import baselines as baselines_lib
from latentdiv import diagnostics_summary
from latentdiv import divergences
from latentdiv import estimators as est
from latentdiv import model as model_lib
from latentdiv import model_oracle
from latentdiv import moments
from latentdiv import oracle
from latentdiv import vocab

Array = chex.Array
PyTree = Any

MODES = ("auto", "exact", "mc")
PRECISIONS = ("auto", "float32", "float64")
MAX_EXACT_PAIRS = 1 << 16
"""Most pairs of outputs exact mode enumerates for ``leave_one_out``."""
RETURN_ESTIMATORS = (est.TRAJECTORY,) + est.BASELINED_ESTIMATORS
"""Estimators whose returns :func:`rollout_returns` computes (row order)."""


class Combo(NamedTuple):
  """One estimator × baseline combination."""
  estimator: str
  baseline: str

  @property
  def rollouts(self) -> int:
    """Rollouts one estimate uses (2 for the N = 2 leave-one-out baseline)."""
    return 2 if self.baseline == baselines_lib.LEAVE_ONE_OUT else 1

  @property
  def label(self) -> str:
    return f"{self.estimator} / {self.baseline}"


def combinations(estimators: Sequence[str] = est.ALL_ESTIMATORS,
                 baselines: Sequence[str] = baselines_lib.BASELINES
                 ) -> tuple[Combo, ...]:
  """The estimator × baseline pairs where the baseline applies.

  Estimators without a baseline get ``none`` only; the ``*_baseline``
  estimators get every baseline but ``none`` (with ``none`` they are
  ``reward_to_go`` / ``kl_to_go``); ``rao_blackwell`` gets all.

  Args:
    estimators: names in ``estimators.ALL_ESTIMATORS``.
    baselines: names in ``baselines.BASELINES``.

  Returns:
    Tuple of :class:`Combo`, in the order of the arguments.

  Raises:
    ValueError: unknown name.
  """
  for name in baselines:
    baselines_lib.check_baseline(name)
  out = []
  for name in estimators:
    if not est.uses_baseline(name):
      out += [Combo(name, b) for b in baselines if b == baselines_lib.NONE]
    else:
      out += [Combo(name, b) for b in baselines
              if b != baselines_lib.NONE or name == est.RAO_BLACKWELL]
  return tuple(out)


def all_cells(batch_size: int, num_latents: int, num_pairs: int = 0,
              seed: int = 0) -> list[tuple[int, int, int]]:
  """(b, i, j) for every prompt and all ordered pairs (or ``num_pairs`` random ones)."""
  pairs = [(i, j) for i in range(num_latents) for j in range(num_latents) if i != j]
  if num_pairs:
    rng = np.random.default_rng(seed)
    pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), num_pairs, replace=False))]
  return [(b, i, j) for b in range(batch_size) for i, j in pairs]


def _ravel(tree):
  return flatten_util.ravel_pytree(tree)[0]


@functools.partial(jax.jit, static_argnames=("model", "length"))
def exact_reference(model, params, prompt_P, i, j, index_N, *, length):
  """Exact ``D_ij``, ``∇_θ D_ij`` (flattened) and ``p_i(y)`` of rows ``index_N`` (DESIGN.md §7)."""
  logits_fn = model_oracle.make_logits_fn(model, prompt_P)
  args = (model.config.vocab_size, length, vocab.EOS, vocab.PAD)
  kl, grad = jax.value_and_grad(
      lambda p: oracle.exact_kl(logits_fn, p, i, j, *args))(params)
  logp = oracle.exact_sequence_logprobs(logits_fn, params, i, *args)
  return kl, _ravel(grad), jnp.exp(logp[index_N])


@functools.partial(jax.jit, static_argnames=("model", "length"))
def data_jsd_to_go(model, params, prompts_BxP, targets_BxT, target_mask_BxT, *, length):
  """[B, K, K, L] ``J_t(x, i, j) = Σ_{t'≥t} w_t' JSD_t'(i, j)`` on the teacher-forced data.

  Prefix weighting over the first L positions, as the train step's JSD
  control variate (DESIGN.md §4, §5.4).
  """
  batch = prompts_BxP.shape[0]
  logits = jax.vmap(lambda k: model_lib.teacher_forced_logits(
      model, params, prompts_BxP, targets_BxT, jnp.full((batch,), k, jnp.int32)),
                    out_axes=1)(jnp.arange(model.config.num_latents))
  pairwise = jax.vmap(functools.partial(
      divergences.pairwise_token_jsd, weighting="prefix", prefix_len=length))(
          logits, target_mask_BxT)
  return divergences.jsd_to_go(pairwise.jsd_t, pairwise.weights_t)[..., :length]


@functools.partial(jax.jit, static_argnames=("model",))
def rollout_returns(model, params, prompt_P, i, j, tokens_NxL, mask_NxL):
  """[E, N, L] ``policy_gradient(...).returns`` of each :data:`RETURN_ESTIMATORS`.

  Row 0 (``trajectory``) holds ``R = Σ_t r_t`` at every position: its mean
  over y ~ p_i is D_ij. No gradient.
  """
  logits_fn = model_oracle.make_logits_fn(model, prompt_P)
  terms = jax.vmap(est.per_token_terms)(logits_fn(params, tokens_NxL, i),
                                        logits_fn(params, tokens_NxL, j), tokens_NxL)
  return jnp.stack([est.policy_gradient(name, terms, mask_NxL).returns
                    for name in RETURN_ESTIMATORS])


def _cell_constants(model, params, prompts_BxP, targets_BxT, target_mask_BxT, cells,
                    length, rollouts):
  """JSD to go [B, K, K, L], returns [E, M, N, L], ema [E, L] and c [E] of the
  cells, from each cell's (tokens [N, L], mask [N, L], weights [N])."""
  jsd = data_jsd_to_go(model, params, prompts_BxP, targets_BxT, target_mask_BxT,
                       length=length)
  returns = jnp.stack([rollout_returns(model, params, prompts_BxP[b], i, j, y, m)
                       for (b, i, j), (y, m, _) in zip(cells, rollouts)], axis=1)
  ema, c = baselines_lib.fitted_constants(returns, jnp.stack([m for _, m, _ in rollouts]),
                              jnp.stack([w for _, _, w in rollouts]),
                              jnp.stack([jsd[b, i, j] for b, i, j in cells]))
  return jsd, returns, ema, c


def _cell_baselines(combos, ema_ExL, c_E, jsd_to_go_L):
  """[C, L] the value of each combo's ``ema`` / ``jsd`` baseline (0 for the others)."""
  rows = []
  for combo in combos:
    if combo.baseline in baselines_lib.GIVEN_BASELINES:
      e = RETURN_ESTIMATORS.index(combo.estimator)
      rows.append(ema_ExL[e] if combo.baseline == baselines_lib.EMA
                  else baselines_lib.jsd_control_variate(c_E[e], jsd_to_go_L))
    else:
      rows.append(jnp.zeros_like(jsd_to_go_L))
  return jnp.stack(rows)


@functools.partial(jax.jit, static_argnames=("model", "combos"))
def _chunk_moments(model, params, prompt_P, i, j, support, values_CxL, factors_2xC,
                   ref_P, *, combos):
  logits_fn = model_oracle.make_logits_fn(model, prompt_P)
  values = jnp.broadcast_to(values_CxL[:, None, :],
                            (len(combos), 2, values_CxL.shape[1]))
  loo = np.asarray([c.rollouts == 2 for c in combos])

  def fn(tokens_2xL, mask_2xL):
    g = moments.policy_gradient_estimates(
        oracle.bind(logits_fn, i), oracle.bind(logits_fn, j), params, tokens_2xL,
        mask_2xL, combos, values)  # [2, C, P]
    return jnp.where(loo[None, :, None], jnp.mean(g, axis=0, keepdims=True), g)

  return moments.support_moments(fn, support, ref_P, support.index.shape[0], factors_2xC)


def combo_moments(model, params, prompt_P, i, j, support: moments.Support,
                  combos: tuple[Combo, ...], values_CxL: Array, single_weight: float,
                  ref_P: Array, chunk: int) -> moments.WeightedMoments:
  """``moments.support_moments`` of every combo on a support of pairs of rollouts.

  Each item is a pair (y¹, y²) of rollouts of p_i: a one-rollout combo makes
  two estimates, g(y¹) and g(y²), each weighted ``single_weight`` × the
  item's weight; a ``leave_one_out`` combo makes one, ``½ Σ_n g_n`` with the
  other rollout's returns as baseline (``moments.policy_gradient_estimates``).
  Evaluated ``chunk`` items per compiled call (the last chunk padded with
  zero-weight items) and merged (``moments.merge_moments``): every cell and
  both modes share one compiled program.

  Args:
    model: the Transformer.
    params: its parameters.
    prompt_P: [P] prompt x.
    i: sampling latent.
    j: target latent.
    support: ``moments.Support`` of pairs (index [M, 2]) and their weights.
    combos: from :func:`combinations`.
    values_CxL: [C, L] ``ema`` / ``jsd`` baseline values (other rows ignored).
    single_weight: weight factor of each one-rollout estimate (½ when the
      pairs enumerate the outputs with probabilities p(y)p(y'), 1 for samples).
    ref_P: [P] the reference ∇D_ij of the cosines.
    chunk: items per compiled call.

  Returns:
    ``moments.WeightedMoments`` of the C combos.
  """
  loo = np.asarray([c.rollouts == 2 for c in combos])
  factors = jnp.asarray(np.where(loo[None], [[1.0], [0.0]], single_weight),
                        support.weight.dtype)
  index, weight = np.asarray(support.index), jnp.asarray(support.weight)
  total = None
  for start in range(0, index.shape[0], chunk):
    rows = index[start:start + chunk]
    pad = chunk - rows.shape[0]
    rows = np.concatenate([rows, np.repeat(rows[:1], pad, axis=0)]).reshape(-1)
    part = moments.Support(
        support.tokens[rows], support.mask[rows], np.arange(rows.size).reshape(chunk, 2),
        jnp.concatenate([weight[start:start + chunk], jnp.zeros((pad,), weight.dtype)]))
    part = _chunk_moments(model, params, prompt_P, i, j, part, values_CxL, factors,
                          ref_P, combos=combos)
    total = part if total is None else moments.merge_moments(total, part)
  return total


class CellStats(NamedTuple):
  """Moments of every combo on one cell (prompt b, pair (i, j))."""
  cell: tuple  # (b, i, j).
  kl: float  # D_ij (exact, or the MC mean of R over the reference rollouts).
  kl_stderr: float  # standard error of kl (0 in exact mode).
  ref: Array  # [P] reference ∇D_ij.
  ref_stderr: float  # relative standard error ‖se(ref)‖/‖ref‖ (0 in exact mode).
  mean: Array  # [C, P] E g.
  variance: Array  # [C] total variance of one estimate.
  cos_one: Array  # [C] E cos(g, ref).
  num_estimates: Array  # [C] estimates behind the sample moments (inf: exact).


def _stats(cell, m, num_rollouts, combos, ref, kl, kl_stderr=0.0, ref_stderr=0.0):
  """CellStats from WeightedMoments: exact when ``num_rollouts`` is None."""
  exact = num_rollouts is None
  tiny = jnp.finfo(m.m2.dtype).tiny
  denom = m.weight if exact else jnp.maximum(m.weight - 1.0, 1.0)
  counts = np.full(len(combos), np.inf) if exact else np.asarray(
      [num_rollouts // c.rollouts for c in combos], np.float64)
  return CellStats(cell, float(kl), float(kl_stderr), ref, float(ref_stderr), m.mean,
                   m.m2 / denom, m.cos_sum / jnp.maximum(m.weight, tiny), counts)


def exact_diagnostics(model, params, prompts_BxP: Array, targets_BxT: Array,
                      target_mask_BxT: Array, cells: Sequence[tuple[int, int, int]],
                      length: int, combos: tuple[Combo, ...],
                      chunk: int = 32) -> list[CellStats]:
  """Exact moments of every combo on every cell, by enumeration (DESIGN.md §7).

  The reference ∇D_ij is :func:`exact_reference`; the moments are sums over
  the outputs of :func:`exact_sequences` weighted by their exact
  probabilities, and over all unordered pairs of outputs (weights
  ``p(y) p(y')``, doubled for y ≠ y') for ``leave_one_out``. The ``ema``
  baseline and the JSD coefficient use exact expectations
  (``baselines.fitted_constants``).

  Args:
    model: the Transformer.
    params: its parameters (float64 under ``jax.enable_x64`` for exactness).
    prompts_BxP: [B, P] prompts.
    targets_BxT, target_mask_BxT: [B, T] data outputs and masks (for the JSD
      control variate).
    cells: (b, i, j) triples, i ≠ j.
    length: L, the rollout length.
    combos: from :func:`combinations`.
    chunk: items per compiled call.

  Returns:
    One :class:`CellStats` per cell.

  Raises:
    ValueError: too many pairs, or the outputs' probabilities do not sum to 1.
  """
  tokens, mask, index = model_oracle.exact_sequences(model.config.vocab_size, length)
  n = tokens.shape[0]
  if any(c.rollouts == 2 for c in combos) and n * (n + 1) // 2 > MAX_EXACT_PAIRS:
    raise ValueError(
        f"Exact leave_one_out moments need all {n * (n + 1) // 2} pairs of the {n} "
        f"outputs (limit {MAX_EXACT_PAIRS}): use --mode=mc, a shorter --rollout_len, "
        f"or leave leave_one_out out of --baselines.")
  mask = mask.astype(_ravel(params).dtype)
  refs = {}
  for b, i, j in cells:
    refs[b, i, j] = exact_reference(model, params, prompts_BxP[b], i, j, index,
                                    length=length)
    mass = float(jnp.sum(refs[b, i, j][2]))
    if abs(mass - 1.0) > 1e-4:
      raise ValueError(
          f"The enumerated outputs of prompt {b}, latent {i} have total probability "
          f"{mass}, not 1: the model gives PAD or BOS non-zero probability.")
  jsd, _, ema, c = _cell_constants(
      model, params, prompts_BxP, targets_BxT, target_mask_BxT, cells, length,
      [(tokens, mask, refs[cell][2]) for cell in cells])
  if any(c.rollouts == 2 for c in combos):
    # Unordered pairs {y, y'}: the estimates are symmetric, so y ≠ y' stands for
    # both orders (weight 2 p(y) p(y')).
    first, second = np.triu_indices(n)
    multiplicity = np.where(first == second, 1.0, 2.0)
  else:
    first = second = np.arange(n)  # (y, y): both rows are y, half the weight each.
    multiplicity = 1.0
  pairs = np.stack([first, second], axis=1)
  out = []
  for b, i, j in cells:
    kl, ref, p = refs[b, i, j]
    support = moments.Support(tokens, mask, pairs, p[first] * p[second] * multiplicity)
    m = combo_moments(model, params, prompts_BxP[b], i, j, support, combos,
                      _cell_baselines(combos, ema, c, jsd[b, i, j]), 0.5, ref, chunk)
    out.append(_stats((b, i, j), m, None, combos, ref, kl))
  return out


def monte_carlo_diagnostics(model, params, prompts_BxP: Array, targets_BxT: Array,
                            target_mask_BxT: Array, cells: Sequence[tuple[int, int, int]],
                            length: int, combos: tuple[Combo, ...], key: Array,
                            num_reference: int, num_samples: int, chunk: int = 32,
                            reference_combos: Optional[tuple[Combo, ...]] = None
                            ) -> list[CellStats]:
  """Sample moments of every combo against a large-sample reference.

  Per (prompt, latent i), ``num_reference`` rollouts give the reference
  ∇D_ij (the mean of ``rao_blackwell / none``, and its relative standard
  error ``sqrt(Var/n)/‖mean‖``), D̂_ij (the mean of R) and the ``ema`` /
  ``jsd`` constants; ``num_samples`` independent rollouts give each combo's
  mean, unbiased variance and E cos(g, ref) (``leave_one_out`` pairs
  consecutive rollouts: num_samples/2 estimates).

  Args:
    model, params, prompts_BxP, targets_BxT, target_mask_BxT, cells, length,
      combos, chunk: as :func:`exact_diagnostics`.
    key: PRNG key.
    num_reference: rollouts for the reference (even, ≥ 4).
    num_samples: rollouts for the estimators (even, ≥ 4).
    reference_combos: the combos evaluated on the reference rollouts, which
      must include ``rao_blackwell / none``; default: that one alone.
      Passing ``combos`` reuses their compiled program.

  Returns:
    One :class:`CellStats` per cell.

  Raises:
    ValueError: bad sample counts or reference combos.
  """
  rb = Combo(est.RAO_BLACKWELL, baselines_lib.NONE)
  ref_combos = reference_combos or (rb,)
  if rb not in ref_combos:
    raise ValueError(f"reference_combos must include rao_blackwell / none, got "
                     f"{reference_combos}.")
  if num_samples < 4 or num_samples % 2 or num_reference < 4 or num_reference % 2:
    raise ValueError(f"num_samples and num_reference must be even and >= 4, got "
                     f"{num_samples}, {num_reference}.")
  ref_key, eval_key = jax.random.split(key)
  ref_tokens, ref_mask = model_oracle.sample_rollouts(model, params, prompts_BxP, ref_key, length,
                                         num_reference)
  tokens, mask = model_oracle.sample_rollouts(model, params, prompts_BxP, eval_key, length, num_samples)
  dtype = _ravel(params).dtype
  ref_mask, mask = ref_mask.astype(dtype), mask.astype(dtype)
  jsd, returns, ema, c = _cell_constants(
      model, params, prompts_BxP, targets_BxT, target_mask_BxT, cells, length,
      [(ref_tokens[b, i], ref_mask[b, i], jnp.ones((num_reference,), dtype))
       for b, i, _ in cells])
  kl_samples = np.asarray(returns[0, :, :, 0], np.float64)  # R = Σ_t r_t, [M, N].
  zeros = jnp.zeros_like(_ravel(params))
  rb_index = ref_combos.index(rb)
  pairs = lambda num: np.arange(num).reshape(-1, 2)  # noqa: E731  Consecutive rollouts.
  ones = lambda num: jnp.ones((num // 2,), dtype)  # noqa: E731
  out = []
  for m, (b, i, j) in enumerate(cells):
    reference = combo_moments(
        model, params, prompts_BxP[b], i, j,
        moments.Support(ref_tokens[b, i], ref_mask[b, i], pairs(num_reference),
                        ones(num_reference)), ref_combos,
        _cell_baselines(ref_combos, ema, c, jsd[b, i, j]), 1.0, zeros, chunk)
    ref = reference.mean[rb_index]
    ref_var = reference.m2[rb_index] / (num_reference - 1)
    ref_stderr = jnp.sqrt(ref_var / num_reference) / jnp.linalg.norm(ref)
    moments_ = combo_moments(
        model, params, prompts_BxP[b], i, j,
        moments.Support(tokens[b, i], mask[b, i], pairs(num_samples), ones(num_samples)),
        combos, _cell_baselines(combos, ema, c, jsd[b, i, j]), 1.0, ref, chunk)
    out.append(_stats((b, i, j), moments_, num_samples, combos, ref, kl_samples[m].mean(),
                      kl_samples[m].std(ddof=1) / np.sqrt(num_reference), ref_stderr))
  return out


def diagnose(model, params, batch, rollout_len: int, *, mode: str = "auto",
             num_pairs: int = 0, estimators: Sequence[str] = est.ALL_ESTIMATORS,
             baselines: Sequence[str] = baselines_lib.BASELINES, num_samples: int = 512,
             num_reference: int = 4096, max_exact_sequences: int = 64, chunk: int = 32,
             precision: str = "auto", seed: int = 0) -> dict:
  """Every estimator × baseline on a batch of prompts: the whole diagnostic.

  Args:
    model: the Transformer.
    params: its parameters.
    batch: ``tasks.Batch`` (prompt, target, target_mask).
    rollout_len: L ≤ the batch's target length.
    mode: ``exact``, ``mc`` or ``auto`` (exact when the model has at most
      ``max_exact_sequences`` outputs of length L).
    num_pairs: ordered latent pairs per prompt (0 = all K(K−1)).
    estimators, baselines: names (:func:`combinations`).
    num_samples, num_reference: MC rollouts per (prompt, latent) for the
      estimators and for the reference.
    max_exact_sequences: the ``auto`` threshold.
    chunk: items per compiled call.
    precision: ``float64`` / ``float32`` / ``auto`` (float64 for exact mode).
    seed: the pairs and the rollouts (``fold_in(PRNGKey(seed), 5)``).

  Returns:
    dict with ``rows`` (:func:`summarize`), ``cells`` (per-cell metrics),
    ``mode``, ``precision``, settings and ``seconds``.

  Raises:
    ValueError: a bad argument.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; allowed: {MODES}.")
  if precision not in PRECISIONS:
    raise ValueError(f"Unknown precision {precision!r}; allowed: {PRECISIONS}.")
  start = time.time()
  if not 1 <= rollout_len <= batch.target.shape[1]:
    raise ValueError(f"rollout_len must be in [1, {batch.target.shape[1]}], got "
                     f"{rollout_len}.")
  count = model_oracle.num_exact_sequences(model.config.vocab_size - vocab.NUM_RESERVED, rollout_len)
  if mode == "auto":
    mode = "exact" if count <= max_exact_sequences else "mc"
  if precision == "auto":
    precision = "float64" if mode == "exact" else "float32"
  combos = combinations(estimators, baselines)
  if not combos:
    raise ValueError(f"No combination of estimators {estimators} and baselines {baselines}.")
  batch_size = batch.prompt.shape[0]
  cells = all_cells(batch_size, model.config.num_latents, num_pairs, seed)
  with jax.enable_x64(precision == "float64"):
    if precision == "float64":
      model, params = model_oracle.to_float64(model, params)
    args = (model, params, batch.prompt, batch.target, batch.target_mask, cells,
            rollout_len, combos)
    if mode == "exact":
      stats = exact_diagnostics(*args, chunk=chunk)
    else:
      stats = monte_carlo_diagnostics(
          *args, key=jax.random.fold_in(jax.random.PRNGKey(seed), 5),
          num_reference=num_reference, num_samples=num_samples, chunk=chunk)
    cells_out = [dict(cell=list(s.cell), kl=s.kl, kl_stderr=s.kl_stderr,
                      ref_norm=float(jnp.linalg.norm(s.ref)), ref_stderr=s.ref_stderr,
                      combos=diagnostics_summary.cell_metrics(s, combos)) for s in stats]
    rows = diagnostics_summary.summarize(stats, combos)
    num_params = int(_ravel(params).shape[0])
  exact = mode == "exact"
  return dict(mode=mode, precision=precision, rollout_len=rollout_len,
              batch_size=batch_size, num_cells=len(cells),
              num_outputs=count if exact else None,
              num_samples=None if exact else num_samples,
              num_reference=None if exact else num_reference,
              num_params=num_params, rows=rows, cells=cells_out,
              seconds=time.time() - start)
