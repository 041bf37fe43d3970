"""Study "sequence-level KL vs token JSD", arm "reconstruction only": hard-EM, no divergence term.

    python run.py --config=experiments/configs/research_recon.py:early \
        --workdir=workdir/research/early/recon/seed0 --config.seed=0
    python run.py --config=experiments/configs/research_recon.py:late \
        --workdir=workdir/research/late/recon/seed0 --config.seed=0

The argument after ':' picks the task ('early' or 'late'; see
research_common.py). ``python experiments/research.py`` runs all arms.
"""

from experiments.configs import research_common


def get_config(task: str = "early"):
  return research_common.base(task)
