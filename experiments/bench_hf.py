"""The peer users would pick instead: Hugging Face ``generate`` against the library sampler.

Optional (``pip install -e '.[bench-hf]'``: PyTorch and ``transformers``;
never imported by the test suite). ``hf_case`` builds, for one bench size, the
library model and a ``transformers`` GPT-2 of the same layers, width, heads,
MLP width and vocabulary (tanh-approximated GELU in both, dropout off), and
times in the same process, interleaved (``bench_util.time_calls``):

* ``sampler`` — ``sampling.sample_latents`` under ``jax.jit``: B prompts × K
  latents, L tokens, temperature 1;
* ``hf_generate`` — ``model.generate`` on the same B·K rows of
  ``[x, BOS]`` (P + 1 tokens), plain ancestral sampling at temperature 1
  (``do_sample=True, top_k=0, top_p=1``), ``use_cache=True``, exactly L new
  tokens (``min_new_tokens = max_new_tokens = L``), under
  ``torch.inference_mode``, float32, with PyTorch's default intra-op threads
  (one per core) and, as ``hf_generate_1_thread``, with one: the faster of
  the two is the comparison (on a loaded 2-core machine, OpenMP threads that
  spin-wait collapse PyTorch's throughput; ``experiments/bench.py`` sets
  ``OMP_WAIT_POLICY=PASSIVE`` before PyTorch loads, which avoids most of it);
* ``full_cache`` — the sampler's earlier design
  (``bench_rollouts.full_cache_rollout``), for the ratio before the bounded
  cache (``full_cache_over_hf_generate``);
* a ``[B·K, d] @ [d, d_ff]`` matmul (the MLP's first product at the decode
  step's rows) repeated 32 times, once in XLA and once in PyTorch: the
  frameworks' matmul throughput at these rows, which the ratio depends on.

``sampler_over_hf_generate`` = generate's median time (the faster thread
setting) / the sampler's (``_min``: from the fastest calls, less sensitive to
a loaded machine). The
models' parameters differ (random initialisations; GPT-2 ties its
unembedding to the token embedding and has no latent embedding): the FLOPs
of a rollout are the same up to the latent embedding's add.
"""

from __future__ import annotations

import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_rollouts
from experiments import bench_util as util
from latentdiv import vocab

MATMUL_REPEATS = 32


def available() -> str | None:
  """None if PyTorch and ``transformers`` import, else why not (for a 'skipped' record)."""
  try:
    for name in ("torch", "transformers"):
      importlib.import_module(name)
  except ImportError as e:
    return f"{e} (pip install -e '.[bench-hf]')"
  return None


