"""The practitioners' OPD variants against the exact gradient, by enumeration (DESIGN.md §6.4, §7).

    python experiments/opd_bias.py              # prints the tables of docs/RESULTS.md

For three student/teacher pairs small enough to enumerate every response
(two tabular models, V = 3, L = 3 without EOS and L = 4 with EOS; a 1-layer
Transformer student and a wider teacher, V = 5, L = 3 with EOS; float64
sums), runs ``opd_exact.bias_table``: the exact mean of each variant's
gradient (the library's ``opd.opd_loss`` on every response, weighted by its
exact probability under the sampler) against the exact ``∇KL(π ‖ q)``, as a
function of the discount γ ∈ {0, 0.25, 0.5, 0.75, 0.9, 1}. Each cell is
``relative error / cosine``. It also checks theory: every on-policy and
sequence-weighted variant's mean equals ``C + Σ_{t<t'} W[t, t'] F[t, t']``
(``opd_exact.predicted_mean``) and the four to-go forms share their means;
the largest deviations are printed under the tables. Writes
``ROOT/opd_bias.md`` and ``ROOT/opd_bias.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

_ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT_DIR not in sys.path:
  sys.path.insert(0, _ROOT_DIR)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import sweep  # noqa: E402
from latentdiv import model as model_lib  # noqa: E402
from latentdiv import opd_exact  # noqa: E402
from latentdiv import oracle  # noqa: E402
from latentdiv import vocab  # noqa: E402

_ROOT = sweep.define_shared_flag(flags.DEFINE_string, "root", "workdir/opd_bias",
                                 "Directory of the output files.")
_ALPHA = flags.DEFINE_float("teacher_mix", 0.2, "α of the teacher-mixed rows (MiniLLM: 0.2).")

GAMMAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
V = opd_exact.Variant


def tabular(vocab_size, length, eos):
  """(name, models, sizes): a tabular student (latent 0) and a sharper tabular teacher."""
  student = oracle.init_tabular_params(jax.random.PRNGKey(0), 1, vocab_size, length, 1.0)
  teacher = oracle.init_tabular_params(jax.random.PRNGKey(11), 1, vocab_size, length, 2.0)
  fn = lambda p, y: oracle.tabular_logits_fn(p, y, 0)  # noqa: E731
  name = f"tabular V = {vocab_size}, L = {length}, " + ("EOS" if eos else "no EOS")
  return name, (fn, student, fn, teacher), dict(
      vocab_size=vocab_size, length=length, eos_id=(vocab_size - 1) if eos else None)


def transformer(length=3):
  """A 1-layer d = 8 Transformer student and a d = 16 teacher, V = 5, EOS likely."""
  prompt = jnp.asarray([[3, 4]], jnp.int32)
  size = vocab.NUM_RESERVED + 2

  def make(d_model, seed, scale, eos_bias):
    model = model_lib.LatentTransformer(model_lib.ModelConfig(
        vocab_size=size, num_latents=1, max_len=prompt.shape[1] + length, d_model=d_model,
        num_heads=2, num_layers=1, d_ff=2 * d_model))
    params = model_lib.init_params(model, jax.random.PRNGKey(seed))
    params["unembed"]["kernel"] = scale * params["unembed"]["kernel"]
    params["unembed"]["bias"] = params["unembed"]["bias"].at[vocab.EOS].add(eos_bias)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

    def fn(p, tokens_NxL):
      n = tokens_NxL.shape[0]
      return model_lib.teacher_forced_logits(model, p, jnp.repeat(prompt, n, axis=0),
                                             tokens_NxL, jnp.zeros((n,), jnp.int32))
    return fn, params

  sfn, sp = make(8, 0, 1.5, 2.5)
  tfn, tp = make(16, 1, 3.0, 0.0)
  return (f"Transformer (1 layer, d = 8 ← d = 16), V = {size}, L = {length}, EOS",
          (sfn, sp, tfn, tp), dict(vocab_size=size, length=length, eos_id=vocab.EOS,
                                   pad_id=vocab.PAD))


def families(alpha):
  """(row label, [variant per γ]) of the table."""
  mix = dict(teacher_mix=alpha)
  rows = [
      ("`kl_to_go` / `rao_blackwell` / `reward_to_go` (± `single_step_kl`)",
       [V("kl_to_go", g) for g in GAMMAS]),
      ("`rao_blackwell`, `length_normalize`", [V("rao_blackwell", g, True) for g in GAMMAS]),
      ("`reward_to_go`, `length_normalize`", [V("reward_to_go", g, True) for g in GAMMAS]),
      (f"`kl_to_go`, teacher-mixed α = {alpha:g}, `sequence` weights",
       [V("kl_to_go", g, **mix) for g in GAMMAS]),
      (f"`kl_to_go`, teacher-mixed α = {alpha:g}, `token` weights",
       [V("kl_to_go", g, **mix, mix_weight="token") for g in GAMMAS]),
      (f"`rao_blackwell`, teacher-mixed α = {alpha:g}, `token` weights",
       [V("rao_blackwell", g, **mix, mix_weight="token") for g in GAMMAS]),
      (f"MiniLLM: `reward_to_go` + `single_step_kl` + `length_normalize`, α = {alpha:g} `token`",
       [V("reward_to_go", g, True, True, **mix, mix_weight="token") for g in GAMMAS]),
  ]
  # The forms whose means must equal the first row's (theory): checked, not shown.
  same = ([V("rao_blackwell", g) for g in GAMMAS] + [V("reward_to_go", g) for g in GAMMAS]
          + [V("reward_to_go", g, single_step_kl=True) for g in GAMMAS])
  return rows, same


def model_table(name, models, sizes, alpha):
  rows, same = families(alpha)
  variants = [v for _, vs in rows for v in vs] + same
  start = time.time()
  results = opd_exact.bias_table(*models, variants, **sizes)
  by_variant = dict(zip(variants, results))
  lines = [f"**{name}** ({time.time() - start:.0f} s)", "",
           "| variant | " + " | ".join(f"γ = {g:g}" for g in GAMMAS) + " |",
           "|---|" + "---|" * len(GAMMAS)]
  for text, vs in rows:
    cells = [f"{by_variant[v]['relative_error']:.3f} / {by_variant[v]['cosine']:.3f}"
             for v in vs]
    lines.append(f"| {text} | " + " | ".join(cells) + " |")
  theory = max(r.get("theory_error", 0.0) for r in results)
  first = rows[0][1]
  spread = max(abs(by_variant[v]["relative_error"] - by_variant[first[i % len(GAMMAS)]][
      "relative_error"]) for i, v in enumerate(same))
  lines += ["", f"Largest deviation of a measured mean from theory's prediction (relative "
            f"to ‖∇KL‖): {theory:.1e}; of the four to-go forms' relative errors from one "
            f"another: {spread:.1e}. Total variance of one response's estimate at γ = 1 / 0: "
            + ", ".join(f"{est} {by_variant[V(est, 1.0)]['variance']:.2f} / "
                        f"{by_variant[V(est, 0.0)]['variance']:.2f}"
                        for est in ("reward_to_go", "kl_to_go", "rao_blackwell")) + "."]
  return "\n".join(lines), results


def main(argv):
  del argv
  jax.config.update("jax_enable_x64", True)
  os.makedirs(_ROOT.value, exist_ok=True)
  settings = [tabular(3, 3, eos=False), tabular(3, 4, eos=True), transformer()]
  tables, records = [], {}
  for name, models, sizes in settings:
    table, results = model_table(name, models, sizes, _ALPHA.value)
    print(table + "\n", flush=True)
    tables.append(table)
    records[name] = results
  with open(os.path.join(_ROOT.value, "opd_bias.md"), "w") as f:
    f.write("\n\n".join(tables) + "\n")
  with open(os.path.join(_ROOT.value, "opd_bias.json"), "w") as f:
    json.dump(records, f, indent=1, default=lambda x: float(np.asarray(x)))


if __name__ == "__main__":
  app.run(main)
