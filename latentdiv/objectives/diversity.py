"""The latent-diversity objective: reconstruction, token JSD and the sequence-level term.

For a batch of data ``(x, y*)`` and the K latents of ``p_θ(y | x, z)``::

    loss = L_rec − λ_jsd · Ĵ − w_seq(step) · D̂_seq          (DESIGN.md §3–5)

* ``L_rec`` — hard-EM, soft-EM, relaxed winner-take-all or annealed EM over
  the K per-latent log-likelihood terms (``latentdiv.reconstruction``; the
  last two keep every latent on the data, DESIGN.md §5.7). What they score is ``objective.targets``
  (DESIGN.md §3, §8): the data y* (maximum likelihood), token-level
  label-smoothed targets, or RAML samples ``y ~ q(y | y*; τ)`` drawn inside the
  jitted step (``latentdiv.raml``).
* ``Ĵ`` — the token-weighted JSD between the K latents' next-token
  distributions under teacher forcing on y* (``divergences.token_jsd``).
* ``D̂_seq`` — the sequence-level inter-latent KL (``kind='kl'``) or the
  bounded mutual information I(Z; Y | x) (``kind='mi'``) from prefix
  rollouts, maximised with a policy-gradient estimator
  (``latentdiv.sequence_term``), weighted 0 for ``warmup_steps`` and ramped
  linearly to its weight.

Evaluation samples one output per (example, latent) on a fixed evaluation
batch and reports strategy coverage, validity per latent, latent↔strategy
NMI, usage, dead latents, the Monte-Carlo sequence KL between latents and
mutual information, token JSD, NLL, and the transduction metrics (greedy
exact match, edit distance, KL(q ‖ p)).

Config: ``config.objective`` with ``name = 'diversity'`` (:func:`default_config`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latentdiv import baselines
from latentdiv import config as config_lib
from latentdiv import divergences
from latentdiv import estimators
from latentdiv import logprobs
from latentdiv import metrics as metrics_lib
from latentdiv import model as model_lib
from latentdiv import payoff
from latentdiv import edits
from latentdiv import raml
from latentdiv import reconstruction
from latentdiv import sampling
from latentdiv import sequence_term
from latentdiv import sharding
from latentdiv import train
from latentdiv import text_data
from latentdiv import text_metrics
from latentdiv import vocab

TARGETS = ("data", "label_smoothing", "raml")
# The multi-reference metrics of text tasks (latentdiv.text_metrics), on the held-out set.
TEXT_METRICS = ("pairwise_bleu", "references_covered", "multi_reference_bleu",
                "leave_one_out_bleu")
# Metrics evaluation also reports on the training slice of a finite training set.
TRAIN_SET_METRICS = ("nll", "exact_match", "edit_distance", "validity", "coverage",
                     "kl_payoff_to_model")


def default_config() -> ml_collections.ConfigDict:
  """The ``objective`` section of the diversity objective, with its defaults."""
  o = ml_collections.ConfigDict()
  o.name = "diversity"
  o.reconstruction = "hard_em"  # one of reconstruction.RECONSTRUCTION_KINDS.
  o.wta_epsilon = 0.05  # relaxed_wta: the non-winners' share of an example.
  o.anneal_steps = 200  # annealed_em: steps from soft-EM (tau = 1) to hard-EM (tau = 0).
  o.lambda_jsd = 0.1
  o.jsd_weighting = "uniform"  # one of divergences.WEIGHTINGS.
  o.jsd_prefix_len = 4  # the 'prefix' weighting's L.
  # The 'divergence' weighting's softmax temperature over positions (not a
  # temperature of the model's logits).
  o.jsd_weight_temperature = 0.1
  # What the reconstruction term scores: the data y* ('data', maximum likelihood),
  # token-level label-smoothed targets, or RAML samples y ~ q(y | y*; tau) (DESIGN §8).
  o.targets = "data"

  # Label smoothing and RAML (used when targets is one of them).
  o.raml = ml_collections.ConfigDict()
  o.raml.epsilon = 0.1  # label smoothing weight of the uniform prior over content tokens.
  o.raml.tau = 0.8  # payoff temperature.
  o.raml.convention = "rescaled"  # 'rescaled' is what the paper's tau values mean.
  # 'hamming' (exact sampler), 'edit' (approximate sampler), or a reward with no exact
  # sampler through self-normalised importance sampling with the Hamming proposal:
  # 'edit_is' (the exact edit distance), 'bleu_is' (sentence BLEU) (DESIGN §8.4).
  o.raml.reward = "hamming"
  o.raml.num_samples = 4  # N samples per example, drawn inside the jitted step.
  o.raml.proposal_tau = 0.0  # '*_is' rewards: the Hamming proposal's tau (0 = raml.tau).

  # The sequence-level term (DESIGN §5); off when weight = 0.
  s = o.sequence_term = ml_collections.ConfigDict()
  s.weight = 0.0
  s.kind = "kl"  # one of sequence_term.KINDS: 'kl' (pairwise, unbounded) or 'mi' (bounded).
  s.pathwise = False  # 'mi' only: keep the pathwise term through the mixture.
  s.estimator = "rao_blackwell"  # one of estimators.ESTIMATORS.
  s.baseline = "none"  # one of baselines.BASELINES.
  s.rollout_len = 4  # L
  s.num_rollouts = 1  # N per (example, latent); leave_one_out needs N >= 2.
  s.num_pairs = 0  # ordered pairs per example; 0 = all K(K-1).
  s.warmup_steps = 0
  s.ramp_steps = 0
  s.ema_decay = 0.9  # for the 'ema' baseline and the JSD control-variate fit.
  return o


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks ``config.objective`` (and its cross-field constraints with ``config.model``).

  Raises:
    ValueError: naming the first invalid field, its value and what is allowed.
  """
  for path in ("objective.jsd_prefix_len", "objective.raml.num_samples",
               "objective.sequence_term.rollout_len", "objective.sequence_term.num_rollouts"):
    config_lib.positive_int(config, path)
  for path in ("objective.lambda_jsd", "objective.sequence_term.weight"):
    config_lib.non_negative(config, path)
  for path in ("objective.sequence_term.warmup_steps", "objective.sequence_term.ramp_steps",
               "objective.sequence_term.num_pairs", "objective.anneal_steps"):
    config_lib.non_negative(config, path, kind=int)
  config_lib.one_of(config, "objective.reconstruction", reconstruction.RECONSTRUCTION_KINDS)
  config_lib.one_of(config, "objective.jsd_weighting", divergences.WEIGHTINGS)
  config_lib.one_of(config, "objective.targets", TARGETS)
  config_lib.one_of(config, "objective.raml.convention", raml.CONVENTIONS)
  config_lib.one_of(config, "objective.raml.reward", raml.REWARDS + raml.IMPORTANCE_REWARDS)
  config_lib.non_negative(config, "objective.raml.proposal_tau")
  config_lib.one_of(config, "objective.sequence_term.kind", sequence_term.KINDS)
  config_lib.one_of(config, "objective.sequence_term.estimator", estimators.ESTIMATORS)
  config_lib.one_of(config, "objective.sequence_term.baseline", baselines.BASELINES)
  config_lib.in_range(config, "objective.raml.epsilon", 0, 1)
  config_lib.finite_number(config, "objective.raml.tau")
  if not config.objective.raml.tau > 0:
    raise ValueError(f"config.objective.raml.tau must be > 0, got {config.objective.raml.tau!r}.")
  config_lib.finite_number(config, "objective.jsd_weight_temperature")
  if not config.objective.jsd_weight_temperature > 0:
    raise ValueError("config.objective.jsd_weight_temperature must be > 0, got "
                     f"{config.objective.jsd_weight_temperature!r}.")
  config_lib.in_range(config, "objective.sequence_term.ema_decay", 0, 1, closed_high=False)
  config_lib.in_range(config, "objective.wta_epsilon", 0, 1, closed_high=False)
  config_lib.boolean(config, "objective.sequence_term.pathwise")
  o, s = config.objective, config.objective.sequence_term
  k = config.model.num_latents
  if k < 2 and (o.lambda_jsd > 0 or s.weight > 0):
    raise ValueError(
        f"config.model.num_latents (K) must be >= 2 when a divergence term is on "
        f"(objective.lambda_jsd > 0 or objective.sequence_term.weight > 0), got {k}.")
  if s.kind == "mi" and s.num_pairs:
    raise ValueError(
        "config.objective.sequence_term.num_pairs must be 0 with kind 'mi' (the mutual "
        f"information uses every latent; pairs apply to 'kl'), got {s.num_pairs}.")
  if s.num_pairs > k * (k - 1):
    raise ValueError(
        f"config.objective.sequence_term.num_pairs must be in [0, K(K-1) = {k * (k - 1)}], "
        f"got {s.num_pairs}.")
  if s.baseline == "leave_one_out" and s.num_rollouts < 2:
    raise ValueError(
        "config.objective.sequence_term.num_rollouts must be >= 2 with baseline "
        f"'leave_one_out', got {s.num_rollouts}.")
  if s.baseline != "none" and s.estimator not in estimators.BASELINED_ESTIMATORS:
    raise ValueError(
        f"config.objective.sequence_term.baseline={s.baseline!r} needs an estimator that "
        f"takes a baseline: config.objective.sequence_term.estimator must be one of "
        f"{estimators.BASELINED_ESTIMATORS}, got {s.estimator!r}.")
  if s.estimator.endswith("_baseline") and s.baseline == "none":
    raise ValueError(
        f"config.objective.sequence_term.estimator={s.estimator!r} needs a baseline: "
        f"config.objective.sequence_term.baseline must be one of {baselines.BASELINES[1:]}, "
        "got 'none'.")


