"""latentdiv: make the K values of a discrete latent produce different strategies.

Pure JAX functions and a Flax model (the mathematics: docs/DESIGN.md):

* ``latentdiv.logprobs`` — token log-probabilities, sequence log-likelihood,
  EOS/content masks: the one primitive per quantity every loss calls (§2–3)
* ``latentdiv.model`` / ``latentdiv.sampling`` — latent-conditioned Transformer,
  KV-cached scanned rollouts vmapped over latents, K×K scoring (§1, §10)
* ``latentdiv.reconstruction`` — hard-EM / soft-EM over latents (§3)
* ``latentdiv.divergences`` — token-level JSD proxy, JSD_β, KL (§4)
* ``latentdiv.estimators`` / ``latentdiv.baselines`` — policy-gradient
  estimators of a sequence KL's gradient and their baselines (§5.3–5.4, §6);
  ``latentdiv.surrogates`` — their single-rollout forms
* ``latentdiv.sequence_term`` — the sequence-level inter-latent term (§5)
* ``latentdiv.opd`` — on-policy distillation losses, GKD (§6)
* ``latentdiv.oracle`` / ``latentdiv.moments`` / ``latentdiv.model_oracle`` —
  exact enumeration: exact KL, gradients, estimator mean and variance on tiny
  vocabularies, the Transformer as an enumerable model (§7);
  ``latentdiv.diagnostics`` — the estimator × baseline diagnostics
* ``latentdiv.payoff`` / ``latentdiv.edits`` / ``latentdiv.raml`` — exponentiated-payoff
  samplers (Hamming exact, edit distance approximate), RAML losses, label smoothing,
  importance-sampled RAML for the rewards of ``latentdiv.rewards`` (§8)
* ``latentdiv.tasks`` / ``latentdiv.metrics`` — synthetic strategy tasks and
  coverage metrics (§9)
* ``latentdiv.datasets`` — the train step's data: fresh draws or a finite
  training set in reshuffled epochs, held-out sets (§8.6, §9)
* ``latentdiv.text_data`` / ``latentdiv.text_metrics`` — JSONL text datasets
  with several references, tokenizers; pairwise BLEU, references covered,
  multi-reference BLEU (§9.1)
* ``latentdiv.objectives`` — the objectives (``diversity``, ``distillation``),
  peers on the one train step of ``latentdiv.train`` and the host loop of
  ``latentdiv.loop``
* ``latentdiv.experiment`` — ``train_and_evaluate(config, workdir)`` and
  ``load(workdir)``, what ``run.py`` and users call
* ``latentdiv.loop`` / ``latentdiv.workdir`` / ``latentdiv.checkpointing`` /
  ``latentdiv.runlog`` / ``latentdiv.memory`` / ``latentdiv.cli`` — the host
  loop and what makes runs reliable: run folders, the lock and the resume
  rules, checksummed checkpoints, the metrics log, the memory check, the
  command line's config files (§11)
"""

from latentdiv import baselines
from latentdiv import checkpointing
from latentdiv import cli
from latentdiv import config
from latentdiv import datasets
from latentdiv import divergences
from latentdiv import edits
from latentdiv import estimators
from latentdiv import experiment
from latentdiv import logprobs
from latentdiv import loop
from latentdiv import memory
from latentdiv import metrics
from latentdiv import model
from latentdiv import objectives
from latentdiv import opd
from latentdiv import oracle
from latentdiv import payoff
from latentdiv import raml
from latentdiv import reconstruction
from latentdiv import runlog
from latentdiv import rewards
from latentdiv import sampling
from latentdiv import sequence_term
from latentdiv import sharding
from latentdiv import surrogates
from latentdiv import tasks
from latentdiv import text_data
from latentdiv import text_metrics
from latentdiv import train
from latentdiv import vocab
from latentdiv import workdir

__version__ = "0.2.0"
