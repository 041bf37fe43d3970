"""Tests for latentdiv.sampling: the sampler draws from the model's exact distribution."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from scipy import stats

from latentdiv import model as model_lib
from latentdiv import sampling
from latentdiv import vocab

CONFIG = model_lib.ModelConfig(vocab_size=9, num_latents=3, max_len=12, d_model=32,
                               num_heads=4, num_layers=2, d_ff=64)


def _setup(config=CONFIG, batch=4, prompt_len=4, seed=0, sharpen=1.0):
  model = model_lib.LatentTransformer(config)
  params = model_lib.init_params(model, jax.random.PRNGKey(seed))
  # Scale the unembedding so the distributions are far from uniform.
  params["unembed"]["kernel"] = params["unembed"]["kernel"] * sharpen
  prompt = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, prompt_len),
                              vocab.FIRST_CONTENT, config.vocab_size)
  return model, params, prompt


class SampleTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_dtypes(self):
    model, params, prompt = _setup()
    fn = self.variant(lambda p, x, z, k: sampling.sample(model, p, x, z, k, 6,
                                                         return_logprobs=True))
    out = fn(params, prompt, jnp.arange(4) % 3, jax.random.PRNGKey(0))
    chex.assert_shape([out.tokens, out.logp, out.mask], (4, 6))
    chex.assert_shape(out.logprobs, (4, 6, CONFIG.vocab_size))
    chex.assert_type([out.tokens, out.logp, out.mask], [jnp.int32, jnp.float32, bool])

  def test_logp_equals_teacher_forced_rescoring(self):
    model, params, prompt = _setup(sharpen=3.0)
    latent = jnp.arange(4) % 3
    out = sampling.sample(model, params, prompt, latent, jax.random.PRNGKey(1), 7,
                          return_logprobs=True)
    logprobs = jax.nn.log_softmax(
        model_lib.teacher_forced_logits(model, params, prompt, out.tokens, latent))
    rescored = jnp.take_along_axis(logprobs, out.tokens[..., None], -1)[..., 0]
    chex.assert_trees_all_close(out.logp, jnp.where(out.mask, rescored, 0.0), atol=1e-5)
    masked = out.mask[..., None]
    chex.assert_trees_all_close(jnp.where(masked, out.logprobs, 0.0),
                                jnp.where(masked, logprobs, 0.0), atol=1e-5)

  def test_eos_ends_a_sequence_through_the_mask(self):
    # Force EOS to be very likely so that most rows stop early.
    model, params, prompt = _setup(batch=64)
    params["unembed"]["bias"] = params["unembed"]["bias"].at[vocab.EOS].set(2.0)
    out = sampling.sample(model, params, prompt, jnp.zeros(64, jnp.int32),
                          jax.random.PRNGKey(2), 6)
    tokens, mask, logp = map(np.asarray, (out.tokens, out.mask, out.logp))
    self.assertTrue((tokens == vocab.EOS).any())
    for row_tokens, row_mask, row_logp in zip(tokens, mask, logp):
      eos = np.flatnonzero(row_tokens == vocab.EOS)
      stop = eos[0] + 1 if eos.size else len(row_tokens)
      np.testing.assert_array_equal(row_mask, np.arange(len(row_tokens)) < stop)
      np.testing.assert_array_equal(row_tokens[stop:], vocab.PAD)
      np.testing.assert_array_equal(row_logp[stop:], 0.0)
      self.assertTrue((row_logp[:stop] < 0).all())
      self.assertFalse(np.isin(row_tokens[:stop], [vocab.PAD, vocab.BOS]).any())

  def test_sample_latents_and_score_latents(self):
    model, params, prompt = _setup()
    out = sampling.sample_latents(model, params, prompt, jax.random.PRNGKey(3), 5)
    chex.assert_shape([out.tokens, out.logp, out.mask], (4, 3, 5))
    logits = sampling.score_latents(model, params, prompt, out.tokens)
    chex.assert_shape(logits, (4, 3, 3, 5, CONFIG.vocab_size))
    # [b, i, j] is rollout i scored under latent j; its diagonal reproduces the sampler.
    for i in range(3):
      for j in range(3):
        direct = model_lib.teacher_forced_logits(model, params, prompt, out.tokens[:, i],
                                                 jnp.full((4,), j))
        chex.assert_trees_all_close(logits[:, i, j], direct, atol=1e-5)
      logprobs = jax.nn.log_softmax(logits[:, i, i])
      rescored = jnp.take_along_axis(logprobs, out.tokens[:, i, :, None], -1)[..., 0]
      chex.assert_trees_all_close(out.logp[:, i], jnp.where(out.mask[:, i], rescored, 0.0),
                                  atol=1e-5)

  @parameterized.parameters((4, 9), (6, 17), (3, 1), (3, 2))
  def test_cache_schedule_covers_every_step_in_a_cache_that_holds_it(self, prompt_len, length):
    chunks = sampling.cache_schedule(prompt_len, length, min_cache_len=1)
    steps = [t for start, stop, _ in chunks for t in range(start, stop)]
    self.assertEqual(steps, list(range(length - 1)))  # Each decode step once, in order.
    lengths = [cache_len for _, _, cache_len in chunks]
    self.assertEqual(lengths, sorted(lengths))
    for start, stop, cache_len in chunks:
      # Step t writes position P + 1 + t; the cache never exceeds P + L.
      self.assertLess(prompt_len + stop, cache_len + 1)
      self.assertLessEqual(cache_len, prompt_len + length)
    if length > 2:
      self.assertGreater(len(chunks), 1)
    with self.assertRaisesRegex(ValueError, "length"):
      sampling.cache_schedule(prompt_len, 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_chunked_cache_draws_what_one_full_cache_draws(self):
    # min_cache_len=1 splits 9 tokens after a 3-token prompt into three
    # chunks (caches of 5, 10, 12 positions); a floor of max_len runs all the
    # steps in one cache of P + L positions. Same keys, same model: the
    # same tokens, log-probabilities and distributions up to rounding.
    config = model_lib.ModelConfig(vocab_size=9, num_latents=3, max_len=12, d_model=32,
                                   num_heads=4, num_layers=2, d_ff=64)
    model, params, prompt = _setup(config, batch=16, prompt_len=3, sharpen=2.0)
    latent = jnp.arange(16) % 3
    self.assertLen(sampling.cache_schedule(3, 9, 1), 3)

    def run(min_cache_len):
      return self.variant(lambda p, x, z, k: sampling.sample(
          model, p, x, z, k, 9, return_logprobs=True, min_cache_len=min_cache_len))(
              params, prompt, latent, jax.random.PRNGKey(4))

    chunked, whole = run(1), run(config.max_len)
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_array_equal(chunked.mask, whole.mask)
    chex.assert_trees_all_close(chunked.logp, whole.logp, atol=1e-5)
    chex.assert_trees_all_close(chunked.logprobs, whole.logprobs, atol=1e-5)
    # And both are the teacher-forced distributions at the sampled prefixes.
    logprobs = jax.nn.log_softmax(
        model_lib.teacher_forced_logits(model, params, prompt, chunked.tokens, latent))
    masked = chunked.mask[..., None]
    chex.assert_trees_all_close(jnp.where(masked, chunked.logprobs, 0.0),
                                jnp.where(masked, logprobs, 0.0), atol=1e-5)

  def test_bad_inputs_are_clear_errors(self):
    model, params, prompt = _setup()
    with self.assertRaisesRegex(ValueError, "max_len"):
      sampling.sample(model, params, prompt, jnp.zeros(4, jnp.int32), jax.random.PRNGKey(0), 20)
    with self.assertRaisesRegex(ValueError, "latent batch"):
      sampling.sample(model, params, prompt, jnp.zeros(3, jnp.int32), jax.random.PRNGKey(0), 3)


def _canonical_sequences(tokens, length):
  """Every distinct output of ``length`` steps: content tokens, EOS stops, PAD after."""
  outs = set()
  for seq in itertools.product(tokens, repeat=length):
    seq = list(seq)
    if vocab.EOS in seq:
      stop = seq.index(vocab.EOS) + 1
      seq = seq[:stop] + [vocab.PAD] * (length - stop)
    outs.add(tuple(seq))
  return np.array(sorted(outs), np.int32)


def _chi2_pvalue(counts, probs):
  """Pearson χ² p-value of sequence counts against probabilities (small cells pooled)."""
  expected = probs / probs.sum() * counts.sum()
  big = expected >= 5  # Pool small expected counts so the χ² approximation holds.
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  return stats.chisquare(obs, exp).pvalue


class SamplerDistributionTest(parameterized.TestCase):
  """Empirical sequence frequencies match exact probabilities by enumeration (DESIGN §7)."""

  def test_chi_square_against_enumeration(self):
    config = model_lib.ModelConfig(vocab_size=6, num_latents=2, max_len=8, d_model=16,
                                   num_heads=2, num_layers=1, d_ff=32)
    model, params, prompt = _setup(config, batch=1, prompt_len=3, seed=5, sharpen=4.0)
    length, n = 3, 20000
    emitted = [vocab.EOS] + list(range(vocab.FIRST_CONTENT, config.vocab_size))
    seqs = _canonical_sequences(emitted, length)
    mask = np.cumsum(np.cumsum(seqs == vocab.EOS, 1), 1) <= 1  # up to the first EOS

    def exact_probs(latent):
      rows = len(seqs)
      logits = model_lib.teacher_forced_logits(
          model, params, jnp.repeat(prompt, rows, 0), jnp.asarray(seqs),
          jnp.full((rows,), latent))
      lp = jnp.take_along_axis(jax.nn.log_softmax(logits), seqs[..., None], -1)[..., 0]
      return np.exp(np.asarray(jnp.sum(jnp.where(mask, lp, 0.0), -1), np.float64))

    p0, p1 = exact_probs(0), exact_probs(1)
    np.testing.assert_allclose(p0.sum(), 1.0, rtol=1e-4)
    # min_cache_len=1: the decode steps run in two chunks (caches of 5 and 6
    # positions), so the exactness covers the lengthened cache.
    self.assertLen(sampling.cache_schedule(3, length, 1), 2)
    out = sampling.sample(model, params, jnp.repeat(prompt, n, 0), jnp.zeros(n, jnp.int32),
                          jax.random.PRNGKey(11), length, min_cache_len=1)
    index = {tuple(s): i for i, s in enumerate(seqs)}
    counts = np.bincount([index[tuple(s)] for s in np.asarray(out.tokens)],
                         minlength=len(seqs))
    self.assertGreater(_chi2_pvalue(counts, p0), 1e-3)
    # The test has power: the other latent's distribution is rejected.
    self.assertLess(_chi2_pvalue(counts, p1), 1e-6)


class MixtureSamplerTest(parameterized.TestCase):
  """``sample_mixture`` draws from ``α·q + (1−α)·π`` token by token (DESIGN.md §6.4)."""

  def test_chi_square_against_the_exact_mixture(self):
    config = model_lib.ModelConfig(vocab_size=6, num_latents=2, max_len=8, d_model=16,
                                   num_heads=2, num_layers=1, d_ff=32)
    model, params, prompt = _setup(config, batch=1, prompt_len=3, seed=5, sharpen=4.0)
    # The teacher: another (wider) model with its own parameters.
    t_config = model_lib.ModelConfig(vocab_size=6, num_latents=1, max_len=8, d_model=32,
                                     num_heads=2, num_layers=1, d_ff=32)
    teacher, t_params, _ = _setup(t_config, batch=1, prompt_len=3, seed=7, sharpen=4.0)
    length, n, alpha = 3, 20000, 0.4
    emitted = [vocab.EOS] + list(range(vocab.FIRST_CONTENT, config.vocab_size))
    seqs = _canonical_sequences(emitted, length)
    mask = np.cumsum(np.cumsum(seqs == vocab.EOS, 1), 1) <= 1
    rows = len(seqs)

    def step_logp(m, p, latent):
      logits = model_lib.teacher_forced_logits(m, p, jnp.repeat(prompt, rows, 0),
                                               jnp.asarray(seqs), jnp.full((rows,), latent))
      return jnp.take_along_axis(jax.nn.log_softmax(logits), seqs[..., None], -1)[..., 0]

    lp, lq = step_logp(model, params, 0), step_logp(teacher, t_params, 0)

    def exact_probs(a):
      mixed = jnp.logaddexp(jnp.log1p(-a) + lp, jnp.log(a) + lq) if a > 0 else lp
      return np.exp(np.asarray(jnp.sum(jnp.where(mask, mixed, 0.0), -1), np.float64))

    np.testing.assert_allclose(exact_probs(alpha).sum(), 1.0, rtol=1e-4)
    zeros = jnp.zeros(n, jnp.int32)
    out = sampling.sample_mixture(model, params, teacher, t_params, jnp.repeat(prompt, n, 0),
                                  zeros, zeros, jax.random.PRNGKey(11), length, alpha)
    index = {tuple(s): i for i, s in enumerate(seqs)}
    counts = np.bincount([index[tuple(s)] for s in np.asarray(out.tokens)], minlength=rows)

    self.assertGreater(_chi2_pvalue(counts, exact_probs(alpha)), 1e-3)
    # Power: the student alone is rejected.
    self.assertLess(_chi2_pvalue(counts, exact_probs(0.0)), 1e-6)
    # logp is the mixture's log-probability of the drawn token.
    first = {tuple(s): i for i, s in enumerate(seqs)}
    i = first[tuple(np.asarray(out.tokens[0]))]
    want = np.logaddexp(np.log1p(-alpha) + np.asarray(lp[i]), np.log(alpha) + np.asarray(lq[i]))
    np.testing.assert_allclose(np.where(mask[i], out.logp[0], 0.0), np.where(mask[i], want, 0.0),
                               rtol=1e-4, atol=1e-5)

  def test_no_teacher_share_is_the_student_sampler(self):
    model, params, prompt = _setup()
    latent = jnp.zeros(prompt.shape[0], jnp.int32)
    key = jax.random.PRNGKey(3)
    alone = sampling.sample(model, params, prompt, latent, key, 5)
    mixed = sampling.sample_mixture(model, params, model, params, prompt, latent, latent + 1,
                                    key, 5, 0.0)
    np.testing.assert_array_equal(mixed.tokens, alone.tokens)
    np.testing.assert_allclose(mixed.logp, alone.logp, rtol=1e-6, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "length"):
      sampling.sample_mixture(model, params, model, params, prompt, latent, latent, key, 0, 0.5)
