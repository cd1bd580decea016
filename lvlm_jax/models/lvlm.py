"""The LLaVA-style LVLM: vision tower -> projector -> LLM, image features spliced at image tokens.

A sequence may hold any number of images. `input_ids` already holds `tokens_per_image` copies of
the image token for each image, in order; the k-th run of image tokens in a row receives the
features of that row's k-th image. Image slots beyond a row's image count (padding) are never read.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models.dinov2 import DINOv2Config, DINOv2Tower
from lvlm_jax.models.llm import LLM, KVCache, LLMConfig, default_positions
from lvlm_jax.models.projector import Projector
from lvlm_jax.models.siglip import SiglipVisionConfig, SiglipVisionTower
from lvlm_jax.models.vision import CLIPVisionConfig, CLIPVisionTower

VisionConfig = CLIPVisionConfig | SiglipVisionConfig | DINOv2Config
# The vision towers a LLaVA config's `vision_config.model_type` may name.
VISION_TOWERS = {config.MODEL_TYPE: (config, tower) for config, tower in [
    (CLIPVisionConfig, CLIPVisionTower), (SiglipVisionConfig, SiglipVisionTower),
    (DINOv2Config, DINOv2Tower)]}


@dataclasses.dataclass(frozen=True)
class LVLMConfig:
  """A LLaVA model; `from_hf`/`to_hf` read and write an HF `LlavaForConditionalGeneration` config."""
  vision: VisionConfig
  text: LLMConfig
  image_token_id: int
  projector_type: str = "mlp2x_gelu"
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True
  vision_feature_layer: int | tuple[int, ...] = -2
  # "default" drops the first token (CLIP's and DINOv2's CLS), "full" keeps every token.
  vision_feature_select_strategy: str = "default"

  MODEL_TYPE: ClassVar[str] = "llava"
  ARCHITECTURE: ClassVar[str] = "LlavaForConditionalGeneration"

  @property
  def tokens_per_tile(self) -> int:
    """The image tokens one vision-tower input yields (an image; one AnyRes tile in LLaVA-NeXT)."""
    tokens = self.vision.num_patches + self.vision.num_prefix_tokens
    return tokens - (1 if self.vision_feature_select_strategy == "default" else 0)

  @property
  def tokens_per_image(self) -> int:
    return self.tokens_per_tile

  @classmethod
  def from_hf(cls, hf: dict, **dtype_overrides) -> "LVLMConfig":
    """Raises UserError for a tower or text model we do not implement, naming its model_type."""
    if hf.get("model_type") != cls.MODEL_TYPE:
      raise ValueError(f"expected a {cls.MODEL_TYPE} config, got model_type="
                       f"{hf.get('model_type')!r}")
    # transformers' LlavaConfig defaults for a section without a model_type.
    vision_type = hf["vision_config"].get("model_type", "clip_vision_model")
    if vision_type not in VISION_TOWERS:
      raise UserError(f"vision_config.model_type {vision_type!r} is not supported; supported: "
                      f"{', '.join(VISION_TOWERS)}")
    try:
      vision = VISION_TOWERS[vision_type][0].from_hf(hf["vision_config"], **dtype_overrides)
    except UserError as e:
      raise UserError(f"vision_config.{e}") from None
    try:
      text = LLMConfig.from_hf({"model_type": "llama", **hf["text_config"]}, **dtype_overrides)
    except UserError as e:
      raise UserError(f"text_config.{e}") from None
    # transformers ties LLaVA's lm_head on the top-level flag, which the text config's True sets.
    if hf.get("tie_word_embeddings"):
      text = dataclasses.replace(text, tie_word_embeddings=True)
    layer = hf.get("vision_feature_layer", -2)
    return cls(
        vision=vision,
        text=text,
        image_token_id=hf.get("image_token_id", hf.get("image_token_index")),
        projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
        projector_bias=hf.get("multimodal_projector_bias", True),
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        **cls._family_fields_from_hf(hf),
    )

  @classmethod
  def _family_fields_from_hf(cls, hf: dict) -> dict:
    """The fields a subclass (LLaVA-NeXT) adds, read from the HF config."""
    return {}

  def to_hf(self) -> dict:
    if self.projector_type != "mlp2x_gelu":
      raise ValueError("transformers' LLaVA only has the mlp2x_gelu projector; cannot export "
                       f"projector_type={self.projector_type!r}")
    layer = self.vision_feature_layer
    return {
        "architectures": [self.ARCHITECTURE],
        "model_type": self.MODEL_TYPE,
        "vision_config": self.vision.to_hf(),
        "text_config": self.text.to_hf(),
        "image_token_id": self.image_token_id,
        "image_token_index": self.image_token_id,
        "projector_hidden_act": self.projector_hidden_act,
        "multimodal_projector_bias": self.projector_bias,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": self.vision_feature_select_strategy,
        "image_seq_length": self.tokens_per_tile,
        "tie_word_embeddings": self.text.tie_word_embeddings,
    }


def merge_image_features(text_embeds: jax.Array, image_features: jax.Array,
                         is_image: jax.Array) -> jax.Array:
  """Splices image features into the token embeddings.

  text_embeds: [B, T, D]; image_features: [B, M, D] (a row's images, concatenated in order);
  is_image: bool [B, T]. The k-th image token of a row takes feature k of that row.
  """
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)  # [B, T]
  gathered = jnp.take_along_axis(image_features, index[..., None], axis=1)  # [B, T, D]
  return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class LVLM(nnx.Module):

  def __init__(self, config: LVLMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.vision = VISION_TOWERS[config.vision.MODEL_TYPE][1](config.vision, rngs=rngs)
    feature_layers = config.vision_feature_layer
    num_feature_layers = len(feature_layers) if isinstance(feature_layers, tuple) else 1
    self.projector = Projector(
        config.vision.hidden_size * num_feature_layers, config.text.hidden_size,
        projector_type=config.projector_type, hidden_act=config.projector_hidden_act,
        use_bias=config.projector_bias, dtype=jnp.dtype(config.text.dtype),
        param_dtype=jnp.dtype(config.text.param_dtype), rngs=rngs)
    self.llm = LLM(config.text, rngs=rngs)

  def embed_images(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float32 [B, N, H, W, 3] (normalised) -> projected features [B, N, P, D]."""
    b, n = pixel_values.shape[:2]
    features = self.vision.features(pixel_values.reshape(b * n, *pixel_values.shape[2:]),
                                    layer=self.config.vision_feature_layer,
                                    strategy=self.config.vision_feature_select_strategy)
    projected = self.projector(features)
    return projected.reshape(b, n, *projected.shape[1:])

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None) -> jax.Array:
    """input_ids: int [B, T]; pixel_values: [B, N, H, W, 3] or None -> embeddings [B, T, D]."""
    is_image = input_ids == self.config.image_token_id
    # Original LLaVA checkpoints use a negative image id that has no embedding row.
    text_embeds = self.llm.embed(jnp.where(is_image, 0, input_ids))
    if pixel_values is None:
      return text_embeds
    image_features = self.embed_images(pixel_values)
    b, n, p, d = image_features.shape
    return merge_image_features(text_embeds, image_features.reshape(b, n * p, d), is_image)

  def rope_positions(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                     pixel_values) -> tuple[jax.Array | None, jax.Array | None]:
    """(RoPE positions, the cache's rope offsets) of a prompt where RoPE does not turn by the
    token positions (Qwen2-VL's M-RoPE); (None, None): it does."""
    return None, None

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None, pixel_values: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """input_ids: int [B, T] with expanded image tokens; attention_mask: [B, T];
    pixel_values: float32 [B, N, H, W, 3] or None -> (logits float32 [B, T, V], cache)."""
    positions = default_positions(input_ids, positions, attention_mask)
    hidden, cache = self.llm.hidden(self.embed(input_ids, pixel_values), positions, cache)
    return self.llm.logits(hidden), cache
