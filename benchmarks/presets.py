"""Model and batch sizes of the benchmarks, and the shared random weights both frameworks load.

`small` runs on a 2-core CPU in minutes: a 68M-parameter LLaVA-style model (CLIP ViT 6x384 at 224/14
-> mlp2x_gelu -> Llama 8x512, GQA 8/4, vocab 32k), batch 4 x 384 tokens of which 256 are image
tokens (LLaVA-1.5's 576 scaled down with the image). `7b` and `13b` are LLaVA-1.5's shapes for
accelerators (CLIP ViT-L/14-336 + Vicuna), built from random weights directly on the devices.
"""

import dataclasses
import json
import os

CACHE = os.environ.get("LVLM_JAX_BENCH_CACHE", os.path.expanduser("~/.cache/lvlm_jax_bench"))
IMAGE_TOKEN_ID = 32000


@dataclasses.dataclass(frozen=True)
class Preset:
  vision: dict
  text: dict
  batch: int
  seq_len: int
  new_tokens: int  # generation workloads
  compare_with_transformers: bool


CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, image_size=336, patch_size=14,
                      projection_dim=768)
VICUNA = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

PRESETS = {
    "small": Preset(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=6, image_size=224, patch_size=14, projection_dim=384),
        text=dict(vocab_size=32064, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0),
        batch=4, seq_len=384, new_tokens=64, compare_with_transformers=True),
    "7b": Preset(
        vision=CLIP_VIT_L_336,
        text=dict(VICUNA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32),
        batch=8, seq_len=2048, new_tokens=256, compare_with_transformers=False),
    "13b": Preset(
        vision=CLIP_VIT_L_336,
        text=dict(VICUNA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40),
        batch=8, seq_len=2048, new_tokens=256, compare_with_transformers=False),
}


def hf_config(preset: Preset) -> dict:
  """The HF LLaVA config dict of a preset (what `config.json` holds)."""
  import transformers
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**preset.vision),
      text_config=transformers.LlamaConfig(**preset.text), image_token_id=IMAGE_TOKEN_ID,
      vision_feature_layer=-2, vision_feature_select_strategy="default")
  return config.to_dict()


def tokens_per_image(preset: Preset) -> int:
  return (preset.vision["image_size"] // preset.vision["patch_size"]) ** 2


def weights_dir(name: str) -> str:
  """Random weights of a CPU preset, written once by transformers and loaded by both frameworks."""
  directory = os.path.join(CACHE, name)
  if os.path.exists(os.path.join(directory, "model.safetensors")):
    return directory
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.LlavaConfig.from_dict(hf_config(PRESETS[name]))
  model = transformers.LlavaForConditionalGeneration(config).eval()
  partial = directory + ".partial"
  model.save_pretrained(partial)
  os.replace(partial, directory)
  return directory


def lvlm_jax_model(name: str, attention: str = "auto"):
  """The preset's model in lvlm_jax: the shared random weights on CPU presets; on accelerator
  presets a random model built in place with bf16 compute (no transformers side to match).
  attention: the decoder's attention implementation (layers.ATTENTION_IMPLEMENTATIONS)."""
  from lvlm_jax.models import hf
  preset = PRESETS[name]
  if preset.compare_with_transformers:
    model = hf.load_lvlm(weights_dir(name))
  else:
    model = hf.build_model(hf_config(preset), dtype="bfloat16")
  model.llm.attention_implementation = attention
  return model


def batch_arrays(preset: Preset, seed: int = 0) -> dict:
  """One SFT batch as numpy: [B, T] tokens with one image block, loss on the last quarter."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b, t, p = preset.batch, preset.seq_len, tokens_per_image(preset)
  ids = rng.integers(3, 32000, (b, t)).astype(np.int32)
  ids[:, 4:4 + p] = IMAGE_TOKEN_ID
  loss_mask = np.zeros((b, t), np.float32)
  loss_mask[:, 3 * t // 4:] = 1.0
  size = preset.vision["image_size"]
  pixels = rng.normal(size=(b, 1, size, size, 3)).astype(np.float32)
  return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": np.ones((b, t), np.int32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "pixel_values": pixels,
          "image_mask": np.ones((b, 1), bool)}


def describe(name: str) -> str:
  return json.dumps(dataclasses.asdict(PRESETS[name]))
