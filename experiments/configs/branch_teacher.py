"""The teacher of the 'branch' task: one latent, maximum likelihood (DESIGN.md §6.4, §9).

    python run.py --config=experiments/configs/branch_teacher.py --workdir=workdir/branch_teacher

Task ``branch`` (alphabet 8, prompts of 6 symbols): half the targets are the
branch token b_0 then a copy of the prompt, half b_1 then the pointer lookup
``x_{(x_t mod 6) + 1}``. A 2-layer d_model = 64 Transformer with K = 1 latent
(hard-EM with one latent is maximum likelihood; no divergence term) learns both
branches (validity 1.0 after 500 steps on 2 CPU cores) and opens each with
probability about ½. ``experiments/configs/distill_branch.py`` distils it.
"""

from latentdiv import objectives

ALPHABET_SIZE = 8
PROMPT_LEN = 6


def get_config():
  config = objectives.base_config()
  config.task.name = "branch"
  config.task.alphabet_size = ALPHABET_SIZE
  config.task.prompt_len = PROMPT_LEN
  config.model.num_latents = 1
  config.objective.lambda_jsd = 0.0
  config.train.num_steps = 1000
  return config
