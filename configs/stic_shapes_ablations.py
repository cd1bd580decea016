"""Ablations of configs/stic_shapes.py (issue 22), run by

    python -m lvlm_jax.ablate --config configs/stic_shapes.py --ablations configs/stic_shapes_ablations.py

Each entry is one run of the STIC pipeline with these overrides (config keys as on the command
line). "recipe" is the paper's recipe at toy scale; "oracle" trains DPO only on the pairs whose
chosen answer is truly better against the scene's ground truth: an upper bound no real run has.
"plain_detailed" asks for the chosen answer with the caption prompt the base was trained on
("Describe the image in detail.", configs/stic_prompts_plain_detailed/) instead of the shapes
prompt set's three-sentence one; the base then often gives the same answer to both prompts, and
DPO skips such identical pairs (no preference in them), so these two runs tolerate more skips.
"""

import os

_PLAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stic_prompts_plain_detailed")

ABLATIONS = {
    "recipe": {},
    "misleading_only": {"stic.misleading_prob": 1.0},
    "corruption_only": {"stic.misleading_prob": 0.0},
    "nll_1": {"dpo.nll_coef": 1.0},
    "beta_0.5": {"dpo.beta": 0.5},
    "lr_5e-5": {"dpo_optim.lr": 5e-5},
    "dpo_epochs_3": {"stic.dpo_epochs": 3.0},
    "noisy_rejected": {"dpo.noisy_rejected": True},
    "oracle": {"stic.pair_filter": "oracle"},
    "plain_detailed": {"stic.prompts": _PLAIN, "data.pipeline.max_skip_fraction": 0.3},
    "plain_detailed_corruption_only": {"stic.prompts": _PLAIN, "stic.misleading_prob": 0.0,
                                       "data.pipeline.max_skip_fraction": 0.3},
}
