"""LLaVA-NeXT (AnyRes) against transformers: token counts, logits, export, refusals."""

import json

import numpy as np
import pytest
import torch
import transformers

from conftest import (ANYRES_SIZES, TINY_PINPOINTS, anyres_images, bpe_tokenizer, forward,
                      llava_next_image_processor, tiny_llava_next)
from lvlm_jax.data.anyres import AnyResProcessing
from lvlm_jax.data.images import ImageProcessing
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.llava_next import AnyResImages, LlavaNext, LlavaNextConfig

TOL = 1e-4  # of the logits' magnitude
IMAGE_TOKEN = 127


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
  directory = tiny_llava_next(tmp_path_factory.mktemp("llava_next"), IMAGE_TOKEN)
  ref = transformers.LlavaNextForConditionalGeneration.from_pretrained(directory).eval()
  return directory, ref, hf.load_lvlm(directory)


def test_image_token_counts_match_transformers_processor(llava_next):
  model = llava_next[2]
  tokenizer = bpe_tokenizer()
  processor = transformers.LlavaNextProcessor(
      image_processor=llava_next_image_processor(), tokenizer=tokenizer, patch_size=7,
      vision_feature_select_strategy="default", num_additional_image_tokens=1)
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  counts = []
  for image in anyres_images():
    ids = processor(images=[image], text=["<image> hi"], return_tensors="np")["input_ids"]
    counts.append(int((ids == image_id).sum()))
  assert [model.config.image_tokens(h, w) for h, w in ANYRES_SIZES] == counts
  # The base's 16, then each kept patch row and its newline. 20 x 70 fills 16 of the 28 rows of
  # a 28 x 56 pinpoint: of its 4 x 8 patches 2 rows stay (20 * 8 // 70 = 2, padding (4 - 2) / 2
  # a side); 70 x 20: 8 rows of 2 of 4 columns; 35 x 50 in 56 x 56: 35 * 8 // 50 = 5 of 8 rows,
  # padding (8 - 5) // 2 = 1 a side, so 6 rows stay.
  assert counts == [16 + 2 * 9, 16 + 8 * 3, 16 + 6 * 9]


def _batch(config):
  """Row 0: the wide and the tall image; row 1: the square one, a padded slot, right padding.
  Returns our inputs and the transformers ones (its processor's pixels)."""
  images = anyres_images()
  tokens = [[IMAGE_TOKEN] * config.image_tokens(h, w) for h, w in ANYRES_SIZES]
  row0 = [5, 6] + tokens[0] + [7] + tokens[1] + [8, 9]
  row1 = [10] + tokens[2] + [11, 12]
  ids = np.zeros((2, max(len(row0), len(row1))), np.int32)
  mask = np.zeros_like(ids)
  ids[0, :len(row0)], mask[0, :len(row0)] = row0, 1
  ids[1, :len(row1)], mask[1, :len(row1)] = row1, 1
  ours = AnyResProcessing.for_config(config, ImageProcessing(size=28))
  pixels = np.full((2, 2, ours.max_tiles, 28, 28, 3), 1e3, np.float32)  # padded slot: unread
  sizes, grids = np.zeros((2, 2, 2), np.int32), np.zeros((2, 2, 2), np.int32)
  for (b, n), image in zip([(0, 0), (0, 1), (1, 0)], images):
    pixels[b, n], grids[b, n] = ours(image)
    sizes[b, n] = image.shape[:2]
  theirs = llava_next_image_processor()(images, return_tensors="pt")
  return (ids, mask, pixels, sizes, grids), theirs


def _torch_logits(ref, ids, mask, theirs):
  with torch.no_grad():
    return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               pixel_values=theirs["pixel_values"],
               image_sizes=theirs["image_sizes"]).logits.numpy()


def _ours(model, ids, mask, pixels, sizes, grids):
  logits, _ = forward(model, ids, attention_mask=mask,
                      pixel_values=AnyResImages(pixels, sizes, grids))
  return np.asarray(logits)


def assert_logits_close(ours, expected, mask):
  """Within TOL of the logits' magnitude on the real (unpadded) positions."""
  real = mask.astype(bool)
  diff = np.abs(ours[real] - expected[real]).max()
  scale = np.abs(expected[real]).max()
  assert diff <= TOL * scale, (diff, scale)


