"""A tiny config for process-level tests (tests/test_reliability.py, tests/test_workdir.py).

    python run.py --config=tests/configs/tiny.py --workdir=/tmp/tiny

The smallest interesting case: two content tokens (V = 5 with PAD, BOS, EOS),
two hidden strategies and K = 2 latents, sequence-level rollouts of L = 1 with
an EMA baseline (so a resume must restore the RNG and the estimator state
exactly), a constant learning rate and a checkpoint every 2 steps.
"""

from latentdiv import objectives


def get_config():
  config = objectives.base_config()
  config.task.name = "early_divergence"
  config.task.prompt_len = 2
  config.task.alphabet_size = 2
  config.task.num_strategies = 2
  config.model.num_latents = 2
  config.model.d_model = 16
  config.model.num_heads = 2
  config.model.num_layers = 1
  config.model.d_ff = 32
  config.objective.jsd_prefix_len = 1
  config.objective.sequence_term.weight = 0.1
  config.objective.sequence_term.estimator = "kl_to_go_baseline"
  config.objective.sequence_term.baseline = "ema"
  config.objective.sequence_term.rollout_len = 1
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 4
  config.optim.learning_rate = 1e-2
  config.train.batch_size = 8
  config.train.num_steps = 60
  config.train.log_every = 5
  config.train.eval_every = 1000
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 3
  config.eval.batch_size = 16
  return config
