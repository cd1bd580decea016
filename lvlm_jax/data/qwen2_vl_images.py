"""Qwen2-VL's image processing: each image at (about) its own resolution, as patches.

An image is resized (bicubic) to the nearest multiples of patch_size * merge_size (28) whose area
lies within [min_pixels, max_pixels] (`smart_resize`, transformers' arithmetic), normalised,
and cut into patches laid out as transformers' Qwen2VLImageProcessor lays them out: merge block
by merge block, each patch flattened as (channel, frame, row, column) with the still image
repeated over temporal_patch_size frames. Its token count follows from its size
(`Qwen2VLImageProcessing.image_tokens`). `pack_images` pads a batch's images into the
fixed-shape `Qwen2VLImages` the model takes.
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from lvlm_jax.data.images import CLIP_MEAN, CLIP_STD, BadImage, resize
from lvlm_jax.errors import UserError
from lvlm_jax.models.qwen2_vl_vision import Qwen2VLImages, Qwen2VLVisionConfig

# transformers' Qwen2VLImageProcessor defaults: 4 to 1280 merged tokens an image.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
# Beyond this aspect ratio transformers refuses an image.
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """The (height, width) transformers' `smart_resize` picks: multiples of factor, area within
  [min_pixels, max_pixels], the aspect ratio kept as far as it can be (Python's round: halves
  to even, as there). Raises BadImage ("image_aspect_ratio") past an aspect ratio of 200."""
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise BadImage("image_aspect_ratio", f"an image of {height}x{width} pixels has an aspect "
                   f"ratio over {MAX_ASPECT_RATIO}, which Qwen2-VL's processor refuses")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class Qwen2VLImageProcessing:
  """How an image becomes Qwen2-VL patches (transformers' Qwen2VLImageProcessor)."""
  min_pixels: int = MIN_PIXELS
  max_pixels: int = MAX_PIXELS
  patch_size: int = 14
  merge_size: int = 2
  temporal_patch_size: int = 2
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  resample: int = Image.BICUBIC

  def __post_init__(self):
    if not 0 < self.min_pixels <= self.max_pixels:
      raise UserError(f"min_pixels {self.min_pixels} and max_pixels {self.max_pixels} must "
                      "satisfy 0 < min_pixels <= max_pixels")

  @classmethod
  def for_config(cls, vision: Qwen2VLVisionConfig, **options) -> "Qwen2VLImageProcessing":
    """The processing a tower's patch geometry needs; options: min/max pixels, mean, std."""
    return cls(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
               temporal_patch_size=vision.temporal_patch_size, **options)

  @classmethod
  def for_model(cls, hf_dir: str | None, vision: Qwen2VLVisionConfig) -> "Qwen2VLImageProcessing":
    """The tower's processing with the pixel budget and statistics of the HF directory's
    `preprocessor_config.json` when it has one (min_pixels/max_pixels, or transformers 5's
    size.shortest_edge/longest_edge; image_mean, image_std), else transformers' defaults."""
    path = os.path.join(hf_dir, "preprocessor_config.json") if hf_dir else ""
    if not path or not os.path.exists(path):
      return cls.for_config(vision)
    try:
      with open(path) as f:
        config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{path}: cannot be read as JSON ({e})") from None
    size = config.get("size") or {}
    options = dict(min_pixels=config.get("min_pixels", size.get("shortest_edge", MIN_PIXELS)),
                   max_pixels=config.get("max_pixels", size.get("longest_edge", MAX_PIXELS)),
                   mean=tuple(config.get("image_mean", CLIP_MEAN)),
                   std=tuple(config.get("image_std", CLIP_STD)))
    for key in ("patch_size", "merge_size", "temporal_patch_size"):
      ours = getattr(cls.for_config(vision), key)
      if config.get(key, ours) != ours:
        raise UserError(f"{path}: {key} {config[key]}, but the vision tower takes {ours}")
    return cls.for_config(vision, **options)

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels,
                        self.max_pixels)

  def grid(self, height: int, width: int) -> tuple[int, int, int]:
    """The (frames, rows, cols) of patches an image of height x width pixels becomes."""
    h, w = self.resized_size(height, width)
    return 1, h // self.patch_size, w // self.patch_size

  def image_tokens(self, height: int, width: int) -> int:
    """The image tokens of an image of height x width pixels."""
    frames, rows, cols = self.grid(height, width)
    return frames * rows * cols // self.merge_size ** 2

  def __call__(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`uint8 [H, W, 3]` -> (float32 [rows * cols, 3 * T * p * p] patches, (1, rows, cols))."""
    h, w = self.resized_size(*image.shape[:2])
    x = resize(image, h, w, self.resample).astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
    rows, cols = h // p, w // p
    x = x.reshape(rows // m, m, p, cols // m, m, p, 3)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)                 # (rows/m, cols/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x.reshape(rows * cols, 3 * t * p * p)), (1, rows, cols)


def pack_images(rows: Sequence[Sequence[tuple[np.ndarray, tuple[int, int, int]]]],
                num_patches: int, num_images: int, merge_size: int = 2) -> Qwen2VLImages:
  """Each row's processed images (`Qwen2VLImageProcessing` outputs, in prompt order) -> numpy
  Qwen2VLImages: patches [B, num_patches, D] (zeros after a row's images), grids [B, num_images,
  3] (zeros for empty slots). num_patches must hold every row's patches and be a multiple of
  merge_size ** 2."""
  if num_patches % merge_size ** 2:
    raise ValueError(f"num_patches {num_patches} must be a multiple of {merge_size ** 2}")
  dims = {patches.shape[1] for row in rows for patches, _ in row}
  if len(dims) > 1:
    raise ValueError(f"images with patches of different sizes {sorted(dims)} in one batch")
  patches = np.zeros((len(rows), num_patches, dims.pop() if dims else 0), np.float32)
  grids = np.zeros((len(rows), num_images, 3), np.int32)
  for b, row in enumerate(rows):
    if len(row) > num_images:
      raise ValueError(f"row {b} has {len(row)} images, more than num_images={num_images}")
    used = sum(len(p) for p, _ in row)
    if used > num_patches:
      raise ValueError(f"row {b}'s images have {used} patches, more than num_patches="
                       f"{num_patches}")
    if row:
      patches[b, :used] = np.concatenate([p for p, _ in row])
      grids[b, :len(row)] = [g for _, g in row]
  return Qwen2VLImages(patches, grids)
