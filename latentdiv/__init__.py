"""latentdiv: make the K values of a discrete latent produce different strategies.

Pure JAX functions and a Flax model; import the module you need:

* ``latentdiv.divergences`` — token-level JSD proxy, JSD_β, GKD loss (DESIGN §4)
* ``latentdiv.reconstruction`` — hard-EM / soft-EM over latents (§3)
* ``latentdiv.estimators`` — policy-gradient estimators of a sequence KL's
  gradient, baselines, JSD control variate (§5, §6)
* ``latentdiv.oracle`` — exact enumeration: exact KL, gradients, estimator
  mean and variance on tiny vocabularies (§7)
* ``latentdiv.raml`` — exponentiated-payoff sampling, label smoothing (§8)
* ``latentdiv.model`` / ``latentdiv.sampling`` — latent-conditioned Transformer,
  KV-cached scanned rollouts vmapped over latents
* ``latentdiv.tasks`` / ``latentdiv.metrics`` — synthetic strategy tasks and
  coverage metrics (§9)
* ``latentdiv.train`` — the training loop behind ``run.py``
"""

__version__ = "0.1.0"
