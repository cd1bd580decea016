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


def test_number_code_orders_the_number_tokens_and_nothing_else():
  small = dict(vision=building.VisionSize(hidden_size=32, intermediate_size=64, num_layers=1,
                                          num_heads=2, image_size=16, patch_size=8),
               text=building.TextSize(hidden_size=32, intermediate_size=64, num_layers=1,
                                      num_heads=2, num_kv_heads=1))
  plain_config = building.ModelConfig(**small)
  tokenizer = load_tokenizer(plain_config)
  plain = building.build_new(plain_config, tokenizer)()
  coded = building.build_new(building.ModelConfig(**small, number_code=0.3), tokenizer)()
  ids, values = building.number_tokens(tokenizer)
  # The shapes tokenizer has every 0..999 once ('007' is not a number token).
  assert sorted(values) == list(range(1000))
  ids = [i for _, i in sorted(zip(values, ids))]  # ids[v]: the token of value v
  emb_plain = np.asarray(plain.llm.embed_tokens.embedding[...])
  emb = np.asarray(coded.llm.embed_tokens.embedding[...])
  head = np.asarray(coded.llm.lm_head.kernel[...])
  # Only the number tokens' first half of the width changed; the rest is the plain init.
  others = np.setdiff1d(np.arange(len(emb)), ids)
  np.testing.assert_array_equal(emb[others], emb_plain[others])
  np.testing.assert_array_equal(emb[ids, 16:], emb_plain[ids, 16:])
  np.testing.assert_array_equal(emb[ids, :16], head[:16, ids].T)
  # The code's frequencies: value / 1000 * pi * 2^(j - 4), j < 8, cos then sin, times 0.3.
  phase = 500 / 1000 * np.pi * 2.0 ** (np.arange(8) - 4)
  np.testing.assert_allclose(emb[ids[500], :16], 0.3 * np.concatenate([np.cos(phase), np.sin(phase)]),
                             rtol=1e-5, atol=1e-6)
  code = emb[ids, :16]
  near, far = code[500] @ code[505], code[500] @ code[900]
  assert near > 2 * far, (near, far)


def test_the_attention_setting_reaches_the_decoder_and_a_bad_one_is_refused():
  import pytest
  from lvlm_jax.errors import UserError
  small = dict(vision=building.VisionSize(hidden_size=32, intermediate_size=64, num_layers=1,
                                          num_heads=2, image_size=16, patch_size=8),
               text=building.TextSize(hidden_size=32, intermediate_size=64, num_layers=1,
                                      num_heads=2, num_kv_heads=1))
  config = building.ModelConfig(attention="fused", **small)
  model = building.build_new(config, load_tokenizer(config))()
  assert model.llm.attention_implementation == "fused"
  with pytest.raises(UserError, match="model.attention='flash' is not one of"):
    building.ModelConfig(attention="flash")
