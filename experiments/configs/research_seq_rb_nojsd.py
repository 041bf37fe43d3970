"""Seed-000 study, control arm: the sequence-level KL *instead of* the token JSD.

Loss: hard-EM − w_seq(step) · D̂ with the Rao-Blackwellised estimator, λ_jsd = 0:
the 100 warm-up steps are reconstruction only, so this arm separates the
effect of the sequence-level term from that of the token JSD, which the three
"+ sequence term" arms share during their warm-up.

    python run.py --config=experiments/configs/research_seq_rb_nojsd.py:early \
        --workdir=workdir/research/early/seq_rb_nojsd/seed0 --config.seed=0
    python run.py --config=experiments/configs/research_seq_rb_nojsd.py:late \
        --workdir=workdir/research/late/seq_rb_nojsd/seed0 --config.seed=0

The argument after ':' picks the task ('early' or 'late'; see
research_common.py). ``python experiments/research.py`` runs all arms.
"""

from experiments.configs import research_common


def get_config(task: str = "early"):
  return research_common.with_sequence_term(research_common.base(task), "rao_blackwell",
                                     token_jsd=False)
