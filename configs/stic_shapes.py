"""STIC on the shapes world, from the quickstart model, on a CPU.

    python -m lvlm_jax.train --config configs/quickstart.py     # the starting model, first
    python -m lvlm_jax.train --config configs/stic_shapes.py

Every stage of the paper's recipe (configs/stic_llava15_7b.py) at toy scale: preference pairs from
unlabeled shapes images (detailed prompt vs misleading prompt / corrupted image), DPO + NLL with
LoRA and a trainable projector, then description-infused SFT. The shapes-world metrics (caption
hallucination chair_i/chair_s/recall, yes/no accuracy, with and without Describe-and-Respond) are
measured before and after each stage and printed at the end (workdir/stic_shapes/summary.json).
Prompts are shapes-vocabulary analogues of STIC's lists (lvlm_jax/methods/prompts/stic_shapes):
the quickstart tokenizer has no words for the paper's prompts.
"""

from lvlm_jax.dataclass_config import sibling_config
from lvlm_jax.methods import stic


def get_config():
  config = stic.default_config()

  # The quickstart export (its tokenizer is read from the same folder).
  config.model.hf_dir = "workdir/quickstart/export/hf"
  config.model.tokenizer = ""
  # LoRA on every LLM linear, the projector trained at its own rate, the vision tower frozen (STIC).
  config.model.use_lora = True
  config.model.lora.rank = 16
  config.model.lora.alpha = 32.0
  config.model.lora.target = r"llm\.layers\.\d+\..*_proj"

  # The starting model's own world, read from its config so that the two never diverge; STIC's
  # images come from scenes of it that no stage trained on.
  config.data.shapes = sibling_config(__file__, "quickstart.py").data.shapes
  config.data.num_unlabeled = 512
  config.data.sft_tasks = (("caption", 192), ("yes_no", 256), ("grounding", 64))
  config.data.pipeline.system_prompt = ""  # as quickstart trained
  config.data.pipeline.length_buckets = (64, 128, 256)
  config.data.pipeline.read_threads = 2

  config.stic.prompts = "shapes"
  config.stic.misleading_prob = 0.5
  # 64 px scenes (resized to 32 for the tower): 8 px blurs small shapes beyond recognition, as
  # STIC's 20 px does to a COCO photo.
  config.stic.low_resolution_side = 8
  config.stic.generation.do_sample = True
  config.stic.generation.temperature = 0.2
  config.stic.generation.max_new_tokens = 96
  config.stic.generation.batch_size = 64

  config.dpo.loss_type = "sigmoid"
  config.dpo.beta = 0.1
  config.dpo.nll_coef = 1 / 1024
  config.dpo.reference = "precomputed"
  config.stic.dpo_epochs = 1.0
  config.dpo_optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.dpo_optim.lr = 2e-4
  config.dpo_optim.lr_groups = ((r"projector\..*", 2e-5),)
  config.dpo_optim.warmup_ratio = 0.03
  config.dpo_train.batch_size = 8
  config.dpo_train.log_every = 8

  config.stic.sft_epochs = 1.0
  config.sft_optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.sft_optim.lr = 2e-4
  config.sft_optim.lr_groups = ((r"projector\..*", 2e-5),)
  config.sft_optim.warmup_ratio = 0.03
  config.sft_train.batch_size = 16
  config.sft_train.log_every = 8

  config.checkpoint.every_steps = 32
  config.checkpoint.keep = 1

  config.eval.yes_no = 200
  config.eval.grounding = 0
  config.eval.captions = 100
  config.eval.batch_size = 50
  return config
