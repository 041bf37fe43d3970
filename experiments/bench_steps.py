"""Train-step benchmark cases: one ``train.make_train_step`` per objective and setting.

The cases (``train_cases``): reconstruction only (``rec``); + token JSD
(``rec+jsd``); + the sequence-level term for each estimator
(``rec+jsd+seq_pg/<estimator>``, ``config.objective.sequence_term``); on-policy
distillation (``opd``, the distillation objective towards a teacher of the
same size with fresh parameters); RAML targets with N = 1, 4, 16
(``raml/N=<n>``). The task is ``late_divergence`` with P = L/2 and
d = L/2 − 1, so the target length is T = L (the rollout length of the
sequence term).

For the issue "Scale to real vocabularies": ``vocab_case`` (the rec, seq and
OPD steps at any V and K, memory from compiling alone where untimed),
``lower_bound_case`` (the sequence-level step against the sampler alone +
the K×K scoring pass, timed together) and ``seq_length_case`` (the seq step
at several L, timed together).

``experiments/bench.py`` says how the records are timed and counted.
"""

from __future__ import annotations

import functools
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from experiments import bench_util as util
from latentdiv import config as config_lib
from latentdiv import estimators
from latentdiv import experiment
from latentdiv import model as model_lib
from latentdiv import objectives
from latentdiv import sampling
from latentdiv import sequence_term
from latentdiv import train
from latentdiv import vocab
from latentdiv import workdir as workdir_lib

RAML_SAMPLES = (1, 4, 16)
WHICH = ("all", "core", "quick", "scaling", "scaling_tf", "smoke")
# The sequence-level step of the vocabulary, lower-bound and length cases: the
# diversity objective with the token JSD off (lambda_jsd = 0, train_config's
# default) and the sequence term on, estimator rao_blackwell, baseline none
# (Settings' defaults): reconstruction + rollouts + K×K scoring + estimator.
SEQ_STEP = {"objective.sequence_term.weight": 0.1}
# The steps of the vocabulary cases (``vocab_case``).
VOCAB_CASES = {"rec": {}, "seq": SEQ_STEP, "opd": {}}


def vocab_overrides(vocab_size: int, num_latents: int) -> dict:
  """``train_config`` overrides for V = 3 reserved ids + the task's alphabet, and K latents."""
  if vocab_size <= vocab.NUM_RESERVED:
    raise ValueError(f"vocab_size must exceed {vocab.NUM_RESERVED}, got {vocab_size}.")
  return {"task.alphabet_size": vocab_size - vocab.NUM_RESERVED,
          "model.num_latents": num_latents}


def train_config(size: str, length: int, batch: int, **overrides) -> Any:
  """The bench's diversity config: late_divergence with T = L, model ``SIZES[size]``, K latents.

  ``overrides`` are ``"dotted.path": value`` pairs (e.g.
  ``"objective.sequence_term.weight"``; ``vocab_overrides`` makes some).
  (late_divergence needs d ≤ P, so T = L needs P ≥ L/2: the shortest prompt.)
  """
  c = objectives.base_config()
  c.task.name = "late_divergence"
  c.task.alphabet_size = util.ALPHABET_SIZE
  c.task.prompt_len = length // 2
  c.task.num_divergent = length - length // 2 - 1  # T = P + d + 1 = L.
  c.task.num_strategies = 3
  c.model.num_latents = util.NUM_LATENTS
  for name, value in util.SIZES[size].items():
    c.model[name] = value
  c.train.batch_size = batch
  c.objective.lambda_jsd = 0.0
  c.objective.jsd_prefix_len = min(4, length)
  c.objective.sequence_term.rollout_len = length
  for path, value in overrides.items():
    parent, _, field = path.rpartition(".")
    config_lib.get(c, parent)[field] = value
  return c


def opd_config(size: str, length: int, batch: int, teacher_workdir: str,
               **overrides) -> Any:
  """The OPD case's distillation config; writes the teacher's config.json in ``teacher_workdir``.

  Student and teacher have the same size (``train_config``'s task, model and
  train sections); the teacher is distilled per latent (``teacher_latent =
  -1``) with loss ``opd`` and the ``rao_blackwell`` estimator, responses of L
  tokens. ``experiment.build`` reads the teacher's ``config.json``; no
  checkpoint is needed to time a step (its parameters are passed as ``frozen``).
  ``overrides`` are the teacher's ``train_config`` overrides (the student
  copies its task, model and train sections).
  """
  teacher = train_config(size, length, batch, **overrides)
  workdir_lib.write_config(teacher_workdir, teacher)
  c = objectives.base_config("distillation")
  for section in ("task", "model", "train"):
    for field, value in teacher[section].items():
      c[section][field] = value
  c.objective.teacher_workdir = teacher_workdir
  c.objective.teacher_latent = -1
  c.objective.loss = "opd"
  c.objective.estimator = estimators.RAO_BLACKWELL
  return c


