"""Tests for latentdiv.logprobs: the shared token log-prob, log-likelihood and mask primitives."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from latentdiv import logprobs
from latentdiv import vocab

EOS, PAD = vocab.EOS, vocab.PAD


def np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_sequence_log_likelihood(logits, targets, mask):
  log_probs = np_log_softmax(logits)
  return sum(log_probs[t, targets[t]] for t in range(len(targets)) if mask[t])


class SequenceLogLikelihoodTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_and_ignores_pad(self):
    rng = np.random.default_rng(0)
    logits = np.asarray(rng.normal(size=(6, 9)) * 2, np.float32)
    targets = np.array([5, 7, 3, vocab.EOS, vocab.PAD, vocab.PAD], np.int32)
    mask = targets != vocab.PAD
    got = self.variant(logprobs.sequence_log_likelihood)(logits, targets, mask)
    chex.assert_shape(got, ())
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, np_sequence_log_likelihood(logits, targets, mask), rtol=1e-5)
    # Whatever the PAD positions hold, they do not count.
    other = logits.copy()
    other[4:] = rng.normal(size=(2, 9)) * 50
    np.testing.assert_allclose(logprobs.sequence_log_likelihood(other, targets, mask), got, rtol=1e-6)

  def test_vmap_over_batch_and_latents(self):
    rng = np.random.default_rng(1)
    logits = np.asarray(rng.normal(size=(3, 2, 5, 7)), np.float32)  # [B, K, T, V]
    targets = rng.integers(vocab.FIRST_CONTENT, 7, size=(3, 5)).astype(np.int32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    fn = jax.jit(jax.vmap(jax.vmap(logprobs.sequence_log_likelihood, (0, None, None))))
    got = fn(logits, targets, mask)
    chex.assert_shape(got, (3, 2))
    want = [[np_sequence_log_likelihood(logits[b, k], targets[b], mask[b]) for k in range(2)] for b in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], 0.0)

  def test_extreme_logits_and_fully_masked_have_finite_gradients(self):
    signs = np.random.default_rng(2).choice([-1.0, 1.0], size=(5, 6))
    logits = jnp.asarray(signs * 1e4, jnp.float32)
    targets = jnp.asarray([3, 4, 5, 0, 1], jnp.int32)
    for mask in (np.array([1, 1, 1, 0, 0], bool), np.zeros(5, bool)):
      value, grad = jax.value_and_grad(logprobs.sequence_log_likelihood)(logits, targets, mask)
      chex.assert_tree_all_finite((value, grad))
      if not mask.any():
        self.assertEqual(float(value), 0.0)
        np.testing.assert_array_equal(grad, 0.0)

  def test_shape_errors_name_the_argument(self):
    logits = jnp.zeros((5, 6))
    with self.assertRaisesRegex(ValueError, "logits_TxV"):
      logprobs.sequence_log_likelihood(jnp.zeros((2, 5, 6)), jnp.zeros(5, jnp.int32), jnp.ones(5))
    with self.assertRaisesRegex(ValueError, "tokens_T, mask_T"):
      logprobs.sequence_log_likelihood(logits, jnp.zeros(5, jnp.int32), jnp.ones(4))
    with self.assertRaisesRegex(ValueError, r"len\(tokens_T\)"):
      logprobs.sequence_log_likelihood(logits, jnp.zeros(4, jnp.int32), jnp.ones(4))
    with self.assertRaisesRegex(ValueError, "tokens_T must hold integer"):
      logprobs.sequence_log_likelihood(logits, jnp.zeros(5), jnp.ones(5))



class TokenLogProbsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_for_any_leading_shape(self):
    rng = np.random.default_rng(3)
    logits = np.asarray(rng.normal(size=(2, 3, 4, 7)), np.float32)
    tokens = rng.integers(0, 7, size=(2, 3, 4)).astype(np.int32)
    got = self.variant(logprobs.token_log_probs)(logits, tokens)
    chex.assert_shape(got, (2, 3, 4))
    want = np.take_along_axis(np_log_softmax(logits), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_gradient_is_onehot_minus_softmax(self):
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(5,)), jnp.float32)
    grad = jax.grad(lambda z: logprobs.token_log_probs(z, jnp.asarray(2)))(logits)
    np.testing.assert_allclose(grad, np.eye(5)[2] - jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)

  def test_shape_mismatch_is_a_value_error(self):
    with self.assertRaisesRegex(ValueError, "tokens.shape"):
      logprobs.token_log_probs(jnp.zeros((3, 5)), jnp.zeros((4,), jnp.int32))


class MaskTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_through_eos(self):
    tokens = np.array([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 3, 0], [4, 4, 4, 2]])
    expected = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(self.variant(logprobs.mask_through_eos)(tokens), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_and_content_masks(self):
    tokens = np.array([[5, 6, EOS, PAD], [5, PAD, 7, 8], [EOS, 3, EOS, PAD], [4, 4, 4, 4]])
    np.testing.assert_array_equal(
        self.variant(logprobs.output_mask)(tokens),
        [[1, 1, 1, 0], [1, 0, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(
        self.variant(logprobs.content_mask)(tokens),
        [[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(logprobs.first_eos_index(tokens), [2, 4, 0, 4])

  def test_other_vocabularies(self):
    # A user whose EOS is 9 and PAD is 7, content from 10.
    tokens = np.array([11, 12, 9, 7, 7])
    np.testing.assert_array_equal(logprobs.output_mask(tokens, eos=9, pad=7), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(logprobs.content_mask(tokens, eos=9, first_content=10),
                                  [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(logprobs.mask_through_eos(tokens, eos=12), [1, 1, 0, 0, 0])


if __name__ == "__main__":
  absltest.main()
