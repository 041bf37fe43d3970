"""Study "sequence-level KL vs token JSD", arm "+ sequence term with the JSD control variate" (DESIGN.md §5.4).

Loss: hard-EM − λ_jsd · Ĵ − w_seq(step) · D̂ with REINFORCE on the reward to go
minus the JSD control variate ``b_t = c · Σ_{t'≥t} w_t' JSD_t'(i, j)`` over the
data's first L tokens, c fitted online (estimator (iii) ``reward_to_go_baseline``
with baseline ``jsd``, DESIGN.md §5.3–5.4); w_seq is 0 for 100 steps then ramps
to λ_seq.

    python run.py --config=experiments/configs/research_seq_cv.py:early \
        --workdir=workdir/research/early/seq_cv/seed0 --config.seed=0
    python run.py --config=experiments/configs/research_seq_cv.py:late \
        --workdir=workdir/research/late/seq_cv/seed0 --config.seed=0

The argument after ':' picks the task ('early' or 'late'; see
research_common.py). ``python experiments/research.py`` runs all arms.
"""

from experiments.configs import research_common


def get_config(task: str = "early"):
  return research_common.with_sequence_term(research_common.base(task), "reward_to_go_baseline",
                                     baseline="jsd")
