"""CSR's recipe (METHODS.md 3.2-3.5; repository YiyangZhou/CSR) on LLaVA-1.5-7B, for a GPU/TPU host.

    python -m lvlm_jax.train --config configs/csr_llava15_7b.py \\
      --config.model.hf_dir=/data/llava-1.5-7b-hf \\
      --config.csr.clip_dir=/data/clip-vit-large-patch14-336 \\
      --config.data.prompt_file=/data/csr/CSR-Prompt-Dataset-12k.json \\
      --config.data.image_root=/data/coco/train2014

Three rounds of search -> CLIP-calibrated pairs -> DPO -> merge. Each value says where it comes
from: [code] = the CSR repository, [paper] = the paper (recalled). The released code prunes and
scores by sibling ranks ('repo' mode); the paper's calibrated reward is the default here, the
released behaviour is --config.csr.tree.reward=repo --config.csr.tree.prune_by=lm
--config.csr.tree.clamp=False. No shapes-world evaluation: measure round_<k>/dpo/export/hf on
POPE, CHAIR and the benchmarks of METHODS.md 3.6.
"""

from lvlm_jax.methods import csr


def get_config():
  config = csr.default_config()

  config.model.hf_dir = ""  # required: an HF LLaVA-1.5-7B directory (llava-hf layout) [code]
  config.model.tokenizer = ""  # the model's own
  config.model.dtype = "bfloat16"  # [code] bf16
  config.model.remat = "dots_no_batch"
  config.model.use_lora = True
  config.model.lora.rank = 128  # [code] scripts/run_train.sh lora_r 128
  config.model.lora.alpha = 256.0  # [code] lora_alpha 256
  config.model.lora.target = r"llm\.layers\.\d+\..*_proj"  # [code] all LLM linear layers

  config.data.source = "files"  # required: prompt_file, image_root
  config.data.num_prompts = 0  # [code] all 12,856 records of CSR-Prompt-Dataset-12k.json
  config.data.pipeline.template = "vicuna_v1"  # [code] conv vicuna v1
  config.data.pipeline.length_buckets = (512, 1024)  # [code] model_max_length 1024

  config.csr.rounds = 3  # [paper] 3 iterations (HF releases CSR-7B iter1-3)
  config.csr.clip_dir = ""  # required: openai/clip-vit-large-patch14-336 [code] score.py
  tree = config.csr.tree
  tree.sentences.num_beams = 5  # [code] sample.py num_beams 5
  tree.sentences.num_beam_groups = 5  # [code] num_beam_groups 5
  tree.sentences.diversity_penalty = 3.0  # [code] diversity_penalty 3.0
  tree.sentences.num_candidates = 5  # [code] num_return_sequences 5
  tree.sentences.max_new_tokens = 70  # [code] max_new_tokens 70
  tree.sentences.sentence_end_ids = (29889,)  # [code] eos_token_id=29889 ('.')
  tree.keep_top = 1  # [code] 5 // 2 - 1
  tree.keep_bottom = 2  # [code] 5 // 2
  tree.max_chars = 1024  # [code] len(text) >= 1024 is final
  tree.max_response_tokens = 320  # 1024 characters of English are about 250 LLaMA tokens
  tree.reward = "paper"  # [paper] R = lam * R_I + (1 - lam) * R_T, summed
  tree.lam = 0.9  # [paper] lambda 0.9
  tree.alpha = 0.9  # [code] step3.sh alpha 0.9 (reward='repo')
  tree.clamp = True  # [paper] max(100 cos, 0); [code] no clamp
  tree.prune_by = "reward"  # [paper] calibrated reward guides expansion; [code] LM score
  config.csr.search_batch_size = 8
  config.csr.clip_batch_size = 256

  config.dpo.loss_type = "sigmoid"  # [code] dpo_trainer.py: standard sigmoid DPO
  config.dpo.beta = 0.1  # [code] default beta 0.1
  config.dpo.nll_coef = 0.0  # [code] no SFT term
  config.dpo.reference = "in_step"  # [code] reference = base with the LoRA disabled
  config.csr.dpo_epochs = 1.0  # [code] num_train_epochs 1
  config.dpo_optim.trainable = r".*\.lora_[ab]|projector\..*"  # [code] LoRA + mm_projector
  config.dpo_optim.lr = 1e-7  # [code] learning_rate 1e-7
  config.dpo_optim.lr_groups = ((r"projector\..*", 2e-5),)  # [code] mm_projector_lr 2e-5
  config.dpo_optim.schedule = "cosine"  # [code] lr_scheduler_type cosine
  config.dpo_optim.warmup_ratio = 0.03  # [code] warmup_ratio 0.03
  config.dpo_optim.weight_decay = 0.0  # [code] weight_decay 0
  config.dpo_train.batch_size = 8  # [code] per-device 1, grad-acc 1; GPU count not given
  config.dpo_train.logits_chunk = 512

  config.checkpoint.every_steps = 200
  config.checkpoint.save_frozen = False  # frozen weights are re-read from model.hf_dir
  config.checkpoint.export_dtype = "bfloat16"

  config.eval.yes_no = 0  # the shapes-world metrics do not apply to COCO models
  config.eval.grounding = 0
  config.eval.captions = 0
  return config
