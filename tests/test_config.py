"""Every config rule rejects bad values with a ValueError naming the field, before compiling."""

from absl.testing import parameterized
import ml_collections

from latentdiv import experiment
from latentdiv import objectives


def _config(**overrides):
  config = objectives.base_config()
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
    misspelt = objectives.base_config()
    misspelt.train.batchsize = 8
    with self.assertRaisesRegex(ValueError, r"config\.train\.batchsize is not a field.*"
                                r"Did you mean config\.train\.batch_size\?"):
      objectives.validate(misspelt)
    section = objectives.base_config()
    section.trian = objectives.base_config().train
    with self.assertRaisesRegex(ValueError, r"config\.trian .*config\.train\?"):
      objectives.validate(section)
    flattened = ml_collections.ConfigDict(objectives.base_config().to_dict(), type_safe=False)
    flattened.optim = 0.1
    with self.assertRaisesRegex(ValueError, r"config\.optim must be a section"):
      objectives.validate(flattened)

  def test_base_and_default_configs_are_valid(self):
    objectives.validate(objectives.base_config())
    experiment.build(objectives.base_config())

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
      ("objective__jsd_weight_temperature", 0.0,
       r"objective\.jsd_weight_temperature must be > 0"),
      ("objective__name", "nope",
       r"objective\.name must be one of \('diversity', 'distillation'\), got 'nope'"),
      ("objective__sequence_term__kind", "jsd",
       r"objective\.sequence_term\.kind must be one of \('kl', 'mi'\)"),
      ("objective__sequence_term__estimator", "reinforce",
       r"objective\.sequence_term\.estimator must be one of"),
      ("objective__sequence_term__baseline", "mean",
       r"objective\.sequence_term\.baseline must be one of"),
      ("objective__sequence_term__weight", -1.0, r"objective\.sequence_term\.weight"),
      ("objective__sequence_term__rollout_len", 0, r"objective\.sequence_term\.rollout_len"),
      ("objective__sequence_term__num_rollouts", 0,
       r"objective\.sequence_term\.num_rollouts"),
      ("objective__sequence_term__num_pairs", 7,
       r"objective\.sequence_term\.num_pairs must be in \[0, K\(K-1\) = 6\]"),
      ("objective__sequence_term__num_pairs", -1, r"objective\.sequence_term\.num_pairs"),
      ("objective__sequence_term__ema_decay", 1.0,
       r"objective\.sequence_term\.ema_decay must be in \[0, 1\)"),
      ("objective__targets", "bleu", r"objective\.targets must be one of"),
      ("objective__raml__convention", "paper", r"objective\.raml\.convention must be one of"),
      ("objective__raml__reward", "bleu", r"objective\.raml\.reward must be one of"),
      ("objective__raml__tau", 0.0, r"objective\.raml\.tau must be > 0"),
      ("objective__raml__epsilon", 1.5, r"objective\.raml\.epsilon must be in \[0, 1\]"),
      ("objective__raml__num_samples", 0, r"objective\.raml\.num_samples"),
      ("optim__learning_rate", 0.0, r"optim\.learning_rate must be a positive"),
      ("optim__schedule", "linear", r"optim\.schedule must be one of"),
      ("optim__grad_clip_norm", -1.0, r"optim\.grad_clip_norm"),
      ("train__batch_size", 0, r"train\.batch_size"),
      ("train__num_steps", 0, r"train\.num_steps"),
      # Counts enter the programs as int32: beyond it they would overflow after compiling.
      ("train__num_steps", 3_000_000_000,
       r"train\.num_steps must be at most 2\*\*31 - 1 = 2147483647 .*got 3000000000"),
      ("optim__warmup_steps", 2**31, r"optim\.warmup_steps must be at most 2\*\*31 - 1"),
      ("objective__sequence_term__ramp_steps", 2**40, r"sequence_term\.ramp_steps must be at most"),
      ("seed", 10**20, r"config\.seed must be an integer in \[-2\*\*31, 2\*\*31 - 1\]"),
      ("seed", -2**31 - 1, r"config\.seed must be an integer in"),
      ("eval__batch_size", 0, r"eval\.batch_size"),
  )
  def test_rule(self, path, value, match):
    config = _config(**{path: value})
    with self.assertRaisesRegex(ValueError, match):
      objectives.validate(config)

  def test_one_latent_only_without_divergence_terms(self):
    config = _config(model__num_latents=1, objective__lambda_jsd=0.0)
    objectives.validate(config)  # Plain maximum likelihood / RAML with K = 1.
    config.objective.sequence_term.weight = 0.1
    with self.assertRaisesRegex(ValueError, r"model\.num_latents \(K\) must be >= 2"):
      objectives.validate(config)

  def test_leave_one_out_needs_two_rollouts(self):
    config = _config(objective__sequence_term__baseline="leave_one_out",
                     objective__sequence_term__num_rollouts=1)
    with self.assertRaisesRegex(ValueError,
                                r"objective\.sequence_term\.num_rollouts must be >= 2"):
      objectives.validate(config)

  def test_baseline_needs_a_baselined_estimator(self):
    config = _config(objective__sequence_term__baseline="ema",
                     objective__sequence_term__estimator="trajectory")
    with self.assertRaisesRegex(ValueError,
                                r"objective\.sequence_term\.estimator must be one of"):
      objectives.validate(config)

  def test_baselined_estimator_needs_a_baseline(self):
    config = _config(objective__sequence_term__estimator="kl_to_go_baseline")
    with self.assertRaisesRegex(ValueError,
                                r"objective\.sequence_term\.baseline must be one of"):
      objectives.validate(config)

  def test_rollout_longer_than_the_task_output(self):
    config = _config(objective__sequence_term__rollout_len=50)
    with self.assertRaisesRegex(
        ValueError, r"objective\.sequence_term\.rollout_len must be in \[1, 5\] \(the task's "
        r"target length\), got 50"):
      experiment.build(config)

  def test_jsd_prefix_longer_than_the_task_output(self):
    config = _config(objective__jsd_prefix_len=50)
    with self.assertRaisesRegex(ValueError, r"objective\.jsd_prefix_len must be in \[1, 5\]"):
      experiment.build(config)

  def test_inconsistent_task_sizes(self):
    # Three strategies need three distinct shifts modulo the alphabet.
    config = _config(task__alphabet_size=2, task__num_strategies=3)
    with self.assertRaisesRegex(ValueError, r"config\.task"):
      experiment.build(config)
