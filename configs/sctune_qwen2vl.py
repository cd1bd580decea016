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
Everything else is configs/sctune_llava15_7b.py's recipe, read from it (so the two never
diverge); each value says where it comes from; [code] = the SC-Tune repository.
"""

from lvlm_jax.dataclass_config import sibling_config


def get_config():
  config = sibling_config(__file__, "sctune_llava15_7b.py")

  config.model.hf_dir = ""  # required: an HF Qwen2-VL directory (Qwen/Qwen2-VL-7B-Instruct)
  config.data.pipeline.template = "chatml"  # Qwen2-VL-Instruct's chat format and system prompt
  config.data.pipeline.length_buckets = (384, 1024)  # [code] model_max_length 384, + the images
  config.data.pipeline.box_format.grid = 1001  # Qwen2-VL's 0..1000
  config.data.pipeline.box_format.open = "<|box_start|>"
  config.data.pipeline.box_format.close = "<|box_end|>"
  config.data.pipeline.grounding_prompt = ("<image>\nOutput the bounding box of "
                                           "<|object_ref_start|>{expression}<|object_ref_end|>.")
  config.sctune.describer_prompt = ("<image>\nWhat is <|object_ref_start|>this<|object_ref_end|>"
                                    "{box}? Answer with a short description.")
  config.optim.trainable = r"llm\..*|vision\.merger\..*"  # [code] LLM + resampler, ViT frozen
  return config
