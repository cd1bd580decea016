"""Parity of the CLIP vision tower, text tower and dual encoder with transformers (fp32, tiny random)."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from lvlm_jax.models import hf as hf_io
from lvlm_jax.models.clip import CLIPConfig, CLIPModel
from lvlm_jax.models.vision import CLIPVisionConfig
from conftest import save_tiny

TOL = 1e-4
EOS = 97


def _hf_config(eos_token_id: int) -> transformers.CLIPConfig:
  text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
              bos_token_id=98, pad_token_id=0)
  vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                image_size=28, patch_size=14)
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def _pair(eos_token_id: int, directory):
  """A tiny random transformers CLIPModel, saved as safetensors, and ours loaded from that directory."""
  torch.manual_seed(0)
  hf = transformers.CLIPModel(_hf_config(eos_token_id))
  with torch.no_grad():  # a non-default scale, so exp(logit_scale) is really exercised
    hf.logit_scale.fill_(1.3)
  return hf, hf_io.load_clip(save_tiny(hf, directory))


@nnx.jit
def _ours_all(model: CLIPModel, pixels, ids, mask, eos_padded_ids) -> dict:
  """Every output the tests compare, from one compilation."""
  vision = model.vision
  last, pooled = vision(pixels)
  return dict(
      states=vision.hidden_states(pixels),
      features=vision.features(pixels),
      features_full=vision.features(pixels, strategy="full"),
      features_0=vision.features(pixels, layer=0),
      features_concat=vision.features(pixels, layer=(-3, -1)),
      last=last, pooled=pooled,
      image_embeds=model.image_embeds(pixels),
      text_last=model.text(ids, mask)[0],
      text_embeds=model.text_embeds(ids, mask),
      eos_padded_text_embeds=model.text_embeds(eos_padded_ids, mask),
      logits=model(pixels, ids, mask),
      score=model.score(pixels, ids[:2], mask[:2]),
  )


def _text_batch(eos_token_id: int, pad_id: int = 0):
  """Three right-padded rows of different lengths, each with one EOS before its padding."""
  rng = np.random.default_rng(1)
  lengths = [7, 4, 10]
  ids = np.full((3, 10), pad_id, np.int64)
  mask = np.zeros((3, 10), np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n - 1] = rng.integers(3, 90, size=n - 1)
    ids[row, n - 1] = eos_token_id
    mask[row, :n] = 1
  return ids, mask


def _torch_pixels(pixels):
  return torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("clip")


@pytest.fixture(scope="module")
def models(clip_dir):
  return _pair(EOS, clip_dir)


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def outputs(models, pixels):
  """(ours, transformers') outputs on one image batch and one right-padded text batch."""
  hf, ours = models
  ids, mask = _text_batch(EOS)
  eos_padded_ids, _ = _text_batch(EOS, pad_id=EOS)  # pooling must pick the first EOS
  tids, tmask, tpix = torch.from_numpy(ids), torch.from_numpy(mask), _torch_pixels(pixels)
  with torch.no_grad():
    theirs = dict(
        vision=hf.vision_model(pixel_values=tpix, output_hidden_states=True),
        image_embeds=hf.get_image_features(pixel_values=tpix).pooler_output,
        text_last=hf.text_model(input_ids=tids, attention_mask=tmask).last_hidden_state,
        text_embeds=hf.get_text_features(input_ids=tids, attention_mask=tmask).pooler_output,
        eos_padded_text_embeds=hf.get_text_features(input_ids=torch.from_numpy(eos_padded_ids),
                                                    attention_mask=tmask).pooler_output,
        logits=hf(input_ids=tids, attention_mask=tmask, pixel_values=tpix).logits_per_image,
    )
  return _ours_all(ours, pixels, ids, mask, eos_padded_ids), theirs, mask


def _close(ours, theirs):
  theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0)


