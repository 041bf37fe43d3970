"""RAML vs maximum likelihood vs label smoothing on FINITE training sets (DESIGN.md §8.6).

    python run.py --config=experiments/configs/raml_finite.py:reverse,128,ml --workdir=workdir/rf/ml
    python run.py --config=experiments/configs/raml_finite.py:reverse,128,hamming,0.8 \\
        --workdir=workdir/rf/hamming_0.8

``python experiments/raml_finite.py`` trains every (task, training-set size,
arm, seed) of the study in ``docs/RESULTS.md`` ("RAML vs maximum
likelihood").

The argument is ``TASK,N,ARM``: the task variant, the training-set size N
(``config.data.train_size``: N distinct examples drawn once from the seed,
iterated in reshuffled epochs, prompts disjoint from the 512 held-out ones)
and the arm of ``experiments/configs/raml.py`` (``ml``, ``ls,EPS``,
``hamming,TAU``, ``hamming_exact,TAU``, ``edit,TAU``, ``edit_is,TAU``).

Tasks (``transduction``, ``transform="reverse"``, inputs of n ~ U{4..12}
symbols, T = 13):

* ``reverse`` — an alphabet of A = 10 symbols (the task of the fresh-data study);
* ``reverse_a30`` — the harder variant: A = 30 symbols, so each symbol is seen
  at each position three times less often in the same N examples, and the
  two temperature conventions differ more (``τ_eff = τ/(1 + ln 29)``).

Everything else is ``experiments/configs/raml.py`` (one latent, 2-layer
d_model = 32 Transformer, batch 32, AdamW 3e-3 cosine), trained for a fixed
budget of ``NUM_STEPS`` steps whatever N (31 epochs at N = 2048, 500 at
N = 128), evaluated every ``EVAL_EVERY`` steps on the held-out set and on the
training set (``train_*`` metrics). RAML arms draw N_s = 1 payoff sample per
example per step (``edit_is``: 4 weighted samples; ``hamming_n4``: 4 samples).
"""

from experiments.configs import raml

TASKS = {"reverse": 10, "reverse_a30": 30}  # name -> alphabet size
NUM_STEPS = 2000
EVAL_EVERY = 200
# Every size up to this shares one compiled train step (config.data.train_capacity).
CAPACITY = 4096


def parse(arg: str) -> tuple[str, int, str]:
  """``"reverse,128,hamming,0.8"`` -> ``("reverse", 128, "hamming,0.8")``.

  Raises:
    ValueError: an unknown task, a size that is not a positive integer, or a
      malformed arm.
  """
  parts = [p.strip() for p in str(arg).split(",")]
  if len(parts) < 3 or parts[0] not in TASKS or not parts[1].isdigit() or int(parts[1]) < 1:
    raise ValueError(f"The argument must be TASK,N,ARM with TASK in {tuple(TASKS)} and N a "
                     f"positive integer, got {arg!r}.")
  arm = ",".join(parts[2:])
  raml.parse_arm(arm)
  return parts[0], int(parts[1]), arm


def get_config(arg: str = "reverse,128,ml"):
  task, size, arm = parse(arg)
  config = raml.get_config(arm)
  config.task.alphabet_size = TASKS[task]
  config.data.train_size = size
  config.data.train_capacity = max(CAPACITY, size)
  if raml.parse_arm(arm)[0] not in ("edit_is", "hamming_n4"):
    config.objective.raml.num_samples = 1
  config.train.num_steps = NUM_STEPS
  config.train.log_every = EVAL_EVERY
  config.train.eval_every = EVAL_EVERY
  config.train.checkpoint_every = NUM_STEPS
  return config