def _loglik_BxK(logits_BxKxTxV, target_BxT, mask_BxT):
  return jax.vmap(jax.vmap(logprobs.sequence_log_likelihood, (0, None, None)))(
      logits_BxKxTxV, target_BxT, mask_BxT)


class Diversity(train.Objective):
  """Reconstruction − λ_jsd · token JSD − w_seq · sequence-level KL (DESIGN.md §3–5)."""

  name = "diversity"
  structural_fields = ("objective.sequence_term.baseline", "objective.sequence_term.rollout_len")
  default_config = staticmethod(default_config)
  validate = staticmethod(validate)

  def __init__(self, setup: train.Setup):
    super().__init__(setup)
    t_len = setup.task.target_len
    o = self.config.objective
    for path, value in (("objective.sequence_term.rollout_len", o.sequence_term.rollout_len),
                        ("objective.jsd_prefix_len", o.jsd_prefix_len)):
      if value > t_len:
        raise ValueError(f"config.{path} must be in [1, {t_len}] (the task's target "
                         f"length), got {value}.")
    s = o.sequence_term
    self.use_sequence_term = s.weight > 0
    self.settings = sequence_term.Settings(
        estimator=s.estimator, baseline=s.baseline, rollout_len=s.rollout_len,
        num_rollouts=s.num_rollouts, num_pairs=s.num_pairs, ema_decay=s.ema_decay,
        kind=s.kind, pathwise=s.pathwise)

  @classmethod
  def structure(cls, record: dict) -> dict:
    # Only whether the term is on changes the state (its estimator state).
    weight = record.get("objective", {}).get("sequence_term", {}).get("weight")
    return dict(super().structure(record),
                **{"objective.sequence_term.weight > 0": weight is not None and weight > 0})

  def content_alphabet(self) -> tuple[int, int]:
    """The id range ``[lo, hi)`` of content tokens (what RAML samplers may write)."""
    return vocab.FIRST_CONTENT, self.setup.task.vocab_size

  def latent_logits(self, params, prompt_BxP, target_BxT) -> jax.Array:
    """Teacher-forced logits of every latent, [B, K, T, V], in one pass vmapped over K."""
    batch = prompt_BxP.shape[0]
    model = self.setup.model

    def one(latent):
      return model_lib.teacher_forced_logits(model, params, prompt_BxP, target_BxT,
                                             jnp.full((batch,), latent, jnp.int32))

    return jax.vmap(one, out_axes=1)(jnp.arange(model.config.num_latents))

  def reconstruction_loglik(self, params, batch, logits_BxKxTxV, key):
    """The [B, K] per-latent log-likelihood terms the reconstruction loss is built from.

    ``objective.targets`` chooses what they score (DESIGN.md §3, §8):
    ``data``: ``log p_k(y* | x)``; ``label_smoothing``:
    ``−CE((1−ε)·onehot(y*) + ε·π, p_k)`` summed over tokens; ``raml``:
    ``(1/N) Σ_n log p_k(y⁽ⁿ⁾ | x)`` with ``y⁽ⁿ⁾ ~ q(· | y*; τ)`` drawn here, or
    ``Σ_n w_n log p_k(y⁽ⁿ⁾ | x)`` with self-normalised importance weights for
    the ``*_is`` rewards (``raml.raml_loss`` either way).

    Returns:
      ``(loglik [B, K], metrics)``; metrics has ``is_ess`` (mean Kish
      effective sample size per example, out of N) for the ``*_is`` rewards.
    """
    o, r = self.config.objective, self.config.objective.raml
    if o.targets == "data" or key is None:
      return _loglik_BxK(logits_BxKxTxV, batch.target, batch.target_mask), {}
    if o.targets == "label_smoothing":
      smoothed = functools.partial(raml.label_smoothing_loss, epsilon=r.epsilon,
                                   prior="uniform", alphabet=self.content_alphabet())
      return -jax.vmap(jax.vmap(smoothed, (0, None, None)))(
          logits_BxKxTxV, batch.target, batch.target_mask), {}
    editable = logprobs.content_mask(batch.target)
    weights, metrics = None, {}
    if r.reward in raml.IMPORTANCE_REWARDS:
      drawn = raml.sample_importance_targets(
          key, batch.target, editable, r.num_samples, self.content_alphabet(), r.tau,
          r.convention, r.reward, proposal_tau=r.proposal_tau or r.tau)
      samples, weights = drawn.tokens, drawn.weights
      metrics["is_ess"] = jnp.mean(drawn.ess)
    else:
      samples = raml.sample_raml_targets(
          key, batch.target, editable, r.num_samples, self.content_alphabet(), r.tau,
          r.convention, reward=r.reward).tokens  # [B, N, T]
    batch_size, num_samples, t_len = samples.shape
    flat = samples.reshape(batch_size * num_samples, t_len)
    logits = self.latent_logits(params, jnp.repeat(batch.prompt, num_samples, axis=0), flat)
    loglik_BxNxK = _loglik_BxK(logits, flat, logprobs.output_mask(flat)).reshape(
        batch_size, num_samples, -1)
    per_latent = jax.vmap(raml.raml_loss, (1, None))  # over K: [N, K] -> [K]
    if weights is None:
      return -jax.vmap(lambda ll: per_latent(ll, None))(loglik_BxNxK), metrics
    return -jax.vmap(per_latent)(loglik_BxNxK, weights), metrics

  def teacher_forced_terms(self, params, batch, key=None, step=None):
    """Reconstruction and token-JSD terms on a batch (DESIGN.md §3–4, §5.7, §8).

    ``step`` sets the annealed-EM temperature (None: the end of the schedule).

    Returns:
      (data logits [B, K, T, V], ``ReconstructionOutput``, ``TokenJSD``
      batched, NLL per token of the best latent on the data, the metrics of
      ``reconstruction_loglik``).
    """
    o = self.config.objective
    logits_BxKxTxV = self.latent_logits(params, batch.prompt, batch.target)
    data_loglik = _loglik_BxK(logits_BxKxTxV, batch.target, batch.target_mask)
    loglik_BxK, target_metrics = (
        (data_loglik, {}) if o.targets == "data" or key is None
        else self.reconstruction_loglik(params, batch, logits_BxKxTxV, key))
    temperature = (0.0 if step is None
                   else reconstruction.annealing_temperature(step, o.anneal_steps))
    rec = reconstruction.reconstruction_loss(o.reconstruction, loglik_BxK,
                                             epsilon=o.wta_epsilon, temperature=temperature)
    # jsd_prefix_len belongs to the 'prefix' weighting only ('uniform' is over
    # all valid tokens).
    prefix_len = o.jsd_prefix_len if o.jsd_weighting == "prefix" else None
    jsd_fn = functools.partial(divergences.token_jsd, weighting=o.jsd_weighting,
                               prefix_len=prefix_len,
                               weight_temperature=o.jsd_weight_temperature)
    jsd = jax.vmap(jsd_fn)(logits_BxKxTxV, batch.target_mask)
    num_tokens = jnp.maximum(jnp.sum(batch.target_mask), 1)
    best_nll = -jnp.sum(jnp.max(data_loglik, axis=1)) / num_tokens
    return logits_BxKxTxV, rec, jsd, best_nll, target_metrics

  def init_extra(self) -> dict:
    return sequence_term.init_state(self.settings) if self.use_sequence_term else {}

  def loss(self, params, frozen, extra, batch, key, step):
    o = self.config.objective
    raml_key, key = jax.random.split(key)
    logits, rec, jsd, best_nll, target_metrics = self.teacher_forced_terms(params, batch,
                                                                           raml_key, step)
    token_jsd = jnp.mean(jsd.value)
    loss = rec.loss - o.lambda_jsd * token_jsd
    aux = dict(rec_loss=rec.loss, token_jsd=token_jsd, nll_per_token=best_nll,
               **target_metrics, **{f"usage/{k}": u for k, u in enumerate(rec.usage)})
    new_extra = extra
    if self.use_sequence_term:
      s = o.sequence_term
      weight = sequence_term.weight_at(step, s.weight, s.warmup_steps, s.ramp_steps)
      term = sequence_term.sequence_term(
          self.setup.model, params, batch.prompt, key, extra, self.settings,
          jax.lax.stop_gradient(logits), batch.target_mask)
      loss = loss + weight * term.surrogate
      aux.update(term.metrics, seq_weight=weight)
      new_extra = term.extra
    return loss, (aux, new_extra)

  def make_evaluate(self, mesh=None):
    """The ``evaluate(params, frozen) -> metrics`` on the held-out set (``setup.data.heldout``).

    Samples one output per (example, latent) at temperature 1 (or greedily with
    ``config.eval.greedy``), matches them against the hidden strategies' valid
    outputs, and scores the teacher-forced terms on the batch. With a finite
    training set the same jitted program also scores a fixed slice of the
    training set (``setup.data.train_eval``, as many rows as the held-out
    set), reported as ``train_<metric>`` for ``TRAIN_SET_METRICS``.
    """
    config, task, model = self.config, self.setup.task, self.setup.model
    ekey = train.eval_key(config)
    eval_batch = self.setup.data.heldout
    text = self.setup.data.text
    num_latents = model.config.num_latents
    r = config.objective.raml

    @jax.jit
    def evaluate(params, batch, eval_key):
      if mesh is not None:
        batch = sharding.constrain_batch(batch, mesh)
      rollout = sampling.sample_latents(model, params, batch.prompt,
                                        jax.random.fold_in(eval_key, 1), task.target_len,
                                        greedy=config.eval.greedy)
      matches = metrics_lib.match_strategies(rollout.tokens, batch.valid_outputs)
      coverage = metrics_lib.strategy_coverage(matches, task.num_strategies)
      _, rec, jsd, best_nll, _ = self.teacher_forced_terms(params, batch)
      # Monte-Carlo sequence KL between latents on the samples (DESIGN §9).
      logits = sampling.score_latents(model, params, batch.prompt, rollout.tokens)
      tokens = jnp.broadcast_to(rollout.tokens[:, :, None], logits.shape[:-1])
      logp = logprobs.token_log_probs(logits, tokens)
      kl = metrics_lib.mc_sequence_kl(logp, rollout.mask)
      mi, mi_stderr = metrics_lib.mc_mutual_information(logp, rollout.mask)
      validity = metrics_lib.per_latent_validity(matches)
      usage = metrics_lib.latent_usage(rec.winners, num_latents)
      # Transduction metrics (DESIGN §9): greedy decodes of the best latent on the data.
      greedy = sampling.sample_latents(model, params, batch.prompt, eval_key,
                                       task.target_len, greedy=True)
      decoded = jnp.take_along_axis(greedy.tokens, rec.winners[:, None, None], axis=1)[:, 0]
      content_len = lambda y: jnp.sum(logprobs.content_mask(y))  # noqa: E731
      distance = jax.vmap(
          lambda a, b: edits.edit_distance(a, content_len(a), b, content_len(b)))(
              decoded, batch.target)
      # KL(q || p) of the payoff distribution to the model (RAML's distillation view).
      editable = logprobs.content_mask(batch.target)
      alphabet = self.content_alphabet()
      q_samples = raml.sample_raml_targets(jax.random.fold_in(eval_key, 2), batch.target,
                                           editable, 4, alphabet, r.tau, r.convention).tokens
      log_q = jax.vmap(jax.vmap(payoff.hamming_log_prob, (0, None, None, None, None, None)),
                       (0, 0, 0, None, None, None))(q_samples, batch.target, editable,
                                                    alphabet, r.tau, r.convention)
      n = q_samples.shape[1]
      q_flat = q_samples.reshape((-1, q_samples.shape[-1]))
      q_logits = model_lib.teacher_forced_logits(
          model, params, jnp.repeat(batch.prompt, n, axis=0), q_flat,
          jnp.repeat(rec.winners, n, axis=0))
      log_p = jax.vmap(logprobs.sequence_log_likelihood)(
          q_logits, q_flat, logprobs.output_mask(q_flat)).reshape(log_q.shape)
      return dict(
          exact_match=jnp.mean(metrics_lib.exact_match(decoded, batch.target)),
          edit_distance=jnp.mean(distance),
          kl_payoff_to_model=jnp.mean(log_q - log_p),
          validity=validity,
          coverage=coverage.coverage,
          per_example_coverage=metrics_lib.per_example_coverage(matches, task.num_strategies),
          assignment=coverage.assignment,
          nmi=metrics_lib.latent_strategy_nmi(matches, task.num_strategies),
          confusion=metrics_lib.confusion(matches, task.num_strategies),
          latent_usage=usage,
          dead_latents=metrics_lib.dead_latents(usage, validity),
          seq_mi=mi,
          seq_mi_stderr=mi_stderr,
          token_jsd=jnp.mean(jsd.value),
          nll=best_nll,
          seq_kl=kl.mean,
          seq_kl_stderr=kl.stderr,
          samples=rollout.tokens[:4],
          **({"greedy_tokens": greedy.tokens} if text is not None else {}),
      )

    bound = train.BoundJit(evaluate, eval_batch, ekey)
    train_slice = self.setup.data.train_eval
    on_train = None if train_slice is None else train.BoundJit(evaluate, train_slice, ekey)

    def run(params, frozen=()):  # pylint: disable=unused-argument
      result = bound(params)
      if on_train is not None:
        train_result = on_train(params)
        result.update({f"train_{k}": train_result[k] for k in TRAIN_SET_METRICS})
      if text is not None:  # Multi-reference metrics of the greedy output of every latent.
        tokens = np.asarray(jax.device_get(result.pop("greedy_tokens")))
        hyps = [[text.tokenizer.decode(t) for t in row] for row in tokens]
        result.update(text_metrics.diversity_report(hyps, text.references, text.bleu_tokenize))
      return result

    run.eval_batch, run.bound = eval_batch, bound
    return run

  def train_line(self, aux):
    """The objective's value ``L_rec − λ·Ĵ − w·D̂`` and its terms (the surrogate's value is not shown)."""
    o = self.config.objective
    value = aux["rec_loss"] - o.lambda_jsd * aux["token_jsd"]
    line = f"rec {aux['rec_loss']:.4f}  jsd {aux['token_jsd']:.4f}"
    if "seq_kl" in aux:
      value -= aux.get("seq_weight", 0.0) * aux["seq_kl"]
      line += f"  seq_kl {aux['seq_kl']:.3f} (w {aux.get('seq_weight', 0.0):.3g})"
    if "seq_mi" in aux:
      value -= aux.get("seq_weight", 0.0) * aux["seq_mi"]
      line += f"  seq_mi {aux['seq_mi']:.3f} (w {aux.get('seq_weight', 0.0):.3g})"
    return f"objective {value:.4f}  {line}  lr {aux.get('learning_rate', float('nan')):.2e}"

  def _strategy_task(self) -> bool:
    """Hidden strategies (or a text task's references) to cover."""
    return self.config.task.name != "transduction"

  def _transduction_task(self) -> bool:
    """One reference per output position: exact match and edit distance mean something."""
    return self.config.task.name in ("transduction", text_data.NAME)

  def eval_line(self, result):
    parts = [f"validity {[round(v, 3) for v in result['validity']]}"]
    if self._strategy_task():
      parts.insert(0, f"coverage {result['coverage']:.2f} "
                      f"({result['per_example_coverage']:.3f} per example)")
    if self._transduction_task():
      parts += [f"exact match {result['exact_match']:.3f}",
                f"edit distance {result['edit_distance']:.3f}"]
    if self.config.model.num_latents > 1:
      if self._strategy_task():
        parts.append(f"nmi {result['nmi']:.3f}")
      parts.append(f"usage {[round(v, 2) for v in result['latent_usage']]}")
      parts.append(f"dead {result['dead_latents']}")
    parts.append(f"nll {result['nll']:.4f}")
    return "  ".join(parts)

  def summary(self, state, result, seconds_per_step):
    """``summary.json``: the metrics that mean something for this task and K.

    Strategy tasks: coverage, assignment, confusion; transduction: exact
    match, edit distance, KL(q ‖ p); K ≥ 2: the between-latent quantities
    (NMI on strategy tasks, usage, dead latents, token JSD, sequence KL and
    mutual information). Always: steps,
    non-finite steps, task, K, validity, NLL.
    """
    # (The step time stays out of this summary: equal runs have equal summaries.)
    keys = ["validity", "nll"]
    if self._strategy_task():
      keys += ["coverage", "per_example_coverage", "assignment", "confusion"]
    if self._transduction_task():
      keys += ["exact_match", "edit_distance", "kl_payoff_to_model"]
    if self.config.model.num_latents > 1:
      keys += ["latent_usage", "dead_latents", "token_jsd", "seq_kl", "seq_kl_stderr",
               "seq_mi", "seq_mi_stderr"]
      keys += ["nmi"] if self._strategy_task() else []
    keys += [k for k in result if k.startswith("train_") or k in TEXT_METRICS]
    return dict(steps=int(state.step), nonfinite_steps=int(state.nonfinite_total),
                task=self.config.task.name, num_latents=self.config.model.num_latents,
                **{k: result[k] for k in keys})

  @classmethod
  def format_summary(cls, summary: dict) -> str:
    """The lines of the keys present (``summary`` chose them by task and K)."""
    lines = [f"Finished {summary['steps']} steps on '{summary['task']}'."]
    if "coverage" in summary:
      lines.append(f"  strategy coverage : {summary['coverage']:.2f}   per example: "
                   f"{summary['per_example_coverage']:.3f}")
    lines.append("  validity per latent: " + ", ".join(f"{v:.1%}" for v in summary["validity"]))
    if "coverage" in summary and len(summary["validity"]) > 1:
      lines.append("  latent -> strategy : " + ", ".join(
          f"z={k}->s={s}" if s >= 0 else f"z={k}->none"
          for k, s in enumerate(summary["assignment"])))
    if "latent_usage" in summary:
      lines.append("  latent usage       : "
                   + ", ".join(f"{u:.2f}" for u in summary["latent_usage"]))
      lines.append(f"  dead latents       : {summary['dead_latents']} "
                   "(usage 0 or validity < 50%)")
    if "nmi" in summary:
      lines.append(f"  latent/strategy NMI: {summary['nmi']:.3f}")
    if "seq_kl" in summary:
      lines.append(f"  sequence KL between latents (MC): {summary['seq_kl']:.3f} "
                   f"± {summary['seq_kl_stderr']:.3f}")
      lines.append(f"  mutual information I(Z; Y | x) (MC): {summary['seq_mi']:.3f} "
                   f"± {summary['seq_mi_stderr']:.3f} nats (at most log K = "
                   f"{math.log(len(summary['validity'])):.3f})")
      lines.append(f"  token JSD: {summary['token_jsd']:.4f}   NLL/token: {summary['nll']:.4f}")
    else:
      lines.append(f"  NLL/token: {summary['nll']:.4f}")
    if "exact_match" in summary:
      lines.append(f"  greedy exact match: {summary['exact_match']:.1%}   mean edit "
                   f"distance: {summary['edit_distance']:.3f}   KL(q || p): "
                   f"{summary['kl_payoff_to_model']:.3f}")
    if "train_nll" in summary:
      if "exact_match" in summary:
        lines.append(f"  training set: NLL/token {summary['train_nll']:.4f}, greedy exact match "
                     f"{summary['train_exact_match']:.1%} (held-out: {summary['nll']:.4f}, "
                     f"{summary['exact_match']:.1%})")
      else:
        lines.append(f"  training set: NLL/token {summary['train_nll']:.4f} (held-out: "
                     f"{summary['nll']:.4f})")
    if "references_covered" in summary:
      lines.append(f"  greedy output of each latent vs the references: pairwise BLEU "
                   f"{summary['pairwise_bleu']:.1f}, references covered "
                   f"{summary['references_covered']:.2f}, multi-reference BLEU "
                   f"{summary['multi_reference_bleu']:.1f} (leave-one-out "
                   f"{summary['leave_one_out_bleu']:.1f})")
    return "\n".join(lines)

