"""LLaVA-1.5-7B LoRA instruction tuning on TPU pods / GPUs: the recipe the four methods share.

    python -m lvlm_jax.train --config configs/sft_llava15_7b.py \
        --config.model.hf_dir=/path/to/llava-1.5-7b-hf \
        --config.data.conversations="('/data/llava_v1_5_mix665k.json',)" \
        --config.data.image_roots="('/data',)"

Values follow the official scripts summarised in METHODS.md (section numbers below): LoRA on
every LLM linear layer, the projector fully trained at its own learning rate, the vision tower
frozen, cosine schedule with 3% warmup, bf16 compute. Copy this file to change the recipe.
"""

from lvlm_jax.methods import sft


def get_config():
  config = sft.default_config()

  # An HF LLaVA directory (llava-hf layout, e.g. llava-hf/llava-1.5-7b-hf): weights, tokenizer,
  # preprocessor_config.json (CLIP ViT-L/14-336, 576 image tokens). Set it on the command line.
  config.model.hf_dir = "llava-1.5-7b-hf"
  config.model.tokenizer = ""  # the one in hf_dir
  config.model.dtype = "bfloat16"  # compute; master weights and Adam moments stay float32
  config.model.param_dtype = "float32"
  config.model.remat = "full"  # 2048-token sequences of a 7B decoder: recompute, keep layer inputs

  # LoRA r=128, alpha=256, dropout 0.05 on all LLM linear layers except lm_head (METHODS.md
  # feature 5; STIC scripts/dpo_finetune.sh, CSR run_train.sh, CaD-VI finetune_vicuna7b_lora.sh).
  config.model.use_lora = True
  config.model.lora.rank = 128
  config.model.lora.alpha = 256.0
  config.model.lora.dropout = 0.05
  config.model.lora.target = r"llm\.layers\.\d+\.(attn|mlp)\.\w+_proj"

  # Adapters + the whole projector train; the vision tower and the base LLM are frozen (5).
  config.optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.optim.lr = 1e-4  # CaD-VI's LoRA lr (4.3); STIC stage 2 uses 2e-5 (2.4)
  config.optim.lr_groups = ((r"projector\..*", 2e-5),)  # mm_projector_lr 2e-5 (2.3, 3.5, 4.3)
  config.optim.schedule = "cosine"
  config.optim.warmup_ratio = 0.03  # (2.3, 2.4, 3.5, 4.3)
  config.optim.weight_decay = 0.0  # LLaVA's default; CSR sets it explicitly (3.5)
  config.optim.clip_norm = 1.0  # HF Trainer's max_grad_norm default

  # LLaVA conversation data (e.g. llava_v1_5_mix665k.json), vicuna_v1 template, max length 2048
  # (4.3), images padded to square with the CLIP mean colour ("image_aspect_ratio pad").
  config.data.shapes_tasks = ()
  config.data.conversations = ()
  config.data.pipeline.template = "vicuna_v1"
  config.data.pipeline.length_buckets = (512, 1024, 1536, 2048)
  config.data.pipeline.max_images = 1
  config.data.pipeline.worker_count = 8
  config.data.pipeline.read_threads = 16

  # Global batch 128 = CaD-VI's 32 per device x 4 GPUs (4.3); 665k examples / 128 = 1 epoch.
  config.train.batch_size = 128
  config.train.num_steps = 5200
  config.train.grad_accum_steps = 1  # raise it if a batch does not fit the devices' memory
  config.train.logits_chunk = 512  # the float32 [B, 2048, 32000] logits never exist at once
  config.train.log_every = 10

  config.checkpoint.every_steps = 500
  config.checkpoint.keep = 2
  config.checkpoint.save_frozen = False  # the frozen base is re-read from hf_dir on resume
  config.checkpoint.export_dtype = "bfloat16"

  config.mesh.shape = (1, -1, 1)  # FSDP over every device; ('data', 'fsdp', 'tensor')

  # The shapes-world metrics mean nothing for a LLaVA-data run.
  config.eval.yes_no = 0
  config.eval.grounding = 0
  config.eval.captions = 0
  return config
