"""Tests for latentdiv/model_oracle.py: the Transformer's enumerable outputs."""
from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from latentdiv import model_oracle
from latentdiv import oracle
from latentdiv import vocab
from test_sampling import _canonical_sequences


class ExactSequencesTest(parameterized.TestCase):

  @parameterized.parameters((5, 3), (6, 2), (5, 1))
  def test_matches_brute_force(self, vocab_size, length):
    tokens, mask, index = model_oracle.exact_sequences(vocab_size, length)
    alphabet = vocab_size - vocab.NUM_RESERVED
    self.assertEqual(tokens.shape[0], model_oracle.num_exact_sequences(alphabet, length))
    emitted = [vocab.EOS] + list(range(vocab.FIRST_CONTENT, vocab_size))
    expected = {tuple(row) for row in _canonical_sequences(emitted, length).tolist()}
    got = {tuple(row) for row in np.asarray(tokens).tolist()}
    self.assertEqual(got, expected)
    self.assertLen(got, tokens.shape[0])
    for row, m in zip(np.asarray(tokens), np.asarray(mask)):
      scored = int(m.sum())
      self.assertTrue(np.all(m[:scored] == 1) and np.all(m[scored:] == 0))
      self.assertTrue(scored == length or row[scored - 1] == vocab.EOS)
    all_rows = np.asarray(oracle.all_sequences(vocab_size, length))
    np.testing.assert_array_equal(all_rows[np.asarray(index)], np.asarray(tokens))


# ---------------------------------------------------------------------------
# Exact mode on a tiny Transformer (float64).
# ---------------------------------------------------------------------------


if __name__ == "__main__":
  absltest.main()
