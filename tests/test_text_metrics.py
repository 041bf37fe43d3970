"""Tests for latentdiv.text_metrics against hand-computed BLEU values."""

import math

from absl.testing import absltest

from latentdiv import text_metrics as tm

# hyp "a b c d e" vs ref "a b c d f": p1..p4 = 4/5, 3/4, 2/3, 1/2, BP = 1.
ONE_WORD_OFF = 100 * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25


class TextMetricsTest(absltest.TestCase):

  def test_corpus_and_sentence_bleu_by_hand(self):
    self.assertAlmostEqual(tm.corpus_bleu(["a b c d e"], [["a b c d f"]]), ONE_WORD_OFF,
                           places=4)
    # fairseq's smoothing: +1 on orders 2-4. "a b c d e" vs "a b x d e":
    # p1 = 4/5, p2 = (2+1)/(4+1), p3 = (0+1)/(3+1), p4 = (0+1)/(2+1).
    want = 100 * (0.8 * 0.6 * 0.25 * (1 / 3)) ** 0.25
    self.assertAlmostEqual(tm.sentence_bleu("a b c d e", "a b x d e"), want, places=4)

  def test_pairwise_bleu(self):
    self.assertAlmostEqual(tm.pairwise_bleu([["a b c d e", "a b c d e"]]), 100.0, places=4)
    self.assertAlmostEqual(tm.pairwise_bleu([["a b c d e", "a b c d f"]]), ONE_WORD_OFF,
                           places=4)
    self.assertAlmostEqual(tm.pairwise_bleu([["a b c d e", "v w x y z"]]), 0.0, places=4)
    with self.assertRaisesRegex(ValueError, "K >= 2"):
      tm.pairwise_bleu([["a b"]])

  def test_references_covered(self):
    hyps = [["a b c d e", "a b c d e", "x y z w v"], ["p q r s t"] * 3]
    refs = [["a b c d e", "x y z w v", "p q r s t"], ["p q r s t", "a b c d e"]]
    self.assertAlmostEqual(tm.references_covered(hyps, refs), (2 + 1) / 2)

  def test_multi_reference_and_leave_one_out(self):
    hyps = [["a b c d e", "x y z w v"]]
    refs = [["a b c d e", "x y z w v"]]
    self.assertAlmostEqual(tm.multi_reference_bleu(hyps, refs), 100.0, places=4)
    # Holding out either reference, one output matches fully and the other not at all:
    # p_n = 1/2 for every order, BP = 1.
    self.assertAlmostEqual(tm.leave_one_out_bleu(hyps, refs), 50.0, places=4)
    self.assertTrue(math.isnan(tm.leave_one_out_bleu(hyps, [["a b c d e"]])))
    report = tm.diversity_report(hyps, refs)
    self.assertEqual(set(report), {"pairwise_bleu", "references_covered",
                                   "multi_reference_bleu", "leave_one_out_bleu"})

  def test_variable_reference_counts_and_errors(self):
    hyps = [["a b c d e", "a b c d e"], ["x y z w v", "x y z w v"]]
    refs = [["a b c d e", "q q q q q", "r r r r r"], ["x y z w v"]]
    self.assertAlmostEqual(tm.multi_reference_bleu(hyps, refs), 100.0, places=4)
    with self.assertRaisesRegex(ValueError, "at least one reference"):
      tm.references_covered(hyps, [["a"], []])
    with self.assertRaisesRegex(ValueError, "must align"):
      tm.multi_reference_bleu(hyps, [["a"]])


if __name__ == "__main__":
  absltest.main()
