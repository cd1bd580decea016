"""LLaVA-NeXT (LLaVA-1.6): AnyRes tiling, unpadded tile features with `image_newline` tokens.

An image of H x W pixels is resized into the best of `image_grid_pinpoints` (a grid of rows x cols
tiles of the tower's input size), padded, and cut into tiles; a copy of the whole image resized to
one tile (the base) comes first. Its image tokens are the base's features, then the tiles' patch
features as one grid of (rows * g) x (cols * g) patches (g patches a tile side) with the padding's
rows or columns cut off, row by row, each row followed by an `image_newline` token: so an image's
token count depends on its size (`LlavaNextConfig.image_tokens`), as transformers'
LlavaNextProcessor computes it.

LLaVA-OneVision (`LlavaOnevisionConfig`, the same model class) caps the features: a kept grid of
more than about 1.21 * N tiles' worth of patches (`anyres_max_N`) is shrunk bilinearly to
int(rows // ratio) x int(cols // ratio), ratio = sqrt(rows * cols / (N * g**2)), before the
newlines are added.

The geometry that decides the grid (`select_best_resolution`) is transformers' float arithmetic,
run on the host; the unpadding is exact integer arithmetic (what transformers' rounding to 7
decimals computes), run inside the jitted forward from `image_sizes` and `image_grids`. The
OneVision cap is float arithmetic too (it floors q - 1 for some exact quotients q), so its
shrunk grid comes from the host as `AnyResImages.feature_grids`.
"""

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models.layers import param
from lvlm_jax.models.lvlm import LVLM, LVLMConfig
from lvlm_jax.models.qwen2_vl_vision import Qwen2VLImages

# transformers' LlavaNextConfig default (LLaVA-1.6 at 336 px tiles).
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# LLaVA-OneVision's image in a row of several (transformers' batch_num_images > 1): its base view
# alone (padded to a square), then one newline: no tiles, a feature grid of one row of none.
UNTILED_GRID, UNTILED_FEATURES = (0, 0), (1, 0)


