"""LLaVA-NeXT's AnyRes preprocessing: an image -> the base view + its tiles, as vision-tower pixels.

As transformers' LlavaNextImageProcessor: the image is resized, keeping its aspect ratio, into the
best pinpoint resolution (`models.llava_next.select_best_resolution`), centred on black padding,
and cut row by row into tiles of the tower's input size; the whole image squashed to one tile
comes first. Each view is then normalised as the tower expects (`ImageProcessing.normalize`).
"""

import dataclasses
import math

import numpy as np

from lvlm_jax.data.images import ImageProcessing, resize
from lvlm_jax.models.llava_next import LlavaNextConfig, select_best_resolution


@dataclasses.dataclass(frozen=True)
class AnyResProcessing:
  """tile: the size, normalisation and resampling of every view (its pad_to_square is unused:
  AnyRes pads to the pinpoint instead); pinpoints: (height, width) resolutions, multiples of
  tile.size."""

  tile: ImageProcessing
  pinpoints: tuple[tuple[int, int], ...]

  @classmethod
  def for_config(cls, config: LlavaNextConfig, tile: ImageProcessing) -> "AnyResProcessing":
    return cls(tile=tile, pinpoints=config.image_grid_pinpoints)

  def grid(self, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) of tiles of an image of height x width pixels."""
    h, w = select_best_resolution(height, width, self.pinpoints)
    return h // self.tile.size, w // self.tile.size

  def views(self, image: np.ndarray) -> np.ndarray:
    """`uint8 [H, W, 3]` -> `uint8 [1 + rows * cols, S, S, 3]`: the base, then the tiles."""
    height, width, _ = image.shape
    size, resample = self.tile.size, self.tile.resample
    target_h, target_w = select_best_resolution(height, width, self.pinpoints)
    # transformers' get_patch_output_size: the limiting side exactly, the other rounded up.
    if target_w / width < target_h / height:
      new_h, new_w = min(math.ceil(height * (target_w / width)), target_h), target_w
    else:
      new_h, new_w = target_h, min(math.ceil(width * (target_h / height)), target_w)
    canvas = np.zeros((target_h, target_w, 3), np.uint8)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resize(image, new_h, new_w, resample)
    tiles = canvas.reshape(target_h // size, size, target_w // size, size, 3).swapaxes(1, 2)
    base = resize(image, size, size, resample)
    return np.concatenate([base[None], tiles.reshape(-1, size, size, 3)])

  def __call__(self, image: np.ndarray, num_tiles: int | None = None
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """`uint8 [H, W, 3]` -> (`float32 [K, S, S, 3]` normalised views, zero-padded to num_tiles
    K when given; the tile grid (rows, cols))."""
    views = self.tile.normalize(self.views(image))
    if num_tiles is not None:
      if num_tiles < len(views):
        raise ValueError(f"num_tiles {num_tiles} is fewer than the image's {len(views)} views")
      views = np.concatenate([views, np.zeros((num_tiles - len(views), *views.shape[1:]),
                                              np.float32)])
    return views, self.grid(*image.shape[:2])
