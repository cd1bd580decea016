"""LLaVA-OneVision (SigLIP + Qwen2, AnyRes with the anyres_max_9 feature cap) against transformers:
token counts, logits, export, greedy generation."""

import json

import numpy as np
import pytest
import torch
import transformers

from conftest import TINY_LLAMA, forward, save_tiny
from lvlm_jax.data.anyres import AnyResProcessing
from lvlm_jax.data.images import ImageProcessing
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.llava_next import AnyResImages, LlavaNext, LlavaOnevisionConfig

TOL = 1e-4  # of the logits' magnitude
IMAGE_TOKEN = 127
# 28 px tiles of a SigLIP with 7 px patches: 16 features a tile, 4 a side; up to 4 x 4 tiles, so
# a kept grid of up to 16 x 16 features, past the cap of 9 tiles' worth (1.1 ** 2 * 9 * 16).
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [84, 84], [112, 112]]
# (height, width): 100 x 110 fills 4 x 4 tiles, keeps 14 x 16 features (ratio 1.25 > 1.1), shrunk
# to int(14 // 1.247) x int(16 // 1.247) = 11 x 12; 20 x 45 is 1 x 2 tiles, kept whole (4 x 8).
SIZES = [(100, 110), (20, 45)]


def _images():
  rng = np.random.default_rng(4)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _image_processor():
  return transformers.LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                                      image_grid_pinpoints=PINPOINTS)


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
  torch.manual_seed(6)
  text = {**TINY_LLAMA, "max_position_embeddings": 256}
  config = transformers.LlavaOnevisionConfig(
      vision_config=transformers.SiglipVisionConfig(
          hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
          image_size=28, patch_size=7, vision_use_head=False),
      text_config=transformers.Qwen2Config(**text), image_token_index=IMAGE_TOKEN,
      image_grid_pinpoints=PINPOINTS)
  directory = save_tiny(transformers.LlavaOnevisionForConditionalGeneration(config),
                        tmp_path_factory.mktemp("onevision"))
  ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(directory).eval()
  return directory, ref, hf.load_model(directory)


def test_config_and_token_counts_match_transformers_processor(onevision):
  model = onevision[2]
  assert isinstance(model, LlavaNext) and isinstance(model.config, LlavaOnevisionConfig)
  config = model.config
  assert (config.max_feature_tiles, config.vision_feature_layer,
          config.vision_feature_select_strategy) == (9, -1, "full")
  # The processor's own count. Building one needs its video processor, which needs torchvision
  # (not installed): an instance without __init__ that has the attributes the count reads.
  processor = object.__new__(transformers.LlavaOnevisionProcessor)
  processor.image_processor, processor.num_image_tokens = _image_processor(), 16
  processor.vision_aspect_ratio = "anyres_max_9"
  counts = [processor._get_number_of_features(h, w, 28, 28) for h, w in SIZES]
  assert [config.image_tokens(h, w) for h, w in SIZES] == counts
  assert [config.feature_grid(h, w) for h, w in SIZES] == [(11, 12), (4, 8)]
  assert counts == [16 + 11 * 13, 16 + 4 * 9]


def _batch(config):
  """Row 0: the capped image, row 1: the small one, right padding. Returns our inputs and the
  transformers ones (its processor's pixels)."""
  images = _images()
  rows = [[5, 6] + [IMAGE_TOKEN] * config.image_tokens(*SIZES[0]) + [7, 8],
          [9] + [IMAGE_TOKEN] * config.image_tokens(*SIZES[1]) + [10, 11, 12]]
  ids = np.zeros((2, max(map(len, rows))), np.int32)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  ours = AnyResProcessing.for_config(config, ImageProcessing(size=28))
  assert ours.max_tiles == 17
  pixels = np.zeros((2, 1, ours.max_tiles, 28, 28, 3), np.float32)
  sizes, grids, feature_grids = (np.zeros((2, 1, 2), np.int32) for _ in range(3))
  for b, image in enumerate(images):
    pixels[b, 0], grids[b, 0] = ours(image)
    sizes[b, 0] = image.shape[:2]
    feature_grids[b, 0] = ours.feature_grid(*image.shape[:2])
  theirs = _image_processor()(images, return_tensors="pt")
  return ids, mask, AnyResImages(pixels, sizes, grids, feature_grids), theirs


def _torch_logits(ref, ids, mask, theirs):
  with torch.no_grad():
    return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               pixel_values=theirs["pixel_values"],
               image_sizes=theirs["image_sizes"]).logits.numpy()


def _assert_logits_close(ours, expected, mask):
  """Within TOL of the logits' magnitude on the real (unpadded) positions."""
  real = mask.astype(bool)
  diff = np.abs(np.asarray(ours)[real] - expected[real]).max()
  scale = np.abs(expected[real]).max()
  assert diff <= TOL * scale, (diff, scale)


def test_logits_match_transformers_with_a_capped_and_a_whole_image(onevision):
  _, ref, model = onevision
  ids, mask, images, theirs = _batch(model.config)
  expected = _torch_logits(ref, ids, mask, theirs)
  _assert_logits_close(forward(model, ids, attention_mask=mask, pixel_values=images)[0],
                       expected, mask)
  # Without feature_grids the shrunk grid is unknown inside jit: refused.
  with pytest.raises(ValueError, match="feature_grids"):
    forward(model, ids, attention_mask=mask, pixel_values=images._replace(feature_grids=None))


