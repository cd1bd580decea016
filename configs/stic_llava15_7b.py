"""STIC's recipe (METHODS.md 2.2-2.4; repository yihedeng9/STIC) on a 7B LLaVA, for a GPU/TPU host.

    python -m lvlm_jax.train --config configs/stic_llava15_7b.py \\
      --config.model.hf_dir=/data/llava-1.5-7b-hf --config.data.image_root=/data/coco/train2014 \\
      --config.data.unlabeled_list=/data/stic/6k_coco_names.json \\
      --config.data.sft_conversations=/data/stic/mixed_5k.json

The paper's base model is LLaVA-v1.6-Mistral-7B (AnyRes tiling, mistral template in generation);
lvlm_jax has no AnyRes, so this recipe runs on LLaVA-1.5-7B (HF layout), which the training
scripts' `--image_aspect_ratio pad` single 336 px view and `--version v1` template match anyway.
Each value says where it comes from; [code] = the STIC repository, [paper] = the paper.
No shapes-world evaluation: measure the exports (dpo/export/hf, sft/export/hf) on real benchmarks.
"""

from lvlm_jax.methods import stic


def get_config():
  config = stic.default_config()

  config.model.hf_dir = ""  # required: an HF LLaVA-1.5-7B directory (llava-hf layout)
  config.model.tokenizer = ""  # the model's own
  config.model.dtype = "bfloat16"  # [code] bf16 training
  config.model.remat = "dots_no_batch"  # [code] gradient checkpointing
  config.model.use_lora = True
  config.model.lora.rank = 128  # [code] scripts/dpo_finetune.sh, finetune_lora.sh: lora_r 128
  config.model.lora.alpha = 256.0  # [code] lora_alpha 256
  config.model.lora.dropout = 0.05  # [code] lora_dropout 0.05
  config.model.lora.target = r"llm\.layers\.\d+\..*_proj"  # [code] all LLM linears but lm_head

  config.data.source = "files"  # required: unlabeled_list, sft_conversations, image_root
  config.data.num_unlabeled = 6000  # [code] data/6k_coco_names.json (6,275 names; [paper] 6k)
  config.data.pipeline.template = "vicuna_v1"  # [code] --version v1 / conv-mode vicuna_v1
  config.data.pipeline.length_buckets = (512, 1024, 2048)  # [code] model_max_length 2048 (stage 2)

  config.stic.prompts = "paper"  # [code] stic/generate_pref.py lists (verbatim)
  config.stic.misleading_prob = 0.5  # [code] random.random() > 0.5
  config.stic.low_resolution_side = 20  # [code] T.Resize(size=20)
  config.stic.brightness = 0.5  # [code] T.ColorJitter(brightness=.5, hue=.3)
  config.stic.hue = 0.3
  config.stic.generation.do_sample = True  # [code] temperature 0.2 => do_sample
  config.stic.generation.temperature = 0.2
  config.stic.generation.max_new_tokens = 1024  # [code] --max_new_tokens 1024
  config.stic.generation.batch_size = 32
  config.stic.seed = 42  # [code] random.seed(42)

  config.dpo.loss_type = "sigmoid"
  config.dpo.beta = 0.1  # [code] TRL default, not overridden
  config.dpo.nll_coef = 1 / 1024  # [code] stic/dpo_trainer.py: - policy_chosen_logps / 1024
  config.dpo.reference = "in_step"  # [code] ref_model=None -> adapter disabled
  config.dpo.noisy_rejected = False  # [paper] DPO on y_l; True reproduces the repository
  config.stic.dpo_epochs = 1.0  # [code] 1 epoch
  config.dpo_optim.trainable = r".*\.lora_[ab]|projector\..*"  # [code] LoRA + mm_projector
  config.dpo_optim.lr = 1e-7  # [code] scripts/dpo_finetune.sh learning_rate 1e-7
  config.dpo_optim.lr_groups = ((r"projector\..*", 2e-5),)  # [code] mm_projector_lr 2e-5
  config.dpo_optim.schedule = "cosine"  # [code] lr_scheduler_type cosine
  config.dpo_optim.warmup_ratio = 0.03  # [code] warmup_ratio 0.03
  config.dpo_optim.weight_decay = 0.0  # [code] weight_decay 0
  config.dpo_train.batch_size = 8  # [code] 1 per device x grad-acc 2 x 4 GPUs (README insists on 8)
  config.dpo_train.grad_accum_steps = 2  # [code] gradient_accumulation_steps 2
  config.dpo_train.logits_chunk = 512

  config.stic.sft_epochs = 1.0  # [code] scripts/finetune_lora.sh num_train_epochs 1
  config.sft_optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.sft_optim.lr = 2e-5  # [code] finetune_lora.sh learning_rate 2e-5
  config.sft_optim.lr_groups = ((r"projector\..*", 2e-5),)  # [code] mm_projector_lr 2e-5
  config.sft_optim.schedule = "cosine"  # [code]
  config.sft_optim.warmup_ratio = 0.03  # [code]
  config.sft_train.batch_size = 32  # [code] 16 per device x 2 GPUs
  config.sft_train.logits_chunk = 512

  config.checkpoint.every_steps = 200
  config.checkpoint.save_frozen = False  # frozen weights are re-read from model.hf_dir
  config.checkpoint.export_dtype = "bfloat16"

  config.eval.yes_no = 0  # the shapes-world metrics do not apply to COCO models
  config.eval.grounding = 0
  config.eval.captions = 0
  config.stic.dar_eval = False
  return config
