"""Qwen2-VL image processing against transformers' Qwen2VLImageProcessorPil (torchvision-free)."""

import numpy as np
import pytest
import transformers

from lvlm_jax.data.images import BadImage
from lvlm_jax.data.qwen2_vl_images import Qwen2VLImageProcessing, pack_images, smart_resize

# Sizes that round down, round up, fall under min_pixels and go over max_pixels.
SIZES = [(50, 70), (97, 41), (20, 30), (300, 180)]
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 24


def _images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def test_patches_and_grids_match_transformers_processor():
  ours = Qwen2VLImageProcessing(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  theirs = transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  images = _images()
  expected = theirs(images, return_tensors="np")
  processed = [ours(image) for image in images]
  np.testing.assert_array_equal([g for _, g in processed], expected["image_grid_thw"])
  np.testing.assert_allclose(np.concatenate([p for p, _ in processed]), expected["pixel_values"],
                             rtol=0, atol=1e-5)
  # 50 x 70 rounds to 56 x 56 (70 / 28 = 2.5 rounds to even); 20 x 30 (28 x 28) is scaled up
  # past min_pixels to 56 x 84; 300 x 180 (308 x 168) down under max_pixels: 168 x 84.
  assert [g for _, g in processed] == [(1, 4, 4), (1, 8, 4), (1, 4, 6), (1, 12, 6)]
  counts = [ours.image_tokens(h, w) for h, w in SIZES]
  assert counts == [len(p) // 4 for p, _ in processed]
  assert counts == [theirs.get_number_of_image_patches(h, w) // 4 for h, w in SIZES]


def test_smart_resize_matches_transformers_over_many_sizes():
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs
  rng = np.random.default_rng(1)
  for h, w in rng.integers(1, 3000, (300, 2)):
    if max(h, w) / min(h, w) <= 200:
      assert smart_resize(int(h), int(w)) == theirs(int(h), int(w)), (h, w)
  with pytest.raises(BadImage, match="aspect ratio over 200"):
    smart_resize(10, 2010)


def test_pack_images_pads_rows_and_slots():
  ours = Qwen2VLImageProcessing(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  first, second, third = (ours(image) for image in _images()[:3])
  packed = pack_images([[first, second], [third]], num_patches=64, num_images=2)
  assert packed.patches.shape == (2, 64, 3 * 2 * 14 * 14)
  np.testing.assert_array_equal(packed.grids, [[first[1], second[1]], [third[1], (0, 0, 0)]])
  n = len(first[0])
  np.testing.assert_array_equal(packed.patches[0, :n], first[0])
  np.testing.assert_array_equal(packed.patches[0, n:n + len(second[0])], second[0])
  assert not packed.patches[1, len(third[0]):].any()
  with pytest.raises(ValueError, match="more than num_patches=32"):
    pack_images([[first, second]], num_patches=32, num_images=2)  # 16 + 32 patches
