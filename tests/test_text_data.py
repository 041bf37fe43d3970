"""Tests for latentdiv.text_data: JSONL loading and its errors, tokenizers, arrays, a K = 3 run."""

import json
import os
import sys

import chex
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from experiments import make_text_example  # noqa: E402
from latentdiv import experiment  # noqa: E402
from latentdiv import objectives  # noqa: E402
from latentdiv import text_data  # noqa: E402
from latentdiv import vocab  # noqa: E402

FIXTURE = [
    {"prompt": "ab", "references": ["ba", "abab"]},
    {"prompt": "ca", "references": ["ac"]},
    {"prompt": "bc", "references": ["cb", "bcbc", "c"]},
    {"prompt": "aa", "references": ["aa", "aaaa"]},
]
VALID = [{"prompt": "cb", "references": ["bc", "cbcb"]}, {"prompt": "ba", "references": ["ab"]}]


def write_jsonl(directory, name, records):
  path = os.path.join(directory, name)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return path


def text_config(train_file, valid_file, **task):
  config = objectives.base_config()
  config.task.name = "text"
  config.task.train_file = train_file
  config.task.valid_file = valid_file
  for name, value in task.items():
    config.task[name] = value
  config.model.num_latents = 3
  config.model.d_model = 16
  config.model.num_heads = 2
  config.model.num_layers = 1
  config.model.d_ff = 32
  config.objective.jsd_prefix_len = 1
  config.train.batch_size = 4
  config.train.num_steps = 6
  config.train.log_every = 3
  config.train.eval_every = 1000
  config.train.checkpoint_every = 6
  config.eval.batch_size = 8
  config.eval.greedy = True
  config.optim.warmup_steps = 1
  return config


class ReadJsonlTest(parameterized.TestCase):

  def test_reads_prompts_and_references_and_skips_blank_lines(self):
    d = self.create_tempdir().full_path
    path = write_jsonl(d, "t.jsonl", FIXTURE[:2] + ["   "] + FIXTURE[2:])
    examples = text_data.read_jsonl(path)
    self.assertLen(examples, 4)
    self.assertEqual(examples[2], text_data.Example("bc", ["cb", "bcbc", "c"]))

  @parameterized.named_parameters(
      ("missing_field", ['{"prompt": "x"}'], r"t.jsonl:2: missing field 'references'"),
      ("empty_references", ['{"prompt": "x", "references": []}'],
       r"t.jsonl:2: 'references' is empty"),
      ("not_json", ['{"prompt": "x", "references": ["y"]'], r"t.jsonl:2: not a JSON object"),
      ("not_an_object", ['["x", "y"]'], r"t.jsonl:2: a line must be a JSON object"),
      ("reference_not_string", ['{"prompt": "x", "references": ["y", 3]}'],
       r"t.jsonl:2: 'references' must be a list of strings"),
      ("prompt_not_string", ['{"prompt": 1, "references": ["y"]}'],
       r"t.jsonl:2: 'prompt' must be a string"),
  )
  def test_bad_lines_name_file_and_line(self, lines, message):
    d = self.create_tempdir().full_path
    path = write_jsonl(d, "t.jsonl", [FIXTURE[0]] + lines)
    with self.assertRaisesRegex(ValueError, message):
      text_data.read_jsonl(path)

  def test_non_utf8_bytes_name_file_and_line(self):
    d = self.create_tempdir().full_path
    path = os.path.join(d, "t.jsonl")
    with open(path, "wb") as f:
      f.write(json.dumps(FIXTURE[0]).encode() + b"\n" + b'{"prompt": "\xff", "references": []}\n')
    with self.assertRaisesRegex(ValueError, r"t.jsonl:2: not valid UTF-8"):
      text_data.read_jsonl(path)

  def test_bad_data_is_refused_before_anything_compiles(self):
    d = self.create_tempdir().full_path
    train = write_jsonl(d, "train.jsonl", FIXTURE + ['{"prompt": "x"}'])
    valid = write_jsonl(d, "valid.jsonl", VALID)
    workdir = os.path.join(d, "run")
    with self.assertRaisesRegex(ValueError, r"train.jsonl:5: missing field 'references'"):
      experiment.train_and_evaluate(text_config(train, valid), workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))
    with self.assertRaisesRegex(ValueError, r"config.task.valid_file='nope.jsonl' is not a file"):
      experiment.build(text_config(train, "nope.jsonl"))


class TokenizerTest(parameterized.TestCase):

  def test_char_round_trip_and_unknown_characters(self):
    examples = [text_data.Example(**r) for r in FIXTURE]
    tok = text_data.train_tokenizer("char", examples)
    self.assertEqual(tok.vocab_size, vocab.NUM_RESERVED + 1 + 3)  # UNK + {a, b, c}
    ids = tok.encode("abca")
    self.assertEqual(ids, [4, 5, 6, 4])  # UNK = 3, then a, b, c
    self.assertEqual(tok.decode(ids + [vocab.EOS, vocab.PAD, 5]), "abca")
    self.assertEqual(tok.encode("az"), [4, text_data.UNK])
    again = text_data.tokenizer_from_json(tok.to_json())
    self.assertEqual(again.encode("cab"), tok.encode("cab"))

  def test_bpe_round_trip_of_any_string(self):
    d = self.create_tempdir().full_path
    examples = [text_data.Example(**r) for r in make_text_example.lines()[0]]
    tok = text_data.train_tokenizer("bpe", examples, vocab_size=300)
    self.assertLessEqual(tok.vocab_size, 300)
    for text in ("the dog is seen by anna", "does hugo wash the cup?", "ünïcødé ✓ tabs\t!"):
      ids = tok.encode(text)
      self.assertTrue(all(i > vocab.EOS for i in ids))
      self.assertEqual(tok.decode(ids + [vocab.EOS]), text)
    self.assertLess(len(tok.encode("the dog is seen by anna")), len("the dog is seen by anna"))
    path = os.path.join(d, "tok.json")
    with open(path, "w") as f:
      f.write(tok.to_json())
    again = text_data.tokenizer_from_json(open(path).read())  # noqa: SIM115
    self.assertEqual(again.encode("anna sees the dog"), tok.encode("anna sees the dog"))


