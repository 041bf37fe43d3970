"""K = 3 latents on a multi-reference text dataset read from JSONL files (DESIGN.md §9.1).

    python experiments/make_text_example.py          # writes experiments/data/paraphrase/
    python run.py --config=experiments/configs/text_example.py --workdir=workdir/text_example
    python run.py --config=experiments/configs/text_example.py:bpe --workdir=workdir/text_bpe

The dataset (``experiments/make_text_example.py``, templates, nothing
downloaded) pairs statements such as "anna sees the dog" with three
references in three styles: passive, yes/no question, past tense. A latent
that commits to one style can reproduce it exactly; the summary reports the
multi-reference metrics of the greedy output of every latent on the 64
validation statements: pairwise BLEU between latents (lower = more diverse),
references covered (out of 3), multi-reference BLEU and its leave-one-out
variant (Shen et al. 2019).

Character tokens by default (BLEU on characters, ``task.bleu_tokenize =
'char'``); the argument ``bpe`` trains a byte-level BPE of Hugging Face
``tokenizers`` on the training file instead (saved as the workdir's
``tokenizer.json``) and scores BLEU on words (``'13a'``).
"""

from latentdiv import objectives


def get_config(tokenizer: str = "char"):
  config = objectives.base_config()
  config.task.name = "text"
  config.task.train_file = "experiments/data/paraphrase/train.jsonl"
  config.task.valid_file = "experiments/data/paraphrase/valid.jsonl"
  config.task.tokenizer = tokenizer
  config.task.tokenizer_vocab_size = 320
  config.task.bleu_tokenize = "char" if tokenizer == "char" else "13a"

  config.model.num_latents = 3
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.num_layers = 2
  config.model.d_ff = 128
  config.objective.reconstruction = "hard_em"
  config.objective.lambda_jsd = 0.1

  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 50
  config.train.batch_size = 32
  config.train.num_steps = 1500
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  config.eval.batch_size = 64
  config.eval.greedy = True
  return config
