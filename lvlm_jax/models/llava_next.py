"""LLaVA-NeXT (LLaVA-1.6): AnyRes tiling, unpadded tile features with `image_newline` tokens.

An image of H x W pixels is resized into the best of `image_grid_pinpoints` (a grid of rows x cols
tiles of the tower's input size), padded, and cut into tiles; a copy of the whole image resized to
one tile (the base) comes first. Its image tokens are the base's features, then the tiles' patch
features as one grid of (rows * g) x (cols * g) patches (g patches a tile side) with the padding's
rows or columns cut off, row by row, each row followed by an `image_newline` token: so an image's
token count depends on its size (`LlavaNextConfig.image_tokens`), as transformers'
LlavaNextProcessor computes it.

The geometry that decides the grid (`select_best_resolution`) is transformers' float arithmetic,
run on the host; the unpadding is exact integer arithmetic (what transformers' rounding to 7
decimals computes), run inside the jitted forward from `image_sizes` and `image_grids`.
"""

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models.layers import param
from lvlm_jax.models.lvlm import LVLM, LVLMConfig

# transformers' LlavaNextConfig default (LLaVA-1.6 at 336 px tiles).
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


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


def anyres_tokens(height: int, width: int, grid: tuple[int, int], side: int,
                  tile_tokens: int) -> int:
  """The image tokens of an image of height x width pixels cut into a grid of (rows, cols) tiles
  of side x side patches: the base's tile_tokens, then each kept patch row and its newline
  (transformers' `LlavaNextProcessor._get_number_of_features`)."""
  _, _, rows, cols = unpadded_grid(np.asarray([height, width]), np.asarray(grid), side)
  return tile_tokens + int(rows) * (int(cols) + 1)


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LVLMConfig):
  """A LLaVA-NeXT model; reads and writes an HF `LlavaNextForConditionalGeneration` config.

  image_grid_pinpoints: the (height, width) resolutions AnyRes may tile an image into, each a
  multiple of the tower's image_size.
  """
  image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS

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
    raise UserError("a LLaVA-NeXT model's image token count depends on each image's size "
                    "(LlavaNextConfig.image_tokens); SFT, SC-Tune, the shapes evaluator and the "
                    "generation service count it per image, STIC's DPO data takes a fixed count "
                    "per image so far")

  @property
  def patches_per_side(self) -> int:
    return self.vision.image_size // self.vision.patch_size

  def image_grid(self, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) of tiles an image of height x width pixels is cut into."""
    h, w = select_best_resolution(height, width, self.image_grid_pinpoints)
    return h // self.vision.image_size, w // self.vision.image_size

  def image_tokens(self, height: int, width: int) -> int:
    """The image tokens of an image of height x width pixels (`anyres_tokens`)."""
    return anyres_tokens(height, width, self.image_grid(height, width), self.patches_per_side,
                         self.tokens_per_tile)

  @classmethod
  def _family_fields_from_hf(cls, hf: dict) -> dict:
    pinpoints = hf.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
    try:
      return {"image_grid_pinpoints": tuple((int(h), int(w)) for h, w in pinpoints)}
    except (TypeError, ValueError):
      raise UserError(f"image_grid_pinpoints {pinpoints!r} must be a list of [height, width] "
                      "pairs") from None

  def to_hf(self) -> dict:
    return {**super().to_hf(), "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints]}


def image_feature_index(is_image: jax.Array, image_sizes: jax.Array, image_grids: jax.Array,
                        num_tiles: int, side: int) -> jax.Array:
  """Which tile feature each image token of a row takes.

  is_image: bool [B, T]; image_sizes, image_grids: int [B, N, 2] (see AnyResImages);
  num_tiles: K, the tile slots per image; side: patches per tile side (P = side**2 features a
  tile) -> index int [B, T] into a row's features [N * K * P], N * K * P for the newline.
  The k-th image token of a row belongs to the first image whose token runs reach past k: the
  row's images take their tokens in order, padded slots (after them) none.
  """
  tokens = side * side
  top, left, rows, cols = unpadded_grid(image_sizes, image_grids, side)     # [B, N] each
  counts = tokens + rows * (cols + 1)                                        # [B, N]
  ends = jnp.cumsum(counts, axis=1)
  ordinal = jnp.cumsum(is_image, axis=1) - 1                                 # [B, T]
  slot = jnp.minimum(jnp.sum(ordinal[..., None] >= ends[:, None, :], axis=-1), ends.shape[1] - 1)
  per_slot = lambda x: jnp.take_along_axis(x, slot, axis=1)                  # [B, N] -> [B, T]
  k = ordinal - per_slot(ends - counts)
  width = per_slot(cols) + 1
  row, col = (k - tokens) // width, (k - tokens) % width
  r, c = row + per_slot(top), col + per_slot(left)
  tile = 1 + (r // side) * per_slot(image_grids[..., 1]) + c // side
  feature = jnp.where(k < tokens, k, tile * tokens + (r % side) * side + c % side)
  newline = (k >= tokens) & (col == width - 1)
  num_features = image_sizes.shape[1] * num_tiles * tokens
  index = jnp.where(newline, num_features, slot * num_tiles * tokens + feature)
  return jnp.clip(index, 0, num_features)


class AnyResImages(NamedTuple):
  """A LLaVA-NeXT batch's images, what `LlavaNext` takes where LVLM takes pixel_values (a pytree:
  it passes through jit and the sampling code unchanged).

  pixel_values: float32 [B, N, K, S, S, 3], each image's views (data.anyres.AnyResProcessing:
  the base first, then its tiles, padded to K); image_sizes: int [B, N, 2] each image's original
  (height, width); image_grids: int [B, N, 2] its tile (rows, cols) (`LlavaNextConfig.image_grid`).
  Padded image slots (after a row's images) are never read.
  """
  pixel_values: jax.Array
  image_sizes: jax.Array
  image_grids: jax.Array


def batch_images(batch: Mapping[str, jax.Array]) -> jax.Array | AnyResImages | None:
  """The batch's images as the model takes them: `pixel_values`, or with AnyRes (the batch has
  `image_sizes` and `image_grids`, data.pipeline.Collate) the three as `AnyResImages`."""
  pixels = batch.get("pixel_values")
  if pixels is None or "image_sizes" not in batch:
    return pixels
  return AnyResImages(pixels, batch["image_sizes"], batch["image_grids"])


class LlavaNext(LVLM):
  """LLaVA-NeXT: the LVLM with AnyRes tiles and the learned `image_newline` embedding. Its
  `pixel_values` are `AnyResImages`; each image's tokens are `config.image_tokens(H, W)` copies
  of the image token."""

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
    views = pixel_values.pixel_values
    b, n, k = views.shape[:3]
    features = self.embed_images(views.reshape(b, n * k, *views.shape[3:]))
    features = features.reshape(b, -1, features.shape[-1]).astype(text_embeds.dtype)
    newline = jnp.broadcast_to(self.image_newline[...].astype(text_embeds.dtype),
                               (b, 1, features.shape[-1]))
    features = jnp.concatenate([features, newline], axis=1)                  # [B, N*K*P + 1, D]
    index = image_feature_index(is_image, pixel_values.image_sizes, pixel_values.image_grids,
                                   k, self.config.patches_per_side)
    gathered = jnp.take_along_axis(features, index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, text_embeds)