def test_config_round_trip(models):
  hf, ours = models
  assert CLIPConfig.from_hf(ours.config.to_hf()) == ours.config
  reloaded = transformers.CLIPConfig(**ours.config.to_hf())
  assert reloaded.vision_config.num_hidden_layers == 2
  assert reloaded.text_config.eos_token_id == EOS
  assert reloaded.projection_dim == 16
  vision = CLIPVisionConfig.from_hf(hf.config.vision_config.to_dict())
  assert vision == ours.config.vision
  assert vision.to_hf()["model_type"] == "clip_vision_model"


def test_vision_hidden_states_and_features(models, pixels, outputs):
  ours, theirs, _ = outputs
  hidden = theirs["vision"].hidden_states
  assert len(ours["states"]) == len(hidden) == 3
  for mine, reference in zip(ours["states"], hidden):
    _close(mine, reference)
  _close(ours["features"], hidden[-2][:, 1:])
  _close(ours["features_full"], hidden[-2])
  _close(ours["features_0"], hidden[0][:, 1:])
  assert ours["features_concat"].shape == (2, 4, 64)
  _close(ours["features_concat"], torch.cat([hidden[-3], hidden[-1]], -1)[:, 1:])
  _close(ours["last"], theirs["vision"].last_hidden_state)
  _close(ours["pooled"], theirs["vision"].pooler_output)

  _, model = models
  partial = nnx.eval_shape(lambda m: m.vision.hidden_states(pixels, num_layers=1), model)
  assert len(partial) == 2


def test_load_clip_vision_matches_the_full_model(models, clip_dir):
  _, ours = models
  tower = hf_io.load_clip_vision(str(clip_dir))
  assert tower.config == ours.config.vision
  jax.tree.map(np.testing.assert_array_equal, nnx.state(tower), nnx.state(ours.vision))


def test_vision_rejects_bad_inputs(models, pixels):
  _, ours = models
  with pytest.raises(ValueError, match="out of range"):
    ours.vision.features(pixels, layer=3)
  with pytest.raises(ValueError, match="strategy"):
    ours.vision.features(pixels, strategy="cls")
  with pytest.raises(ValueError, match="NHWC"):
    ours.vision.features(pixels.transpose(0, 3, 1, 2))


def test_image_and_text_embeds_and_logits(outputs):
  ours, theirs, mask = outputs
  _close(ours["image_embeds"], theirs["image_embeds"])
  real = mask.astype(bool)  # padded positions are never read
  _close(np.asarray(ours["text_last"])[real], theirs["text_last"].numpy()[real])
  _close(ours["text_embeds"], theirs["text_embeds"])
  _close(ours["eos_padded_text_embeds"], theirs["eos_padded_text_embeds"])
  assert ours["logits"].shape == (2, 3)
  _close(ours["logits"], theirs["logits"])
  _close(ours["score"], np.diag(theirs["logits"].numpy()[:, :2]))


def test_text_pooling_legacy_eos(tmp_path):
  hf, ours = _pair(2, tmp_path)
  ids, mask = _text_batch(eos_token_id=95)  # legacy pooling: argmax(ids) finds the largest id
  with torch.no_grad():
    text = hf.get_text_features(input_ids=torch.from_numpy(ids),
                                attention_mask=torch.from_numpy(mask)).pooler_output
  _close(nnx.jit(lambda model, i, m: model.text_embeds(i, m))(ours, ids, mask), text)


def test_export_reloads_in_transformers_and_ours(models, tmp_path):
  """save_hf writes the scalar logit_scale as a scalar (shape ()), as transformers saves it."""
  hf, ours = models
  directory = str(tmp_path / "export")
  hf_io.save_hf(ours, directory)
  reloaded = transformers.CLIPModel.from_pretrained(directory)
  assert tuple(reloaded.logit_scale.shape) == ()
  np.testing.assert_allclose(reloaded.logit_scale.item(), 1.3, rtol=1e-6)
  again = hf_io.load_clip(directory)
  np.testing.assert_allclose(np.asarray(again.logit_scale[...]), 1.3, rtol=1e-6)
