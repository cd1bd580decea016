"""Shared test set-up: fp32 CPU JAX, offline HF, and tiny random HF reference models saved to disk."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, image_size=28, patch_size=7)


def save_tiny(model, directory) -> str:
  """Puts a torch reference model in eval mode and saves it as safetensors; returns the directory."""
  model.eval()
  model.save_pretrained(str(directory))
  return str(directory)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
  return save_tiny(model, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
  """LLaVA: CLIP 28px/7 (16 patches) -> mlp2x_gelu -> Llama; image token id 127, feature layer -2."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**TINY_CLIP_VISION),
      text_config=transformers.LlamaConfig(**TINY_LLAMA), image_token_id=127,
      vision_feature_layer=-2, vision_feature_select_strategy="default")
  model = transformers.LlavaForConditionalGeneration(config)
  return save_tiny(model, tmp_path_factory.mktemp("llava"))