def test_export_reloads_in_transformers_with_equal_logits(onevision, tmp_path):
  _, ref, model = onevision
  hf.save_hf(model, str(tmp_path))
  config = json.load(open(tmp_path / "config.json"))
  assert (config["model_type"], config["vision_aspect_ratio"], config["image_grid_pinpoints"],
          config["vision_config"]["model_type"]) == ("llava_onevision", "anyres_max_9", PINPOINTS,
                                                     "siglip_vision_model")
  reloaded = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
      str(tmp_path)).eval()
  torch.testing.assert_close(reloaded.model.image_newline, ref.model.image_newline, rtol=0, atol=0)
  ids, mask, images, theirs = _batch(model.config)
  _assert_logits_close(forward(model, ids, attention_mask=mask, pixel_values=images)[0],
                       _torch_logits(reloaded, ids, mask, theirs), mask)


def test_config_keys_and_refusals(onevision):
  hf_config = onevision[2].config.to_hf()
  # transformers' OneVision defaults for the keys a hand-written config leaves out.
  bare = {k: v for k, v in hf_config.items()
          if k not in ("vision_feature_layer", "vision_feature_select_strategy",
                       "vision_aspect_ratio")}
  read = LlavaOnevisionConfig.from_hf(bare)
  assert (read.vision_feature_layer, read.vision_feature_select_strategy,
          read.max_feature_tiles) == (-1, "full", 9)
  with pytest.raises(UserError, match="vision_aspect_ratio 'anyres' is not supported"):
    LlavaOnevisionConfig.from_hf({**hf_config, "vision_aspect_ratio": "anyres"})
  assert LlavaOnevisionConfig.from_hf(
      {**hf_config, "vision_aspect_ratio": "anyres_max_4"}).feature_grid(*SIZES[0]) == (7, 8)


def test_greedy_generation_matches_transformers_generate(onevision):
  """AnyResImages with feature_grids pass through the sampling code: left-padded prompts decode
  greedily as transformers' generate, log-probs included."""
  from lvlm_jax.sampling.decode import SamplingConfig, generate
  _, ref, model = onevision
  right_ids, right_mask, images, theirs = _batch(model.config)
  lengths = right_mask.sum(1)
  width = right_ids.shape[1]
  ids, mask = np.zeros_like(right_ids), np.zeros_like(right_mask)
  for i, n in enumerate(lengths):
    ids[i, width - n:], mask[i, width - n:] = right_ids[i, :n], 1
  new = 10
  out = generate(model, ids, mask, pixel_values=images,
                 config=SamplingConfig(max_new_tokens=new, min_new_tokens=new, eos_token_ids=(2,)))
  with torch.no_grad():
    expected = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask), pixel_values=theirs["pixel_values"],
                            image_sizes=theirs["image_sizes"], do_sample=False, pad_token_id=0,
                            max_new_tokens=new, min_new_tokens=new, eos_token_id=2,
                            return_dict_in_generate=True, output_logits=True)
  tokens = expected.sequences[:, width:].numpy()
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
  logp = torch.log_softmax(torch.stack(expected.logits, 1).float(), -1).numpy()
  np.testing.assert_allclose(np.asarray(out.logprobs),
                             np.take_along_axis(logp, tokens[..., None], -1)[..., 0],
                             atol=1e-4, rtol=0)


def test_a_row_of_several_images_takes_them_untiled_as_transformers(onevision):
  """transformers' processor takes the images of a row with several as base views only (padded
  to a square in the mean colour, tile_tokens + 1 tokens each; its batch_num_images): row 0 holds
  both images so, row 1 the capped one tiled."""
  _, ref, model = onevision
  config = model.config
  big, small = _images()
  untiled = config.image_tokens(*SIZES[0], tiled=False)
  assert untiled == config.image_tokens(*SIZES[1], tiled=False) == 16 + 1
  rows = [[5] + [IMAGE_TOKEN] * untiled + [6] + [IMAGE_TOKEN] * untiled + [7, 8],
          [9] + [IMAGE_TOKEN] * config.image_tokens(*SIZES[0]) + [10]]
  ids = np.zeros((2, max(map(len, rows))), np.int32)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  ours = AnyResProcessing.for_config(config, ImageProcessing(size=28))
  pixels = np.zeros((2, 2, ours.max_tiles, 28, 28, 3), np.float32)
  sizes, grids, feature_grids = (np.zeros((2, 2, 2), np.int32) for _ in range(3))
  for (b, n, tiled), image in zip([(0, 0, False), (0, 1, False), (1, 0, True)], [big, small, big]):
    pixels[b, n], grids[b, n] = ours(image, tiled)
    sizes[b, n] = image.shape[:2]
    feature_grids[b, n] = ours.feature_grid(*image.shape[:2], tiled)
  theirs = _image_processor()([[big, small], [big]], return_tensors="pt")
  assert theirs["batch_num_images"].tolist() == [2, 1]
  np.testing.assert_allclose(pixels[0, :, 0], theirs["pixel_values"][:2, 0].numpy()
                             .transpose(0, 2, 3, 1), atol=1e-5)
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   pixel_values=theirs["pixel_values"], image_sizes=theirs["image_sizes"],
                   batch_num_images=theirs["batch_num_images"]).logits.numpy()
  images = AnyResImages(pixels, sizes, grids, feature_grids)
  _assert_logits_close(forward(model, ids, attention_mask=mask, pixel_values=images)[0],
                       expected, mask)
  with pytest.raises(ValueError, match="tiles every image"):
    AnyResProcessing(tile=ours.tile, pinpoints=ours.pinpoints, patch_size=7,
                     tile_tokens=16).image_tokens(20, 45, tiled=False)
