"""Text datasets from JSONL files: prompts with one or more references (DESIGN.md §9.1).

Each line of ``config.task.train_file`` and ``config.task.valid_file`` is a
JSON object ``{"prompt": str, "references": [str, ...]}`` (at least one
reference; blank lines are skipped). A bad line — not UTF-8, not JSON, a
missing or mistyped field, an empty reference list — raises a ValueError
naming the file and the line, before anything compiles.

Tokenisation (``config.task.tokenizer``): ``"char"`` (default) — one id per
character of the training file; ``"bpe"`` — a byte-level BPE of Hugging Face
``tokenizers`` trained on the training file (prompts and references) with
``config.task.tokenizer_vocab_size`` ids. Ids 0–3 are PAD, BOS, EOS and UNK
(``latentdiv/vocab.py``; UNK is the first content id: characters unseen in
training map to it). The tokenizer is saved in the workdir
(``tokenizer.json``) with the task's shapes (``text_task.json``), and a
resumed or loaded run reads them from there.

The training set is one example per (prompt, reference) pair — the hidden
"strategy" of an example is its reference's index — held as a
``datasets.ArrayDataset`` (``config.data.train_size = 0``: every pair; N > 0:
N pairs drawn without replacement, ``numpy.random.default_rng(seed)``). The held-out set is one row
per validation prompt (its first ``eval.batch_size`` prompts), scored against
its first reference for the NLL, and against all of them by the text metrics
(``latentdiv.text_metrics``). ``valid_outputs`` holds every reference of a
prompt, padded to S = the most references of any prompt with all-PAD rows
(which no sample matches: the model never emits PAD).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple, Optional

import jax
import numpy as np

from latentdiv import datasets
from latentdiv import tasks as tasks_lib
from latentdiv import vocab

NAME = "text"
TOKENIZERS = ("char", "bpe")
TOKENIZER_FILE = "tokenizer.json"
TASK_FILE = "text_task.json"
UNK = vocab.FIRST_CONTENT
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids PAD, BOS, EOS, UNK.


class Example(NamedTuple):
  """One line of a JSONL file."""

  prompt: str
  references: list[str]


def read_jsonl(path: str) -> list[Example]:
  """The examples of a JSONL file, checked line by line.

  Raises:
    ValueError: ``'<path>:<line>: <what is wrong>'`` for the first bad line
      (not UTF-8, not a JSON object, ``prompt`` missing or not a string,
      ``references`` missing, not a list of strings, or empty), or a file with
      no example.
    FileNotFoundError: no such file.
  """
  examples = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      where = f"{path}:{number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start} of the "
                         "line).") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON object ({err.msg} at column {err.colno}).") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: a line must be a JSON object with 'prompt' and "
                         f"'references', got {type(record).__name__}.")
      for field in ("prompt", "references"):
        if field not in record:
          raise ValueError(f"{where}: missing field {field!r} (fields present: "
                           f"{sorted(record)}).")
      prompt, references = record["prompt"], record["references"]
      if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}.")
      if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ValueError(f"{where}: 'references' must be a list of strings, got "
                         f"{references!r:.80}.")
      if not references:
        raise ValueError(f"{where}: 'references' is empty; give at least one reference.")
      examples.append(Example(prompt, references))
  if not examples:
    raise ValueError(f"{path}: no example (the file is empty).")
  return examples


# ----------------------------------------------------------------- tokenizers


class CharTokenizer:
  """One id per character: ``FIRST_CONTENT + 1 + rank`` of the character in ``chars``; UNK otherwise."""

  kind = "char"

  def __init__(self, chars: list[str]):
    self.chars = list(chars)
    self._ids = {c: UNK + 1 + i for i, c in enumerate(self.chars)}

  @property
  def vocab_size(self) -> int:
    return UNK + 1 + len(self.chars)

  def encode(self, text: str) -> list[int]:
    return [self._ids.get(c, UNK) for c in text]

  def decode(self, ids) -> str:
    """Text of the content ids up to the first EOS (UNK → U+FFFD; PAD, BOS skipped)."""
    out = []
    for i in ids:
      i = int(i)
      if i == vocab.EOS:
        break
      if i == UNK:
        out.append("\ufffd")
      elif i > UNK:
        out.append(self.chars[i - UNK - 1])
    return "".join(out)

  def to_json(self) -> str:
    return json.dumps({"latentdiv_char_tokenizer": self.chars}, ensure_ascii=False)

  @classmethod
  def train(cls, texts: list[str]) -> "CharTokenizer":
    return cls(sorted({c for t in texts for c in t}))


class BpeTokenizer:
  """A byte-level BPE of Hugging Face ``tokenizers`` (exact round trip for any string)."""

  kind = "bpe"

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if vocab.EOS in ids:
      ids = ids[:ids.index(vocab.EOS)]
    return self.tokenizer.decode([i for i in ids if i > vocab.EOS], skip_special_tokens=False)

  def to_json(self) -> str:
    return self.tokenizer.to_str()

  @classmethod
  def train(cls, texts: list[str], vocab_size: int) -> "BpeTokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
      assert tokenizer.token_to_id(token) == i, (token, tokenizer.token_to_id(token))
    return cls(tokenizer)


def tokenizer_from_json(text: str):
  """A tokenizer saved by ``to_json`` (either kind)."""
  record = json.loads(text)
  if "latentdiv_char_tokenizer" in record:
    return CharTokenizer(record["latentdiv_char_tokenizer"])
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  return BpeTokenizer(Tokenizer.from_str(text))


def train_tokenizer(kind: str, examples: list[Example], vocab_size: int = 512):
  """A tokenizer of ``kind`` trained on the prompts and references of ``examples``."""
  texts = [e.prompt for e in examples] + [r for e in examples for r in e.references]
  if kind == "char":
    return CharTokenizer.train(texts)
  return BpeTokenizer.train(texts, vocab_size)


# ----------------------------------------------------------------- arrays


def _row(ids: list[int], length: int, eos: bool) -> tuple[np.ndarray, bool]:
  """ids (+ EOS) padded with PAD to ``length``; truncated (EOS kept) if too long."""
  room = length - 1 if eos else length
  truncated = len(ids) > room
  ids = list(ids[:room]) + ([vocab.EOS] if eos else [])
  return np.array(ids + [vocab.PAD] * (length - len(ids)), np.int32), truncated


def encode_examples(examples: list[Example], tokenizer, prompt_len: int, target_len: int,
                    num_references: int, per_pair: bool):
  """A ``tasks.Batch`` of numpy arrays, and the number of truncated prompts and references.

  ``per_pair``: one row per (prompt, reference), its strategy the reference's
  index; else one row per prompt with its first reference as the target.
  """
  rows, truncated = [], 0
  for e in examples:
    prompt, cut = _row(tokenizer.encode(e.prompt), prompt_len, eos=False)
    truncated += cut
    refs = []
    for r in e.references:
      ref, cut = _row(tokenizer.encode(r), target_len, eos=True)
      refs.append(ref)
      truncated += cut
    valid = np.zeros((num_references, target_len), np.int32)
    valid[:len(refs)] = np.stack(refs)
    for s in range(len(refs) if per_pair else 1):
      rows.append((prompt, refs[s], s, valid))
  prompt, target, strategy, valid = (np.stack(x) for x in zip(*rows))
  batch = tasks_lib.Batch(prompt=prompt, target=target, target_mask=target != vocab.PAD,
                          strategy=strategy.astype(np.int32), valid_outputs=valid)
  return batch, truncated


# ----------------------------------------------------------------- building


@dataclasses.dataclass(frozen=True)
class TextInfo:
  """The text side of a ``datasets.Data``: the tokenizer and the held-out strings."""

  tokenizer: object
  prompts: list
  references: list
  bleu_tokenize: str


def _no_generator(*_):
  raise ValueError("The 'text' task has no generator: its examples come from "
                   "config.task.train_file (latentdiv.datasets / text_data).")


def make_task(tokenizer, prompt_len: int, target_len: int, num_references: int,
              options: dict) -> tasks_lib.Task:
  """The ``tasks.Task`` of a text dataset (shapes and tokenizer; no generator)."""
  return tasks_lib.Task(
      name=NAME, vocab_size=tokenizer.vocab_size,
      alphabet_size=tokenizer.vocab_size - vocab.NUM_RESERVED, prompt_len=prompt_len,
      target_len=target_len, num_strategies=num_references,
      options=tuple(sorted(options.items())), prompt_fn=_no_generator,
      outputs_fn=_no_generator, tokenizer=tokenizer)


def _shapes(train, valid, tokenizer, c) -> dict:
  every = train + valid
  longest_prompt = max(len(tokenizer.encode(e.prompt)) for e in every)
  longest_ref = max(len(tokenizer.encode(r)) for e in every for r in e.references)
  return dict(prompt_len=c.max_prompt_len or max(longest_prompt, 1),
              target_len=c.max_target_len or longest_ref + 1,
              num_references=max(len(e.references) for e in every),
              vocab_size=tokenizer.vocab_size)


def _read_workdir(workdir):
  if workdir is None or not os.path.exists(os.path.join(workdir, TOKENIZER_FILE)):
    return None, None
  with open(os.path.join(workdir, TOKENIZER_FILE), encoding="utf-8") as f:
    tokenizer = tokenizer_from_json(f.read())
  shapes = None
  if os.path.exists(os.path.join(workdir, TASK_FILE)):
    with open(os.path.join(workdir, TASK_FILE)) as f:
      shapes = json.load(f)
  return tokenizer, shapes


def build(config, workdir: Optional[str] = None, load_data: bool = True):
  """``(task, data)`` of a text config; ``data`` is None unless ``load_data``.

  Reads (and checks) both files, trains the tokenizer unless ``workdir``
  already holds one, writes ``tokenizer.json`` and ``text_task.json`` to
  ``workdir`` (when given and new), encodes the examples.

  Raises:
    ValueError: a bad line (file and line named), shapes that differ from
      the ones saved in ``workdir`` (the files changed), a ``train_size``
      larger than the number of (prompt, reference) pairs, or a workdir with
      no tokenizer when ``load_data`` is False.
  """
  c = config.task
  options = dict(train_file=c.train_file, valid_file=c.valid_file, tokenizer=c.tokenizer)
  tokenizer, saved = _read_workdir(workdir)
  if not load_data:
    if tokenizer is None or saved is None:
      raise ValueError(f"{workdir} holds no {TOKENIZER_FILE} / {TASK_FILE}: not a text run's "
                       "workdir.")
    task = make_task(tokenizer, saved["prompt_len"], saved["target_len"],
                     saved["num_references"], options)
    return task, None
  for field in ("train_file", "valid_file"):
    if not c[field] or not os.path.isfile(c[field]):
      raise ValueError(f"config.task.{field}={c[field]!r} is not a file (the 'text' task reads "
                       "JSONL files of {\"prompt\": ..., \"references\": [...]}).")
  train, valid = read_jsonl(c.train_file), read_jsonl(c.valid_file)
  if tokenizer is None:
    tokenizer = train_tokenizer(c.tokenizer, train, c.tokenizer_vocab_size)
  shapes = _shapes(train, valid, tokenizer, c)
  if saved is not None and saved != shapes:
    raise ValueError(f"The data files give shapes {shapes}, but {workdir}/{TASK_FILE} says "
                     f"{saved}: the files changed since this run started. Use a new --workdir.")
  if workdir is not None and saved is None and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, TOKENIZER_FILE), "w", encoding="utf-8") as f:
      f.write(tokenizer.to_json())
    with open(os.path.join(workdir, TASK_FILE), "w") as f:
      json.dump(shapes, f, indent=2)
  task = make_task(tokenizer, shapes["prompt_len"], shapes["target_len"],
                   shapes["num_references"], options)
  sizes = (task.prompt_len, task.target_len, task.num_strategies)
  pairs, cut_train = encode_examples(train, tokenizer, *sizes, per_pair=True)
  heldout_examples = valid[:config.eval.batch_size]
  heldout, cut_valid = encode_examples(heldout_examples, tokenizer, *sizes, per_pair=False)
  if cut_train or cut_valid:
    print(f"Text data: {cut_train} training and {cut_valid} held-out prompts/references "
          f"truncated to prompt_len={task.prompt_len}, target_len={task.target_len}.",
          flush=True)
  num_pairs = pairs.prompt.shape[0]
  size = config.data.train_size
  if size > num_pairs:
    raise ValueError(f"config.data.train_size={size} is more than the {num_pairs} (prompt, "
                     f"reference) pairs of {c.train_file}.")
  if size:  # A seeded subset of the pairs (train_capacity does not apply to text data).
    order = np.random.default_rng(config.seed).permutation(num_pairs)
    pairs = jax.tree_util.tree_map(lambda a: a[np.sort(order[:size])], pairs)
  if config.train.batch_size > pairs.prompt.shape[0]:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} must be at most the "
                     f"{pairs.prompt.shape[0]} training pairs.")
  info = TextInfo(tokenizer, [e.prompt for e in heldout_examples],
                  [e.references for e in heldout_examples], c.bleu_tokenize)

  def arrays():  # JAX work (keys, device arrays) waits until the loop needs the data.
    train_set = datasets.make_dataset(pairs, datasets.seed_key(config.seed, 2),
                                      config.train.batch_size)
    return datasets.Data(train_set, heldout, datasets.cycle_rows(pairs, heldout.prompt.shape[0]),
                         text=info)

  data = datasets.LazyData(arrays)
  return task, data


def encode_strings(task: tasks_lib.Task, texts: list[str], outputs: bool) -> np.ndarray:
  """Rows of the task's tokens for strings: prompts [B, P], or outputs [B, T] (EOS appended).

  Raises:
    ValueError: a string longer than the model's prompt (or output) length,
      naming its index.
  """
  length = task.target_len if outputs else task.prompt_len
  rows = []
  for i, text in enumerate(texts):
    row, truncated = _row(task.tokenizer.encode(text), length, eos=outputs)
    if truncated:
      what = "output" if outputs else "prompt"
      raise ValueError(f"{what} {i} ({text!r:.40}) is longer than the model's {what} length "
                       f"({length}{' with the EOS' if outputs else ''} tokens).")
    rows.append(row)
  return np.stack(rows)