def train_step_flops(setup: train.Setup) -> float:
  """Analytic FLOPs of one diversity train step: forward + backward (= 3 forwards) of every pass.

  Teacher-forced reconstruction/JSD: B·K sequences of P + T positions (B·N·K
  with RAML targets, plus the data pass). The sequence term adds the rollouts
  (forward only) of B·N·K rows and the scoring of each rollout under the K
  latents, B·N·K·K sequences, forward + backward.
  """
  c = setup.config
  cfg = setup.model.config
  k, b = cfg.num_latents, c.train.batch_size
  p, t = setup.task.prompt_len, setup.task.target_len
  seq = util.forward_flops(cfg, p + t, p + t, t)
  sequences = b * k
  if c.objective.targets == "raml":
    sequences += b * k * c.objective.raml.num_samples
  total = 3 * sequences * seq
  if c.objective.sequence_term.weight > 0:
    rows = b * c.objective.sequence_term.num_rollouts * k
    length = c.objective.sequence_term.rollout_len
    total += rows * util.sampler_rollout_flops(cfg, p, length)
    total += 3 * rows * k * util.forward_flops(cfg, p + length, p + length, length)
  return float(total)


def opd_flops(setup: train.Setup, objective) -> float:
  """Analytic FLOPs of an OPD step: student rollouts, student fwd+bwd and teacher fwd scoring."""
  s, t = setup.model.config, objective.teacher.config
  rows = setup.config.train.batch_size * s.num_latents * setup.config.objective.num_rollouts
  p, length = setup.task.prompt_len, objective.response_len
  rollout = util.sampler_rollout_flops(s, p, length)
  score = (3 * util.forward_flops(s, p + length, p + length, length)
           + util.forward_flops(t, p + length, p + length, length))
  return float(rows * (rollout + score))


def train_cases(size: str, length: int, batch: int, which: str = "all") -> list:
  """``(name, overrides)`` of the train-step cases (``overrides`` for ``train_config``).

  ``which``: 'all' (every case), 'core' (rec, rec+jsd, seq_pg/rao_blackwell,
  OPD, RAML N = 4), 'quick' (rec+jsd, seq_pg/rao_blackwell), 'scaling'
  (rec+jsd, seq_pg/rao_blackwell) or 'smoke' / 'scaling_tf' (rec+jsd only).
  """
  del size, length, batch  # The same cases at every size and length.
  jsd = {"objective.lambda_jsd": 0.1}

  def seq(**fields):  # + the sequence term (weight 0.1) with these fields.
    return dict(jsd, **{f"objective.sequence_term.{k}": v
                        for k, v in dict(weight=0.1, **fields).items()})

  rb = (f"rec+jsd+seq_pg/{estimators.RAO_BLACKWELL}", seq())
  raml_case = lambda n: (f"raml/N={n}", dict(jsd, **{  # noqa: E731
      "objective.targets": "raml", "objective.raml.num_samples": n}))
  if which in ("smoke", "scaling_tf"):
    return [("rec+jsd", jsd)]
  if which in ("quick", "scaling"):
    return [("rec+jsd", jsd), rb]
  if which == "core":
    return [("rec", {}), ("rec+jsd", jsd), rb, ("opd", {}), raml_case(4)]
  if which != "all":
    raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
  cases = [("rec", {}), ("rec+jsd", jsd)]
  for est in estimators.ESTIMATORS:
    baseline = "ema" if est.endswith("_baseline") else "none"
    cases.append((f"rec+jsd+seq_pg/{est}", seq(estimator=est, baseline=baseline)))
  cases.append(("opd", {}))
  cases.extend(raml_case(n) for n in RAML_SAMPLES)
  return cases


