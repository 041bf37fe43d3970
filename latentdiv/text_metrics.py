"""Multi-reference diversity metrics for text: pairwise BLEU, references covered, multi-reference BLEU.

The standard metrics of latent-variable (mixture) models of diverse generation
(Shen et al. 2019, as scored by fairseq's ``examples/translation_moe/score.py``),
computed with ``sacrebleu`` on host strings. For B prompts, ``hyps[b]`` holds
the K outputs of prompt b (one per latent) and ``refs[b]`` its references
(any number ≥ 1 per prompt).

* ``pairwise_bleu`` — corpus BLEU of every ordered pair (h_i, h_j), i ≠ j, of
  each prompt's K outputs: how alike the latents' outputs are (lower = more
  diverse).
* ``references_covered`` — per prompt, the number of distinct references that
  are the best match (highest smoothed sentence BLEU) of some output, averaged
  over prompts (ties go to the first reference; fairseq draws one at random).
* ``multi_reference_bleu`` — corpus BLEU of all B·K outputs, each against all
  references of its prompt (quality against the whole reference set).
* ``leave_one_out_bleu`` — fairseq's "average multi-reference BLEU
  (leave-one-out)": the mean over m of the corpus BLEU against every
  reference but the m-th (a prompt with fewer than m + 1 references keeps
  all of them in round m; fairseq assumes equal counts).

Scores are on sacrebleu's 0–100 scale. ``tokenize`` is sacrebleu's tokenizer
(``"13a"`` for detokenised text; ``"none"`` for pre-tokenised text, what
fairseq's corpus scores use; ``"char"`` for character-level data).

References:
  Shen, Ott, Auli, Ranzato (2019), "Mixture Models for Diverse Machine
  Translation: Tricks of the Trade", ICML. Post (2018), "A Call for Clarity
  in Reporting BLEU Scores", WMT (sacrebleu). DESIGN.md §9.1.
"""

from __future__ import annotations

from typing import Sequence

import sacrebleu
from sacrebleu.metrics import BLEU

Outputs = Sequence[Sequence[str]]
# sacrebleu's tokenizers (some need optional packages: 'ja-mecab', 'ko-mecab', 'spm', ...).
BLEU_TOKENIZERS = tuple(BLEU.TOKENIZERS)


def _check(hyps: Outputs, refs: Outputs | None = None) -> None:
  if not hyps:
    raise ValueError("hyps must hold the outputs of at least one prompt.")
  if len({len(h) for h in hyps}) != 1:
    raise ValueError("every prompt must have the same number K of outputs (one per latent).")
  if refs is not None:
    if len(refs) != len(hyps):
      raise ValueError(f"hyps ({len(hyps)} prompts) and refs ({len(refs)}) must align.")
    if any(len(r) == 0 for r in refs):
      raise ValueError("every prompt needs at least one reference.")


def corpus_bleu(hyps: Sequence[str], ref_streams: Sequence[Sequence[str | None]],
                tokenize: str = "13a") -> float:
  """sacrebleu's corpus BLEU (0–100); ``ref_streams[m][i]`` is the m-th reference of segment i (None: absent)."""
  return sacrebleu.corpus_bleu(list(hyps), [list(s) for s in ref_streams],
                               tokenize=tokenize).score


def sentence_bleu(hyp: str, ref: str, tokenize: str = "13a") -> float:
  """Smoothed sentence BLEU (0–100) as fairseq's scoring script computes it.

  One added to the matches and totals of orders 2–4, then sacrebleu's
  ``exp`` smoothing (which then only acts on order 1).
  """
  stats = sacrebleu.corpus_bleu([hyp], [[ref]], tokenize=tokenize)
  correct, total = list(stats.counts), list(stats.totals)
  for n in range(1, 4):
    correct[n] += 1
    total[n] += 1
  return BLEU.compute_bleu(correct, total, stats.sys_len, stats.ref_len,
                           smooth_method="exp").score


def pairwise_bleu(hyps: Outputs, tokenize: str = "13a") -> float:
  """Corpus BLEU of h_j against h_i over all prompts and ordered pairs i ≠ j (K ≥ 2)."""
  _check(hyps)
  if len(hyps[0]) < 2:
    raise ValueError("pairwise BLEU needs K >= 2 outputs per prompt.")
  system, reference = [], []
  for outputs in hyps:
    for i, h_i in enumerate(outputs):
      for j, h_j in enumerate(outputs):
        if i != j:
          reference.append(h_i)
          system.append(h_j)
  return corpus_bleu(system, [reference], tokenize)


def references_covered(hyps: Outputs, refs: Outputs, tokenize: str = "13a") -> float:
  """Mean over prompts of the number of distinct references that best match some output."""
  _check(hyps, refs)
  covered = 0
  for outputs, references in zip(hyps, refs):
    best = set()
    for h in outputs:
      scores = [sentence_bleu(h, r, tokenize) for r in references]
      best.add(max(range(len(references)), key=lambda m, s=scores: (s[m], -m)))
    covered += len(best)
  return covered / len(hyps)


def _reference_streams(refs: Outputs, k: int, skip: int | None = None) -> list[list]:
  """Streams of references for B·K outputs (each prompt's repeated K times), reference ``skip`` removed."""
  kept = [[r for m, r in enumerate(rs) if m != skip] for rs in refs]
  width = max(len(rs) for rs in kept)
  return [[rs[m] if m < len(rs) else None for rs in kept for _ in range(k)]
          for m in range(width)]


def multi_reference_bleu(hyps: Outputs, refs: Outputs, tokenize: str = "13a") -> float:
  """Corpus BLEU of all B·K outputs, each against every reference of its prompt."""
  _check(hyps, refs)
  k = len(hyps[0])
  return corpus_bleu([h for outputs in hyps for h in outputs], _reference_streams(refs, k),
                     tokenize)


def leave_one_out_bleu(hyps: Outputs, refs: Outputs, tokenize: str = "13a") -> float:
  """Mean over m of the multi-reference corpus BLEU with the m-th reference of each prompt held out.

  Needs ≥ 2 references for every prompt (else NaN): what remains must not be empty.
  """
  _check(hyps, refs)
  if min(len(rs) for rs in refs) < 2:
    return float("nan")
  k = len(hyps[0])
  system = [h for outputs in hyps for h in outputs]
  scores = [corpus_bleu(system, _reference_streams(refs, k, skip=m), tokenize)
            for m in range(max(len(rs) for rs in refs))]
  return sum(scores) / len(scores)


def diversity_report(hyps: Outputs, refs: Outputs, tokenize: str = "13a") -> dict:
  """All four metrics (pairwise BLEU needs K ≥ 2: NaN otherwise), as a dict of floats."""
  return dict(
      pairwise_bleu=pairwise_bleu(hyps, tokenize) if len(hyps[0]) > 1 else float("nan"),
      references_covered=references_covered(hyps, refs, tokenize),
      multi_reference_bleu=multi_reference_bleu(hyps, refs, tokenize),
      leave_one_out_bleu=leave_one_out_bleu(hyps, refs, tokenize))
