"""RAML vs maximum likelihood on the rewarded transduction task (DESIGN.md §8–9; Norouzi et al. 2016).

    python run.py --config=experiments/configs/raml.py --workdir=workdir/raml/ml
    python run.py --config=experiments/configs/raml.py:ls,0.1 --workdir=workdir/raml/ls_0.1
    python run.py --config=experiments/configs/raml.py:hamming,0.8 --workdir=workdir/raml/h_0.8
    python run.py --config=experiments/configs/raml.py:edit,0.8 --workdir=workdir/raml/e_0.8

``python experiments/raml_compare.py`` trains every arm (ML, label smoothing
over an ε grid, RAML over a τ grid with the Hamming and the edit-distance
payoff) with three seeds and writes the table and the plot of
``docs/RESULTS.md`` ("RAML vs maximum likelihood").

The task: ``transduction`` with ``transform="reverse"`` — the input is
``n ~ U{4..12}`` symbols of an alphabet of A = 10, the reference is the input
reversed, then EOS (T = 13). Outputs have variable length, so an almost-right
decode (one symbol wrong, or one dropped) earns partial credit under the
edit-distance reward, and exact match is far from free for this model in this
budget: a 2-layer, d_model = 32 Transformer, batch 32, 300 steps of AdamW
(lr 3e-3, cosine). One latent (K = 1) and no divergence term (λ_jsd = 0): this
is plain conditional sequence modelling, the setting of Norouzi et al. (2016).

The argument after the colon picks the arm (default: maximum likelihood):

* ``ml`` — ``objective.targets = "data"``;
* ``ls,EPS`` — token-level label smoothing, uniform prior over the content
  tokens, weight ε = EPS;
* ``hamming,TAU`` / ``edit,TAU`` — RAML with N = ``raml.num_samples`` samples
  per example from the Hamming (exact) or edit-distance (approximate) payoff
  distribution at temperature τ = TAU;
* ``hamming_exact,TAU`` — the Hamming payoff with τ in the ``"exact"``
  convention (``q ∝ exp(−d_H/τ)``);
* ``edit_is,TAU`` — the exact edit-distance reward ``q ∝ exp(−d_E/τ_eff)``
  by self-normalised importance sampling with the Hamming proposal
  (``raml.reward = "edit_is"``, N = ``IS_SAMPLES`` weighted samples);
* ``hamming_n4,TAU`` — ``hamming,TAU`` with N = ``IS_SAMPLES`` samples (the
  control of ``edit_is``: the same proposals with uniform weights).

τ follows the ``"rescaled"`` convention of the public implementations (the
one the paper's τ = 0.6–0.95 refer to), except in ``hamming_exact``: with
V' = 10 content tokens it is the
exact payoff distribution at ``τ_eff = τ / (1 + ln 9) ≈ τ / 3.2``; the
per-token substitution probability of the Hamming sampler is 0.04, 0.14 and
0.24 at τ = 0.6, 0.8 and 0.95.
"""

from __future__ import annotations

from latentdiv import objectives

ARM_KINDS = ("ml", "ls", "hamming", "hamming_exact", "hamming_n4", "edit", "edit_is")
KIND_LABELS = {"ml": "maximum likelihood", "ls": "label smoothing",
               "hamming": "RAML, Hamming", "edit": "RAML, edit distance",
               "hamming_exact": "RAML, Hamming (exact convention)",
               "hamming_n4": "RAML, Hamming, 4 samples",
               "edit_is": "RAML, exact edit distance by IS"}
IS_SAMPLES = 4  # Samples per example of the importance-sampled arms (weights need N > 1).


def get_config(arm: str = "ml"):
  """The config of one arm: ``"ml"``, ``"ls,EPS"``, ``"hamming,TAU"`` or ``"edit,TAU"``."""
  config = objectives.base_config()
  config.task.name = "transduction"
  config.task.transform = "reverse"
  config.task.prompt_len = 12
  config.task.min_len = 4
  config.task.alphabet_size = 10
  config.task.num_strategies = 1

  config.model.num_latents = 1
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.num_layers = 2
  config.model.d_ff = 64

  config.objective.reconstruction = "hard_em"  # With K = 1: maximum likelihood.
  config.objective.lambda_jsd = 0.0
  config.objective.jsd_prefix_len = 1
  config.objective.sequence_term.weight = 0.0
  config.objective.sequence_term.rollout_len = 1

  config.objective.raml.convention = "rescaled"
  config.objective.raml.num_samples = 4
  config.objective.raml.tau = 0.8  # Also the τ of the summary's KL(q || p) for ML and LS arms.

  config.optim.learning_rate = 3e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 40
  config.train.batch_size = 32
  config.train.num_steps = 300
  config.train.log_every = 50
  config.train.eval_every = 100000  # Evaluate once, at the end.
  config.train.checkpoint_every = 300  # One checkpoint, at the end.
  config.train.keep_checkpoints = 1
  config.eval.batch_size = 512
  return apply_arm(config, arm)


def parse_arm(arm: str) -> tuple[str, float | None]:
  """``"hamming,0.8"`` -> ``("hamming", 0.8)``; ``"ml"`` -> ``("ml", None)``.

  Raises:
    ValueError: an unknown kind, or a value missing, extra or not a number.
  """
  parts = [p.strip() for p in str(arm).split(",")]
  kind = parts[0]
  if kind not in ARM_KINDS:
    raise ValueError(f"arm must start with one of {ARM_KINDS}, got {arm!r}.")
  if kind == "ml":
    if len(parts) != 1:
      raise ValueError(f"arm 'ml' takes no value, got {arm!r}.")
    return kind, None
  if len(parts) != 2:
    raise ValueError(f"arm {kind!r} needs one value ('{kind},VALUE'), got {arm!r}.")
  return kind, float(parts[1])


def apply_arm(config, arm: str):
  """Sets ``objective.targets`` and ε or τ on ``config`` for ``arm`` (see the module docstring)."""
  kind, value = parse_arm(arm)
  if kind == "ml":
    config.objective.targets = "data"
  elif kind == "ls":
    config.objective.targets = "label_smoothing"
    config.objective.raml.epsilon = value
  else:
    config.objective.targets = "raml"
    config.objective.raml.reward = {"hamming_exact": "hamming", "hamming_n4": "hamming"}.get(
        kind, kind)
    config.objective.raml.convention = "exact" if kind == "hamming_exact" else "rescaled"
    config.objective.raml.tau = value
    if kind in ("edit_is", "hamming_n4"):
      config.objective.raml.num_samples = IS_SAMPLES
  return config


def arm_dir(arm: str) -> str:
  """``"hamming,0.65"`` -> ``"hamming_0.65"`` (the arm's directory name)."""
  kind, value = parse_arm(arm)
  return kind if value is None else f"{kind}_{value:g}"


def arm_label(arm: str) -> str:
  """``"hamming,0.65"`` -> ``"RAML, Hamming, τ = 0.65"``."""
  kind, value = parse_arm(arm)
  if kind == "ml":
    return KIND_LABELS[kind]
  return f"{KIND_LABELS[kind]}, {'ε' if kind == 'ls' else 'τ'} = {value:g}"
