"""Writes the small multi-reference text dataset of ``experiments/configs/text_example.py``.

    python experiments/make_text_example.py --out=experiments/data/paraphrase

Nothing is downloaded: every line is built from templates. A prompt is a
simple statement, "<name> <verb>s the <noun>" (e.g. "anna sees the dog"); its
three references rewrite it in three fixed styles — the passive ("the dog is
seen by anna"), a yes/no question ("does anna see the dog?") and the past
tense ("anna saw the dog"). The styles are the hidden strategies a K = 3
latent model should split between its latents: each reference is a
deterministic function of the prompt, so a latent that commits to one style
can reproduce it exactly, and a model that averages the styles cannot.

8 names × 8 verbs × 8 nouns = 512 statements, shuffled with ``--seed``; the
last ``--valid`` of them (disjoint prompts) go to ``valid.jsonl``, the rest to
``train.jsonl``. With ``--references_per_prompt=2`` each training line keeps
two of the three styles, drawn per line (every style still appears), as
datasets with fewer references per source than styles do.
"""

from __future__ import annotations

import json
import os
import random

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "experiments/data/paraphrase", "Output directory.")
_VALID = flags.DEFINE_integer("valid", 64, "Statements held out for validation.")
_SEED = flags.DEFINE_integer("seed", 0, "Shuffle seed.")
_REFS = flags.DEFINE_integer("references_per_prompt", 3,
                             "References per training line (1-3); validation keeps all 3.")

NAMES = ("anna", "ben", "carla", "dev", "emma", "felix", "gita", "hugo")
# (base form, third person, past tense, past participle).
VERBS = (("see", "sees", "saw", "seen"), ("take", "takes", "took", "taken"),
         ("find", "finds", "found", "found"), ("hold", "holds", "held", "held"),
         ("draw", "draws", "drew", "drawn"), ("feed", "feeds", "fed", "fed"),
         ("wash", "washes", "washed", "washed"), ("hide", "hides", "hid", "hidden"))
NOUNS = ("dog", "cat", "bird", "book", "lamp", "cup", "kite", "boat")


def lines(seed: int = 0, valid: int = 64, references_per_prompt: int = 3):
  """``(train, valid)`` lists of ``{"prompt", "references"}`` dicts (deterministic in ``seed``)."""
  if not 1 <= references_per_prompt <= 3:
    raise ValueError(f"references_per_prompt must be in 1..3, got {references_per_prompt}.")
  rng = random.Random(seed)
  records = []
  for name in NAMES:
    for base, third, past, participle in VERBS:
      for noun in NOUNS:
        references = [f"the {noun} is {participle} by {name}", f"does {name} {base} the {noun}?",
                      f"{name} {past} the {noun}"]
        records.append(dict(prompt=f"{name} {third} the {noun}", references=references))
  rng.shuffle(records)
  train, held_out = records[:-valid], records[-valid:]
  for record in train:
    keep = sorted(rng.sample(range(3), references_per_prompt))
    record["references"] = [record["references"][i] for i in keep]
  return train, held_out


def main(argv):
  del argv
  train, valid = lines(_SEED.value, _VALID.value, _REFS.value)
  os.makedirs(_OUT.value, exist_ok=True)
  for name, records in (("train.jsonl", train), ("valid.jsonl", valid)):
    with open(os.path.join(_OUT.value, name), "w") as f:
      for record in records:
        f.write(json.dumps(record) + "\n")
  print(f"Wrote {len(train)} training and {len(valid)} validation lines to {_OUT.value}.")


if __name__ == "__main__":
  app.run(main)
