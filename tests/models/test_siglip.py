"""The SigLIP image-text model (text tower, pooling head, logit scale and bias) against
transformers' SiglipModel (fp32, tiny random)."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conftest import save_tiny
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf as hf_io
from lvlm_jax.models.siglip import SiglipConfig, SiglipModel

TOL = 1e-4  # of the logits' magnitude


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  torch.manual_seed(2)
  config = transformers.SiglipConfig(
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=12, projection_size=24,
                       pad_token_id=1, bos_token_id=None, eos_token_id=2),
      vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, image_size=28, patch_size=7))
  ref = transformers.SiglipModel(config)
  with torch.no_grad():  # transformers initialises both at 0: make each one count
    ref.logit_scale.fill_(1.7)
    ref.logit_bias.fill_(-2.5)
  directory = save_tiny(ref, tmp_path_factory.mktemp("siglip"))
  return directory, ref, hf_io.load_siglip(directory)


def _inputs():
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
  ids = rng.integers(3, 64, (4, 12)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 7:] = mask[3, 4:] = 0
  ids[mask == 0] = 1
  return pixels, ids, mask


@nnx.jit
def _ours(model, pixels, ids, mask):
  return model(pixels, ids), model(pixels, ids, mask), model.score(pixels, ids[:3])


def _theirs(ref, pixels, ids, mask=None):
  with torch.no_grad():
    return ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
               input_ids=torch.tensor(ids),
               attention_mask=None if mask is None else torch.tensor(mask))


def _assert_close(ours, expected):
  diff = np.abs(np.asarray(ours) - expected).max()
  assert diff <= TOL * np.abs(expected).max(), (diff, np.abs(expected).max())


def test_logits_per_image_match_transformers(siglip):
  _, ref, model = siglip
  assert isinstance(model, SiglipModel)
  pixels, ids, mask = _inputs()
  unmasked, masked, score = _ours(model, pixels, ids, mask)
  expected = _theirs(ref, pixels, ids)
  assert unmasked.shape == (3, 4)
  _assert_close(unmasked, expected.logits_per_image.numpy())
  _assert_close(masked, _theirs(ref, pixels, ids, mask).logits_per_image.numpy())
  _assert_close(score, np.diag(expected.logits_per_image.numpy()[:, :3]))


def test_export_reloads_in_transformers_with_equal_logits(siglip, tmp_path):
  _, ref, model = siglip
  hf_io.save_hf(model, str(tmp_path))
  config = json.load(open(tmp_path / "config.json"))
  assert config["model_type"] == "siglip" and config["vision_config"]["vision_use_head"]
  reloaded = transformers.SiglipModel.from_pretrained(str(tmp_path)).eval()
  pixels, ids, _ = _inputs()
  np.testing.assert_allclose(_theirs(reloaded, pixels, ids).logits_per_image.numpy(),
                             _theirs(ref, pixels, ids).logits_per_image.numpy(), rtol=0,
                             atol=1e-6)


def test_refuses_a_config_without_the_pooling_head(siglip):
  hf_config = siglip[2].config.to_hf()
  hf_config["vision_config"]["vision_use_head"] = False
  with pytest.raises(UserError, match="vision_use_head is false"):
    SiglipConfig.from_hf(hf_config)
