"""SC-Tune's recipe (METHODS.md 1.3-1.4; repository ivattyue/SC-Tune) on LLaVA-1.5-7B, for a
GPU/TPU host.

    python -m lvlm_jax.train --config configs/sctune_llava15_7b.py \\
      --config.model.hf_dir=/data/llava-1.5-7b-hf --config.data.grounding=/data/objects365.jsonl \\
      --config.data.image_roots=/data/objects365

The released code runs on Qwen-VL-Chat only. What differs here:
- The model is LLaVA-1.5 (CLIP ViT-L/14-336 + MLP + Vicuna), not Qwen-VL (ViT-bigG + a
  cross-attention resampler whose `attn_pool` SC-Tune keeps trainable): here the projector trains
  in its place and the vision tower is frozen.
- Prompts are chat questions in the model's template: the describer asks about
  `<ref>this</ref><box>(x1,y1),(x2,y2)</box>` (Qwen-VL: '<ref>This</ref><box>...</box> is',
  continued as plain text), the locator is the grounding prompt. LLaVA-1.5 has no box tokens:
  '<box>' must be one token of the tokenizer for the locator loss mask (add it, or train a model
  whose tokenizer has it), and a base LLaVA grounds poorly until the locator phases teach it.
- Boxes use the same 0..999 grid (`int(v * 999)`), x1,y1,x2,y2.
Each value says where it comes from; [code] = the SC-Tune repository.
"""

from lvlm_jax.methods import sctune


def get_config():
  config = sctune.default_config()

  config.model.hf_dir = ""  # required: an HF LLaVA-1.5-7B directory (llava-hf layout)
  config.model.tokenizer = ""
  config.model.dtype = "bfloat16"  # [code] bf16
  config.model.remat = "dots_no_batch"  # [code] gradient checkpointing

  config.data.source = "files"  # required: data.grounding (Objects365 boxes, [code] object365.json)
  config.data.pipeline.template = "vicuna_v1"
  config.data.pipeline.length_buckets = (384,)  # [code] model_max_length 384

  config.sctune.describer_prompt = ("<image>\nWhat is <ref>this</ref>{box}? Answer with a short "
                                    "description.")
  config.sctune.describer_answer_start = ""
  config.sctune.describer_steps = 200  # [code] caption_update_steps
  config.sctune.locator_steps = 100  # [code] bbox_update_steps
  config.sctune.describer_lr = 5e-7  # [code]
  config.sctune.locator_lr = 1e-6  # [code]
  config.sctune.top_k = 100  # [code] generate_twice_for_iou
  config.sctune.top_p = 0.3  # [code]
  config.sctune.temperature = 1.0  # [code]
  config.sctune.min_description_tokens = 3  # [code]
  config.sctune.max_description_tokens = 30  # [code]
  config.sctune.max_box_tokens = 20  # [code]

  config.ppo.kl_coef = 0.01  # [code] FixedKLController
  config.ppo.ppo_epochs = 2  # [code]

  config.optim.trainable = r"llm\..*|projector\..*"  # [code] full LLM fine-tune, ViT frozen
  config.optim.weight_decay = 0.1  # [code] AdamW wd 0.1
  config.optim.b2 = 0.95  # [code] beta2 0.95
  config.train.num_steps = 2400  # [code] stops at global step 2400
  config.train.batch_size = 128  # [code] 8 GPUs x 16
  config.train.log_every = 10

  config.checkpoint.every_steps = 300  # a checkpoint per describer+locator cycle
  config.checkpoint.save_frozen = False
  config.checkpoint.export_dtype = "bfloat16"

  config.eval.yes_no = 0  # no shapes-world evaluation: measure the export on RefCOCO etc.
  config.eval.grounding = 0
  config.eval.captions = 0
  config.mesh.shape = (1, -1, 1)  # FSDP over every chip
  return config
