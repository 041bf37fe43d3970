"""Study "sequence-level KL vs token JSD", arm "+ sequence term (trajectory)": token JSD plus plain REINFORCE on D.

Loss: hard-EM − λ_jsd · Ĵ − w_seq(step) · D̂ with the whole-trajectory return
``A_t = Σ_t' r_t'`` (estimator (i) of DESIGN.md §5.3), no baseline; w_seq is 0
for 100 steps then ramps to λ_seq.

    python run.py --config=experiments/configs/research_seq_traj.py:early \
        --workdir=workdir/research/early/seq_traj/seed0 --config.seed=0
    python run.py --config=experiments/configs/research_seq_traj.py:late \
        --workdir=workdir/research/late/seq_traj/seed0 --config.seed=0

The argument after ':' picks the task ('early' or 'late'; see
research_common.py). ``python experiments/research.py`` runs all arms.
"""

from experiments.configs import research_common


def get_config(task: str = "early"):
  return research_common.with_sequence_term(research_common.base(task), "trajectory")
