"""Qwen2-VL and Qwen2.5-VL: a native-resolution vision tower (qwen2_vl_vision.py) and a Qwen2 LLM
with M-RoPE.

An image of a grid of rows x cols patches is (rows / m) * (cols / m) image tokens
(`Qwen2VLConfig.image_tokens`; m = spatial_merge_size), between `<|vision_start|>` and
`<|vision_end|>`. Text tokens turn RoPE by one position for all three M-RoPE sections; an image's
tokens by (temporal, row, column) positions, all offset by where the image starts, and the text
after an image continues from the image's largest position + 1 (transformers' `get_rope_index`).
Attention still follows the token order: the mask compares token positions, RoPE the M-RoPE ones.
After the prompt, decoding continues at token position + the row's rope offset (its rope delta),
kept in the KV cache.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models.llm import LLM, KVCache, LLMConfig, default_positions
from lvlm_jax.models.lvlm import LVLM, merge_image_features
from lvlm_jax.models.qwen2_vl_vision import (Qwen25VLVisionConfig, Qwen2VLImages,
                                             Qwen2VLVisionConfig, Qwen2VLVisionTower, slot_of)

# transformers' Qwen2VLTextConfig defaults where a checkpoint leaves them out.
DEFAULT_MROPE_SECTION = (16, 24, 24)
DEFAULT_TEXT_THETA = 1000000.0
# Keys of a flat (transformers 4) Qwen2-VL config.json that belong to the model, not its text config.
_MODEL_KEYS = ("vision_config", "text_config", "architectures", "model_type", "image_token_id",
               "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _text_from_hf(hf: dict) -> LLMConfig:
  """The Qwen2 LLM of a Qwen2-VL config: its `text_config`, or the top-level keys of a flat one."""
  text = dict(hf.get("text_config") or {k: v for k, v in hf.items() if k not in _MODEL_KEYS})
  key = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
  rope = dict(text.get(key) or {})
  section = tuple(rope.pop("mrope_section", DEFAULT_MROPE_SECTION))
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  if rope_type not in ("default", "mrope"):
    raise UserError(f"text_config.{key}.rope_type {rope_type!r} is not supported; Qwen2-VL "
                    "runs M-RoPE unscaled (default)")
  rope.setdefault("rope_theta", text.pop("rope_theta", DEFAULT_TEXT_THETA))
  text[key] = rope
  try:
    config = LLMConfig.from_hf({**text, "model_type": "qwen2"})
  except UserError as e:
    raise UserError(f"text_config.{e}") from None
  if len(section) != 3 or sum(section) != config.head_dim // 2:
    raise UserError(f"text_config.{key}.mrope_section {list(section)} must be 3 sizes adding up "
                    f"to head_dim / 2 = {config.head_dim // 2}")
  return dataclasses.replace(config, mrope_section=tuple(int(s) for s in section))


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
  """A Qwen2-VL model; `from_hf`/`to_hf` read and write an HF Qwen2VLForConditionalGeneration
  config (transformers 4's flat layout or 5's `text_config`)."""
  vision: Qwen2VLVisionConfig
  text: LLMConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  MODEL_TYPE: ClassVar[str] = "qwen2_vl"
  ARCHITECTURE: ClassVar[str] = "Qwen2VLForConditionalGeneration"
  TEXT_MODEL_TYPE: ClassVar[str] = "qwen2_vl_text"
  VISION_CONFIG: ClassVar[type] = Qwen2VLVisionConfig

  def image_tokens(self, rows: int, cols: int, frames: int = 1) -> int:
    """The image tokens of an image of rows x cols patches (transformers' processor count)."""
    m = self.vision.spatial_merge_size
    return frames * (rows // m) * (cols // m)

  @classmethod
  def from_hf(cls, hf: dict, **dtype_overrides) -> "Qwen2VLConfig":
    """dtype_overrides (dtype, param_dtype) apply to the tower and the LLM."""
    if hf.get("model_type") != cls.MODEL_TYPE:
      raise ValueError(f"expected a {cls.MODEL_TYPE} config, got model_type="
                       f"{hf.get('model_type')!r}")
    try:
      vision = cls.VISION_CONFIG.from_hf(hf.get("vision_config") or {}, **dtype_overrides)
    except UserError as e:
      raise UserError(f"vision_config.{e}") from None
    text = dataclasses.replace(_text_from_hf(hf), **dtype_overrides)
    # transformers 5 ties on the top-level flag, which a text config's True sets (pre-v5 saves).
    if hf.get("tie_word_embeddings") or (hf.get("text_config") or {}).get("tie_word_embeddings"):
      text = dataclasses.replace(text, tie_word_embeddings=True)
    if vision.hidden_size != text.hidden_size:
      raise UserError(f"vision_config.hidden_size {vision.hidden_size} must equal the text "
                      f"model's hidden_size {text.hidden_size}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name.endswith("_id")}
    return cls(vision=vision, text=text, **{k: hf.get(k, v) for k, v in defaults.items()})

  def to_hf(self) -> dict:
    text = self.text.to_hf()
    del text["architectures"]
    text["model_type"] = self.TEXT_MODEL_TYPE
    text["rope_parameters"]["mrope_section"] = list(self.text.mrope_section)
    return {
        "architectures": [self.ARCHITECTURE],
        "model_type": self.MODEL_TYPE,
        "text_config": text,
        "vision_config": self.vision.to_hf(),
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.text.tie_word_embeddings,
    }


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig(Qwen2VLConfig):
  """A Qwen2.5-VL model (Qwen2-VL's LLM and M-RoPE, `Qwen25VLVisionConfig`'s tower); reads and
  writes an HF Qwen2_5_VLForConditionalGeneration config."""
  vision: Qwen25VLVisionConfig

  MODEL_TYPE: ClassVar[str] = "qwen2_5_vl"
  ARCHITECTURE: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
  TEXT_MODEL_TYPE: ClassVar[str] = "qwen2_5_vl_text"
  VISION_CONFIG: ClassVar[type] = Qwen25VLVisionConfig


def rope_index(input_ids: jax.Array, attention_mask: jax.Array, grids: jax.Array,
               image_token_id: int, merge: int) -> tuple[jax.Array, jax.Array]:
  """M-RoPE positions, transformers' `get_rope_index` for images.

  input_ids, attention_mask: int [B, T], each image as its `image_tokens` image tokens, in the
  order of grids: int [B, N, 3] (frames, rows, cols of patches; zeros for an empty slot)
  -> (positions int32 [3, B, T] (temporal, row, column; padding 0), rope offsets int32 [B]: the
  row's largest position + 1 - its real tokens, what text positions after the prompt add).
  """
  real = attention_mask > 0
  is_image = (input_ids == image_token_id) & real
  is_text = real & ~is_image
  frames, rows, cols = grids[..., 0], grids[..., 1] // merge, grids[..., 2] // merge
  tokens = frames * rows * cols                                               # [B, N]
  ends = jnp.cumsum(tokens, axis=1)
  # Text after an image goes on from its start + max(rows, cols); padded slots advance nothing.
  spans = jnp.maximum(rows, cols)
  images_before = jnp.cumsum(is_image, axis=1) - is_image                     # [B, T]
  image = slot_of(ends, images_before)               # images wholly before (the image it is in)
  n = grids.shape[1]
  span_before = jnp.concatenate([jnp.zeros_like(spans[:, :1]), jnp.cumsum(spans, axis=1)], axis=1)
  start = (jnp.cumsum(is_text, axis=1) - is_text) + jnp.take_along_axis(span_before, image, axis=1)
  slot = jnp.minimum(image, n - 1)
  take = lambda x: jnp.take_along_axis(x, slot, axis=1)
  offset = images_before - take(ends - tokens)
  frame_size = jnp.maximum(take(rows * cols), 1)
  within = offset % frame_size
  width = jnp.maximum(take(cols), 1)
  image_positions = jnp.stack([offset // frame_size, within // width, within % width]) + start
  positions = jnp.where(is_image, image_positions, start)
  positions = jnp.where(real, positions, 0).astype(jnp.int32)
  largest = jnp.max(jnp.where(real, positions, -1), axis=(0, 2))
  offsets = largest + 1 - jnp.sum(real, axis=1)
  return positions, offsets.astype(jnp.int32)


class Qwen2VL(LVLM):
  """Qwen2-VL: `Qwen2VLImages` in, the k-th image token of a row gets the row's k-th merged
  image token. Its `pixel_values` are Qwen2VLImages."""

  def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.vision = Qwen2VLVisionTower(config.vision, rngs=rngs)
    self.llm = LLM(config.text, rngs=rngs)

  def embed_images(self, images: Qwen2VLImages) -> jax.Array:
    """-> [B, P / m**2, D]: each row's image tokens in order, then padding."""
    return self.vision(images)

  def embed(self, input_ids: jax.Array, pixel_values: Qwen2VLImages | None = None) -> jax.Array:
    """input_ids: int [B, T]; pixel_values: Qwen2VLImages or None -> embeddings [B, T, D]."""
    is_image = input_ids == self.config.image_token_id
    text_embeds = self.llm.embed(input_ids)
    if pixel_values is None:
      return text_embeds
    if not isinstance(pixel_values, Qwen2VLImages):
      raise TypeError("a Qwen2-VL model takes Qwen2VLImages (patches and grids), got "
                      f"{type(pixel_values).__name__}")
    return merge_image_features(text_embeds, self.embed_images(pixel_values), is_image)

  def rope_positions(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                     pixel_values: Qwen2VLImages | None) -> tuple[jax.Array | None, jax.Array | None]:
    """(M-RoPE positions [3, B, T], rope offsets [B]) of a prompt (`rope_index`); text alone
    turns by its token positions: (None, None)."""
    if pixel_values is None:
      return None, None
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    return rope_index(input_ids, attention_mask, pixel_values.grids, self.config.image_token_id,
                      self.config.vision.spatial_merge_size)

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               pixel_values: Qwen2VLImages | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """input_ids: int [B, T] with expanded image tokens; attention_mask: [B, T]; pixel_values:
    Qwen2VLImages or None -> (logits float32 [B, T, V], cache). A cache given here is a fresh
    one the prompt fills (its rope offsets set for decoding)."""
    positions = default_positions(input_ids, positions, attention_mask)
    rope, offsets = self.rope_positions(input_ids, attention_mask, pixel_values)
    if cache is not None and offsets is not None:
      cache = cache._replace(rope_offsets=offsets)
    hidden, cache = self.llm.hidden(self.embed(input_ids, pixel_values), positions, cache, rope)
    return self.llm.logits(hidden), cache
