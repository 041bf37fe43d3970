"""On-policy distillation of the default K = 3 teacher into a smaller student (DESIGN.md §6).

    python run.py --config=experiments/configs/default.py --workdir=workdir/default   # teacher
    python run.py --config=experiments/configs/distill.py --workdir=workdir/distill/opd_rb
    python run.py --config=experiments/configs/distill.py:gkd --workdir=workdir/distill/gkd
    python run.py --config=experiments/configs/distill.py:seq_kd \\
        --config.objective.teacher_workdir=/path/to/teacher --workdir=workdir/distill/seq_kd

``python experiments/distill_compare.py`` trains the teacher (if absent) and
every method below with three seeds, and writes the table and learning curves
of ``docs/RESULTS.md`` ("On-policy distillation").

The teacher is the default run (``experiments/configs/default.py``: early
divergence, 3 hidden strategies, K = 3 latents, a 2-layer d_model = 64
Transformer) read from ``objective.teacher_workdir``. The student is a 1-layer
d_model = 32 Transformer with the same K = 3 latents, distilled per latent
(``teacher_latent = -1``: student latent k towards teacher latent k) on
responses of the task's full length (T = 5 tokens including EOS): batch 32
prompts × 3 latents, 300 steps of AdamW (lr 3e-3, 20 warmup steps, constant).

The argument after the colon picks the method (default ``opd_rb``):

* ``opd_rb`` — OPD, sequence reverse KL, ``rao_blackwell`` estimator, after a
  warm start of ``WARM_START_STEPS`` steps of seq-KD (DESIGN.md §6.4: from a
  random student the exact objective's steepest descent is to emit EOS first);
* ``opd_rb_cold`` — the same from the random student (no warm start);
* ``opd_kl_to_go`` — OPD, ``kl_to_go`` estimator (iv), warm-started likewise;
* ``per_token_reward`` — the per-token reverse KL as a reward, no future
  terms (biased);
* ``gkd`` — TRL's GKD: generalised JSD(β = 0.5), on-policy fraction
  λ = 0.5, off-policy rows from the data;
* ``seq_kd`` — forward KL by sequence-level KD on teacher samples.

A suffix ``_g<γ>`` on ``opd_rb`` or ``opd_kl_to_go`` sets the discount on the
future terms (``objective.discount``, DESIGN.md §6.4; γ = 1 without it):
``opd_rb_g0`` is MiniLLM's single-step exact-KL term alone, ``opd_kl_to_go_g0``
the per-token reward. ``DISCOUNT_STUDY`` lists the arms of the discount study
(``python experiments/distill_compare.py --study=discount``).
"""

from __future__ import annotations

import re

from latentdiv import objectives

METHODS = ("opd_rb", "opd_rb_cold", "opd_kl_to_go", "per_token_reward", "gkd", "seq_kd")
WARM_START_STEPS = 100
DISCOUNTS = (0.0, 0.5, 0.9, 1.0)
DISCOUNT_STUDY = tuple(
    f"{base}_g{g:g}" if g < 1 else base
    for base in ("opd_rb", "opd_kl_to_go") for g in DISCOUNTS) + ("gkd", "seq_kd")
_DISCOUNTED = re.compile(r"^(opd_rb|opd_kl_to_go)_g(0|0?\.[0-9]+|1)$")


def parse_method(method: str) -> tuple[str, float]:
  """``(base method, discount)`` of a method name: ``opd_rb_g0.5`` → ``('opd_rb', 0.5)``."""
  match = _DISCOUNTED.match(method)
  if match:
    return match.group(1), float(match.group(2))
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, or opd_rb / opd_kl_to_go with a "
                     f"discount suffix _g<γ in [0, 1]> (e.g. opd_rb_g0.5), got {method!r}.")
  return method, 1.0


def get_config(method: str = "opd_rb"):
  """The distillation config of ``method`` (``METHODS``, or with a ``_g<γ>`` suffix)."""
  method, discount = parse_method(method)
  config = objectives.base_config("distillation")
  config.task.name = "early_divergence"
  config.task.num_strategies = 3
  config.model.num_latents = 3
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.num_layers = 1
  config.model.d_ff = 64
  config.train.batch_size = 32
  config.train.num_steps = 300
  config.train.log_every = 25
  config.train.eval_every = 50
  config.train.checkpoint_every = 100
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 20
  config.optim.schedule = "constant"
  d = config.objective
  d.teacher_workdir = "workdir/default"
  d.teacher_latent = -1
  d.num_eval_samples = 256
  if method in ("opd_rb", "opd_rb_cold"):
    d.loss, d.estimator = "opd", "rao_blackwell"
  elif method == "opd_kl_to_go":
    d.loss, d.estimator = "opd", "kl_to_go"
  else:
    d.loss = method
  if method in ("opd_rb", "opd_kl_to_go"):
    d.warm_start, d.warm_start_steps = "seq_kd", WARM_START_STEPS
    d.discount = discount
  d.gkd_beta = 0.5
  d.gkd_lambda = 0.5
  d.gkd_off_policy = "data"
  return config
