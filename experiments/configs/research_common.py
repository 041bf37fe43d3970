"""Shared settings of the study "sequence-level KL vs token-level JSD" (docs/RESULTS.md).

Not an experiment by itself: the six ``research_<arm>.py`` files next to this
one start from ``base(task)`` and switch on their objective. Each takes the
task as its config argument, so one arm runs on both tasks::

    python run.py --config=experiments/configs/research_jsd.py:early
    python run.py --config=experiments/configs/research_jsd.py:late

``python experiments/research.py`` trains every arm on both tasks with three
seeds and writes the table and plots of ``docs/RESULTS.md``.

The two tasks (DESIGN.md §9), both with S = 3 hidden strategies, K = 3 latents
and an alphabet of A = 6 symbols:

* ``early`` — ``early_divergence``: prompt of P = 4 symbols, output
  ``(x_t + s) mod A``; the strategies differ at every output token (T = 5).
* ``late`` — ``late_divergence`` with ``variant="permute"``: the output copies
  the P = 4 prompt symbols, then writes a rotation by s of the first d = 3 of
  them (T = 4 + 3 + 1 = 8). The strategies agree on the first 4 output tokens
  and differ only on the last 3, where they use the *same tokens in a different
  order* (every position's marginal is uniform for every strategy): the case
  where the teacher-forced token proxy is expected to fall short (DESIGN.md §9).

Settings common to all arms: a 2-layer, d_model = 64 Transformer; hard-EM
reconstruction; batch 32; 300 steps of AdamW (lr 3e-3, cosine). The
sequence-level term rolls out L = T − 1 tokens (every content token, all
divergent positions included; the EOS is deterministic) and is switched on
after 100 steps of reconstruction + token JSD, then ramped linearly over 50
steps to ``SEQ_WEIGHT`` (DESIGN.md §5.5; without the warm-up a pilot with
λ_seq = 0.05 from step 0 drove two of the three latents to invalid outputs).

``objective.jsd_prefix_len`` is set to T: ``divergences.token_weights`` also
truncates the ``"uniform"`` weighting to the first ``prefix_len`` tokens when
one is given, and ``train`` always passes ``objective.jsd_prefix_len``
(default 4), which would hide the late task's divergent positions from the
token JSD.
"""

import ml_collections

from latentdiv import objectives

TASKS = ("early", "late")
ARMS = ("recon", "jsd", "seq_rb", "seq_traj", "seq_cv", "seq_rb_nojsd")
ARM_LABELS = {
    "recon": "reconstruction only",
    "jsd": "+ token JSD",
    "seq_rb": "+ sequence term (rao_blackwell)",
    "seq_traj": "+ sequence term (trajectory)",
    "seq_cv": "+ sequence term (reward_to_go_baseline, JSD control variate)",
    "seq_rb_nojsd": "sequence term (rao_blackwell) without token JSD",
}

LAMBDA_JSD = 0.1
SEQ_WEIGHT = 0.01
SEQ_WARMUP_STEPS = 100
SEQ_RAMP_STEPS = 50
NUM_STEPS = 300


def base(task: str = "early") -> ml_collections.ConfigDict:
  """The settings every arm shares, on ``task`` (``"early"`` or ``"late"``)."""
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
  config = objectives.base_config()
  config.task.alphabet_size = 6
  config.task.prompt_len = 4
  config.task.num_strategies = 3
  if task == "early":
    config.task.name = "early_divergence"
    target_len = config.task.prompt_len + 1
  else:
    config.task.name = "late_divergence"
    config.task.variant = "permute"
    config.task.num_divergent = 3
    target_len = config.task.prompt_len + config.task.num_divergent + 1
  config.model.num_latents = 3
  config.model.d_model = 64
  config.model.num_layers = 2
  config.objective.reconstruction = "hard_em"
  config.objective.lambda_jsd = 0.0
  config.objective.jsd_weighting = "uniform"
  config.objective.jsd_prefix_len = target_len  # See the module docstring.
  config.objective.sequence_term.weight = 0.0
  config.objective.sequence_term.rollout_len = target_len - 1
  config.objective.sequence_term.warmup_steps = SEQ_WARMUP_STEPS
  config.objective.sequence_term.ramp_steps = SEQ_RAMP_STEPS
  config.train.batch_size = 32
  config.train.num_steps = NUM_STEPS
  config.train.log_every = 25
  config.train.eval_every = 50
  config.train.checkpoint_every = 100
  config.eval.batch_size = 256
  return config


def with_sequence_term(config: ml_collections.ConfigDict, estimator: str,
                baseline: str = "none", token_jsd: bool = True) -> ml_collections.ConfigDict:
  """Adds token JSD (unless ``token_jsd=False``) and the sequence-level KL term."""
  config.objective.lambda_jsd = LAMBDA_JSD if token_jsd else 0.0
  config.objective.sequence_term.weight = SEQ_WEIGHT
  config.objective.sequence_term.estimator = estimator
  config.objective.sequence_term.baseline = baseline
  return config
