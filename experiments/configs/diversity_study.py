"""The diversity study: which objective keeps every latent alive and covers the strategies.

    python run.py --config=experiments/configs/diversity_study.py:late,mi,annealed_em
    python experiments/diversity_study.py           # every cell, 5 seeds, table + plots

The config argument is ``TASK,OBJECTIVE,RECONSTRUCTION[,WEIGHT]`` (WEIGHT
overrides the divergence term's weight: λ_jsd, or the sequence term's):

* TASK (DESIGN.md §9), all with S = 3 hidden strategies, K = 3 latents and an
  alphabet of A = 6 symbols, prompt P = 4:
  ``early`` — ``early_divergence``: output ``(x_t + s) mod A``, the strategies
  differ at every token (T = 5);
  ``late`` — ``late_divergence``, ``variant='permute'``: copy x, then a
  rotation by s of its first 3 symbols (T = 8): the strategies agree on 4
  tokens and differ on 3, where every position's marginal is uniform;
  ``placement`` — ``pattern_placement``: a shared pattern written at one of
  S offsets (DESIGN.md §9): teacher forcing on data reveals the offset as
  soon as the pattern starts, after which every latent agrees.
* OBJECTIVE: ``recon`` (reconstruction only), ``jsd`` (+ token JSD),
  ``kl`` (+ the sequence-level KL, §5.1), ``mi`` (+ the bounded sequence-level
  mutual information, §5.6).
* RECONSTRUCTION (§3, §5.7): ``hard_em`` or a remedy that keeps every latent
  on the data, ``relaxed_wta`` or ``annealed_em``.

Settings shared by every cell: a 2-layer, d_model = 64 Transformer; batch 32;
``NUM_STEPS`` steps of AdamW (lr 3e-3, cosine). The sequence-level terms roll
out every content token (L = T − 1), one rollout per latent, with
``rao_blackwell`` and the EMA baseline (the diagnostics' best one-rollout
combination: leave-one-out over two rollouts removes a little more variance
at twice the cost), after ``SEQ_WARMUP_STEPS`` of reconstruction (+ token
JSD) and a linear ramp (§5.5).
"""

import ml_collections

from latentdiv import objectives

TASKS = ("early", "late", "placement")
OBJECTIVES = ("recon", "jsd", "kl", "mi")
RECONSTRUCTIONS = ("hard_em", "relaxed_wta", "annealed_em")

LAMBDA_JSD = 0.1
KL_WEIGHT = 0.01  # The KL is tens of nats: its weight is smaller.
MI_WEIGHT = 0.5  # The MI is at most log 3 = 1.1 nats.
WTA_EPSILON = 0.05
ANNEAL_STEPS = 150
SEQ_WARMUP_STEPS = 100
SEQ_RAMP_STEPS = 50
NUM_STEPS = 400


def task_config(config: ml_collections.ConfigDict, task: str) -> int:
  """Sets ``config.task`` for ``task``; returns the target length T."""
  config.task.alphabet_size = 6
  config.task.prompt_len = 4
  config.task.num_strategies = 3
  if task == "early":
    config.task.name = "early_divergence"
    return config.task.prompt_len + 1
  if task == "late":
    config.task.name = "late_divergence"
    config.task.variant = "permute"
    config.task.num_divergent = 3
    return config.task.prompt_len + config.task.num_divergent + 1
  config.task.name = "pattern_placement"
  config.task.num_strategies = 3
  return config.task.prompt_len + config.task.num_strategies  # pattern + S − 1 fillers + EOS


def get_config(arg: str = "late,mi,annealed_em") -> ml_collections.ConfigDict:
  parts = arg.split(",")
  if len(parts) not in (3, 4):
    raise ValueError("The config argument must be TASK,OBJECTIVE,RECONSTRUCTION[,WEIGHT], got "
                     f"{arg!r}.")
  task, objective, recon = parts[:3]
  for value, allowed, name in ((task, TASKS, "TASK"), (objective, OBJECTIVES, "OBJECTIVE"),
                               (recon, RECONSTRUCTIONS, "RECONSTRUCTION")):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r} in {arg!r}.")
  config = objectives.base_config("diversity")
  target_len = task_config(config, task)
  config.model.num_latents = 3
  config.model.d_model = 64
  config.model.num_layers = 2
  o = config.objective
  o.reconstruction = recon
  o.wta_epsilon = WTA_EPSILON
  o.anneal_steps = ANNEAL_STEPS
  o.lambda_jsd = LAMBDA_JSD if objective == "jsd" else 0.0
  o.jsd_weighting = "uniform"
  s = o.sequence_term
  s.weight = {"kl": KL_WEIGHT, "mi": MI_WEIGHT}.get(objective, 0.0)
  s.kind = objective if objective in ("kl", "mi") else "kl"
  s.estimator = "rao_blackwell"
  s.baseline = "ema"
  s.num_rollouts = 1
  s.rollout_len = target_len - 1
  s.warmup_steps = SEQ_WARMUP_STEPS
  s.ramp_steps = SEQ_RAMP_STEPS
  config.train.batch_size = 32
  config.train.num_steps = NUM_STEPS
  config.train.log_every = 25
  config.train.eval_every = 50
  config.train.checkpoint_every = 100
  config.eval.batch_size = 256
  if len(parts) == 4:  # The divergence term's weight (λ_jsd or the sequence term's).
    weight = float(parts[3])
    if objective == "jsd":
      o.lambda_jsd = weight
    elif objective in ("kl", "mi"):
      s.weight = weight
    else:
      raise ValueError(f"WEIGHT applies to jsd, kl and mi, not {objective!r} (in {arg!r}).")
  return config
