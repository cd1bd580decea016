"""What the method pipeline tests share: a tiny untrained shapes-world model saved as the
quickstart saves its export."""

import pytest
from flax import nnx

from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer
from lvlm_jax.models import hf
from lvlm_jax.models.llm import LLMConfig
from lvlm_jax.models.lvlm import LVLM, LVLMConfig
from lvlm_jax.models.vision import CLIPVisionConfig


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
  """A tiny random LLaVA with the shapes tokenizer (which knows the grounding prompt's words),
  exported like the quickstart."""
  directory = str(tmp_path_factory.mktemp("base"))
  tokenizer = shapes_tokenizer(extra_texts=(DataConfig().grounding_prompt,))
  config = LVLMConfig(
      vision=CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                              image_size=16, patch_size=8),
      text=LLMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id),
      image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
  hf.save_hf(LVLM(config, rngs=nnx.Rngs(0)), directory)
  tokenizer.save_pretrained(directory)
  return directory