def build_case(name: str, size: str, length: int, batch: int, overrides: dict | None,
               abstract: bool = False):
  """(setup, objective, step, state, flops_analytic, has_loop) of one case.

  ``step`` is ``train.make_train_step``'s ``BoundJit``; for 'opd' its
  ``frozen`` argument is a teacher with fresh parameters (seed 1) and
  ``overrides`` are the teacher's (and so the student's) task and model.
  With ``abstract`` the state and the teacher's parameters are
  ``jax.ShapeDtypeStruct``s: enough to compile, nothing allocated.
  """
  make = jax.eval_shape if abstract else (lambda f: f())
  overrides = overrides or {}
  if name == "opd":
    with tempfile.TemporaryDirectory() as teacher_workdir:
      setup, objective = experiment.build(
          opd_config(size, length, batch, teacher_workdir, **overrides))
    teacher_params = make(lambda: jax.jit(functools.partial(
        model_lib.init_params, objective.teacher))(jax.random.PRNGKey(1)))
    flops_analytic, has_loop = opd_flops(setup, objective), True
  else:
    setup, objective = experiment.build(train_config(size, length, batch, **overrides))
    teacher_params = ()
    flops_analytic = train_step_flops(setup)
    has_loop = setup.config.objective.sequence_term.weight > 0
  state = make(lambda: train.init_state(setup, objective))
  step = train.make_train_step(setup, objective, mesh=None, frozen=teacher_params)
  return setup, objective, step, state, flops_analytic, has_loop


def train_case(name: str, size: str, length: int, batch: int, overrides: dict | None,
               repeats: int, peak_gflops: float, budget_s: float = 20.0,
               reference: util.MatmulReference | None = None) -> dict:
  """Times one train step (``train.make_train_step``); a record with time, FLOP/s, memory.

  An OPD step that fails to build is recorded as skipped, with the reason.
  """
  k = (overrides or {}).get("model.num_latents", util.NUM_LATENTS)
  base = dict(kind="train", case=name, size=size, B=batch, K=k, L=length)
  try:
    setup, _, step, state, flops_analytic, has_loop = build_case(
        name, size, length, batch, overrides)
    compiled, compile_s = util.compile_fn(step, state)
  except Exception as err:  # pylint: disable=broad-except
    if name != "opd":
      raise
    return dict(base, skipped=f"OPD step failed to build: {type(err).__name__}: {err}")
  base["V"] = setup.model.config.vocab_size
  args = (state, *step.bound_args)  # The compiled step takes the data key (and frozen) too.
  timings = util.time_with_reference({"step": lambda: compiled(*args)}, repeats, budget_s,
                                     reference)
  timing = timings["step"]
  flops_xla = util.xla_flops(compiled)
  flops = flops_analytic if has_loop else flops_xla
  gflops = flops / timing["median_s"] / 1e9
  return dict(
      base, P=setup.task.prompt_len, T=setup.task.target_len,
      params=util.param_count(state.params),
      median_s=timing["median_s"], min_s=timing["min_s"], repeats=len(timing["times_s"]),
      flops_xla=flops_xla, flops_analytic=flops_analytic,
      flops_counted="analytic (scan in step)" if has_loop else "xla",
      gflops=gflops, **util.peak_fraction(gflops, peak_gflops, timings, reference),
      peak_memory_bytes=util.peak_memory_bytes(compiled), compile_s=compile_s)


# ---------------------------------------------------------------- the sequence step's lower bound


def sampler_fn(setup: train.Setup, length: int):
  """The jitted sampler alone: ``sampling.sample_latents(model, params, prompt, key, L)``."""
  model = setup.model

  def sample(params, prompt_BxP, key):
    return sampling.sample_latents(model, params, prompt_BxP, key, length)

  sample.__name__ = "sampler"
  return jax.jit(sample)


def scoring_fn(setup: train.Setup):
  """The jitted K×K scoring pass, forward and backward, on fixed rollouts.

  ``jax.grad`` of the sum of ``sequence_term.pair_terms``' three [B, K, K, L]
  outputs (log p_i, log p_j of the rollout tokens and the per-token KL) with
  respect to the parameters: all the teacher-forced work the sequence term
  differentiates, without rollouts, estimator, reconstruction or optimiser.
  """
  model = setup.model

  def loss(params, prompt_BxP, tokens_BxKxL):
    terms = sequence_term.pair_terms(model, params, prompt_BxP, tokens_BxKxL)
    return sum(jnp.sum(a) for a in terms)

  scoring = jax.grad(loss)
  scoring.__name__ = "scoring"
  return jax.jit(scoring)


