"""Study "sequence-level KL vs token JSD", arm "+ token JSD": hard-EM − λ_jsd · Ĵ (uniform weights, all T tokens).

    python run.py --config=experiments/configs/research_jsd.py:early \
        --workdir=workdir/research/early/jsd/seed0 --config.seed=0
    python run.py --config=experiments/configs/research_jsd.py:late \
        --workdir=workdir/research/late/jsd/seed0 --config.seed=0

The argument after ':' picks the task ('early' or 'late'; see
research_common.py). ``python experiments/research.py`` runs all arms.
"""

from experiments.configs import research_common


def get_config(task: str = "early"):
  config = research_common.base(task)
  config.objective.lambda_jsd = research_common.LAMBDA_JSD
  return config
