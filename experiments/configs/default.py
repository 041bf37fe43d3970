"""Default experiment: K = 3 latents on the early-divergence task, hard-EM + token JSD.

    python run.py --config=experiments/configs/default.py --workdir=workdir/default

Three hidden strategies (shift every prompt token by 0, 1 or 2) and three
latents; the token-level JSD term (λ_jsd > 0) pushes the latents apart. On
2 CPU cores it trains in a few minutes and should reach full strategy coverage
with >= 90% validity for every latent.
"""

from latentdiv import objectives


def get_config():
  config = objectives.base_config()
  config.task.name = "early_divergence"
  config.task.num_strategies = 3
  config.model.num_latents = 3
  config.objective.lambda_jsd = 0.1
  config.train.num_steps = 1000
  return config
