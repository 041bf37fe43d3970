"""Mean, variance, SNR and bias of the sequence-KL gradient estimators on a Transformer.

Issue 3, deliverable 4 (DESIGN.md §5.3, §5.4, §7). For a checkpoint (or a fresh
model) and a batch of prompts, every estimator × baseline combination is
evaluated as an estimator of the inter-latent KL gradient ``∇_θ D_ij``::

    python experiments/estimator_variance.py                        # tiny fresh model, exact
    python experiments/estimator_variance.py --workdir=workdir/default          # a run.py run
    python experiments/estimator_variance.py \\
        --config=experiments/configs/default.py --mode=mc           # a fresh default model

What is measured, per cell (prompt x, ordered latent pair (i, j)) and
combination, for the one-rollout estimate ``g(y) = −∇_θ S(y)`` (``S`` is
:func:`latentdiv.estimators.sequence_kl_surrogate_from_logits`, a loss whose
gradient estimates ``−∇D_ij``, so g estimates ``+∇D_ij``), y ~ p_i:

* ``E g`` (printed as ``‖E g‖ / ‖∇D‖``), its cosine to the reference gradient
  ``∇D_ij`` and the relative error ``‖E g − ∇D‖ / ‖∇D‖`` (the bias);
* the total variance ``Var g = E‖g − E g‖²``, its ratio to ``trajectory``'s,
  and the signal-to-noise ratio ``SNR = ‖E g‖² / Var g``;
* ``E cos(g, ∇D)``: how well ONE rollout points along the true gradient.

The reference is exact where the V^L outputs can be enumerated (``--mode=exact``):
``∇D_ij`` by ``jax.grad`` through :mod:`latentdiv.oracle`'s enumeration, and the
estimator moments as sums over every output weighted by its exact probability.
Otherwise (``--mode=mc``) the reference is the mean of ``rao_blackwell`` over
``--num_reference`` rollouts (its relative standard error is reported), and
the estimators' moments are sample moments over ``--num_samples`` other,
independent rollouts per (prompt, latent).

Baselines (DESIGN.md §5.4), for the estimators that take one:

* ``none``;
* ``ema``: the per-position constant a converged EMA baseline tends to, the
  mean return ``b_t = E[R_t]`` pooled over the batch and the pairs (exact in
  exact mode; from the reference rollouts in MC mode, so independent of the
  evaluated ones);
* ``jsd``: the control variate ``b_t = c · Σ_{t'≥t} w_t' JSD_t'(i, j)`` on the
  teacher-forced DATA prefix, with ``c = Cov(R, Ĵ) / Var(Ĵ)`` fitted (pooled,
  by :func:`latentdiv.estimators.fit_control_variate_coefficient`) on the same
  data as ``ema``;
* ``leave_one_out``: N = 2 rollouts, each baselined by the other's returns;
  one estimate uses 2 rollouts (column ``rollouts``), so compare its variance
  with half the one-rollout variances (column ``var×rollouts``).

Tokens the model never emits (PAD, BOS) have probability 0, so exact mode
enumerates only outputs over EOS and the content tokens, truncated at EOS
(PAD after it), and checks that their probabilities sum to 1. Exact mode
computes in float64 by default (``--precision``); the Transformer still rounds
its logits to float32, which bounds the agreement with the exact gradient to
~1e-7 relative.

Outputs (``--output_dir``): ``estimator_variance.md`` (the table),
``estimator_variance.json`` (rows, per-cell metrics, settings) and
``estimator_variance.png`` (variance per estimator × baseline on a log scale,
and the cosines to the reference).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, NamedTuple, Optional, Sequence

import chex
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

try:
  import latentdiv  # noqa: F401  pylint: disable=unused-import
except ImportError:  # Run from a checkout without `pip install -e .`.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentdiv import config as config_lib  # noqa: E402
from latentdiv import divergences  # noqa: E402
from latentdiv import estimators as est  # noqa: E402
from latentdiv import model as model_lib  # noqa: E402
from latentdiv import oracle  # noqa: E402
from latentdiv import sampling  # noqa: E402
from latentdiv import vocab  # noqa: E402

Array = chex.Array
PyTree = Any

BASELINES = ("none", "ema", "jsd", "leave_one_out")
"""Baselines compared (DESIGN.md §5.4)."""

MODES = ("auto", "exact", "mc")
MAX_EXACT_PAIRS = 1 << 16
"""Most pairs of outputs exact mode enumerates for ``leave_one_out``."""
PRECISIONS = ("auto", "float32", "float64")


class Combo(NamedTuple):
  """One estimator × baseline combination."""
  estimator: str
  baseline: str

  @property
  def rollouts(self) -> int:
    """Rollouts one estimate uses (2 for the N = 2 leave-one-out baseline)."""
    return 2 if self.baseline == "leave_one_out" else 1

  @property
  def label(self) -> str:
    return f"{self.estimator} / {self.baseline}"


def combinations(estimators: Sequence[str] = est.ALL_ESTIMATORS,
                 baselines: Sequence[str] = BASELINES) -> tuple[Combo, ...]:
  """The estimator × baseline pairs where the baseline applies.

  Estimators without a baseline (``trajectory``, ``reward_to_go``,
  ``kl_to_go``, ``per_token_reward``) get ``none`` only; the ``*_baseline``
  estimators get every baseline but ``none`` (with ``none`` they are
  ``reward_to_go`` / ``kl_to_go``); ``rao_blackwell`` gets all.

  Args:
    estimators: names in ``estimators.ALL_ESTIMATORS``.
    baselines: names in :data:`BASELINES`.

  Returns:
    Tuple of :class:`Combo`, in the order of the arguments.

  Raises:
    ValueError: unknown name.
  """
  for name in estimators:
    if name not in est.ALL_ESTIMATORS:
      raise ValueError(f"Unknown estimator {name!r}; allowed: {est.ALL_ESTIMATORS}.")
  for name in baselines:
    if name not in BASELINES:
      raise ValueError(f"Unknown baseline {name!r}; allowed: {BASELINES}.")
  out = []
  for name in estimators:
    if not est.uses_baseline(name):
      if "none" in baselines:
        out.append(Combo(name, "none"))
      continue
    for baseline in baselines:
      if baseline == "none" and name != est.RAO_BLACKWELL:
        continue
      out.append(Combo(name, baseline))
  return tuple(out)


# ----------------------------------------------------------------------------
# The model as a function of (params, tokens, latent).
# ----------------------------------------------------------------------------


def _logits(model, params, prompt_P, tokens_NxL, latent):
  n = tokens_NxL.shape[0]
  prompt = jnp.broadcast_to(prompt_P[None, :], (n, prompt_P.shape[0]))
  return model_lib.teacher_forced_logits(model, params, prompt, tokens_NxL,
                                         jnp.full((n,), latent, jnp.int32))


def make_logits_fn(model: model_lib.LatentTransformer, prompt_P: Array):
  """The model at a fixed prompt as an oracle ``logits_fn``.

  ``logits_fn(params, tokens_NxL, latent) = teacher_forced_logits(model,
  params, x, y, z)`` with x = ``prompt_P`` repeated N times: row t holds the
  logits of y_t given (x, y_<t, z), as :mod:`latentdiv.oracle` expects.

  Args:
    model: the Transformer.
    prompt_P: [P] int prompt.

  Returns:
    ``(params, tokens_NxL, latent) -> logits_NxLxV``.

  References:
    DESIGN.md §7.
  """
  chex.assert_rank(prompt_P, 1, custom_message="argument: prompt_P")
  return lambda params, tokens_NxL, latent: _logits(model, params, prompt_P, tokens_NxL,
                                                     latent)


def to_float64(model: model_lib.LatentTransformer, params: PyTree):
  """A float64 copy of the model and its parameters (use inside ``jax.enable_x64``).

  The Transformer still rounds its attention weights and output logits to
  float32 (``latentdiv/model.py``); both the exact gradient and the estimators
  see the same rounded function, so they agree to about float32 precision of
  the logits' cotangents (≪ 1e-6 relative) instead of float32 accumulation.

  Args:
    model: the Transformer.
    params: its parameters.

  Returns:
    (model with compute dtype float64, params cast to float64).
  """
  cfg = model.config.__class__(**{**model.config.__dict__, "dtype": "float64"})
  return (model_lib.LatentTransformer(cfg),
          jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params))


def _ravel(tree):
  return flatten_util.ravel_pytree(tree)[0]


# ----------------------------------------------------------------------------
# Per-rollout gradients of the library's surrogates.
# ----------------------------------------------------------------------------


def _stack_cotangents(cots):
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *cots)


def single_rollout_gradients(model: model_lib.LatentTransformer,
                             params: PyTree,
                             prompt_P: Array,
                             i: Array,
                             j: Array,
                             tokens_L: Array,
                             mask_L: Array,
                             combos: tuple[Combo, ...],
                             baselines_CxL: Array) -> Array:
  """One-rollout estimates ``g_c(y) = −∇_θ S_c(y)`` of ``∇D_ij`` for every combo.

  ``S_c`` is :func:`latentdiv.estimators.sequence_kl_surrogate_from_logits`
  with estimator ``c.estimator`` and baseline ``baselines_CxL[c]`` (None for
  ``none``), on the logits of p_i and p_j at y's contexts. The gradient is
  ``jax.grad`` of ``S_c ∘ logits`` by the chain rule: one forward pass and its
  VJP are shared by the combos, the VJP is vmapped over their logit
  cotangents.

  Args:
    model: the Transformer.
    params: its parameters.
    prompt_P: [P] prompt x.
    i: sampling latent (int scalar, may be traced).
    j: target latent.
    tokens_L: [L] rollout y ~ p_i (PAD after EOS).
    mask_L: [L] 1 up to and including EOS.
    combos: the combinations; a ``leave_one_out`` combo is treated as a
      baselined one here (its row of ``baselines_CxL`` holds the other
      rollout's returns, see :func:`chunk_gradients`).
    baselines_CxL: [C, L] the baselines ``b(c_t)`` of the combos with a
      baseline other than ``none`` (rows of the others are ignored).

  Returns:
    [C, num_params] flattened gradient estimates of +∇D_ij.

  References:
    DESIGN.md §5.2, §5.3.
  """
  chex.assert_rank([tokens_L, mask_L, baselines_CxL], [1, 1, 2],
                   custom_message="arguments: tokens_L, mask_L, baselines_CxL")
  chex.assert_shape(baselines_CxL, (len(combos), tokens_L.shape[0]),
                    custom_message="baselines_CxL must be [len(combos), L]")

  def logits_ij(p):
    return (_logits(model, p, prompt_P, tokens_L[None], i)[0],
            _logits(model, p, prompt_P, tokens_L[None], j)[0])

  (logits_i, logits_j), vjp = jax.vjp(logits_ij, params)
  cots = []
  for c, combo in enumerate(combos):
    baseline = None if combo.baseline == "none" else baselines_CxL[c]
    surrogate = functools.partial(est.sequence_kl_surrogate_from_logits,
                                  combo.estimator, tokens_L=tokens_L,
                                  mask_t=mask_L, baseline_t=baseline)
    cots.append(jax.grad(surrogate, argnums=(0, 1))(logits_i, logits_j))
  grads = jax.vmap(vjp)(_stack_cotangents(cots))[0]
  return -jax.vmap(_ravel)(grads)


def leave_one_out_baselines(model: model_lib.LatentTransformer, params: PyTree,
                            prompt_P: Array, i: Array, j: Array, tokens_2xL: Array,
                            mask_2xL: Array, estimators: Sequence[str]) -> Array:
  """N = 2 leave-one-out baselines: each rollout gets the other's returns.

  ``b[e, n] = R^e(y^{3−n})`` from :func:`latentdiv.estimators.estimator_returns`
  and :func:`latentdiv.estimators.leave_one_out_baseline` (no gradient), as
  in :func:`latentdiv.oracle.leave_one_out_gradient_moments` and the train
  step.

  Args:
    model: the Transformer.
    params: its parameters.
    prompt_P: [P] prompt.
    i: sampling latent.
    j: target latent.
    tokens_2xL: [2, L] two rollouts of p_i.
    mask_2xL: [2, L] their masks.
    estimators: E baselined estimator names.

  Returns:
    [E, 2, L] baselines.

  References:
    DESIGN.md §5.4.
  """
  chex.assert_shape([tokens_2xL, mask_2xL], (2, tokens_2xL.shape[1]),
                    custom_message="tokens_2xL and mask_2xL must be [2, L]")
  params = jax.lax.stop_gradient(params)
  terms = jax.vmap(est.per_token_terms)(_logits(model, params, prompt_P, tokens_2xL, i),
                                        _logits(model, params, prompt_P, tokens_2xL, j),
                                        tokens_2xL)
  out = []
  for name in estimators:
    returns = jax.vmap(functools.partial(est.estimator_returns, name))(
        terms.logp_score_t - terms.logp_target_t, terms.kl_t, mask_2xL)
    out.append(est.leave_one_out_baseline(returns, mask_2xL))
  return jnp.stack(out) if out else jnp.zeros((0,) + tokens_2xL.shape, terms.kl_t.dtype)


# ----------------------------------------------------------------------------
# Weighted moments, accumulated over fixed-size chunks.
# ----------------------------------------------------------------------------


class GradMoments(NamedTuple):
  """Weighted moments of C vector-valued estimators.

  Attributes:
    weight: [C] ``W = Σ_n w_n``.
    mean: [C, P] ``Σ_n w_n g_n / W``.
    m2: [C] ``Σ_n w_n ‖g_n − mean‖²`` (exact variance ``m2 / W`` when w are
      probabilities; unbiased sample variance ``m2 / (W − 1)`` when w = 1).
    cos_sum: [C] ``Σ_n w_n cos(g_n, ref)``.
  """
  weight: Array
  mean: Array
  m2: Array
  cos_sum: Array


def moments_of(g_NxCxP: Array, w_NxC: Array, ref_P: Array) -> GradMoments:
  """Weighted moments of N estimates of C estimators (see :class:`GradMoments`).

  Args:
    g_NxCxP: [N, C, P] estimates.
    w_NxC: [N, C] non-negative weights (0 = absent).
    ref_P: [P] reference direction of the cosines (zeros: cosines 0).

  Returns:
    :class:`GradMoments`.
  """
  chex.assert_rank([g_NxCxP, w_NxC, ref_P], [3, 2, 1])
  chex.assert_equal_shape_prefix([g_NxCxP, w_NxC], 2)
  w_NxC = w_NxC.astype(g_NxCxP.dtype)
  tiny = jnp.finfo(g_NxCxP.dtype).tiny
  weight_C = jnp.sum(w_NxC, axis=0)
  mean_CxP = jnp.einsum("nc,ncp->cp", w_NxC, g_NxCxP) / jnp.maximum(weight_C, tiny)[:, None]
  sq_NxC = jnp.sum((g_NxCxP - mean_CxP[None]) ** 2, axis=-1)
  norms_NxC = jnp.linalg.norm(g_NxCxP, axis=-1)
  cos_NxC = jnp.einsum("ncp,p->nc", g_NxCxP, ref_P) / jnp.maximum(
      norms_NxC * jnp.linalg.norm(ref_P), tiny)
  return GradMoments(weight_C, mean_CxP, jnp.sum(w_NxC * sq_NxC, axis=0),
                     jnp.sum(w_NxC * cos_NxC, axis=0))


@jax.jit
def merge_moments(a: GradMoments, b: GradMoments) -> GradMoments:
  """Moments of the union of two weighted sets (Chan et al.'s parallel update).

  ``W = W_a + W_b``, ``mean = mean_a + (W_b/W) δ``,
  ``m2 = m2_a + m2_b + ‖δ‖² W_a W_b / W`` with ``δ = mean_b − mean_a``: no
  ``E‖g‖² − ‖E g‖²`` cancellation.

  References:
    Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm
    for computing sample variances".
  """
  tiny = jnp.finfo(a.mean.dtype).tiny
  weight = a.weight + b.weight
  frac_b = jnp.where(weight > 0, b.weight / jnp.maximum(weight, tiny), 0.0)
  delta = b.mean - a.mean
  return GradMoments(weight, a.mean + frac_b[:, None] * delta,
                     a.m2 + b.m2 + jnp.sum(delta**2, axis=-1) * a.weight * frac_b,
                     a.cos_sum + b.cos_sum)


def chunk_gradients(model: model_lib.LatentTransformer, params: PyTree, prompt_P: Array,
                    i: Array, j: Array, tokens_Nx2xL: Array, mask_Nx2xL: Array,
                    combos: tuple[Combo, ...], baselines_CxL: Array) -> Array:
  """Every combo's estimates on N items, each a pair of rollouts (y¹, y²) ~ p_i.

  Row n of a one-rollout combo is its estimate on yⁿ
  (:func:`single_rollout_gradients`). A ``leave_one_out`` combo's estimate is
  ``g(y¹, y²) = −∇_θ ½ Σ_n S(yⁿ; b = R(y^{3−n}))`` — the mean of the two
  rollouts' one-rollout estimates, each baselined by the other's returns
  (:func:`leave_one_out_baselines`); it is in row 0, row 1 holds zeros.
  (One vmap over the 2N rollouts: it compiles faster than nested vmaps.)

  Args:
    model: the Transformer.
    params: its parameters.
    prompt_P: [P] prompt.
    i: sampling latent.
    j: target latent.
    tokens_Nx2xL: [N, 2, L] N pairs of rollouts.
    mask_Nx2xL: [N, 2, L] their masks.
    combos: the combinations.
    baselines_CxL: [C, L] ``ema`` / ``jsd`` baselines (other rows ignored).

  Returns:
    [N, 2, C, num_params] estimates of +∇D_ij.

  References:
    DESIGN.md §5.3, §5.4.
  """
  chex.assert_rank([tokens_Nx2xL, mask_Nx2xL], 3,
                   custom_message="arguments: tokens_Nx2xL, mask_Nx2xL")
  num = tokens_Nx2xL.shape[0]
  loo = np.asarray([c.baseline == "leave_one_out" for c in combos])
  baselines = jnp.broadcast_to(baselines_CxL[None, None], (num, 2) + baselines_CxL.shape)
  if loo.any():
    b_NxEx2xL = jax.vmap(lambda y, m: leave_one_out_baselines(
        model, params, prompt_P, i, j, y, m,
        [c.estimator for c in combos if c.baseline == "leave_one_out"]))(
            tokens_Nx2xL, mask_Nx2xL)
    baselines = baselines.at[:, :, np.flatnonzero(loo)].set(
        jnp.swapaxes(b_NxEx2xL, 1, 2).astype(baselines.dtype))
  flat = lambda a: a.reshape((2 * num,) + a.shape[2:])  # noqa: E731
  g = jax.vmap(lambda y, m, b: single_rollout_gradients(
      model, params, prompt_P, i, j, y, m, combos, b))(
          flat(tokens_Nx2xL), flat(mask_Nx2xL), flat(baselines))
  g = g.reshape((num, 2) + g.shape[1:])
  if loo.any():
    pair_mean = jnp.mean(g, axis=1)  # The leave-one-out estimate of the item.
    g = jnp.stack([jnp.where(loo[None, :, None], pair_mean, g[:, 0]),
                   jnp.where(loo[None, :, None], 0.0, g[:, 1])], axis=1)
  return g


@functools.partial(jax.jit, static_argnames=("model", "combos"))
def chunk_moments(model, params, prompt_P, i, j, tokens_Nx2xL, mask_Nx2xL, w_single_Nx2,
                  w_pair_N, baselines_CxL, ref_P, *, combos) -> GradMoments:
  """Weighted moments of :func:`chunk_gradients` over a chunk of N items (jitted).

  A one-rollout combo's two estimates of item n get weights
  ``w_single[n, 0]`` and ``w_single[n, 1]``; a ``leave_one_out`` combo's pair
  estimate gets ``w_pair[n]``.

  Returns:
    :class:`GradMoments` over the chunk.
  """
  num = tokens_Nx2xL.shape[0]
  g = chunk_gradients(model, params, prompt_P, i, j, tokens_Nx2xL, mask_Nx2xL, combos,
                      baselines_CxL)
  loo = np.asarray([c.baseline == "leave_one_out" for c in combos])
  w_pair = jnp.stack([w_pair_N, jnp.zeros_like(w_pair_N)], axis=1)  # [N, 2]
  w = jnp.where(loo[None, None, :], w_pair[:, :, None], w_single_Nx2[:, :, None])
  return moments_of(g.reshape((2 * num,) + g.shape[2:]), w.reshape(2 * num, -1), ref_P)


def accumulate_moments(model, params, prompt_P, i, j, tokens_Nx2xL, mask_Nx2xL,
                       w_single_Nx2, w_pair_N, baselines_CxL, ref_P, combos,
                       chunk: int) -> GradMoments:
  """:func:`chunk_moments` over chunks of ``chunk`` items, merged.

  Every call has the same shapes (the last chunk is padded with zero-weight
  items), so one compiled program serves all cells, both modes and the
  Monte-Carlo reference.

  Returns:
    :class:`GradMoments` over all items.
  """
  n = tokens_Nx2xL.shape[0]
  total = None
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    pad = chunk - (stop - start)

    def take(a, pad=pad, start=start, stop=stop):
      a = a[start:stop]
      return jnp.concatenate([a, jnp.repeat(a[:1] * 0, pad, axis=0)]) if pad else a

    moments = chunk_moments(model, params, prompt_P, i, j, take(tokens_Nx2xL),
                            take(mask_Nx2xL), take(w_single_Nx2), take(w_pair_N),
                            baselines_CxL, ref_P, combos=combos)
    total = moments if total is None else merge_moments(total, moments)
  return total


# ----------------------------------------------------------------------------
# Returns, baselines and the JSD control variate.
# ----------------------------------------------------------------------------


RETURN_ESTIMATORS = (est.TRAJECTORY,) + est.BASELINED_ESTIMATORS
"""Estimators whose returns :func:`rollout_returns` computes (row order)."""


@functools.partial(jax.jit, static_argnames=("model",))
def _returns_block(model, params, prompt_P, i, j, tokens_NxL, mask_NxL):
  terms = jax.vmap(est.per_token_terms)(
      _logits(model, params, prompt_P, tokens_NxL, i),
      _logits(model, params, prompt_P, tokens_NxL, j), tokens_NxL)
  r_t = terms.logp_score_t - terms.logp_target_t
  return jnp.stack([
      jax.vmap(functools.partial(est.estimator_returns, name))(r_t, terms.kl_t, mask_NxL)
      for name in RETURN_ESTIMATORS])


def rollout_returns(model: model_lib.LatentTransformer, params: PyTree, prompt_P: Array,
                    i: Array, j: Array, tokens_NxL: Array, mask_NxL: Array,
                    block: int = 64) -> Array:
  """Returns of every rollout for each of :data:`RETURN_ESTIMATORS` (no gradient).

  Row 0 (``trajectory``) holds ``R = Σ_t r_t`` at every position: its mean
  over y ~ p_i is D_ij. Computed in blocks of ``block`` rollouts (one
  compiled program for every N).

  Args:
    model: the Transformer.
    params: its parameters.
    prompt_P: [P] prompt.
    i: sampling latent.
    j: target latent.
    tokens_NxL: [N, L] rollouts of p_i.
    mask_NxL: [N, L] masks.
    block: rollouts per call.

  Returns:
    [E, N, L] returns of :func:`latentdiv.estimators.estimator_returns`.
  """
  n = tokens_NxL.shape[0]
  parts = []
  for start in range(0, n, block):
    stop = min(start + block, n)
    pad = block - (stop - start)
    take = lambda a: jnp.concatenate(  # noqa: E731
        [a[start:stop], jnp.zeros((pad,) + a.shape[1:], a.dtype)])
    parts.append(_returns_block(model, params, prompt_P, i, j, take(tokens_NxL),
                                take(mask_NxL))[:, :stop - start])
  return jnp.concatenate(parts, axis=1)


@functools.partial(jax.jit, static_argnames=("model", "length"))
def data_jsd_to_go(model, params, prompts_BxP, targets_BxT, target_mask_BxT, *, length):
  """``J_t(x, i, j) = Σ_{t'≥t} w_t' JSD_t'(i, j)`` on the teacher-forced data.

  Prefix weighting over the first L positions, as the train step's JSD control
  variate (``latentdiv/seq_kl.py``).

  Args:
    model: the Transformer.
    params: its parameters.
    prompts_BxP: [B, P] prompts.
    targets_BxT: [B, T] data outputs y*.
    target_mask_BxT: [B, T] their masks.
    length: L ≤ T.

  Returns:
    [B, K, K, L] JSD to go.

  References:
    DESIGN.md §5.4.
  """
  batch = prompts_BxP.shape[0]

  def one(latent):
    return model_lib.teacher_forced_logits(model, params, prompts_BxP, targets_BxT,
                                           jnp.full((batch,), latent, jnp.int32))

  logits = jax.vmap(one, out_axes=1)(jnp.arange(model.config.num_latents))
  pairwise = jax.vmap(functools.partial(
      divergences.pairwise_token_jsd, weighting="prefix", prefix_len=length))(
          logits, target_mask_BxT)
  return divergences.jsd_to_go(pairwise.jsd_t, pairwise.weights_t)[..., :length]


def baseline_constants(returns_ExMxNxL: Array, mask_MxNxL: Array, weights_MxN: Array,
                       jsd_to_go_MxL: Array):
  """The pooled ``ema`` baseline and the fitted JSD control-variate coefficient.

  Over M cells (prompt, i, j), N weighted rollouts each and the L positions::

    ema_e[t] = Σ_{m,n} w_mn mask_mnt R^e_mnt / Σ_{m,n} w_mn mask_mnt
    c_e      = Cov(R^e, J) / Var(J)   (weights w_mn mask_mnt)

  ``c_e`` comes from :func:`latentdiv.estimators.fit_control_variate_coefficient`
  (one update at decay 0: the weighted moments themselves).

  Args:
    returns_ExMxNxL: [E, M, N, L] returns of E estimators.
    mask_MxNxL: [M, N, L] masks.
    weights_MxN: [M, N] rollout weights (probabilities, or 1).
    jsd_to_go_MxL: [M, L] J_t of each cell.

  Returns:
    (ema [E, L], c [E]).

  References:
    DESIGN.md §5.4.
  """
  chex.assert_rank([returns_ExMxNxL, mask_MxNxL, weights_MxN, jsd_to_go_MxL],
                   [4, 3, 2, 2])
  w = weights_MxN[:, :, None] * mask_MxNxL.astype(weights_MxN.dtype)
  denom = jnp.sum(w, axis=(0, 1))
  ema = jnp.sum(w[None] * returns_ExMxNxL, axis=(1, 2)) / jnp.where(
      denom > 0, denom, 1.0)[None, :]
  jsd = jnp.broadcast_to(jsd_to_go_MxL[:, None, :], mask_MxNxL.shape)
  state = est.init_control_variate_state(returns_ExMxNxL.dtype)
  coeffs = [est.fit_control_variate_coefficient(state, r, jsd, 0.0, mask=w)[1]
            for r in returns_ExMxNxL]
  return ema, jnp.stack(coeffs)


# ----------------------------------------------------------------------------
# Exact and Monte-Carlo diagnostics.
# ----------------------------------------------------------------------------


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


def exact_sequences(vocab_size: int, length: int):
  """Every output the model can emit: canonical EOS-truncated, no PAD/BOS before EOS.

  Built from :func:`latentdiv.oracle.all_sequences` and
  :func:`latentdiv.oracle.truncation_mask` (EOS scored, PAD after it); the
  rows left out have probability exactly 0 under the Transformer (it never
  emits PAD or BOS, and non-canonical rows are not outputs).

  Args:
    vocab_size: V of the model.
    length: L.

  Returns:
    (tokens [N, L] int32, mask [N, L] float32, index [N] rows in
    ``oracle.all_sequences``).
  """
  tokens = np.asarray(oracle.all_sequences(vocab_size, length))
  mask, canonical = map(np.asarray, oracle.truncation_mask(
      jnp.asarray(tokens), eos_id=vocab.EOS, pad_id=vocab.PAD))
  never = np.isin(tokens, [vocab.PAD, vocab.BOS]) & (mask > 0)
  keep = canonical & ~never.any(axis=-1)
  index = np.flatnonzero(keep)
  return jnp.asarray(tokens[index]), jnp.asarray(mask[index]), jnp.asarray(index)


def num_exact_sequences(alphabet_size: int, length: int) -> int:
  """How many outputs exact mode enumerates: ``Σ_{k<L} A^k + A^L``."""
  return sum(alphabet_size**k for k in range(length)) + alphabet_size**length


@functools.partial(jax.jit, static_argnames=("model", "length"))
def exact_reference(model: model_lib.LatentTransformer, params: PyTree, prompt_P: Array,
                    i: Array, j: Array, index_N: Array, *, length: int):
  """Exact ``D_ij``, ``∇_θ D_ij`` and ``p_i(y)`` by :mod:`latentdiv.oracle`.

  ``D_ij`` and its gradient by ``jax.grad`` of :func:`latentdiv.oracle.exact_kl`
  over all V^L rows; ``p_i(y | x)`` of the rows ``index_N`` of the
  enumeration by :func:`latentdiv.oracle.exact_sequence_logprobs`.

  Returns:
    (D_ij scalar, ∇D_ij flattened [num_params], probabilities [N]).

  References:
    DESIGN.md §7.
  """
  logits_fn = make_logits_fn(model, prompt_P)
  args = (model.config.vocab_size, length, vocab.EOS, vocab.PAD)
  kl, grad = jax.value_and_grad(
      lambda p: oracle.exact_kl(logits_fn, p, i, j, *args))(params)
  logp = oracle.exact_sequence_logprobs(logits_fn, params, i, *args)
  return kl, _ravel(grad), jnp.exp(logp[index_N])


def _cell_baselines(combos, ema_ExL, c_E, jsd_to_go_L):
  rows = []
  for combo in combos:
    if combo.baseline in ("ema", "jsd"):
      e = RETURN_ESTIMATORS.index(combo.estimator)
      rows.append(ema_ExL[e] if combo.baseline == "ema"
                  else est.jsd_control_variate(c_E[e], jsd_to_go_L))
    else:
      rows.append(jnp.zeros_like(jsd_to_go_L))
  return jnp.stack(rows)


def _stats(cell, moments, exact, num_rollouts, combos, ref, kl, kl_stderr=0.0,
           ref_stderr=0.0):
  tiny = jnp.finfo(moments.m2.dtype).tiny
  denom = moments.weight if exact else jnp.maximum(moments.weight - 1.0, 1.0)
  counts = np.full(len(combos), np.inf) if exact else np.asarray(
      [num_rollouts // c.rollouts for c in combos], np.float64)
  return CellStats(cell, float(kl), float(kl_stderr), ref, float(ref_stderr),
                   moments.mean, moments.m2 / denom,
                   moments.cos_sum / jnp.maximum(moments.weight, tiny), counts)


def exact_diagnostics(model: model_lib.LatentTransformer, params: PyTree, prompts_BxP: Array,
                      targets_BxT: Array, target_mask_BxT: Array,
                      cells: Sequence[tuple[int, int, int]], length: int,
                      combos: tuple[Combo, ...], chunk: int = 32) -> list[CellStats]:
  """Exact moments of every combo on every cell, by enumeration (DESIGN.md §7).

  The reference ``∇D_ij`` is ``jax.grad`` of :func:`latentdiv.oracle.exact_kl`
  over all V^L rows (:func:`exact_reference`); the estimators' moments are
  sums over the outputs of :func:`exact_sequences` weighted by their exact
  probabilities (also from the oracle), and over all pairs of outputs
  (weights p(y) p(y')) for ``leave_one_out``. The ``ema`` baseline
  and the JSD coefficient c use exact expectations (:func:`baseline_constants`).

  Args:
    model: the Transformer.
    params: its parameters (float64 under ``jax.enable_x64`` for exactness).
    prompts_BxP: [B, P] prompts.
    targets_BxT: [B, T] data outputs (for the JSD control variate).
    target_mask_BxT: [B, T] their masks.
    cells: (b, i, j) triples, i ≠ j.
    length: L, the rollout length.
    combos: from :func:`combinations`.
    chunk: items (pairs of outputs) per compiled call.

  Returns:
    One :class:`CellStats` per cell.

  Raises:
    ValueError: the enumerated outputs' probabilities do not sum to 1.
  """
  tokens, mask, index = exact_sequences(model.config.vocab_size, length)
  n = tokens.shape[0]
  if any(combo.rollouts == 2 for combo in combos) and n * (n + 1) // 2 > MAX_EXACT_PAIRS:
    raise ValueError(
        f"Exact leave_one_out moments need all {n * (n + 1) // 2} pairs of the {n} "
        f"outputs (limit {MAX_EXACT_PAIRS}): use --mode=mc, a shorter --rollout_len, "
        f"or leave leave_one_out out of --baselines.")
  dtype = _ravel(params).dtype
  mask = mask.astype(dtype)
  references = {}
  for b, i, j in cells:
    kl, ref, p = exact_reference(model, params, prompts_BxP[b], i, j, index, length=length)
    mass = float(jnp.sum(p))
    if abs(mass - 1.0) > 1e-4:
      raise ValueError(
          f"The enumerated outputs of prompt {b}, latent {i} have total probability "
          f"{mass}, not 1: the model gives PAD or BOS non-zero probability.")
    references[(b, i, j)] = kl, ref, p
  jsd = data_jsd_to_go(model, params, prompts_BxP, targets_BxT, target_mask_BxT,
                       length=length)
  ema, c = baseline_constants(
      jnp.stack([rollout_returns(model, params, prompts_BxP[b], i, j, tokens, mask,
                                 2 * chunk) for b, i, j in cells], axis=1),
      jnp.broadcast_to(mask, (len(cells),) + mask.shape),
      jnp.stack([references[cell][2] for cell in cells]),
      jnp.stack([jsd[b, i, j] for b, i, j in cells]))
  if any(combo.rollouts == 2 for combo in combos):
    # Unordered pairs {y, y'}: the pair estimate is symmetric, so y ≠ y' stands
    # for both orders (weight 2 p(y) p(y')).
    first, second = np.triu_indices(n)
    multiplicity = np.where(first == second, 1.0, 2.0)
  else:
    first = second = np.arange(n)  # (y, y): both rows are y, half the weight each.
    multiplicity = None
  items = jnp.stack([tokens[first], tokens[second]], axis=1)
  item_masks = jnp.stack([mask[first], mask[second]], axis=1)
  out = []
  for b, i, j in cells:
    kl, ref, p = references[(b, i, j)]
    w_pair = p if multiplicity is None else p[first] * p[second] * multiplicity
    moments = accumulate_moments(
        model, params, prompts_BxP[b], i, j, items, item_masks,
        jnp.stack([w_pair / 2, w_pair / 2], axis=1), w_pair,
        _cell_baselines(combos, ema, c, jsd[b, i, j]), ref, combos, chunk)
    out.append(_stats((b, i, j), moments, True, None, combos, ref, kl))
  return out


def sample_rollouts(model: model_lib.LatentTransformer, params: PyTree, prompts_BxP: Array,
                    key: Array, length: int, num: int):
  """``num`` rollouts of L tokens per (prompt, latent) with ``sampling.sample``.

  Returns:
    (tokens [B, K, num, L] int32, mask [B, K, num, L] bool).
  """
  batch, prompt_len = prompts_BxP.shape
  k = model.config.num_latents
  prompts = jnp.broadcast_to(prompts_BxP[:, None, None, :], (batch, k, num, prompt_len))
  latents = jnp.broadcast_to(jnp.arange(k)[None, :, None], (batch, k, num))
  rollout = sampling.sample(model, params, prompts.reshape(-1, prompt_len),
                            latents.reshape(-1), key, length)
  shape = (batch, k, num, length)
  return rollout.tokens.reshape(shape), rollout.mask.reshape(shape)


def monte_carlo_diagnostics(model: model_lib.LatentTransformer, params: PyTree,
                            prompts_BxP: Array, targets_BxT: Array, target_mask_BxT: Array,
                            cells: Sequence[tuple[int, int, int]], length: int,
                            combos: tuple[Combo, ...], key: Array, num_reference: int,
                            num_samples: int, chunk: int = 32,
                            reference_combos: Optional[tuple[Combo, ...]] = None
                            ) -> list[CellStats]:
  """Sample moments of every combo against a large-sample reference.

  Per (prompt, latent i), ``num_reference`` rollouts give the reference
  ``∇D_ij`` (the mean of ``rao_blackwell`` with no baseline, the lowest
  variance unbiased estimate that needs no fitted constant, and its relative
  standard error ``sqrt(Var/n)/‖mean‖``), D̂_ij (the mean of R) and the
  ``ema`` / ``jsd`` baseline constants; ``num_samples`` independent rollouts
  give each combo's mean, unbiased variance and E cos(g, ref)
  (``leave_one_out`` pairs consecutive rollouts: num_samples/2 estimates).

  Args:
    model: the Transformer.
    params: its parameters.
    prompts_BxP: [B, P] prompts.
    targets_BxT: [B, T] data outputs (JSD control variate).
    target_mask_BxT: [B, T] masks.
    cells: (b, i, j) triples.
    length: L.
    combos: from :func:`combinations`.
    key: PRNG key.
    num_reference: rollouts for the reference (per (prompt, latent), even).
    num_samples: rollouts for the estimators (even, ≥ 4).
    chunk: items (pairs of rollouts) per compiled call.
    reference_combos: the combos evaluated on the reference rollouts, which
      must include ``rao_blackwell / none`` (the reference); default: that one
      alone. Passing ``combos`` reuses their compiled program, which saves a
      compilation where rollouts are cheap (tiny models).

  Returns:
    One :class:`CellStats` per cell.
  """
  rb = reference_combos or (Combo(est.RAO_BLACKWELL, "none"),)
  if Combo(est.RAO_BLACKWELL, "none") not in rb:
    raise ValueError(f"reference_combos must include rao_blackwell / none, got {rb}.")
  rb_index = rb.index(Combo(est.RAO_BLACKWELL, "none"))
  if num_samples < 4 or num_samples % 2 or num_reference < 4 or num_reference % 2:
    raise ValueError(f"num_samples and num_reference must be even and >= 4, got "
                     f"{num_samples}, {num_reference}.")
  ref_key, eval_key = jax.random.split(key)
  ref_tokens, ref_mask = sample_rollouts(model, params, prompts_BxP, ref_key, length,
                                         num_reference)
  tokens, mask = sample_rollouts(model, params, prompts_BxP, eval_key, length, num_samples)
  dtype = _ravel(params).dtype
  ref_mask, mask = ref_mask.astype(dtype), mask.astype(dtype)
  jsd = data_jsd_to_go(model, params, prompts_BxP, targets_BxT, target_mask_BxT,
                       length=length)
  returns = jnp.stack([
      rollout_returns(model, params, prompts_BxP[b], i, j, ref_tokens[b, i], ref_mask[b, i],
                      2 * chunk) for b, i, j in cells], axis=1)  # [E, M, N, L]
  ema, c = baseline_constants(returns, jnp.stack([ref_mask[b, i] for b, i, _ in cells]),
                              jnp.ones((len(cells), num_reference), dtype),
                              jnp.stack([jsd[b, i, j] for b, i, j in cells]))
  kl_samples = np.asarray(returns[0, :, :, 0], np.float64)  # R = Σ_t r_t, [M, N].
  num_params = _ravel(params).shape[0]
  pairs = lambda a: a.reshape((-1, 2) + a.shape[1:])  # noqa: E731
  out = []
  for m, (b, i, j) in enumerate(cells):
    prompt = prompts_BxP[b]
    ones = jnp.ones((num_reference // 2, 2), dtype)
    reference = accumulate_moments(
        model, params, prompt, i, j, pairs(ref_tokens[b, i]), pairs(ref_mask[b, i]), ones,
        ones[:, 0], _cell_baselines(rb, ema, c, jsd[b, i, j]),
        jnp.zeros((num_params,), dtype), rb, chunk)
    ref = reference.mean[rb_index]
    ref_var = reference.m2[rb_index] / (num_reference - 1)
    ref_stderr = jnp.sqrt(ref_var / num_reference) / jnp.linalg.norm(ref)
    ones = jnp.ones((num_samples // 2, 2), dtype)
    moments = accumulate_moments(
        model, params, prompt, i, j, pairs(tokens[b, i]), pairs(mask[b, i]), ones,
        ones[:, 0], _cell_baselines(combos, ema, c, jsd[b, i, j]), ref, combos, chunk)
    out.append(_stats((b, i, j), moments, False, num_samples, combos, ref,
                      kl_samples[m].mean(),
                      kl_samples[m].std(ddof=1) / np.sqrt(num_reference), ref_stderr))
  return out


# ----------------------------------------------------------------------------
# Summaries, table, plot.
# ----------------------------------------------------------------------------


def cell_metrics(stats: CellStats, combos: tuple[Combo, ...]) -> list[dict]:
  """Per-combo metrics of one cell.

  ``norm_ratio = ‖E g‖/‖∇D‖``, ``cosine = cos(E g, ∇D)``,
  ``rel_err = ‖E g − ∇D‖/‖∇D‖``, ``noise`` = the RMS relative error an
  unbiased estimator would show from sampling alone,
  ``sqrt(Var/n + ref_stderr²)`` (0 in exact mode), ``variance``,
  ``signal = ‖E g‖²`` (in MC mode estimated by ``‖ḡ‖² − Var/n``),
  ``snr = signal/Var``, ``cos_one = E cos(g, ∇D)``.

  Args:
    stats: a :class:`CellStats`.
    combos: the combos of ``stats``, in order.

  Returns:
    One dict per combo.
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
        norm_ratio=norm / ref_norm,
        cosine=float(mean @ ref) / max(norm * ref_norm, tiny),
        rel_err=float(np.linalg.norm(mean - ref)) / ref_norm,
        noise=float(np.sqrt(sampling_var / ref_norm**2 + stats.ref_stderr**2)),
        variance=var,
        signal=signal,
        snr=signal / var if var > 0 else float("inf"),
        cos_one=float(stats.cos_one[c])))
  return rows


def summarize(cell_stats: Sequence[CellStats], combos: tuple[Combo, ...]) -> list[dict]:
  """One row per combo, aggregated over the cells (:func:`summarize_metrics`).

  Args:
    cell_stats: from :func:`exact_diagnostics` or :func:`monte_carlo_diagnostics`.
    combos: their combos.

  Returns:
    List of dicts, in the order of ``combos``.
  """
  return summarize_metrics([cell_metrics(s, combos) for s in cell_stats])


def summarize_metrics(per_cell: Sequence[Sequence[dict]]) -> list[dict]:
  """Aggregates per-cell metrics (:func:`cell_metrics`) into one row per combo.

  Means over the cells, except: ``rel_err_max`` is the largest relative
  error; ``snr`` = mean ‖E g‖² / mean Var (a ratio of means: one
  near-deterministic cell with Var ≈ 0 would dominate a mean of ratios);
  ``var_ratio`` = mean variance / mean variance of ``trajectory`` (NaN when
  not evaluated); ``var_x_rollouts`` = variance × rollouts per estimate (the
  variance at equal rollout cost, in units of one rollout).

  Args:
    per_cell: for each cell, the list of combo metrics (same order per cell).

  Returns:
    List of dicts, one per combo.
  """
  rows = []
  for c, first in enumerate(per_cell[0]):
    cells = [m[c] for m in per_cell]
    avg = lambda k: float(np.mean([m[k] for m in cells]))  # noqa: E731
    variance = avg("variance")
    rows.append(dict(
        estimator=first["estimator"], baseline=first["baseline"],
        rollouts=first["rollouts"], norm_ratio=avg("norm_ratio"), cosine=avg("cosine"),
        rel_err=avg("rel_err"), rel_err_max=float(np.max([m["rel_err"] for m in cells])),
        noise=avg("noise"), variance=variance,
        var_x_rollouts=variance * first["rollouts"],
        snr=avg("signal") / variance if variance > 0 else float("inf"),
        cos_one=avg("cos_one")))
  traj = [r["variance"] for r in rows
          if r["estimator"] == est.TRAJECTORY and r["baseline"] == "none"]
  for r in rows:
    r["var_ratio"] = r["variance"] / traj[0] if traj and traj[0] > 0 else float("nan")
  return rows


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


# ----------------------------------------------------------------------------
# Models: a checkpoint or a fresh one.
# ----------------------------------------------------------------------------


def tiny_config():
  """A fresh model small enough for exact enumeration: A = 2, L = 3, K = 3.

  Effective vocabulary EOS + 2 content tokens, 15 possible outputs of L = 3;
  a 1-layer, d = 16 Transformer.
  """
  c = config_lib.base_config()
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
  c.seq_pg.rollout_len = 3
  return c


def restore_params(setup, workdir: str, step: Optional[int] = None):
  """Parameters of the newest (or ``step``'s) readable checkpoint in ``workdir``.

  Read-only: unlike a resumed run, a checkpoint that fails to restore is
  reported and skipped, never moved.

  Args:
    setup: ``train.build(config)`` of the run's config.
    workdir: the run.py workdir (holding ``checkpoints/``).
    step: a checkpoint step, or None for the newest that restores.

  Returns:
    (params, step).

  Raises:
    FileNotFoundError: no checkpoint (or not ``step``).
  """
  from latentdiv import checkpointing  # pylint: disable=import-outside-toplevel
  from latentdiv import train  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"No checkpoints/ in {workdir!r}.")
  c = setup.config.train
  manager = checkpointing.make_manager(ckpt_dir, c.keep_checkpoints, c.checkpoint_every)
  abstract = checkpointing.abstract_like(jax.eval_shape(lambda: train.init_state(setup)))
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint at step {step} in {ckpt_dir}; have {steps}.")
    steps = [step]
  for s in steps:
    try:
      restored = manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
    except Exception as err:  # pylint: disable=broad-except
      print(f"WARNING: checkpoint {s} in {ckpt_dir} does not restore "
            f"({type(err).__name__}); trying an older one.", flush=True)
      continue
    manager.close()
    # Plain host-backed arrays, like a fresh model's (restored arrays carry
    # Orbax's sharding, which would make every jitted function recompile).
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)),
                                    restored["state"].params)
    return params, s
  manager.close()
  raise FileNotFoundError(f"No checkpoint in {ckpt_dir} could be restored.")


