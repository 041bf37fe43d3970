"""Distillation where the future matters: the 'branch' task (DESIGN.md §6.4).

    python run.py --config=experiments/configs/branch_teacher.py --workdir=workdir/branch_teacher
    python run.py --config=experiments/configs/distill_branch.py:opd_rb --workdir=workdir/branch/opd_rb
    python run.py --config=experiments/configs/distill_branch.py:opd_rb_g0 --workdir=workdir/branch/opd_rb_g0

The teacher (``experiments/configs/branch_teacher.py``) opens a response with
b_0 (then copies the prompt) or b_1 (then looks tokens up by pointer), each
about half the time. The student is the 1-layer d_model = 32 Transformer of
``experiments/configs/distill.py`` with one latent: it learns the copy but
not the lookup (maximum likelihood on the data for 2000 steps leaves it at
validity 0.51: the copy branch right, the lookup wrong). The per-token reward
(γ = 0) matches the teacher's first token, so the student keeps opening the
branch it cannot follow; the sequence reverse KL (γ = 1) is lowest when it
avoids b_1 (``−log q(b_0) ≈ log 2`` nats, against about half the cost of a
failed lookup for γ = 0).

Methods as in ``experiments/configs/distill.py`` (``opd_rb``, ``opd_kl_to_go``
with a ``_g<γ>`` discount suffix, ``gkd``, ``seq_kd``, ...). The OPD arms
warm-start with ``WARM_START_STEPS`` of seq-KD; every method runs
``NUM_STEPS`` steps with a cosine learning-rate decay.
"""

from __future__ import annotations

from experiments.configs import branch_teacher
from experiments.configs import distill

WARM_START_STEPS = 200
NUM_STEPS = 600


def get_config(method: str = "opd_rb"):
  """The config of ``method`` (see ``distill.parse_method``) on the branch task."""
  config = distill.get_config(method)
  config.task.name = "branch"
  config.task.alphabet_size = branch_teacher.ALPHABET_SIZE
  config.task.prompt_len = branch_teacher.PROMPT_LEN
  config.model.num_latents = 1
  config.train.num_steps = NUM_STEPS
  config.train.eval_every = 100
  config.train.checkpoint_every = 200
  config.optim.schedule = "cosine"
  d = config.objective
  d.teacher_workdir = "workdir/branch_teacher"
  d.teacher_latent = 0
  if d.warm_start != "none":
    d.warm_start_steps = WARM_START_STEPS
  return config
