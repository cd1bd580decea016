"""SigLIP vision tower against transformers: LLaVA logits, the tower's hidden states, export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from conftest import forward, TINY_LLAMA, save_tiny, torch_llava_logits
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.siglip import SiglipVisionTower

TOL = 1e-4  # of the logits' magnitude
IMAGE_TOKEN = 127
# 28 px / 7 px patches: 16 patches, all kept ("full": SigLIP has no CLS token).
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, image_size=28, patch_size=7)


def _llava_config(strategy: str) -> transformers.LlavaConfig:
  """vision_use_head stays at transformers' default (true): the checkpoint holds the head."""
  return transformers.LlavaConfig(
      vision_config=transformers.SiglipVisionConfig(**TINY_SIGLIP),
      text_config=transformers.LlamaConfig(**TINY_LLAMA), image_token_id=IMAGE_TOKEN,
      vision_feature_layer=-2, vision_feature_select_strategy=strategy)


@pytest.fixture(scope="module")
def siglip_llava(tmp_path_factory):
  torch.manual_seed(11)
  ref = transformers.LlavaForConditionalGeneration(_llava_config("full"))
  directory = save_tiny(ref, tmp_path_factory.mktemp("siglip_llava"))
  return directory, ref, hf.load_lvlm(directory)


def _batch(tokens_per_image: int):
  """Row 0: two images; row 1: one image, a garbage padded image slot and right padding."""
  rng = np.random.default_rng(12)
  image = [IMAGE_TOKEN] * tokens_per_image
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


def test_llava_logits_match_transformers(siglip_llava):
  directory, ref, ours = siglip_llava
  assert ours.config.tokens_per_image == 16
  with safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
    assert "vision_tower.head.probe" in f.keys()  # described by the config, read by nobody
  ids, mask, images, real_images = _batch(16)
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                      pixel_values=jnp.asarray(images))
  _assert_close(logits, torch_llava_logits(ref.eval(), ids, mask, real_images), mask)


@nnx.jit
def _tower_outputs(tower, pixels):
  return tower.hidden_states(pixels), tower(pixels)


def test_tower_on_its_own_matches_hf_vision_model(tmp_path):
  """A SiglipVisionModel directory loads as our tower: every hidden state and the post-normed last."""
  torch.manual_seed(13)
  ref = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_SIGLIP))
  tower = hf.load_model(save_tiny(ref, tmp_path))
  assert isinstance(tower, SiglipVisionTower)
  pixels = np.random.default_rng(14).normal(size=(2, 28, 28, 3)).astype(np.float32)
  states, last = _tower_outputs(tower, jnp.asarray(pixels))
  with torch.no_grad():
    out = ref(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
  assert len(states) == len(out.hidden_states) == 4
  for ours_state, expected in zip(states + [last], list(out.hidden_states) + [out.last_hidden_state]):
    expected = expected.numpy()
    assert np.abs(np.asarray(ours_state) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_export_reloads_in_transformers_without_the_head(siglip_llava, tmp_path):
  _, ref, ours = siglip_llava
  hf.save_hf(ours, str(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["vision_config"]["vision_use_head"] is False
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    assert not [k for k in f.keys() if ".head." in k]
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  ids, mask, images, real_images = _batch(16)
  _assert_close(torch_llava_logits(reloaded, ids, mask, real_images),
                torch_llava_logits(ref.eval(), ids, mask, real_images), mask)
  again = hf.load_lvlm(str(tmp_path))
  pairs = zip(jax.tree.leaves(nnx.state(ours, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param)))
  assert all(np.array_equal(a, b) for a, b in pairs)


def test_head_tensors_the_config_does_not_describe_are_refused(siglip_llava, tmp_path):
  directory, _, _ = siglip_llava
  config = json.load(open(os.path.join(directory, "config.json")))
  config["vision_config"]["vision_use_head"] = False
  (tmp_path / "config.json").write_text(json.dumps(config))
  os.symlink(os.path.join(directory, "model.safetensors"), tmp_path / "model.safetensors")
  with pytest.raises(UserError, match=r"checkpoint tensors are not used .*vision_tower\.head\."):
    hf.load_lvlm(str(tmp_path))


def test_default_strategy_drops_the_first_patch_as_transformers(tmp_path):
  """transformers' LLaVA drops the first token under "default" whatever the tower: with SigLIP
  that is a patch, so an image has 15 tokens."""
  torch.manual_seed(15)
  ref = transformers.LlavaForConditionalGeneration(_llava_config("default"))
  ours = hf.load_lvlm(save_tiny(ref, tmp_path))
  assert ours.config.tokens_per_image == 15
  ids = np.asarray([[5, 6] + [IMAGE_TOKEN] * 15 + [7, 8]], np.int32)
  mask = np.ones_like(ids)
  images = np.random.default_rng(16).normal(size=(1, 1, 28, 28, 3)).astype(np.float32)
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                      pixel_values=jnp.asarray(images))
  _assert_close(logits, torch_llava_logits(ref, ids, mask, images[:, 0]), mask)