def decode_bytes_per_step(cfg: model_lib.ModelConfig, params, rows: int,
                          cache_len: int | None = None) -> dict:
  """Bytes a cached decode step of ``rows`` rows reads at least: the parameters and the KV cache.

  Every weight matrix (the unembedding included) is read whole; the three
  embedding tables (token, position, latent) are gathered, one d_model row of
  each per row. Parameters are float32 (cast to the compute dtype inside the
  step). The cache: ``cache_len`` positions (default ``cfg.max_len``) of keys
  and values, 2 · layers · rows · cache_len · d_model elements of the
  compute dtype. (A rollout of L tokens after a prompt of P needs at least
  the filled prefix, P + 1 + L/2 positions at its middle step, on average.)
  """
  cache_len = cfg.max_len if cache_len is None else cache_len
  tables = ("token_embed", "position_embed", "latent_embed")
  param_bytes = sum(a.size * a.dtype.itemsize for name, sub in params.items()
                    if name not in tables for a in jax.tree_util.tree_leaves(sub))
  param_bytes += sum(rows * params[name]["embedding"].shape[-1]
                     * params[name]["embedding"].dtype.itemsize for name in tables)
  cache_bytes = (2 * cfg.num_layers * rows * cache_len * cfg.d_model
                 * jnp.dtype(cfg.dtype).itemsize)
  return dict(param_bytes=int(param_bytes), cache_bytes=int(cache_bytes),
              bytes_per_decode_step=int(param_bytes + cache_bytes))


