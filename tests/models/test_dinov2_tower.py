"""DINOv2 vision tower against transformers: position interpolation, LLaVA logits, the tower's
hidden states, export, refusals."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conftest import forward, TINY_LLAMA, save_tiny, torch_llava_logits
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.dinov2 import DINOv2Tower, interpolate_positions

TOL = 1e-4  # of the logits' magnitude
IMAGE_TOKEN = 127
# A 6 x 6 position table (42 px / 7 px patches) run at 28 px: 4 x 4 patches, positions resized.
# "default" drops the CLS token: 16 image tokens.
TINY_DINOV2 = dict(hidden_size=32, mlp_ratio=2, num_hidden_layers=3, num_attention_heads=4,
                   image_size=42, patch_size=7, layerscale_value=0.5, lvlm_jax_input_size=28)


def _random_layer_scales(model: torch.nn.Module) -> None:
  """LayerScale starts constant; random values make a transposed or swapped scale visible."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("lambda1"):
        p.normal_(0.5, 0.3)


@pytest.mark.parametrize("side,grid", [(6, 4), (4, 6), (37, 16), (5, 5)])
def test_position_interpolation_is_torchs_bicubic(side, grid):
  rng = np.random.default_rng(side * grid)
  table = rng.normal(size=(1, 1 + side * side, 8)).astype(np.float32)
  ours = np.asarray(interpolate_positions(jnp.asarray(table), grid))
  patch = torch.tensor(table[0, 1:].reshape(side, side, 8).transpose(2, 0, 1)[None])
  expected = torch.nn.functional.interpolate(patch, size=(grid, grid), mode="bicubic",
                                             align_corners=False)
  expected = expected[0].numpy().transpose(1, 2, 0).reshape(grid * grid, 8)
  np.testing.assert_array_equal(ours[0, 0], table[0, 0])
  assert np.abs(ours[0, 1:] - expected).max() <= 2e-6 * np.abs(expected).max()


@pytest.fixture(scope="module")
def dinov2_llava(tmp_path_factory):
  torch.manual_seed(21)
  config = transformers.LlavaConfig(
      vision_config=transformers.Dinov2Config(**TINY_DINOV2),
      text_config=transformers.LlamaConfig(**TINY_LLAMA), image_token_id=IMAGE_TOKEN,
      vision_feature_layer=-2, vision_feature_select_strategy="default")
  ref = transformers.LlavaForConditionalGeneration(config)
  _random_layer_scales(ref)
  directory = save_tiny(ref, tmp_path_factory.mktemp("dinov2_llava"))
  return directory, ref, hf.load_lvlm(directory)


def _batch():
  """Row 0: two images; row 1: one image, a garbage padded image slot and right padding."""
  rng = np.random.default_rng(22)
  image = [IMAGE_TOKEN] * 16
  row0 = [5, 6] + image + [7] + image + [8, 9]
  row1 = [10] + image + [11, 12]
  ids = np.zeros((2, len(row0)), np.int32)
  mask = np.zeros_like(ids)
  ids[0], mask[0] = row0, 1
  ids[1, :len(row1)], mask[1, :len(row1)] = row1, 1
  images = rng.normal(size=(2, 2, 28, 28, 3)).astype(np.float32)
  images[1, 1] = 1e3
  return ids, mask, images, np.stack([images[0, 0], images[0, 1], images[1, 0]])


def _assert_close(ours, expected, mask):
  real = mask.astype(bool)
  diff = np.abs(np.asarray(ours)[real] - expected[real]).max()
  assert diff <= TOL * np.abs(expected[real]).max(), diff


def test_llava_logits_match_transformers(dinov2_llava):
  _, ref, ours = dinov2_llava
  assert (ours.config.vision.image_size, ours.config.vision.position_grid) == (28, 6)
  assert ours.config.tokens_per_image == 16
  ids, mask, images, real_images = _batch()
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                      pixel_values=jnp.asarray(images))
  _assert_close(logits, torch_llava_logits(ref.eval(), ids, mask, real_images), mask)


@nnx.jit
def _tower_outputs(tower, pixels):
  return tower.hidden_states(pixels), tower(pixels)


def test_tower_on_its_own_matches_hf_vision_model(tmp_path):
  """A Dinov2Model directory loads as our tower: every hidden state and the normed last, at an
  input size that needs the positions resized."""
  torch.manual_seed(23)
  ref = transformers.Dinov2Model(transformers.Dinov2Config(**TINY_DINOV2))
  _random_layer_scales(ref)
  tower = hf.load_model(save_tiny(ref, tmp_path))
  assert isinstance(tower, DINOv2Tower)
  pixels = np.random.default_rng(24).normal(size=(2, 28, 28, 3)).astype(np.float32)
  states, last = _tower_outputs(tower, jnp.asarray(pixels))
  with torch.no_grad():
    out = ref(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
  assert len(states) == len(out.hidden_states) == 4
  for ours_state, expected in zip(states + [last], list(out.hidden_states) + [out.last_hidden_state]):
    expected = expected.numpy()
    assert np.abs(np.asarray(ours_state) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_export_reloads_in_transformers(dinov2_llava, tmp_path):
  _, ref, ours = dinov2_llava
  hf.save_hf(ours, str(tmp_path))
  vision = json.load(open(tmp_path / "config.json"))["vision_config"]
  assert (vision["image_size"], vision["lvlm_jax_input_size"], vision["use_mask_token"]) == (42, 28, False)
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  ids, mask, images, real_images = _batch()
  _assert_close(torch_llava_logits(reloaded, ids, mask, real_images),
                torch_llava_logits(ref.eval(), ids, mask, real_images), mask)
  again = hf.load_lvlm(str(tmp_path))
  assert again.config == ours.config
  pairs = zip(jax.tree.leaves(nnx.state(ours, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param)))
  assert all(np.array_equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("key,value,message", [
    ("use_swiglu_ffn", True, "vision_config.use_swiglu_ffn is true (DINOv2 ViT-g); only the MLP "
     "DINOv2 towers (ViT-S/B/L) are supported"),
    ("num_register_tokens", 4, "vision_config.num_register_tokens=4: DINOv2 register tokens are "
     "not supported"),
    ("lvlm_jax_input_size", 30, "vision_config.lvlm_jax_input_size=30 is not a multiple of "
     "patch_size 7"),
])
def test_unsupported_dinov2_configs_are_refused_in_one_line(tmp_path, key, value, message):
  config = transformers.LlavaConfig(vision_config=transformers.Dinov2Config(**TINY_DINOV2),
                                    text_config=transformers.LlamaConfig(**TINY_LLAMA),
                                    image_token_id=IMAGE_TOKEN).to_dict()
  config["vision_config"][key] = value
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError) as error:
    hf.load_lvlm(str(tmp_path))
  assert str(error.value) == f"{os.path.join(tmp_path, 'config.json')}: {message}"
