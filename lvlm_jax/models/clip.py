"""CLIP: the text tower and the dual encoder with projections, for image-text scores (CSR's scorer)."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.models.layers import Embed, LayerNorm, default_kernel_init, param
from lvlm_jax.models.lora import Linear
from lvlm_jax.models.vision import CLIPVisionConfig, CLIPVisionTower, encoder_layers

# Checkpoints converted before transformers PR #24773 say eos_token_id == 2 and pool at argmax(ids).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Hyperparameters of the CLIP text transformer; `from_hf`/`to_hf` read and write an HF CLIPTextConfig dict."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 49407
  bos_token_id: int | None = 49406
  pad_token_id: int | None = 1
  dtype: str = "float32"        # compute dtype (bfloat16 on accelerators)
  param_dtype: str = "float32"  # master weights

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "CLIPTextConfig":
    eos = hf.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
      if len(eos) != 1:
        raise ValueError(f"CLIP text pooling needs one eos_token_id, got {eos}")
      eos = eos[0]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 77),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        hidden_act=hf.get("hidden_act", "quick_gelu"),
        eos_token_id=eos,
        bos_token_id=hf.get("bos_token_id", 49406),
        pad_token_id=hf.get("pad_token_id", 1),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    return {
        "model_type": "clip_text_model",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "max_position_embeddings": self.max_position_embeddings,
        "layer_norm_eps": self.layer_norm_eps,
        "hidden_act": self.hidden_act,
        "eos_token_id": self.eos_token_id,
        "bos_token_id": self.bos_token_id,
        "pad_token_id": self.pad_token_id,
    }


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP dual encoder; `from_hf`/`to_hf` read and write a full HF CLIPConfig dict."""
  text: CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = 512
  logit_scale_init: float = 2.6592

  @classmethod
  def from_hf(cls, hf: dict, *, dtype: str = "float32", param_dtype: str = "float32") -> "CLIPConfig":
    """`dtype`/`param_dtype` apply to both towers."""
    overrides = dict(dtype=dtype, param_dtype=param_dtype)
    return cls(
        text=CLIPTextConfig.from_hf(hf.get("text_config") or {}, **overrides),
        vision=CLIPVisionConfig.from_hf(hf.get("vision_config") or {}, **overrides),
        projection_dim=hf.get("projection_dim", 512),
        logit_scale_init=hf.get("logit_scale_init_value", 2.6592),
    )

  def to_hf(self) -> dict:
    text, vision = self.text.to_hf(), self.vision.to_hf()
    text["projection_dim"] = vision["projection_dim"] = self.projection_dim
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "text_config": text,
        "vision_config": vision,
        "projection_dim": self.projection_dim,
        "logit_scale_init_value": self.logit_scale_init,
    }


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
  """attention_mask: [B, T] (1 = real token) -> bool [B, 1, T, T]: real keys at or before the query."""
  t = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return (causal[None] & (attention_mask[:, None, :] > 0))[:, None]


class CLIPTextTower(nnx.Module):
  """Token + absolute position embeddings -> causal layers -> final_norm; pooled at the EOS token."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d = config.hidden_size
    self.token_embedding = Embed(config.vocab_size, d, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.position_embedding = param(rngs, default_kernel_init, (config.max_position_embeddings, d),
                                    (None, "embed"), pdt)
    self.layers = encoder_layers(config, rngs)
    self.final_norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=pdt, rngs=rngs)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """input_ids: int [B, T]; attention_mask: [B, T] (1 = real) -> (last hidden [B, T, D], pooled [B, D]).

    Positions are 0..T-1 whatever the padding, as in HF. The pooled state is taken at the first
    `eos_token_id` of each row (at argmax(input_ids) for legacy configs with eos_token_id == 2);
    every row must contain one.
    """
    b, t = input_ids.shape
    if t > self.config.max_position_embeddings:
      raise ValueError(f"text length {t} exceeds max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    x = self.token_embedding(input_ids)
    x = x + self.position_embedding[:t].astype(x.dtype)
    mask = causal_padding_mask(attention_mask)
    for layer in self.layers:
      x = layer(x, mask)
    x = self.final_norm(x)
    if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos_index = jnp.argmax(input_ids, axis=-1)
    else:
      eos_index = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
    return x, jnp.take_along_axis(x, eos_index[:, None, None], axis=1)[:, 0]


def unit_norm(x: jax.Array) -> jax.Array:
  """[..., E] -> float32 [..., E] with unit L2 norm on the last axis."""
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nnx.Module):
  """Vision and text towers with linear projections into a shared embedding space of size E."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.vision = CLIPVisionTower(config.vision, rngs=rngs)
    self.text = CLIPTextTower(config.text, rngs=rngs)
    self.visual_projection = Linear(
        config.vision.hidden_size, config.projection_dim, axes=("embed", None), use_bias=False,
        dtype=jnp.dtype(config.vision.dtype), param_dtype=jnp.dtype(config.vision.param_dtype),
        rngs=rngs)
    self.text_projection = Linear(
        config.text.hidden_size, config.projection_dim, axes=("embed", None), use_bias=False,
        dtype=jnp.dtype(config.text.dtype), param_dtype=jnp.dtype(config.text.param_dtype),
        rngs=rngs)
    self.logit_scale = param(rngs, nnx.initializers.constant(config.logit_scale_init), (), (),
                             jnp.dtype(config.text.param_dtype))

  def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float [B, H, W, C] -> projected, unnormalised [B, E] (HF `get_image_features`)."""
    return self.visual_projection(self.vision(pixel_values)[1])

  def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids: int [B, T], attention_mask: [B, T] -> projected, unnormalised [B, E]."""
    return self.text_projection(self.text(input_ids, attention_mask)[1])

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """-> float32 logits_per_image [B_img, B_txt] = exp(logit_scale) * cosine similarity."""
    image = unit_norm(self.image_embeds(pixel_values))
    text = unit_norm(self.text_embeds(input_ids, attention_mask))
    return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * image @ text.T

  def score(self, pixel_values: jax.Array, input_ids: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
    """Image i against text i: float32 [B] = exp(logit_scale) * cos (about 100 * cos for trained CLIP)."""
    image = unit_norm(self.image_embeds(pixel_values))
    text = unit_norm(self.text_embeds(input_ids, attention_mask))
    return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * jnp.sum(image * text, axis=-1)
