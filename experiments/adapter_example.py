"""Your own Flax model and your own token ids with latentdiv's losses and its exactness oracle.

    python experiments/adapter_example.py

The library's losses and estimators are pure functions of logits, tokens and
masks (DESIGN.md §2–§5, §7), so any model that returns teacher-forced logits
fits. This script, run by ``tests/test_adapter_example.py``:

1. defines a model that is not latentdiv's — a GRU decoder (``flax.linen``)
   with a latent embedding, over YOUR vocabulary: ids 0..3 with PAD = 3 and
   EOS = 2 (not the library's PAD = 0, EOS = 2 layout: the ids are arguments);
2. trains it for a few steps on toy data with the library's hard-EM
   reconstruction (``reconstruction.reconstruction_loss``) of sequence
   log-likelihoods (``logprobs.sequence_log_likelihood`` with
   ``logprobs.output_mask(tokens, eos=MY_EOS, pad=MY_PAD)``) minus the token
   JSD between latents (``divergences.token_jsd``);
3. checks the library's sequence-level KL gradient estimator
   (``estimators.sequence_kl_surrogate_from_logits``, ``rao_blackwell``) on
   this model against the exact gradient of ``KL(p_0 ‖ p_1)`` by enumerating
   all 4^3 outputs (``oracle.exact_kl_grad``; the estimator's exact mean by
   ``moments.estimator_gradient_moments``), and a Monte-Carlo average of it
   on exact samples of the model (``oracle.sample_sequences``).
"""

from __future__ import annotations

import functools
import os
import sys

_ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT_DIR not in sys.path:
  sys.path.insert(0, _ROOT_DIR)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from latentdiv import divergences  # noqa: E402
from latentdiv import estimators  # noqa: E402
from latentdiv import logprobs  # noqa: E402
from latentdiv import moments  # noqa: E402
from latentdiv import oracle  # noqa: E402
from latentdiv import reconstruction  # noqa: E402

MY_VOCAB = 4          # ids: 0 = "a", 1 = "b", 2 = EOS, 3 = PAD
MY_EOS, MY_PAD = 2, 3
NUM_LATENTS = 2
LENGTH = 3            # outputs of at most 3 tokens (EOS included)


class GruDecoder(nn.Module):
  """A user's decoder: ``(tokens [N, L], latent [N]) -> next-token logits [N, L, V]`` (causal)."""

  vocab_size: int = MY_VOCAB
  num_latents: int = NUM_LATENTS
  hidden: int = 16

  @nn.compact
  def __call__(self, tokens_NxL, latent_N):
    start = jnp.full(tokens_NxL.shape[:1] + (1,), self.vocab_size, tokens_NxL.dtype)
    inputs = jnp.concatenate([start, tokens_NxL[:, :-1]], axis=1)  # shift right: causal
    x = nn.Embed(self.vocab_size + 1, self.hidden)(inputs)
    x = x + nn.Embed(self.num_latents, self.hidden)(latent_N)[:, None, :]
    x = nn.RNN(nn.GRUCell(self.hidden))(x)
    return nn.Dense(self.vocab_size)(x)


def make_logits_fn(model):
  """The oracle's model interface: ``(params, tokens_NxL, latent) -> logits_NxLxV``."""
  def logits_fn(params, tokens_NxL, latent):
    return model.apply(params, tokens_NxL, jnp.full(tokens_NxL.shape[:1], latent, jnp.int32))
  return logits_fn


def diversity_loss(logits_fn, params, tokens_BxL, lambda_jsd=0.1):
  """Hard-EM reconstruction over the K latents − λ · token JSD between them (DESIGN.md §3–4)."""
  logits_KxBxLxV = jnp.stack([logits_fn(params, tokens_BxL, k) for k in range(NUM_LATENTS)])
  logits_BxKxLxV = jnp.moveaxis(logits_KxBxLxV, 0, 1)
  mask_BxL = jax.vmap(functools.partial(logprobs.output_mask, eos=MY_EOS, pad=MY_PAD))(
      tokens_BxL)
  per_latent = jax.vmap(logprobs.sequence_log_likelihood, in_axes=(0, None, None))
  loglik_BxK = jax.vmap(per_latent)(logits_BxKxLxV, tokens_BxL, mask_BxL)
  rec = reconstruction.reconstruction_loss("hard_em", loglik_BxK)
  jsd = jax.vmap(divergences.token_jsd)(logits_BxKxLxV, mask_BxL)
  return rec.loss - lambda_jsd * jnp.mean(jsd.value)


def estimator_gradient(logits_fn, params, tokens_NxL):
  """Mean over rollouts ``y ~ p_0`` of the rao_blackwell surrogate's gradient: ≈ −∇KL(p_0 ‖ p_1)."""
  mask_NxL = logprobs.mask_through_eos(tokens_NxL, eos=MY_EOS).astype(jnp.float32)

  def surrogate(p):
    score, target = logits_fn(p, tokens_NxL, 0), logits_fn(p, tokens_NxL, 1)
    one = functools.partial(estimators.sequence_kl_surrogate_from_logits, "rao_blackwell")
    return jnp.mean(jax.vmap(one)(score, target, tokens_NxL, mask_NxL))

  return jax.grad(surrogate)(params)


def main(train_steps: int = 30, mc_samples: int = 4000, seed: int = 0) -> dict:
  """Runs the three parts; returns the figures the test checks."""
  model = GruDecoder()
  logits_fn = make_logits_fn(model)
  key_init, key_mc = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init(key_init, jnp.zeros((1, LENGTH), jnp.int32), jnp.zeros((1,), jnp.int32))

  # 2. Train on two "strategies" written in the user's ids: "a a EOS" and "b EOS PAD".
  data = jnp.array([[0, 0, MY_EOS], [1, MY_EOS, MY_PAD]] * 8, jnp.int32)
  optimizer = optax.adam(3e-2)
  opt_state = optimizer.init(params)
  loss_fn = jax.jit(lambda p: diversity_loss(logits_fn, p, data))
  losses = [float(loss_fn(params))]

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: diversity_loss(logits_fn, p, data))(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(train_steps):
    params, opt_state, _ = step(params, opt_state)
  losses.append(float(loss_fn(params)))

  # 3. The estimator on the user's model, against the exact gradient by enumeration.
  exact = oracle.exact_kl_grad(logits_fn, params, 0, 1, MY_VOCAB, LENGTH, eos_id=MY_EOS,
                               pad_id=MY_PAD)
  exact_kl = oracle.exact_kl(logits_fn, params, 0, 1, MY_VOCAB, LENGTH, eos_id=MY_EOS,
                             pad_id=MY_PAD)
  m = moments.estimator_gradient_moments(logits_fn, params, 0, 1, "rao_blackwell", MY_VOCAB,
                                         LENGTH, eos_id=MY_EOS, pad_id=MY_PAD)
  samples, _ = oracle.sample_sequences(key_mc, logits_fn, params, 0, MY_VOCAB, LENGTH, mc_samples,
                                    eos_id=MY_EOS, pad_id=MY_PAD)
  mc = jax.jit(functools.partial(estimator_gradient, logits_fn))(params, samples)
  negative_exact = jax.tree_util.tree_map(jnp.negative, exact)
  result = dict(loss_start=losses[0], loss_end=losses[-1], exact_kl=float(exact_kl),
                exact_mean_relative_error=float(oracle.relative_error(m.mean, negative_exact)),
                monte_carlo_relative_error=float(oracle.relative_error(mc, negative_exact)))
  return result


if __name__ == "__main__":
  for name, value in main().items():
    print(f"{name}: {value:.6g}")