def gpt2_like(cfg, seed: int = 0):
  """A ``transformers.GPT2LMHeadModel`` of ``cfg``'s shape (eval mode, float32, no dropout)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  config = transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
      activation_function="gelu_new",  # tanh GELU, as flax's nn.gelu
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=vocab.BOS, eos_token_id=vocab.EOS, pad_token_id=vocab.PAD)
  torch.manual_seed(seed)
  return transformers.GPT2LMHeadModel(config).eval()


def hf_generate_fn(hf_model, input_ids, length: int):
  """A no-argument call of ``hf_model.generate``: L sampled tokens per row, fixed length."""
  import torch  # pylint: disable=import-outside-toplevel
  attention_mask = torch.ones_like(input_ids)

  def run():
    with torch.inference_mode():
      return hf_model.generate(
          input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
          top_k=0, top_p=1.0, max_new_tokens=length, min_new_tokens=length,
          use_cache=True, pad_token_id=vocab.PAD, eos_token_id=vocab.EOS)

  return run


def _matmul_fns(rows: int, d: int, f: int):
  """(XLA call, PyTorch call, FLOPs): ``[rows, d] @ [d, f]`` ``MATMUL_REPEATS`` times, chained."""
  import torch  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.PRNGKey(0), (rows, d)) * 0.1
  w = jax.random.normal(jax.random.PRNGKey(1), (d, f)) * 0.1

  def chain(x, w):  # Each product depends on the last (no hoisting out of the loop).
    def body(c, _):
      return jnp.sum((x + c) @ w) * 1e-9, None
    return jax.lax.scan(body, jnp.zeros(()), None, length=MATMUL_REPEATS)[0]

  compiled, _ = util.compile_fn(jax.jit(chain), x, w)
  tx, tw = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(w))

  def torch_chain():
    with torch.inference_mode():
      c = torch.zeros(())
      for _ in range(MATMUL_REPEATS):
        c = torch.sum((tx + c) @ tw) * 1e-9
    return None

  return functools.partial(compiled, x, w), torch_chain, 2.0 * rows * d * f * MATMUL_REPEATS


def hf_case(size: str, length: int, batch: int, repeats: int, budget_s: float = 20.0,
            prompt_len: int = bench_rollouts.ROLLOUT_PROMPT_LEN) -> dict:
  """The sampler against HF ``generate`` on one size; one record (kind 'hf').

  B = ``batch`` prompts × K latents = B·K rows, P = ``prompt_len``, L =
  ``length``, V = the rollout cases' vocabulary. Returns a record with
  ``skipped`` (the reason) where PyTorch or ``transformers`` is missing.
  """
  base = dict(kind="hf", size=size, B=batch, L=length, P=prompt_len)
  reason = available()
  if reason is not None:
    return dict(base, skipped=reason)
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model, params = bench_rollouts.make_model(size, prompt_len, length)
  cfg = model.config
  prompt = bench_rollouts.make_prompts(batch, prompt_len, vocab_size=cfg.vocab_size)
  key = jax.random.PRNGKey(2)
  sampler, compile_s = util.compile_fn(bench_rollouts.sampler_rollout, model, params, prompt,
                                       key, length)
  rows = batch * cfg.num_latents
  hf_model = gpt2_like(cfg)
  # The same rows as the sampler's: each prompt once per latent, then BOS.
  ids = np.repeat(np.asarray(prompt), cfg.num_latents, axis=0)
  ids = torch.tensor(np.concatenate([ids, np.full((rows, 1), vocab.BOS)], axis=1))
  generate = hf_generate_fn(hf_model, ids, length)
  xla_mm, torch_mm, mm_flops = _matmul_fns(rows, cfg.d_model, cfg.d_ff)
  full_cache, _ = util.compile_fn(bench_rollouts.full_cache_rollout, model, params, prompt,
                                  key, length)
  threads = torch.get_num_threads()
  fns = {"sampler": functools.partial(sampler, params, prompt, key),
         "full_cache": functools.partial(full_cache, params, prompt, key),
         "hf_generate": generate, "xla_matmul": xla_mm, "torch_matmul": torch_mm}
  if threads > 1:
    fns["hf_generate_1_thread"] = _with_threads(torch, 1, generate)
  timings = util.time_calls(fns, repeats, budget_s)
  out = timings["hf_generate"]["output"]
  if tuple(out.shape) != (rows, prompt_len + 1 + length):
    raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                       f"{(rows, prompt_len + 1 + length)}: not a fixed-length rollout.")
  med = {k: v["median_s"] for k, v in timings.items()}
  fast = {k: v["min_s"] for k, v in timings.items()}
  # generate at its best: PyTorch's default threads or one thread, whichever
  # was faster here (OpenMP threads that spin on a loaded machine can be many
  # times slower than one thread).
  best = min((k for k in med if k.startswith("hf_generate")), key=med.get)
  med["hf"], fast["hf"] = med[best], min(v for k, v in fast.items() if k.startswith("hf_"))
  return dict(
      base, K=cfg.num_latents, rows=rows, V=cfg.vocab_size,
      sampler_s=med["sampler"], hf_generate_s=med["hf"], hf_best=best,
      hf_generate_default_threads_s=med["hf_generate"],
      hf_generate_1_thread_s=med.get("hf_generate_1_thread"),
      sampler_min_s=fast["sampler"], hf_generate_min_s=fast["hf"],
      sampler_times_s=timings["sampler"]["times_s"],
      hf_generate_times_s=timings[best]["times_s"],
      sampler_over_hf_generate=med["hf"] / med["sampler"],
      sampler_over_hf_generate_min=fast["hf"] / fast["sampler"],
      full_cache_s=med["full_cache"],
      full_cache_over_hf_generate=med["hf"] / med["full_cache"],
      sampler_tokens_per_s=rows * length / med["sampler"],
      hf_generate_tokens_per_s=rows * length / med["hf"],
      xla_matmul_gflops=mm_flops / fast["xla_matmul"] / 1e9,
      torch_matmul_gflops=mm_flops / fast["torch_matmul"] / 1e9,
      params=util.param_count(params),
      hf_params=int(sum(p.numel() for p in hf_model.parameters())),
      torch_threads=threads, cpu_count=os.cpu_count(), cpu=cpu_model(),
      omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), xla_flags=os.environ.get("XLA_FLAGS"),
      torch=torch.__version__, transformers=transformers.__version__,
      torch_blas=_torch_blas(torch), compile_s=compile_s,
      repeats=len(timings["sampler"]["times_s"]))


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo; '' where there is none): BLAS speed depends on it."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def _with_threads(torch, threads: int, fn):
  """``fn`` run with PyTorch's intra-op threads set to ``threads`` (restored after)."""
  def run():
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
      return fn()
    finally:
      torch.set_num_threads(before)
  return run


def _torch_blas(torch) -> str:
  """The BLAS PyTorch was built with (e.g. 'mkl'), from its build configuration."""
  for part in torch.__config__.show().replace("\n", ",").split(","):
    if "BLAS_INFO=" in part:
      return part.split("=", 1)[1].strip()
  return "unknown"
