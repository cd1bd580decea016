"""SC-Tune's recipe (METHODS.md 1.3-1.4; repository ivattyue/SC-Tune) on Qwen2-VL-2B/7B-Instruct,
for a GPU/TPU host.

    python -m lvlm_jax.train --config configs/sctune_qwen2vl.py \\
      --config.model.hf_dir=/data/Qwen2-VL-7B-Instruct --config.data.grounding=/data/objects365.jsonl \\
      --config.data.image_roots=/data/objects365

The released code runs on Qwen-VL-Chat, Qwen2-VL's predecessor; what differs here:
- Boxes are Qwen2-VL's own grounding markup, `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` on its
  0..1000 grid (data.text.QWEN2_VL_BOXES), and the describer asks about
  `<|object_ref_start|>this<|object_ref_end|>` with the box (Qwen-VL: `<ref>This</ref><box>...`
  on 0..999, continued as plain text).
- Each image keeps about its own resolution (data.qwen2_vl_images; the model directory's
  preprocessor_config.json sets the pixel budget); LLaVA-format `<image>` placeholders in the data
  and prompts become `<|vision_start|><|image_pad|><|vision_end|>`.
- Qwen-VL's trainable `attn_pool` resampler is, in Qwen2-VL, the patch merger
  (`vision.merger`): it trains with the LLM, the rest of the vision tower is frozen.
Each value says where it comes from; [code] = the SC-Tune repository.
"""

from lvlm_jax.methods import sctune


def get_config():
  config = sctune.default_config()

  config.model.hf_dir = ""  # required: an HF Qwen2-VL directory (Qwen/Qwen2-VL-7B-Instruct)
  config.model.tokenizer = ""  # the model's own
  config.model.dtype = "bfloat16"  # [code] bf16
  config.model.remat = "dots_no_batch"  # [code] gradient checkpointing

  config.data.source = "files"  # required: data.grounding (Objects365 boxes, [code] object365.json)
  config.data.pipeline.template = "chatml"  # Qwen2-VL-Instruct's chat format and system prompt
  config.data.pipeline.length_buckets = (384, 1024)  # [code] model_max_length 384, + the images
  config.data.pipeline.box_format.grid = 1001  # Qwen2-VL's 0..1000
  config.data.pipeline.box_format.open = "<|box_start|>"
  config.data.pipeline.box_format.close = "<|box_end|>"
  config.data.pipeline.grounding_prompt = ("<image>\nOutput the bounding box of "
                                           "<|object_ref_start|>{expression}<|object_ref_end|>.")

  config.sctune.describer_prompt = ("<image>\nWhat is <|object_ref_start|>this<|object_ref_end|>"
                                    "{box}? Answer with a short description.")
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

  config.optim.trainable = r"llm\..*|vision\.merger\..*"  # [code] LLM + resampler, ViT frozen
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
