"""Tests for latentdiv.opd's pure losses (GKD against a TRL-style NumPy reference)."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from latentdiv import divergences
from latentdiv import opd
from test_divergences import BETAS, TEMPERATURES, _extreme_logits, _random_logits
from test_divergences import _values_and_grads, np_kl, np_softmax


def np_gkd_loss(student_logits, teacher_logits, mask, beta, temperature, reduction):
  """TRL's generalized_jsd_loss reductions over [tokens, V] per-element terms.

  Per-element term of KL(A‖M) is a_v log(a_v/m_v); TRL keeps them until the
  reduction. The endpoints follow DESIGN (continuous), not TRL's special case.
  """
  p = np_softmax(np.asarray(teacher_logits, np.float64) / temperature)
  q = np_softmax(np.asarray(student_logits, np.float64) / temperature)
  m = beta * p + (1 - beta) * q
  elem = beta * p * np.log(p / m) + (1 - beta) * q * np.log(q / m)  # [B, T, V]
  if mask is None:
    if reduction == "batchmean":
      return elem.sum() / elem.shape[0]
    if reduction == "sum":
      return elem.sum()
    if reduction == "mean":
      return elem.mean()
    return elem.sum(-1)
  selected = elem[np.asarray(mask, bool)]  # [N, V], TRL's jsd[mask]
  if reduction == "batchmean":
    return selected.sum() / np.asarray(mask, bool).sum()
  if reduction == "sum":
    return selected.sum()
  if reduction == "mean":
    return selected.mean()
  return np.where(np.asarray(mask, bool), elem.sum(-1), 0.0)




class GKDLossTest(chex.TestCase):

  def _inputs(self):
    student = _random_logits(30, (2, 5, 7))
    teacher = _random_logits(31, (2, 5, 7))
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], bool)  # masked label positions
    return student, teacher, mask

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("batchmean", "sum", "mean", "none")
  def test_matches_trl_style_numpy(self, reduction):
    student, teacher, mask = self._inputs()
    fn = self.variant(lambda s, t, m, b, tau: opd.gkd_loss(s, t, m, b, tau, reduction))
    for beta, temperature in itertools.product(BETAS, TEMPERATURES):
      got = fn(student, teacher, mask, beta, temperature)
      want = np_gkd_loss(student, teacher, mask, beta, temperature, reduction)
      chex.assert_shape(got, np.shape(want))
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7,
                                 err_msg=f"beta={beta}, T={temperature}, {reduction}")

  @parameterized.parameters("batchmean", "sum", "mean", "none")
  def test_without_mask_matches_trl_style_numpy(self, reduction):
    student, teacher, _ = self._inputs()
    got = opd.gkd_loss(student, teacher, None, 0.3, 1.0, reduction)
    np.testing.assert_allclose(got, np_gkd_loss(student, teacher, None, 0.3, 1.0, reduction), rtol=1e-4)

  def test_teacher_is_p_student_is_q(self):
    # Near β=0 the loss/β is the forward KL(teacher ‖ student), as in TRL.
    student, teacher, mask = self._inputs()
    with jax.enable_x64(True):
      s, t = jnp.asarray(student, jnp.float64), jnp.asarray(teacher, jnp.float64)
      beta = 1e-8  # the O(β) correction is β·χ²-like, large for these peaked logits
      near_zero = opd.gkd_loss(s, t, mask, beta, 1.0, "none") / beta
      fwd = np.where(mask, np_kl(np_softmax(teacher), np_softmax(student)), 0.0)
      np.testing.assert_allclose(near_zero, fwd, rtol=1e-5, atol=1e-12)

  def test_endpoints_are_continuous_unlike_trl(self):
    # TRL returns the plain KL at exactly β=0; this library returns the limit value 0
    # and exposes that KL as forward_kl.
    student, teacher, mask = self._inputs()
    np.testing.assert_array_equal(opd.gkd_loss(student, teacher, mask, 0.0, 1.0), 0.0)
    np.testing.assert_array_equal(opd.gkd_loss(student, teacher, mask, 1.0, 1.0), 0.0)
    trl_beta0 = np.where(mask, np_kl(np_softmax(teacher), np_softmax(student)), 0.0).sum() / mask.sum()
    fwd = divergences.forward_kl(teacher, student)
    np.testing.assert_allclose(jnp.sum(jnp.where(mask, fwd, 0.0)) / mask.sum(), trl_beta0, rtol=1e-5)

  def test_fully_masked_and_extreme_logits_stay_finite(self):
    student = jnp.asarray(_extreme_logits(32, (2, 4, 6)))
    teacher = jnp.asarray(_extreme_logits(33, (2, 4, 6)))
    fns = [functools.partial(opd.gkd_loss, labels_mask_BxT=mask, beta=beta, temperature=1.0,
                             reduction=reduction)
           for mask in (np.zeros((2, 4), bool), np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool))
           for reduction in opd.GKD_REDUCTIONS
           for beta in (0.0, 0.5, 1.0)]
    chex.assert_tree_all_finite(_values_and_grads(fns, student, teacher))
    np.testing.assert_array_equal(opd.gkd_loss(student, teacher, np.zeros((2, 4), bool)), 0.0)

  def test_bad_reduction_and_shapes(self):
    student, teacher, mask = self._inputs()
    with self.assertRaisesRegex(ValueError, "reduction must be one of .*batchmean.*none"):
      opd.gkd_loss(student, teacher, mask, 0.5, 1.0, "average")
    with self.assertRaisesRegex(AssertionError, "labels_mask_BxT"):
      opd.gkd_loss(student, teacher, mask[:, :4], 0.5, 1.0)
    with self.assertRaisesRegex(AssertionError, "teacher_logits_BxTxV"):
      opd.gkd_loss(student, teacher[:, :4], mask, 0.5, 1.0)
    with self.assertRaisesRegex(AssertionError, "student_logits_BxTxV"):
      opd.gkd_loss(student[0], teacher[0], mask, 0.5, 1.0)


# ---------------------------------------------------------------------------
# Token weighting and token-weighted JSD.


if __name__ == "__main__":
  absltest.main()