def load(config=None, workdir: Optional[str] = None, step: Optional[int] = None,
         seed: int = 0):
  """The Setup and parameters to diagnose: a run's checkpoint or a fresh model.

  Args:
    config: a ConfigDict (ignored with ``workdir``); None = :func:`tiny_config`.
    workdir: a run.py workdir: its ``config.json`` and newest checkpoint.
    step: checkpoint step (with ``workdir``).
    seed: parameter seed of a fresh model (``config.seed`` is overridden).

  Returns:
    (setup, params, description string).
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  from latentdiv import train  # pylint: disable=import-outside-toplevel

  if workdir:
    with open(os.path.join(workdir, "config.json")) as f:
      config = ml_collections.ConfigDict(json.load(f))
    setup = train.build(config)
    params, restored = restore_params(setup, workdir, step)
    return setup, params, f"checkpoint {workdir} @ step {restored}"
  config = tiny_config() if config is None else config
  config = ml_collections.ConfigDict(config.to_dict())
  config.seed = seed
  setup = train.build(config)
  params = jax.jit(lambda: train.init_state(setup).params)()
  return setup, params, f"fresh model (seed {seed})"


def all_cells(batch_size: int, num_latents: int, num_pairs: int = 0,
              seed: int = 0) -> list[tuple[int, int, int]]:
  """(b, i, j) for every prompt and all ordered pairs (or ``num_pairs`` random ones)."""
  pairs = [(i, j) for i in range(num_latents) for j in range(num_latents) if i != j]
  if num_pairs:
    rng = np.random.default_rng(seed)
    pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), num_pairs, replace=False))]
  return [(b, i, j) for b in range(batch_size) for i, j in pairs]


def run(setup, params, *, mode: str = "auto", batch_size: int = 2, num_pairs: int = 0,
        rollout_len: Optional[int] = None, estimators: Sequence[str] = est.ALL_ESTIMATORS,
        baselines: Sequence[str] = BASELINES, num_samples: int = 512,
        num_reference: int = 4096, max_exact_sequences: int = 64, chunk: int = 32,
        precision: str = "auto", seed: int = 0) -> dict:
  """Every estimator × baseline on a batch: the whole diagnostic as a dict.

  Args:
    setup: ``train.build(config)``.
    params: model parameters.
    mode: ``exact`` (enumeration), ``mc`` (sampling) or ``auto`` (exact when
      the model has at most ``max_exact_sequences`` outputs of length L).
    batch_size: prompts drawn from the task (``fold_in(PRNGKey(seed), 4)``).
    num_pairs: ordered latent pairs per prompt (0 = all K(K−1)).
    rollout_len: L (default ``config.seq_pg.rollout_len``).
    estimators: estimator names (default: all, with ``per_token_reward``).
    baselines: baseline names.
    num_samples: MC rollouts per (prompt, latent) for the estimators.
    num_reference: MC rollouts per (prompt, latent) for the reference.
    max_exact_sequences: the ``auto`` threshold.
    chunk: items (pairs of rollouts) per compiled call.
    precision: ``float64`` / ``float32`` / ``auto`` (float64 for exact mode).
    seed: prompts and rollouts.

  Returns:
    dict with ``rows`` (:func:`summarize`), ``cells`` (per-cell metrics),
    ``mode``, ``precision``, settings and ``seconds``.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; allowed: {MODES}.")
  if precision not in PRECISIONS:
    raise ValueError(f"Unknown precision {precision!r}; allowed: {PRECISIONS}.")
  start = time.time()
  task, model = setup.task, setup.model
  length = rollout_len or setup.config.seq_pg.rollout_len
  if not 1 <= length <= task.target_len:
    raise ValueError(f"rollout_len must be in [1, {task.target_len}], got {length}.")
  count = num_exact_sequences(task.alphabet_size, length)
  if mode == "auto":
    mode = "exact" if count <= max_exact_sequences else "mc"
  if precision == "auto":
    precision = "float64" if mode == "exact" else "float32"
  combos = combinations(estimators, baselines)
  if not combos:
    raise ValueError(f"No combination of estimators {estimators} and baselines {baselines}.")
  key = jax.random.PRNGKey(seed)
  batch = task.sample(jax.random.fold_in(key, 4), batch_size)
  cells = all_cells(batch_size, model.config.num_latents, num_pairs, seed)
  with jax.enable_x64(precision == "float64"):
    if precision == "float64":
      model, params = to_float64(model, params)
    args = (model, params, batch.prompt, batch.target, batch.target_mask, cells, length,
            combos)
    if mode == "exact":
      stats = exact_diagnostics(*args, chunk=chunk)
    else:
      stats = monte_carlo_diagnostics(*args, key=jax.random.fold_in(key, 5),
                                      num_reference=num_reference,
                                      num_samples=num_samples, chunk=chunk)
    rows = summarize(stats, combos)
    cells_out = [dict(cell=list(s.cell), kl=s.kl, kl_stderr=s.kl_stderr,
                      ref_norm=float(jnp.linalg.norm(s.ref)), ref_stderr=s.ref_stderr,
                      combos=cell_metrics(s, combos)) for s in stats]
    num_params = int(_ravel(params).shape[0])
  return dict(mode=mode, precision=precision, rollout_len=length, batch_size=batch_size,
              num_cells=len(cells), num_outputs=count if mode == "exact" else None,
              num_samples=num_samples if mode == "mc" else None,
              num_reference=num_reference if mode == "mc" else None,
              num_params=num_params, rows=rows, cells=cells_out,
              seconds=time.time() - start)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def define_flags(flag_values=None):
  """Defines the command line's absl flags (only when run as a script, or in a test).

  Args:
    flag_values: an ``absl.flags.FlagValues`` (default: the global FLAGS).
  """
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
    ("enum", "mode", "auto", MODES, "exact: enumerate all outputs; mc: sample; auto: "
     "exact when there are at most --max_exact_sequences outputs."),
    ("integer", "max_exact_sequences", 64, "Threshold of --mode=auto."),
    ("integer", "batch_size", 2, "Prompts."),
    ("integer", "num_pairs", 0, "Ordered latent pairs per prompt (0 = all K(K-1))."),
    ("integer", "rollout_len", None, "L (default: config.seq_pg.rollout_len)."),
    ("list", "estimators", list(est.ALL_ESTIMATORS), "Estimators."),
    ("list", "baselines", list(BASELINES), "Baselines."),
    ("integer", "num_samples", 512, "MC: rollouts per (prompt, latent) for the "
     "estimators (leave_one_out pairs consecutive ones)."),
    ("integer", "num_reference", 4096, "MC: rollouts per (prompt, latent) for the "
     "rao_blackwell reference."),
    ("integer", "chunk", 32, "Items (pairs of rollouts) per compiled call."),
    ("enum", "precision", "auto", PRECISIONS, "auto: float64 in exact mode, else float32."),
    ("integer", "seed", 0, "Prompts, rollouts and a fresh model's parameters."),
    ("string", "output_dir", None, "Where estimator_variance.{md,json,png} go (default: "
     "WORKDIR/estimator_variance, or workdir/estimator_variance)."),
)


def main(argv, flag_values=None):
  """Runs the diagnostic with the flags of :func:`define_flags` and writes the report.

  Args:
    argv: leftover command-line arguments (none allowed).
    flag_values: parsed ``FlagValues`` (default: the global FLAGS).
  """
  from absl import app  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS if flag_values is None else flag_values
  try:
    setup, params, source = load(f.config, f.workdir, f.checkpoint_step, f.seed)
    result = run(setup, params, mode=f.mode, batch_size=f.batch_size,
                 num_pairs=f.num_pairs, rollout_len=f.rollout_len,
                 estimators=f.estimators, baselines=f.baselines,
                 num_samples=f.num_samples, num_reference=f.num_reference,
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