def test_logits_match_transformers_with_images_of_three_sizes(llava_next):
  _, ref, model = llava_next
  assert isinstance(model, LlavaNext)
  (ids, mask, pixels, sizes, grids), theirs = _batch(model.config)
  expected = _torch_logits(ref, ids, mask, theirs)
  assert_logits_close(_ours(model, ids, mask, pixels, sizes, grids), expected, mask)


def test_export_reloads_in_transformers_with_equal_logits(llava_next, tmp_path):
  _, ref, model = llava_next
  hf.save_hf(model, str(tmp_path))
  config = json.load(open(tmp_path / "config.json"))
  assert config["model_type"] == "llava_next" and config["image_grid_pinpoints"] == TINY_PINPOINTS
  reloaded = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  torch.testing.assert_close(reloaded.model.image_newline, ref.model.image_newline, rtol=0, atol=0)
  (ids, mask, pixels, sizes, grids), theirs = _batch(model.config)
  assert_logits_close(_ours(model, ids, mask, pixels, sizes, grids),
                      _torch_logits(reloaded, ids, mask, theirs), mask)


def test_refusals(llava_next):
  config = llava_next[2].config
  # A tower whose size does not divide transformers' default pinpoints (336 px) reads its own.
  other = config.to_hf()
  other["vision_config"] = {**other["vision_config"], "image_size": 32, "patch_size": 8}
  read = LlavaNextConfig.from_hf({**other, "image_grid_pinpoints": [[32, 64], [64, 64]]})
  assert read.image_grid_pinpoints == ((32, 64), (64, 64)) and read.image_tokens(20, 70) == 34
  with pytest.raises(UserError, match="multiples of the vision tower's image_size 28"):
    LlavaNextConfig.from_hf({**config.to_hf(), "image_grid_pinpoints": [[28, 50]]})
  with pytest.raises(UserError, match="'full' keeps 17 tokens of a tile with 16 patches"):
    LlavaNextConfig.from_hf({**config.to_hf(), "vision_feature_select_strategy": "full"})
  with pytest.raises(UserError, match="depends on each image's size"):
    config.tokens_per_image


def test_greedy_generation_matches_transformers_generate(llava_next):
  """AnyResImages pass through the sampling code as pixel_values: left-padded prompts with
  images of different sizes (two in one row) decode greedily as transformers' generate."""
  from lvlm_jax.sampling.decode import SamplingConfig, generate
  _, ref, model = llava_next
  config = model.config
  images = anyres_images()
  tokens = [[IMAGE_TOKEN] * config.image_tokens(h, w) for h, w in ANYRES_SIZES]
  rows = [[5, 6] + tokens[0] + [7] + tokens[1] + [8], [10, 11, 12] + tokens[2] + [13, 14]]
  width = max(map(len, rows))
  ids, mask = np.zeros((2, width), np.int32), np.zeros((2, width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
  (_, _, pixels, sizes, grids), theirs = _batch(config)  # the same images in the same slots
  new = 12
  out = generate(model, ids, mask, pixel_values=AnyResImages(pixels, sizes, grids),
                 config=SamplingConfig(max_new_tokens=new, min_new_tokens=new, eos_token_ids=(2,)))
  with torch.no_grad():
    expected = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask), pixel_values=theirs["pixel_values"],
                            image_sizes=theirs["image_sizes"], do_sample=False, pad_token_id=0,
                            max_new_tokens=new, min_new_tokens=new, eos_token_id=2,
                            return_dict_in_generate=True, output_logits=True)
  tokens = expected.sequences[:, width:].numpy()
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
  # The log-probs too, which see every image feature (a greedy choice of a tiny random model
  # rarely does): transformers' raw logits at the chosen tokens.
  logp = torch.log_softmax(torch.stack(expected.logits, 1).float(), -1).numpy()
  np.testing.assert_allclose(np.asarray(out.logprobs),
                             np.take_along_axis(logp, tokens[..., None], -1)[..., 0],
                             atol=1e-4, rtol=0)
