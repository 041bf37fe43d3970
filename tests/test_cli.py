"""run.py's helpers (latentdiv/cli.py): config-file faults in one line, the field listing.

Every way a config file can fail to give a config is a ``ConfigFileError``
whose message is one line naming the file (and the line); ``describe`` lists
every field with its value, default and meaning. The command-line glue
(one stderr line, no traceback, no usage dump) is tested on run.py itself in
``tests/test_reliability.py``.
"""

import os
import re
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from latentdiv import cli
from latentdiv import objectives
from latentdiv import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BROKEN = {
    "syntax_error": ("def get_config(:\n  pass\n", r"{path}, line 1: SyntaxError: "),
    "no_get_config": ("CONFIG = 1\n", r"{path} defines no get_config\(\) function"),
    "get_config_raises": (
        "from latentdiv import objectives\n\ndef get_config():\n"
        "  config = objectives.base_config()\n  raise ValueError('no such arm')\n",
        r"{path}, line 5: get_config\(\) raised ValueError: no such arm$"),
    "returns_a_dict": ("def get_config():\n  return {'seed': 0}\n",
                       r"{path}: get_config\(\) returned a dict, not an "
                       r"ml_collections.ConfigDict"),
    "import_error": ("import no_such_module_xyz\n", r"{path}, line 1: ModuleNotFoundError"),
    "bool_learning_rate": (
        "from latentdiv import objectives\n\ndef get_config():\n"
        "  config = objectives.base_config()\n  config.optim.learning_rate = True\n"
        "  return config\n",
        r"{path}, line 5: get_config\(\) raised TypeError: .*'learning_rate'.*True is a bool, "
        r"not a number"),
}


class ConfigFileTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(name, name) for name in BROKEN])
  def test_a_broken_config_file_is_one_line_naming_it(self, name):
    source, pattern = BROKEN[name]
    path = os.path.join(tempfile.mkdtemp(), f"{name}.py")
    with open(path, "w") as f:
      f.write(source)
    with self.assertRaisesRegex(cli.ConfigFileError, pattern.format(path=path)) as caught:
      cli.load_config_file(path)
    self.assertNotIn("\n", str(caught.exception))

  def test_a_missing_file_and_an_argument_get_config_rejects(self):
    with self.assertRaisesRegex(cli.ConfigFileError, r"no such file 'nope/x\.py'"):
      cli.load_config_file("nope/x.py:1")
    raml = os.path.join(REPO, "experiments", "configs", "raml.py")
    with self.assertRaisesRegex(cli.ConfigFileError,
                                r"raml\.py, line \d+: get_config\('bleu,1'\) raised ValueError: "
                                r"arm must start with one of"):
      cli.load_config_file(raml + ":bleu,1")
    self.assertEqual(cli.load_config_file(raml + ":hamming,0.8").objective.raml.tau, 0.8)

  def test_the_patch_for_bools_is_undone(self):
    path = os.path.join(tempfile.mkdtemp(), "ok.py")
    with open(path, "w") as f:
      f.write("from latentdiv import objectives\n\ndef get_config():\n"
              "  return objectives.base_config()\n")
    config = cli.load_config_file(path)
    config.optim.learning_rate = True  # ml_collections' own rule again outside the loader.
    self.assertEqual(config.optim.learning_rate, 1.0)

  def test_config_spec_is_read_like_absl(self):
    self.assertEqual(cli.config_spec(["--config=a.py:x", "--workdir=w"], "d.py"), "a.py:x")
    self.assertEqual(cli.config_spec(["--config", "b.py"], "d.py"), "b.py")
    self.assertEqual(cli.config_spec(["--config.seed=1"], "d.py"), "d.py")


class DescribeTest(parameterized.TestCase):

  @parameterized.parameters(*objectives.NAMES)
  def test_every_field_is_listed_with_its_default_and_meaning(self, name):
    config = objectives.base_config(name)
    config.seed = 7
    text = cli.describe(config)
    for path in workdir_lib.flatten(workdir_lib.config_record(config)):
      line = [l for l in text.splitlines() if f" config.{path} = " in l]
      self.assertLen(line, 1, path)
      self.assertIn("[default ", line[0])
      self.assertTrue(cli.field_meaning(name, path), f"no help text for config.{path}")
    self.assertIn("* config.seed = 7", text)
    self.assertIn("  config.train.num_steps = 1000", text)

  def test_help_examples_name_existing_files(self):
    with open(os.path.join(REPO, "run.py")) as f:
      source = f.read()
    paths = set(re.findall(r"--config=([\w/.]+\.py)", source))
    self.assertNotEmpty(paths)
    for path in paths:
      self.assertTrue(os.path.isfile(os.path.join(REPO, path)), path)


if __name__ == "__main__":
  absltest.main()
