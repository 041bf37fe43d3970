"""Tests for latentdiv.model: shapes, the KV cache and the teacher-forced pass agree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from latentdiv import model as model_lib
from latentdiv import vocab

CONFIG = model_lib.ModelConfig(vocab_size=11, num_latents=3, max_len=14, d_model=32,
                               num_heads=4, num_layers=2, d_ff=64)


def _setup(batch=3, prompt_len=5, target_len=8, seed=0):
  model = model_lib.LatentTransformer(CONFIG)
  params = model_lib.init_params(model, jax.random.PRNGKey(seed))
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed + 1), 3)
  prompt = jax.random.randint(k1, (batch, prompt_len), vocab.FIRST_CONTENT, CONFIG.vocab_size)
  target = jax.random.randint(k2, (batch, target_len), vocab.FIRST_CONTENT, CONFIG.vocab_size)
  latent = jax.random.randint(k3, (batch,), 0, CONFIG.num_latents)
  return model, params, prompt, target, latent


class ModelTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_teacher_forced_shapes_and_dtype(self):
    model, params, prompt, target, latent = _setup()
    fn = self.variant(lambda p, x, y, z: model_lib.teacher_forced_logits(model, p, x, y, z))
    logits = fn(params, prompt, target, latent)
    chex.assert_shape(logits, (3, 8, CONFIG.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)

  def test_never_emits_pad_or_bos(self):
    model, params, prompt, target, latent = _setup()
    probs = jax.nn.softmax(model_lib.teacher_forced_logits(model, params, prompt, target, latent))
    np.testing.assert_array_equal(probs[..., vocab.PAD], 0.0)
    np.testing.assert_array_equal(probs[..., vocab.BOS], 0.0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cached_decoding_equals_teacher_forcing(self):
    model, params, prompt, target, latent = _setup()
    reference = model_lib.teacher_forced_logits(model, params, prompt, target, latent)

    @self.variant
    def decode_all(params, prompt, target, latent):
      logits0, cache = model_lib.prefill(model, params, prompt, latent)

      def step(cache, t):
        logits, cache = model_lib.decode_step(model, params, cache, target[:, t], latent,
                                              prompt.shape[1] + 1 + t)
        return cache, logits

      _, rest = jax.lax.scan(step, cache, jnp.arange(target.shape[1] - 1))
      return jnp.concatenate([logits0[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)

    decoded = decode_all(params, prompt, target, latent)
    chex.assert_trees_all_close(decoded, reference, atol=1e-5, rtol=1e-5)

  def test_decoding_in_a_short_cache_grown_midway_equals_teacher_forcing(self):
    model, params, prompt, target, latent = _setup()
    reference = model_lib.teacher_forced_logits(model, params, prompt, target, latent)
    prompt_len = prompt.shape[1]
    # [x, BOS] fills a 7-position cache; it grows to 10, then 13 (= P + T).
    logits0, cache = model_lib.prefill(model, params, prompt, latent, cache_len=prompt_len + 2)
    decoded = [logits0]
    for t in range(target.shape[1] - 1):
      position = prompt_len + 1 + t
      if position == cache.key_valid.shape[1]:
        cache = model_lib.grow_cache(CONFIG, cache, position + 3)
      logits, cache = model_lib.decode_step(model, params, cache, target[:, t], latent,
                                            position)
      decoded.append(logits)
    self.assertEqual(cache.key_valid.shape[1], 13)
    chex.assert_shape(cache.k[0], (3, CONFIG.num_heads, 13, CONFIG.head_dim))
    chex.assert_trees_all_close(jnp.stack(decoded, 1), reference, atol=1e-5, rtol=1e-5)

  def test_cache_length_errors(self):
    model, params, prompt, _, latent = _setup()
    with self.assertRaisesRegex(ValueError, "cache length"):
      model_lib.init_cache(CONFIG, 2, CONFIG.max_len + 1)
    with self.assertRaisesRegex(ValueError, "cache_len"):
      model_lib.prefill(model, params, prompt, latent, cache_len=prompt.shape[1])
    _, cache = model_lib.prefill(model, params, prompt, latent, cache_len=8)
    with self.assertRaisesRegex(ValueError, "shrink"):
      model_lib.grow_cache(CONFIG, cache, 7)

  def test_teacher_forcing_unembeds_the_target_positions_only(self):
    model, params, prompt, target, latent = _setup()
    logits = model_lib.teacher_forced_logits(model, params, prompt, target, latent)
    every, _ = model.apply({"params": params}, model_lib.decoder_inputs(prompt, target),
                           latent)
    chex.assert_trees_all_close(logits, every[:, prompt.shape[1]:], atol=1e-6)
    # The compiled pass has no [B, P + T, V] logits: its unembedding is [B·T, V].
    hlo = jax.jit(lambda p: model_lib.teacher_forced_logits(
        model, p, prompt, target, latent)).lower(params).as_text()
    self.assertNotIn(f"tensor<3x13x{CONFIG.vocab_size}xf32>", hlo)

  def test_prompt_padding_is_masked(self):
    model, params, prompt, target, latent = _setup()
    # What sits at a PAD prompt position must not matter: perturbing the
    # position-0 embedding (only a PAD sits there) leaves every logit unchanged.
    padded = prompt.at[:, 0].set(vocab.PAD)
    logits_a = model_lib.teacher_forced_logits(model, params, padded, target, latent)
    perturbed = jax.tree_util.tree_map(lambda a: a, params)
    pos = perturbed["position_embed"]["embedding"]
    noise = jax.random.normal(jax.random.PRNGKey(9), pos.shape[1:])
    perturbed["position_embed"]["embedding"] = pos.at[0].add(3.0 * noise)
    logits_b = model_lib.teacher_forced_logits(model, perturbed, padded, target, latent)
    chex.assert_trees_all_close(logits_a, logits_b, atol=1e-5)
    # Sanity: without the PAD the same perturbation does change the output.
    logits_c = model_lib.teacher_forced_logits(model, perturbed, prompt, target, latent)
    logits_d = model_lib.teacher_forced_logits(model, params, prompt, target, latent)
    self.assertGreater(float(jnp.abs(logits_c - logits_d).max()), 1e-3)

  def test_latent_changes_the_distribution(self):
    model, params, prompt, target, _ = _setup()
    zeros = jnp.zeros((3,), jnp.int32)
    a = model_lib.teacher_forced_logits(model, params, prompt, target, zeros)
    b = model_lib.teacher_forced_logits(model, params, prompt, target, zeros + 1)
    self.assertGreater(float(jnp.abs(a - b).max()), 1e-4)

  def test_bfloat16_compute_close_to_float32(self):
    model, params, prompt, target, latent = _setup()
    bf16 = model_lib.LatentTransformer(
        model_lib.ModelConfig(**{**CONFIG.__dict__, "dtype": "bfloat16"}))
    a = jax.nn.log_softmax(model_lib.teacher_forced_logits(model, params, prompt, target, latent))
    b = jax.nn.log_softmax(model_lib.teacher_forced_logits(bf16, params, prompt, target, latent))
    chex.assert_type(b, jnp.float32)
    content = slice(vocab.FIRST_CONTENT, None)
    np.testing.assert_allclose(b[..., content], a[..., content], atol=0.1)

  def test_too_long_input_is_a_clear_error(self):
    model, params, prompt, _, latent = _setup()
    long_target = jnp.zeros((3, CONFIG.max_len), jnp.int32)
    with self.assertRaisesRegex(ValueError, "max_len"):
      model_lib.teacher_forced_logits(model, params, prompt, long_target, latent)

  def test_batch_mismatch_is_a_clear_error(self):
    model, params, prompt, target, latent = _setup()
    with self.assertRaisesRegex(ValueError, "latent batch"):
      model_lib.teacher_forced_logits(model, params, prompt, target, latent[:2])

  @parameterized.parameters(
      dict(field="num_heads", value=5, match="divide"),
      dict(field="vocab_size", value=3, match="reserved"),
      dict(field="d_model", value=0, match="model.d_model"),
      dict(field="dtype", value="float16", match="model.dtype"),
  )
  def test_config_validation(self, field, value, match):
    bad = model_lib.ModelConfig(**{**CONFIG.__dict__, field: value})
    with self.assertRaisesRegex(ValueError, match):
      bad.validate()
