"""A model built from scratch starts at a scale where image features reach the decoder."""

import numpy as np
from flax import nnx

from lvlm_jax.data.tokenizer import load_tokenizer
from lvlm_jax.models import building
from lvlm_jax.models.lora import Linear


def test_new_model_kernels_are_fan_in_scaled_and_images_reach_the_decoder():
  config = building.ModelConfig(vision=building.VisionSize(hidden_size=64, intermediate_size=128,
                                                     num_layers=2, num_heads=4, image_size=32,
                                                     patch_size=8),
                             text=building.TextSize(hidden_size=64, intermediate_size=128,
                                                 num_layers=2, num_heads=4, num_kv_heads=2))
  tokenizer = load_tokenizer(config)
  model = building.build_new(config, tokenizer)()
  for path, module in nnx.iter_graph(model):
    if isinstance(module, Linear):
      kernel = np.asarray(module.kernel[...])
      assert abs(kernel.std() * np.sqrt(kernel.shape[0]) - 1) < 0.15, path

  # Two different images give clearly different projected features (N(0, 0.02) kernels, HF's
  # default, passed ~1% of the difference at this width).
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 1, 32, 32, 3)).astype(np.float32)
  features = np.asarray(nnx.jit(lambda m, p: m.embed_images(p))(model, images))
  difference = np.abs(features[0] - features[1]).mean() / np.abs(features).mean()
  assert difference > 0.3, difference
