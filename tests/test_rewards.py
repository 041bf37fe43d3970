"""Tests for latentdiv.rewards: the exact edit-distance reward and token sentence BLEU."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu
from absl.testing import absltest

from latentdiv import rewards
from latentdiv import vocab


def _row(content, t=10):
  return jnp.array(list(content) + [vocab.EOS] + [vocab.PAD] * (t - len(content) - 1),
                   jnp.int32)


def _reference_bleu(hyp, ref):
  """sacrebleu's sentence BLEU with add-one smoothing of orders >= 2, on token ids as words."""
  bleu = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="add-k", smooth_value=1,
                                effective_order=False)
  return bleu.sentence_score(" ".join(map(str, hyp)), [" ".join(map(str, ref))]).score / 100


class RewardsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_negative_edit_distance(self):
    fn = self.variant(rewards.negative_edit_distance)
    self.assertEqual(float(fn(_row([3, 4, 5]), _row([3, 4, 5]))), 0.0)
    self.assertEqual(float(fn(_row([4, 5, 6]), _row([3, 4, 5]))), -2.0)  # delete 3, insert 6
    self.assertEqual(float(fn(_row([]), _row([3, 4, 5, 6]))), -4.0)

  def test_bleu_by_hand(self):
    # hyp "a b c d", ref "a b c e": p1 = 3/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = 1/2.
    got = float(rewards.sentence_bleu(_row([3, 4, 5, 6]), _row([3, 4, 5, 7])))
    want = (0.75 * 0.75 * (2 / 3) * 0.5) ** 0.25
    self.assertAlmostEqual(got, want, places=5)
    # Brevity penalty: hyp "a b" against ref "a b c d": exp(1 − 4/2) · (1 · 1 · 1 · 1)^(1/4).
    got = float(rewards.sentence_bleu(_row([3, 4]), _row([3, 4, 5, 6])))
    self.assertAlmostEqual(got, np.exp(-1.0), places=5)
    self.assertEqual(float(rewards.sentence_bleu(_row([]), _row([3]))), 0.0)
    self.assertEqual(float(rewards.sentence_bleu(_row([7, 8]), _row([3, 4]))), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bleu_matches_sacrebleu(self):
    rng = np.random.default_rng(0)
    fn = self.variant(jax.vmap(rewards.sentence_bleu))
    hyps, refs = [], []
    for _ in range(40):
      hyps.append(list(rng.integers(3, 7, size=rng.integers(1, 10))))
      refs.append(list(rng.integers(3, 7, size=rng.integers(1, 10))))
    got = fn(jnp.stack([_row(h) for h in hyps]), jnp.stack([_row(r) for r in refs]))
    want = [_reference_bleu(h, r) for h, r in zip(hyps, refs)]
    np.testing.assert_allclose(got, want, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