def select_best_resolution(height: int, width: int,
                           pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
  """The (height, width) pinpoint that keeps most of the image's pixels, then wastes least; in
  transformers' float arithmetic (`image_processing_utils.select_best_resolution`), first wins."""
  best, max_effective, min_wasted = None, 0, float("inf")
  for h, w in pinpoints:
    scale = min(w / width, h / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    wasted = w * h - effective
    if effective > max_effective or (effective == max_effective and wasted < min_wasted):
      best, max_effective, min_wasted = (h, w), effective, wasted
  return best


def unpadded_grid(sizes, grids, side: int):
  """The patch rows/columns an image's tiles hold that are not padding.

  sizes: int [..., 2] images' (height, width); grids: int [..., 2] their tile (rows, cols);
  side: patches per tile side -> (top, left, rows, cols), each int [...]: the kept window of the
  (rows * side) x (cols * side) patch grid. numpy arrays (on the host: data workers must not
  start an accelerator) or jax arrays (inside jit).
  """
  xp = jnp if isinstance(sizes, jax.Array) else np
  height, width = sizes[..., 0], sizes[..., 1]
  grid_h, grid_w = grids[..., 0] * side, grids[..., 1] * side
  # transformers compares the aspect ratios in floats and rounds height * (grid_w / width) to 7
  # decimals before truncating: for integer sizes that is exactly the floor division below.
  wider = width * grid_h > height * grid_w
  new_h = height * grid_w // xp.maximum(width, 1)
  new_w = width * grid_h // xp.maximum(height, 1)
  top = xp.where(wider, (grid_h - new_h) // 2, 0)
  left = xp.where(wider, 0, (grid_w - new_w) // 2)
  return top, left, grid_h - 2 * top, grid_w - 2 * left


def feature_grid(height: int, width: int, grid: tuple[int, int], side: int,
                 max_feature_tiles: int | None = None) -> tuple[int, int]:
  """The (rows, cols) of tile features an image of height x width pixels cut into a grid of
  (rows, cols) tiles of side x side patches keeps: unpadded, then (max_feature_tiles N, LLaVA-
  OneVision's anyres_max_N) shrunk in transformers' float arithmetic when more than ~1.21 N
  tiles' worth."""
  _, _, rows, cols = unpadded_grid(np.asarray([height, width]), np.asarray(grid), side)
  rows, cols = int(rows), int(cols)
  if max_feature_tiles is None:
    return rows, cols
  ratio = math.sqrt(rows * cols / (max_feature_tiles * side ** 2))
  if ratio > 1.1:
    return int(rows // ratio), int(cols // ratio)
  return rows, cols


def anyres_tokens(height: int, width: int, grid: tuple[int, int], side: int, tile_tokens: int,
                  max_feature_tiles: int | None = None) -> int:
  """The image tokens of an image of height x width pixels cut into a grid of (rows, cols) tiles
  of side x side patches: the base's tile_tokens, then each kept feature row (`feature_grid`) and
  its newline (transformers' `LlavaNextProcessor._get_number_of_features`,
  `LlavaOnevisionProcessor._get_number_of_features`)."""
  rows, cols = feature_grid(height, width, grid, side, max_feature_tiles)
  return tile_tokens + rows * (cols + 1)


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LVLMConfig):
  """A LLaVA-NeXT model; reads and writes an HF `LlavaNextForConditionalGeneration` config.

  image_grid_pinpoints: the (height, width) resolutions AnyRes may tile an image into, each a
  multiple of the tower's image_size. max_feature_tiles: None (LLaVA-NeXT keeps every unpadded
  feature); LLaVA-OneVision's anyres_max_N.
  """
  image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
  max_feature_tiles: int | None = None

  MODEL_TYPE: ClassVar[str] = "llava_next"
  ARCHITECTURE: ClassVar[str] = "LlavaNextForConditionalGeneration"

  def __post_init__(self):
    size = self.vision.image_size
    if not self.image_grid_pinpoints or any(
        len(p) != 2 or p[0] % size or p[1] % size or min(p) <= 0
        for p in self.image_grid_pinpoints):
      raise UserError(f"image_grid_pinpoints {list(map(list, self.image_grid_pinpoints))} must be "
                      f"(height, width) pairs, positive multiples of the vision tower's image_size "
                      f"{size}")
    if self.tokens_per_tile != self.vision.num_patches:
      raise UserError(
          f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} keeps "
          f"{self.tokens_per_tile} tokens of a tile with {self.vision.num_patches} patches; "
          "LLaVA-NeXT lays the patches out as a grid: use 'default' with a tower that has a "
          "class token (CLIP, DINOv2), 'full' with SigLIP")

  @property
  def tokens_per_image(self) -> int:
    raise UserError(f"a {self.MODEL_TYPE} model's image token count depends on each image's size "
                    "(LlavaNextConfig.image_tokens); SFT, SC-Tune, the shapes evaluator and the "
                    "generation service count it per image, STIC's DPO data takes a fixed count "
                    "per image so far")

  @property
  def patches_per_side(self) -> int:
    return self.vision.image_size // self.vision.patch_size

  def _check_tiled(self, tiled: bool) -> None:
    if not tiled and self.max_feature_tiles is None:
      raise ValueError("LLaVA-NeXT tiles every image; only LLaVA-OneVision takes untiled ones")

  def image_grid(self, height: int, width: int, tiled: bool = True) -> tuple[int, int]:
    """The (rows, cols) of tiles an image of height x width pixels is cut into; tiled=False:
    LLaVA-OneVision's image in a row of several (UNTILED_GRID)."""
    self._check_tiled(tiled)
    if not tiled:
      return UNTILED_GRID
    h, w = select_best_resolution(height, width, self.image_grid_pinpoints)
    return h // self.vision.image_size, w // self.vision.image_size

  def feature_grid(self, height: int, width: int, tiled: bool = True) -> tuple[int, int]:
    """The (rows, cols) of tile features an image of height x width pixels keeps (`feature_grid`;
    UNTILED_FEATURES when not tiled)."""
    self._check_tiled(tiled)
    if not tiled:
      return UNTILED_FEATURES
    return feature_grid(height, width, self.image_grid(height, width), self.patches_per_side,
                        self.max_feature_tiles)

  def image_tokens(self, height: int, width: int, tiled: bool = True) -> int:
    """The image tokens of an image of height x width pixels (`anyres_tokens`; the base and a
    newline when not tiled)."""
    self._check_tiled(tiled)
    if not tiled:
      return self.tokens_per_tile + 1
    return anyres_tokens(height, width, self.image_grid(height, width), self.patches_per_side,
                         self.tokens_per_tile, self.max_feature_tiles)

  @classmethod
  def _family_fields_from_hf(cls, hf: dict) -> dict:
    pinpoints = hf.get("image_grid_pinpoints")
    if not pinpoints:  # transformers' default, the field's
      return {}
    try:
      return {"image_grid_pinpoints": tuple((int(h), int(w)) for h, w in pinpoints)}
    except (TypeError, ValueError):
      raise UserError(f"image_grid_pinpoints {pinpoints!r} must be a list of [height, width] "
                      "pairs") from None

  def to_hf(self) -> dict:
    return {**super().to_hf(), "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints]}


def _source_rows(out: jax.Array, size: jax.Array, out_size: jax.Array):
  """Rows `out` of a grid shrunk from size to out_size rows (int [B, T] each) -> the two source
  rows and their weights, as torch's bilinear interpolation (align_corners=False) takes them
  (row `out` itself, weight 1, when nothing shrinks)."""
  scale = size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
  source = jnp.maximum(scale * (out.astype(jnp.float32) + 0.5) - 0.5, 0.0)
  low = jnp.floor(source).astype(out.dtype)
  frac = jnp.clip(source - low, 0.0, 1.0)
  high = jnp.minimum(low + 1, jnp.maximum(size - 1, 0))
  return (low, 1.0 - frac), (high, frac)


def image_feature_index(is_image: jax.Array, image_sizes: jax.Array, image_grids: jax.Array,
                        num_tiles: int, side: int,
                        feature_grids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Which tile features each image token of a row blends.

  is_image: bool [B, T]; image_sizes, image_grids, feature_grids: int [B, N, 2] (see
  AnyResImages); num_tiles: K, the tile slots per image; side: patches per tile side (P = side**2
  features a tile) -> (index int [B, T, C] into a row's features [N * K * P], N * K * P for the
  newline; weight float32 [B, T, C]): C = 1 without feature_grids, else the 4 bilinear corners.
  The k-th image token of a row belongs to the first image whose token runs reach past k: the
  row's images take their tokens in order, padded slots (after them) none.
  """
  tokens = side * side
  top, left, rows, cols = unpadded_grid(image_sizes, image_grids, side)     # [B, N] each
  out_rows, out_cols = (rows, cols) if feature_grids is None else (feature_grids[..., 0],
                                                                   feature_grids[..., 1])
  counts = tokens + out_rows * (out_cols + 1)                                # [B, N]
  ends = jnp.cumsum(counts, axis=1)
  ordinal = jnp.cumsum(is_image, axis=1) - 1                                 # [B, T]
  slot = jnp.minimum(jnp.sum(ordinal[..., None] >= ends[:, None, :], axis=-1), ends.shape[1] - 1)
  per_slot = lambda x: jnp.take_along_axis(x, slot, axis=1)                  # [B, N] -> [B, T]
  k = ordinal - per_slot(ends - counts)
  width = per_slot(out_cols) + 1
  row, col = (k - tokens) // width, (k - tokens) % width
  if feature_grids is None:
    corners = [((row, 1.0), (col, 1.0))]
  else:
    ys = _source_rows(row, per_slot(rows), per_slot(out_rows))
    xs = _source_rows(col, per_slot(cols), per_slot(out_cols))
    corners = [(y, x) for y in ys for x in xs]
  newline = (k >= tokens) & (col == width - 1)
  num_features = image_sizes.shape[1] * num_tiles * tokens
  indices, weights = [], []
  for (r, wr), (c, wc) in corners:
    r, c = r + per_slot(top), c + per_slot(left)
    tile = 1 + (r // side) * per_slot(image_grids[..., 1]) + c // side
    feature = jnp.where(k < tokens, k, tile * tokens + (r % side) * side + c % side)
    index = jnp.where(newline, num_features, slot * num_tiles * tokens + feature)
    indices.append(jnp.clip(index, 0, num_features))
    # The base's features and the newline are taken whole, from the first corner.
    whole, first = (k < tokens) | newline, not weights
    weights.append(jnp.where(whole, 1.0 if first else 0.0,
                             jnp.broadcast_to(jnp.asarray(wr * wc, jnp.float32), k.shape)))
  return jnp.stack(indices, -1), jnp.stack(weights, -1)


class AnyResImages(NamedTuple):
  """A LLaVA-NeXT batch's images, what `LlavaNext` takes where LVLM takes pixel_values (a pytree:
  it passes through jit and the sampling code unchanged).

  pixel_values: float32 [B, N, K, S, S, 3], each image's views (data.anyres.AnyResProcessing:
  the base first, then its tiles, padded to K); image_sizes: int [B, N, 2] each image's original
  (height, width); image_grids: int [B, N, 2] its tile (rows, cols) (`LlavaNextConfig.image_grid`);
  feature_grids: int [B, N, 2] the (rows, cols) of tile features it keeps
  (`LlavaNextConfig.feature_grid`; UNTILED_FEATURES for an untiled image, whose grid is
  UNTILED_GRID), which LLaVA-OneVision needs and LLaVA-NeXT computes itself (None). Padded image
  slots (after a row's images) are never read.
  """
  pixel_values: jax.Array
  image_sizes: jax.Array
  image_grids: jax.Array
  feature_grids: jax.Array | None = None


# The batch keys `batch_images` reads: what a step that regroups a batch's rows carries along.
IMAGE_KEYS = ("pixel_values", "pixel_mean", "pixel_std", "image_sizes", "image_grids",
              "feature_grids", "patch_grids")


def normalized_pixels(pixels: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 [B, ..., H, W, 3] -> float32 (x / 255 - mean) / std, with mean and std float32 [B, 3]
  (per row, so they shard with the batch): `ImageProcessing.normalize` on the device, where the
  batch travels as a quarter of its float32 bytes."""
  shape = (mean.shape[0],) + (1,) * (pixels.ndim - 2) + (3,)
  x = pixels.astype(jnp.float32) * jnp.float32(1 / 255)
  return (x - mean.reshape(shape)) / std.reshape(shape)


def batch_images(batch: Mapping[str, jax.Array]
                 ) -> jax.Array | AnyResImages | Qwen2VLImages | None:
  """The batch's images as the model takes them: `pixel_values`, or with AnyRes (the batch has
  `image_sizes` and `image_grids`, data.pipeline.Collate; LLaVA-OneVision's also
  `feature_grids`) those as `AnyResImages`, or Qwen2-VL's patches with their `patch_grids`
  (data.qwen2_vl_images.pack_images) as `Qwen2VLImages`. uint8 pixels (the data pipeline's) are
  normalised here, on the device, with the batch's `pixel_mean` and `pixel_std`."""
  pixels = batch.get("pixel_values")
  if pixels is not None and "patch_grids" in batch:
    return Qwen2VLImages(pixels, batch["patch_grids"])
  if pixels is not None and pixels.dtype == jnp.uint8:
    pixels = normalized_pixels(pixels, batch["pixel_mean"], batch["pixel_std"])
  if pixels is None or "image_sizes" not in batch:
    return pixels
  return AnyResImages(pixels, batch["image_sizes"], batch["image_grids"],
                      batch.get("feature_grids"))


class LlavaNext(LVLM):
  """LLaVA-NeXT and LLaVA-OneVision: the LVLM with AnyRes tiles and the learned `image_newline`
  embedding. Its `pixel_values` are `AnyResImages`; each image's tokens are
  `config.image_tokens(H, W)` copies of the image token."""

  def __init__(self, config: LlavaNextConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    d = config.text.hidden_size
    self.image_newline = param(rngs, nnx.initializers.normal(d ** -0.5), (d,), ("embed",),
                               jnp.dtype(config.text.param_dtype))

  def embed(self, input_ids: jax.Array, pixel_values: AnyResImages | None = None) -> jax.Array:
    """input_ids: int [B, T]; pixel_values: AnyResImages or None -> embeddings [B, T, D]."""
    is_image = input_ids == self.config.image_token_id
    text_embeds = self.llm.embed(jnp.where(is_image, 0, input_ids))
    if pixel_values is None:
      return text_embeds
    if not isinstance(pixel_values, AnyResImages):
      raise TypeError("a LLaVA-NeXT model takes AnyResImages (views, image sizes and grids), "
                      f"got {type(pixel_values).__name__}")
    if self.config.max_feature_tiles is not None and pixel_values.feature_grids is None:
      raise ValueError("a LLaVA-OneVision model takes AnyResImages with feature_grids "
                       "(LlavaNextConfig.feature_grid of each image)")
    feature_grids = None if self.config.max_feature_tiles is None else pixel_values.feature_grids
    views = pixel_values.pixel_values
    b, n, k = views.shape[:3]
    features = self.embed_images(views.reshape(b, n * k, *views.shape[3:]))
    features = features.reshape(b, -1, features.shape[-1]).astype(text_embeds.dtype)
    newline = jnp.broadcast_to(self.image_newline[...].astype(text_embeds.dtype),
                               (b, 1, features.shape[-1]))
    features = jnp.concatenate([features, newline], axis=1)                  # [B, N*K*P + 1, D]
    index, weight = image_feature_index(is_image, pixel_values.image_sizes,
                                        pixel_values.image_grids, k, self.config.patches_per_side,
                                        feature_grids)
    c = index.shape[-1]
    gathered = jnp.take_along_axis(features, index.reshape(b, -1, 1), axis=1)  # [B, T * C, D]
    gathered = gathered.reshape(*index.shape, -1)
    if c == 1:  # LLaVA-NeXT: a copy
      blended = gathered[:, :, 0]
    else:
      # Elementwise, not a dot: accelerators' default matmul precision would round the weights.
      blended = jnp.sum(weight[..., None].astype(gathered.dtype) * gathered, axis=2)
    return jnp.where(is_image[..., None], blended, text_embeds)


# transformers' LlavaOnevisionConfig default: 384 px tiles, 1 to 6 of them a side.
ONEVISION_PINPOINTS = tuple((384 * rows, 384 * cols) for rows in range(1, 7)
                            for cols in range(1, 7))


@dataclasses.dataclass(frozen=True)
class LlavaOnevisionConfig(LlavaNextConfig):
  """A LLaVA-OneVision model (SigLIP + Qwen2 in the released ones); reads and writes an HF
  `LlavaOnevisionForConditionalGeneration` config: LLaVA-NeXT's AnyRes with the feature cap of
  `vision_aspect_ratio` anyres_max_N.

  transformers' processor takes the images of a row with several as base views only, padded to
  a square (its `batch_num_images`): here those are the untiled images (`image_tokens(...,
  tiled=False)`, `AnyResProcessing.views(..., tiled=False)`). Videos are not read.
  """
  image_grid_pinpoints: tuple[tuple[int, int], ...] = ONEVISION_PINPOINTS
  max_feature_tiles: int | None = 9

  MODEL_TYPE: ClassVar[str] = "llava_onevision"
  ARCHITECTURE: ClassVar[str] = "LlavaOnevisionForConditionalGeneration"

  @classmethod
  def from_hf(cls, hf: dict, **dtype_overrides) -> "LlavaOnevisionConfig":
    # transformers' LlavaOnevisionConfig defaults, which differ from LLaVA's.
    defaults = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full",
                "image_token_index": 151646}
    return super().from_hf({**defaults, **hf}, **dtype_overrides)

  @classmethod
  def _family_fields_from_hf(cls, hf: dict) -> dict:
    aspect = hf.get("vision_aspect_ratio", "anyres_max_9")
    match = re.fullmatch(r"anyres_max_([1-9]\d*)", str(aspect))
    if match is None:
      raise UserError(f"vision_aspect_ratio {aspect!r} is not supported; LLaVA-OneVision takes "
                      "anyres_max_N (transformers' only kind)")
    return {**super()._family_fields_from_hf(hf), "max_feature_tiles": int(match.group(1))}

  def to_hf(self) -> dict:
    return {**super().to_hf(), "vision_aspect_ratio": f"anyres_max_{self.max_feature_tiles}"}