class BuildTest(parameterized.TestCase):

  def test_arrays_pairs_heldout_and_workdir_files(self):
    d = self.create_tempdir().full_path
    train = write_jsonl(d, "train.jsonl", FIXTURE)
    valid = write_jsonl(d, "valid.jsonl", VALID)
    workdir = os.path.join(d, "run")
    config = text_config(train, valid)
    setup, _ = experiment.build(config, workdir)
    task, data = setup.task, setup.data
    self.assertEqual((task.prompt_len, task.target_len, task.num_strategies), (2, 5, 3))
    self.assertEqual(int(data.train.size), 8)  # (prompt, reference) pairs
    tok = task.tokenizer
    pairs = [(tok.decode(p), tok.decode(t)) for p, t in zip(data.train.examples.prompt,
                                                            data.train.examples.target)]
    self.assertEqual(pairs[:3], [("ab", "ba"), ("ab", "abab"), ("ca", "ac")])
    np.testing.assert_array_equal(data.train.examples.strategy[:3], [0, 1, 0])
    # valid_outputs: every reference of the prompt, missing ones all PAD.
    row = data.train.examples.valid_outputs[2]
    self.assertEqual(tok.decode(row[0]), "ac")
    np.testing.assert_array_equal(row[1:], vocab.PAD)
    chex.assert_shape(data.heldout.prompt, (2, 2))
    self.assertEqual(tok.decode(data.heldout.target[0]), "bc")
    self.assertEqual(data.text.references, [["bc", "cbcb"], ["ab"]])
    for name in (text_data.TOKENIZER_FILE, text_data.TASK_FILE):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)))
    # A model loads from the workdir alone (the files may be gone).
    task2, none = text_data.build(config, workdir, load_data=False)
    self.assertIsNone(none)
    self.assertEqual(task2, task)
    # train_size: a seeded subset of the pairs.
    config.data.train_size = 5
    small, _ = experiment.build(config)
    self.assertEqual(int(small.data.train.size), 5)
    config.data.train_size = 9
    with self.assertRaisesRegex(ValueError, r"train_size=9 is more than the 8"):
      experiment.build(config)

  def test_changed_files_are_refused_on_resume(self):
    d = self.create_tempdir().full_path
    valid = write_jsonl(d, "valid.jsonl", VALID)
    workdir = os.path.join(d, "run")
    experiment.build(text_config(write_jsonl(d, "a.jsonl", FIXTURE), valid), workdir)
    longer = FIXTURE + [{"prompt": "abcabc", "references": ["x"]}]
    with self.assertRaisesRegex(ValueError, "the files changed since this run started"):
      experiment.build(text_config(write_jsonl(d, "b.jsonl", longer), valid), workdir)


class TrainTest(parameterized.TestCase):

  def test_k3_run_reports_pairwise_bleu_and_references_covered(self):
    d = self.create_tempdir().full_path
    train = write_jsonl(d, "train.jsonl", FIXTURE)
    valid = write_jsonl(d, "valid.jsonl", VALID)
    workdir = os.path.join(d, "run")
    summary = experiment.train_and_evaluate(
        text_config(train, valid, bleu_tokenize="char"), workdir)
    for key in ("pairwise_bleu", "references_covered", "multi_reference_bleu",
                "leave_one_out_bleu", "train_nll"):
      self.assertIn(key, summary)
    self.assertBetween(summary["references_covered"], 1.0, 2.0)  # at most min(K, #refs)
    self.assertBetween(summary["pairwise_bleu"], 0.0, 100.0)
    self.assertTrue(np.isnan(summary["leave_one_out_bleu"]))  # a prompt has 1 reference
    text = objectives.get("diversity").format_summary(summary)
    self.assertIn("references covered", text)
    # The API: load, then sample and score strings.
    run = experiment.load(workdir)
    outputs = experiment.sample(run, ["ab", "ca"], seed=0, greedy=True)
    self.assertLen(outputs, 2)
    self.assertLen(outputs[0], 3)
    self.assertTrue(all(isinstance(o, str) for o in outputs[0]))
    scores = experiment.score(run, ["ab", "ab"], ["ba", outputs[0][1]])
    chex.assert_shape(scores, (2, 3))
    self.assertTrue(np.all(scores <= 0))

  def test_the_example_dataset_is_what_its_script_writes(self):
    train, valid = make_text_example.lines()
    for name, records in (("train.jsonl", train), ("valid.jsonl", valid)):
      path = os.path.join(_REPO, "experiments", "data", "paraphrase", name)
      self.assertEqual([json.loads(line) for line in open(path)], records)  # noqa: SIM115
    self.assertTrue(all(len(r["references"]) == 3 for r in train + valid))
    prompts = lambda rs: {r["prompt"] for r in rs}  # noqa: E731
    self.assertEmpty(prompts(train) & prompts(valid))


if __name__ == "__main__":
  absltest.main()
