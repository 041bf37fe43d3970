"""What each field of an objective's config section means (``run.py --print_config``).

One dict per objective, keyed by the dotted path under ``config.objective``;
``tests/test_config.py`` checks that every field of every objective's
``default_config`` has an entry here. The loop's sections are described in
``latentdiv.config.FIELD_HELP``.
"""

HELP = {
    "diversity": {
        "name": "the objective: 'diversity' (this one) or 'distillation'",
        "reconstruction": "how the K per-latent likelihoods combine: hard_em, soft_em, ... "
                          "(latentdiv/reconstruction.py)",
        "wta_epsilon": "relaxed_wta: the non-winners' share of an example",
        "anneal_steps": "annealed_em: steps from soft-EM (tau = 1) to hard-EM (tau = 0)",
        "lambda_jsd": "weight of the token-level JSD between latents (DESIGN.md §4)",
        "jsd_weighting": "token weights of the JSD: uniform, prefix, divergence, ...",
        "jsd_prefix_len": "the 'prefix' weighting's L (first L tokens only)",
        "jsd_weight_temperature": "the 'divergence' weighting's softmax temperature over positions",
        "targets": "what reconstruction scores: 'data', 'label_smoothing' or 'raml' samples",
        "raml.epsilon": "label smoothing weight of the uniform prior over content tokens",
        "raml.tau": "RAML payoff temperature tau (also the tau of the summary's KL(q || p))",
        "raml.convention": "how tau is read: 'rescaled' (the paper's values) or exact",
        "raml.reward": "RAML payoff: 'hamming' (exact sampler) or 'edit' (approximate)",
        "raml.num_samples": "RAML samples N per example, drawn inside the step",
        "raml.proposal_tau": "'*_is' rewards: tau of the Hamming proposal of the importance "
                             "sampler (0: raml.tau)",
        "sequence_term.weight": "weight of the sequence-level term (0: off; DESIGN.md §5)",
        "sequence_term.kind": "'kl' (pairwise sequence KL) or 'mi' (bounded mutual information)",
        "sequence_term.pathwise": "'mi' only: keep the pathwise term through the mixture",
        "sequence_term.estimator": "policy-gradient estimator (DESIGN.md §5.3), e.g. rao_blackwell",
        "sequence_term.baseline": "baseline: none, leave_one_out, ema or jsd (DESIGN.md §5.4)",
        "sequence_term.rollout_len": "L, tokens per prefix rollout",
        "sequence_term.num_rollouts": "N rollouts per (example, latent); leave_one_out needs >= 2",
        "sequence_term.num_pairs": "ordered latent pairs per example (0: all K(K-1))",
        "sequence_term.warmup_steps": "steps with the term's weight at 0",
        "sequence_term.ramp_steps": "steps of linear ramp to its weight after the warmup",
        "sequence_term.ema_decay": "decay of the 'ema' baseline and the JSD control-variate fit",
    },
    "distillation": {
        "name": "the objective: 'distillation' (this one) or 'diversity'",
        "teacher_workdir": "the teacher: a run.py workdir (config.json and checkpoints/)",
        "teacher_latent": "k >= 0: distil the teacher at latent k into a K = 1 student; "
                          "-1: per latent",
        "loss": "opd, gkd, per_token_reward or seq_kd (DESIGN.md §6)",
        "estimator": "loss='opd': the policy-gradient estimator, e.g. rao_blackwell",
        "baseline": "loss='opd': none, leave_one_out or ema",
        "single_step_kl": "MiniLLM's single-step decomposition: the current step's exact KL "
                          "gradient in place of its sampled term",
        "teacher_mix": "alpha: sample from alpha * teacher + (1 - alpha) * student (0: on-policy)",
        "mix_weight": "teacher-mixed importance weights: 'sequence' (prefix ratios, unbiased) "
                      "or 'token' (MiniLLM's per-token ratio, biased)",
        "num_rollouts": "responses per (prompt, latent); leave_one_out needs >= 2",
        "discount": "gamma on the future terms (1: the unbiased sequence-KL gradient)",
        "length_normalize": "MiniLLM's length normalisation of the future terms",
        "ema_decay": "decay of the 'ema' baseline",
        "gkd_beta": "loss='gkd': the JSD_beta mixing weight",
        "gkd_lambda": "loss='gkd': the on-policy fraction of rows",
        "gkd_off_policy": "loss='gkd': the other rows from 'data' (y*) or the 'teacher'",
        "temperature": "sampling temperature in training (1: the objective of DESIGN.md §6)",
        "response_len": "tokens per response (0: the task's target length)",
        "num_eval_samples": "evaluation prompts (one student sample per latent each)",
        "warm_start": "first train on 'sft' (data NLL) or 'seq_kd' (teacher samples), or 'none'",
        "warm_start_steps": "steps of the warm start before `loss` takes over",
        "student_workdir": "initialise the student from this run.py workdir ('': from the seed)",
    },
}
