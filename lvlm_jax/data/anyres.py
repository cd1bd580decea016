"""LLaVA-NeXT's (and LLaVA-OneVision's) AnyRes preprocessing: an image -> the base view + its
tiles, as vision-tower pixels.

As transformers' LlavaNextImageProcessor: the image is resized, keeping its aspect ratio, into the
best pinpoint resolution (`models.llava_next.select_best_resolution`), centred on black padding,
and cut row by row into tiles of the tower's input size; the whole image squashed to one tile
comes first. Each view is then normalised as the tower expects (`ImageProcessing.normalize`).
"""

import dataclasses
import math

import numpy as np

from lvlm_jax.data.images import ImageProcessing, resize
from lvlm_jax.models.llava_next import (UNTILED_FEATURES, UNTILED_GRID, LlavaNextConfig,
                                       anyres_tokens, feature_grid, select_best_resolution)


@dataclasses.dataclass(frozen=True)
class AnyResProcessing:
  """How an image becomes a LLaVA-NeXT (or -OneVision) model's views and how many image tokens
  it takes.

  tile: the size, normalisation and resampling of every view (its pad_to_square is unused:
  AnyRes pads to the pinpoint, an untiled OneVision view always to a square); pinpoints:
  (height, width) resolutions, multiples of tile.size; patch_size: the vision tower's;
  tile_tokens: the image tokens of one view (`LVLMConfig.tokens_per_tile`); max_feature_tiles: LLaVA-OneVision's feature cap (None for
  LLaVA-NeXT). `for_config` fills them from the model's config.
  """

  tile: ImageProcessing
  pinpoints: tuple[tuple[int, int], ...]
  patch_size: int
  tile_tokens: int
  max_feature_tiles: int | None = None

  @classmethod
  def for_config(cls, config: LlavaNextConfig, tile: ImageProcessing) -> "AnyResProcessing":
    if tile.size != config.vision.image_size:
      raise ValueError(f"tile size {tile.size} differs from the vision tower's "
                       f"{config.vision.image_size}")
    return cls(tile=tile, pinpoints=config.image_grid_pinpoints,
               patch_size=config.vision.patch_size, tile_tokens=config.tokens_per_tile,
               max_feature_tiles=config.max_feature_tiles)

  @property
  def max_tiles(self) -> int:
    """Views of the largest image: the base + the most tiles of any pinpoint."""
    return 1 + max(h // self.tile.size * (w // self.tile.size) for h, w in self.pinpoints)

  def tiles_row(self, num_images: int) -> bool:
    """Whether a row (one prompt or record) of num_images images tiles them: LLaVA-NeXT always,
    LLaVA-OneVision only a lone image, as transformers' processor (its batch_num_images)."""
    return self.max_feature_tiles is None or num_images == 1

  def _check_tiled(self, tiled: bool) -> None:
    if not tiled and self.max_feature_tiles is None:
      raise ValueError("LLaVA-NeXT tiles every image; only LLaVA-OneVision takes untiled ones")

  def grid(self, height: int, width: int, tiled: bool = True) -> tuple[int, int]:
    """The (rows, cols) of tiles of an image of height x width pixels
    (`LlavaNextConfig.image_grid`); tiled=False: LLaVA-OneVision's image in a row of several."""
    self._check_tiled(tiled)
    if not tiled:
      return UNTILED_GRID
    h, w = select_best_resolution(height, width, self.pinpoints)
    return h // self.tile.size, w // self.tile.size

  def feature_grid(self, height: int, width: int, tiled: bool = True) -> tuple[int, int]:
    """The (rows, cols) of tile features an image of height x width pixels keeps
    (`LlavaNextConfig.feature_grid`, `AnyResImages.feature_grids`)."""
    self._check_tiled(tiled)
    if not tiled:
      return UNTILED_FEATURES
    return feature_grid(height, width, self.grid(height, width), self.tile.size // self.patch_size,
                        self.max_feature_tiles)

  def image_tokens(self, height: int, width: int, tiled: bool = True) -> int:
    """The image tokens of an image of height x width pixels (`LlavaNextConfig.image_tokens`)."""
    self._check_tiled(tiled)
    if not tiled:
      return self.tile_tokens + 1
    return anyres_tokens(height, width, self.grid(height, width),
                         self.tile.size // self.patch_size, self.tile_tokens,
                         self.max_feature_tiles)

  def views(self, image: np.ndarray, num_tiles: int | None = None,
            tiled: bool = True) -> np.ndarray:
    """`uint8 [H, W, 3]` -> `uint8 [K, S, S, 3]`: the base, then the tiles row by row, then
    zero views up to num_tiles (K = 1 + rows * cols when None). tiled=False (LLaVA-OneVision's
    image in a row of several): the base alone, padded to a square in the mean colour first, as
    transformers' LlavaOnevisionImageProcessor."""
    height, width, _ = image.shape
    size, resample = self.tile.size, self.tile.resample
    self._check_tiled(tiled)
    if not tiled:
      base = dataclasses.replace(self.tile, pad_to_square=True).resize(image)[None]
      return np.concatenate([base, np.zeros(((num_tiles or 1) - 1, size, size, 3), np.uint8)])
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
    views = [resize(image, size, size, resample)[None], tiles.reshape(-1, size, size, 3)]
    if num_tiles is not None:
      if num_tiles < 1 + len(views[1]):
        raise ValueError(f"num_tiles {num_tiles} is fewer than the image's {1 + len(views[1])} "
                         "views")
      views.append(np.zeros((num_tiles - 1 - len(views[1]), size, size, 3), np.uint8))
    return np.concatenate(views)

  def __call__(self, image: np.ndarray,
               tiled: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """`uint8 [H, W, 3]` -> (`float32 [max_tiles, S, S, 3]` normalised views, the tile grid)."""
    return (self.tile.normalize(self.views(image, self.max_tiles, tiled)),
            self.grid(*image.shape[:2], tiled))
