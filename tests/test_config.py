"""Every config rule rejects bad values with a ValueError naming the field, before compiling."""

from absl.testing import parameterized
import ml_collections

from latentdiv import config as config_lib
from latentdiv import train


def _config(**overrides):
  config = config_lib.base_config()
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


class ValidateTest(parameterized.TestCase):

  def test_unknown_fields_are_named_with_the_closest_known_ones(self):
    # What a config file can do that the command line cannot: add a field.
    misspelt = config_lib.base_config()
    misspelt.train.batchsize = 8
    with self.assertRaisesRegex(ValueError, r"config\.train\.batchsize is not a field.*"
                                r"Did you mean config\.train\.batch_size\?"):
      config_lib.validate(misspelt)
    section = config_lib.base_config()
    section.trian = config_lib.base_config().train
    with self.assertRaisesRegex(ValueError, r"config\.trian .*config\.train\?"):
      config_lib.validate(section)
    flattened = ml_collections.ConfigDict(config_lib.base_config().to_dict(), type_safe=False)
    flattened.optim = 0.1
    with self.assertRaisesRegex(ValueError, r"config\.optim must be a section"):
      config_lib.validate(flattened)

  def test_base_and_default_configs_are_valid(self):
    config_lib.validate(config_lib.base_config())
    train.build(config_lib.base_config())

  @parameterized.parameters(
      ("model__num_latents", 1, r"model\.num_latents.*>= 2"),
      ("model__num_latents", 0, r"model\.num_latents.*positive"),
      ("model__d_model", -4, r"model\.d_model"),
      ("model__num_heads", 3, r"num_heads=3 must divide"),
      ("model__dtype", "float16", r"model\.dtype.*\('float32', 'bfloat16'\)"),
      ("task__name", "copy", r"task\.name must be one of"),
      ("task__variant", "rotate", r"task\.variant must be one of"),
      ("task__alphabet_size", 1, r"task\.alphabet_size must be >= 2"),
      ("task__prompt_len", 0, r"task\.prompt_len"),
      ("objective__reconstruction", "em", r"objective\.reconstruction must be one of"),
      ("objective__jsd_weighting", "idf", r"objective\.jsd_weighting must be one of"),
      ("objective__lambda_jsd", -0.1, r"objective\.lambda_jsd must be a non-negative"),
      ("objective__jsd_prefix_len", 0, r"objective\.jsd_prefix_len"),
      ("seq_pg__estimator", "reinforce", r"seq_pg\.estimator must be one of"),
      ("seq_pg__baseline", "mean", r"seq_pg\.baseline must be one of"),
      ("seq_pg__lambda_pg", -1.0, r"seq_pg\.lambda_pg"),
      ("seq_pg__rollout_len", 0, r"seq_pg\.rollout_len"),
      ("seq_pg__num_rollouts", 0, r"seq_pg\.num_rollouts"),
      ("seq_pg__num_pairs", 7, r"seq_pg\.num_pairs must be in \[0, K\(K-1\) = 6\]"),
      ("seq_pg__num_pairs", -1, r"seq_pg\.num_pairs"),
      ("seq_pg__ema_decay", 1.0, r"seq_pg\.ema_decay must be in \[0, 1\)"),
      ("objective__targets", "bleu", r"objective\.targets must be one of"),
      ("raml__convention", "paper", r"raml\.convention must be one of"),
      ("raml__reward", "bleu", r"raml\.reward must be one of"),
      ("raml__tau", 0.0, r"raml\.tau must be > 0"),
      ("raml__epsilon", 1.5, r"raml\.epsilon must be in \[0, 1\]"),
      ("raml__num_samples", 0, r"raml\.num_samples"),
      ("optim__learning_rate", 0.0, r"optim\.learning_rate must be a positive"),
      ("optim__schedule", "linear", r"optim\.schedule must be one of"),
      ("optim__grad_clip_norm", -1.0, r"optim\.grad_clip_norm"),
      ("train__batch_size", 0, r"train\.batch_size"),
      ("train__num_steps", 0, r"train\.num_steps"),
      ("eval__batch_size", 0, r"eval\.batch_size"),
  )
  def test_rule(self, path, value, match):
    config = _config(**{path: value})
    with self.assertRaisesRegex(ValueError, match):
      config_lib.validate(config)

  def test_one_latent_only_without_divergence_terms(self):
    config = _config(model__num_latents=1, objective__lambda_jsd=0.0)
    config_lib.validate(config)  # Plain maximum likelihood / RAML with K = 1.
    config.seq_pg.lambda_pg = 0.1
    with self.assertRaisesRegex(ValueError, r"model\.num_latents \(K\) must be >= 2"):
      config_lib.validate(config)

  def test_leave_one_out_needs_two_rollouts(self):
    config = _config(seq_pg__baseline="leave_one_out", seq_pg__num_rollouts=1)
    with self.assertRaisesRegex(ValueError, r"seq_pg\.num_rollouts must be >= 2"):
      config_lib.validate(config)

  def test_baseline_needs_a_baselined_estimator(self):
    config = _config(seq_pg__baseline="ema", seq_pg__estimator="trajectory")
    with self.assertRaisesRegex(ValueError, r"seq_pg\.estimator must be one of"):
      config_lib.validate(config)

  def test_baselined_estimator_needs_a_baseline(self):
    config = _config(seq_pg__estimator="kl_to_go_baseline")
    with self.assertRaisesRegex(ValueError, r"seq_pg\.baseline must be one of"):
      config_lib.validate(config)

  def test_rollout_longer_than_the_task_output(self):
    config = _config(seq_pg__rollout_len=50)
    with self.assertRaisesRegex(ValueError, r"seq_pg\.rollout_len \(L\) must be in \[1, 5\]"):
      train.build(config)

  def test_jsd_prefix_longer_than_the_task_output(self):
    config = _config(objective__jsd_prefix_len=50)
    with self.assertRaisesRegex(ValueError, r"objective\.jsd_prefix_len must be in \[1, 5\]"):
      train.build(config)

  def test_inconsistent_task_sizes(self):
    # Three strategies need three distinct shifts modulo the alphabet.
    config = _config(task__alphabet_size=2, task__num_strategies=3)
    with self.assertRaisesRegex(ValueError, r"config\.task"):
      train.build(config)