def lower_bound_case(size: str, length: int, batch: int, repeats: int, budget_s: float = 20.0,
                     reference: util.MatmulReference | None = None,
                     overrides: dict | None = None) -> dict:
  """The sequence-level step's time over its lower bound, all measured in the same calls.

  Three programs on one model and parameters, timed interleaved
  (``time_calls``): the sequence-level step (``train.make_train_step`` of
  ``train_config(..., **SEQ_STEP, **overrides)``), the jitted sampler alone
  (``sampler_fn``: the step's B·N prompts, L tokens, K latents) and the jitted
  K×K scoring pass forward and backward on the sampler's rollouts
  (``scoring_fn``). ``seq_step_over_lower_bound`` = step / (sampler +
  scoring): what the rest of the step (reconstruction, estimator, optimiser,
  and whatever XLA does worse in the fused program) costs on top of the two
  parts it cannot avoid.

  Returns:
    One record (kind 'lower_bound'): the three medians, the ratio, each
    program's peak memory and compile time, the sampler's tokens/s and the
    bytes it reads per decode step (``decode_bytes_per_step``).
  """
  overrides = dict(SEQ_STEP, **(overrides or {}))
  setup, _, step, state, _, _ = build_case("seq", size, length, batch, overrides)
  cfg = setup.model.config
  num_rollouts = setup.config.objective.sequence_term.num_rollouts
  prompt = jnp.repeat(setup.task.sample(jax.random.PRNGKey(3), batch).prompt, num_rollouts,
                      axis=0)
  key = jax.random.PRNGKey(4)
  step_c, step_compile_s = util.compile_fn(step, state)
  sampler_c, sampler_compile_s = util.compile_fn(sampler_fn(setup, length), state.params,
                                                 prompt, key)
  tokens = sampler_c(state.params, prompt, key).tokens
  scoring_c, scoring_compile_s = util.compile_fn(scoring_fn(setup), state.params, prompt,
                                                 tokens)
  args = (state, *step.bound_args)
  timings = util.time_with_reference(
      {"step": lambda: step_c(*args),
       "sampler": lambda: sampler_c(state.params, prompt, key),
       "scoring": lambda: scoring_c(state.params, prompt, tokens)},
      repeats, budget_s, reference)
  med = {name: timings[name]["median_s"] for name in ("step", "sampler", "scoring")}
  rows = prompt.shape[0] * cfg.num_latents
  return dict(
      kind="lower_bound", size=size, B=batch, N=num_rollouts, K=cfg.num_latents, L=length,
      V=cfg.vocab_size, P=setup.task.prompt_len, M=cfg.max_len, dtype=cfg.dtype,
      params=util.param_count(state.params),
      step_s=med["step"], sampler_s=med["sampler"], scoring_s=med["scoring"],
      step_min_s=timings["step"]["min_s"],
      repeats=len(timings["step"]["times_s"]),
      seq_step_over_lower_bound=med["step"] / (med["sampler"] + med["scoring"]),
      sampler_tokens_per_s=rows * length / med["sampler"],
      **decode_bytes_per_step(cfg, state.params, rows,
                              setup.task.prompt_len + 1 + length // 2),
      peak_memory_bytes=util.peak_memory_bytes(step_c),
      sampler_peak_memory_bytes=util.peak_memory_bytes(sampler_c),
      scoring_peak_memory_bytes=util.peak_memory_bytes(scoring_c),
      compile_s=dict(step=step_compile_s, sampler=sampler_compile_s,
                     scoring=scoring_compile_s),
      matmul_gflops_here=util.peak_fraction(0.0, 0.0, timings, reference)["matmul_gflops_here"])


# ---------------------------------------------------------------- vocabulary


def vocab_case(case: str, size: str, length: int, batch: int, vocab_size: int,
               num_latents: int, timed: bool, repeats: int = 3, budget_s: float = 20.0,
               reference: util.MatmulReference | None = None) -> dict:
  """Peak memory (and, if ``timed``, median time) of one step at vocabulary V and K latents.

  ``case`` is one of ``VOCAB_CASES``: 'rec' (reconstruction only), 'seq' (the
  sequence-level step, ``SEQ_STEP``) or 'opd' (on-policy distillation),
  with V = ``vocab_size`` (``vocab_overrides``). Untimed cases are compiled
  for their memory analysis only (``compile_fn(memory_only=True)``, abstract
  state): cheap at any V. A timed 'seq' case is a ``lower_bound_case`` (its
  record also carries ``seq_step_over_lower_bound``).

  Returns:
    One record (kind 'vocab'): case, size, B, K, L, V, peak_memory_bytes,
    timed, median_s (None if not timed), compile_s.
  """
  if case not in VOCAB_CASES:
    raise ValueError(f"case must be one of {tuple(VOCAB_CASES)}, got {case!r}.")
  overrides = dict(VOCAB_CASES[case], **vocab_overrides(vocab_size, num_latents))
  base = dict(kind="vocab", case=case, size=size, B=batch, K=num_latents, L=length,
              V=vocab_size, timed=timed)
  if timed and case == "seq":
    r = lower_bound_case(size, length, batch, repeats, budget_s, reference, overrides)
    return dict(base, median_s=r["step_s"], min_s=r["step_min_s"], repeats=r["repeats"],
                peak_memory_bytes=r["peak_memory_bytes"], compile_s=r["compile_s"]["step"],
                sampler_s=r["sampler_s"], scoring_s=r["scoring_s"],
                seq_step_over_lower_bound=r["seq_step_over_lower_bound"])
  _, _, step, state, _, _ = build_case(case, size, length, batch, overrides,
                                       abstract=not timed)
  compiled, compile_s = util.compile_fn(step, state, memory_only=not timed)
  record = dict(base, peak_memory_bytes=util.peak_memory_bytes(compiled), compile_s=compile_s,
                median_s=None)
  if timed:
    args = (state, *step.bound_args)
    timing = util.time_calls({"step": lambda: compiled(*args)}, repeats, budget_s)["step"]
    record.update(median_s=timing["median_s"], min_s=timing["min_s"],
                  repeats=len(timing["times_s"]))
  return record


def seq_length_case(size: str, lengths, batch: int, repeats: int, peak_gflops: float,
                    budget_s: float = 20.0,
                    reference: util.MatmulReference | None = None) -> list[dict]:
  """The sequence-level step (``SEQ_STEP``) at each L in ``lengths``, timed interleaved.

  ``train_config`` at T = L = the rollout length (so P = L/2, the task's
  shortest prompt), B = ``batch``. All the steps are compiled first, then
  timed round-robin (``time_calls``).

  Returns:
    One record per L (kind 'length', program 'seq_step'), with
    ``per_token_s`` = median / (B·N·K·L), the rollout tokens of the step.
  """
  runs, info = {}, {}
  for length in sorted(lengths):
    setup, _, step, state, flops, _ = build_case("seq", size, length, batch, SEQ_STEP)
    compiled, compile_s = util.compile_fn(step, state)
    args = (state, *step.bound_args)
    name = f"seq_step/L={length}"
    runs[name] = functools.partial(compiled, *args)
    info[name] = dict(setup=setup, L=length, flops=flops, compile_s=compile_s,
                      peak_memory_bytes=util.peak_memory_bytes(compiled))
  timings = util.time_with_reference(runs, repeats, budget_s, reference)
  records = []
  for name, i in info.items():
    setup, t = i["setup"], timings[name]
    cfg = setup.model.config
    rows = batch * setup.config.objective.sequence_term.num_rollouts * cfg.num_latents
    gflops = i["flops"] / t["median_s"] / 1e9
    records.append(dict(
        kind="length", program="seq_step", size=size, B=batch, K=cfg.num_latents, L=i["L"],
        P=setup.task.prompt_len, M=cfg.max_len, median_s=t["median_s"], min_s=t["min_s"],
        repeats=len(t["times_s"]), per_token_s=t["median_s"] / (rows * i["L"]),
        flops_analytic=i["flops"], gflops=gflops,
        **util.peak_fraction(gflops, peak_gflops, timings, reference),
        peak_memory_bytes=i["peak_memory_bytes"], compile_s=i["compile_s"]))
  return records
