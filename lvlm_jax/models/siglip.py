"""SigLIP: the ViT vision tower as LLaVA-style models use it (LLaVA-OneVision, LLaVA-Interleave),
and the image-text model (text tower, attention-pooling head, logit scale and bias).

No CLS token: the hidden states are the patches alone, so LLaVA selects them with the "full"
strategy. SigLIP's attention-pooling head (`vision_use_head`) only makes the pooled image
embedding of the image-text model (`SiglipModel`), which LLaVA never reads; the tower has none.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models.clip import unit_norm
from lvlm_jax.models.layers import (Embed, LayerNorm, default_kernel_init, dot_product_attention,
                                    param)
from lvlm_jax.models.lora import Linear
from lvlm_jax.models.vision import MLP, CLIPVisionConfig, VisionTower, encoder_layers, patches


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(CLIPVisionConfig):
  """A CLIP ViT's hyperparameters with SigLIP's defaults; reads and writes an HF SiglipVisionConfig.

  The export says `vision_use_head: false`: the tower has no head to write.
  """
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"

  MODEL_TYPE: ClassVar[str] = "siglip_vision_model"
  HF_DEFAULTS: ClassVar[dict] = dict(image_size=224, patch_size=16, num_channels=3,
                                     layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")

  @property
  def num_prefix_tokens(self) -> int:
    return 0

  def to_hf(self) -> dict:
    return {**super().to_hf(), "vision_use_head": False}


class SiglipVisionTower(VisionTower):
  """SigLIP ViT: biased patch embedding + positions -> layers (-> post_norm on every token)."""

  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d, p, c = config.hidden_size, config.patch_size, config.num_channels
    self.patch_embed = Linear(p * p * c, d, axes=(None, "embed"), use_bias=True, dtype=dt,
                              param_dtype=pdt, rngs=rngs)
    self.position_embedding = param(rngs, default_kernel_init, (config.num_patches, d),
                                    (None, "embed"), pdt)
    self.layers = encoder_layers(config, rngs)
    self.post_norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=pdt, rngs=rngs)

  def embed(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float [B, H, W, C] -> embeddings [B, P, D]."""
    x = self.patch_embed(patches(pixel_values, self.config))
    return x + self.position_embedding[...].astype(x.dtype)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: [B, H, W, C] -> post_norm(last hidden) [B, P, D] (HF `last_hidden_state`)."""
    return self.post_norm(self.hidden_states(pixel_values)[-1])


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig:
  """Hyperparameters of the SigLIP text transformer; `from_hf`/`to_hf` read and write an HF
  SiglipTextConfig dict. The token ids are kept for the export only: SigLIP pools the last
  position, whatever token is there.

  projection_size: the width of the head after pooling (transformers: hidden_size when unset).
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  projection_size: int
  max_position_embeddings: int = 64
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int | None = 49407
  dtype: str = "float32"        # compute dtype (bfloat16 on accelerators)
  param_dtype: str = "float32"  # master weights

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "SiglipTextConfig":
    hf = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072,
          "num_hidden_layers": 12, "num_attention_heads": 12, **hf}
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        projection_size=hf.get("projection_size") or hf["hidden_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 64),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "gelu_pytorch_tanh"),
        pad_token_id=hf.get("pad_token_id", 1),
        bos_token_id=hf.get("bos_token_id", 49406),
        eos_token_id=hf.get("eos_token_id", 49407),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    return {
        "model_type": "siglip_text_model",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "projection_size": self.projection_size,
        "max_position_embeddings": self.max_position_embeddings,
        "layer_norm_eps": self.layer_norm_eps,
        "hidden_act": self.hidden_act,
        "pad_token_id": self.pad_token_id,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
    }


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """A SigLIP image-text model; `from_hf`/`to_hf` read and write a full HF SiglipConfig dict."""
  text: SiglipTextConfig
  vision: SiglipVisionConfig

  @classmethod
  def from_hf(cls, hf: dict, *, dtype: str = "float32",
              param_dtype: str = "float32") -> "SiglipConfig":
    """`dtype`/`param_dtype` apply to both towers."""
    overrides = dict(dtype=dtype, param_dtype=param_dtype)
    vision = hf.get("vision_config") or {}
    if not vision.get("vision_use_head", True):
      raise UserError("vision_config.vision_use_head is false: a SigLIP image-text model pools "
                      "its images with the attention head; load the tower alone instead")
    return cls(text=SiglipTextConfig.from_hf(hf.get("text_config") or {}, **overrides),
               vision=SiglipVisionConfig.from_hf(vision, **overrides))

  def to_hf(self) -> dict:
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": self.text.to_hf(),
        "vision_config": {**self.vision.to_hf(), "vision_use_head": True},
    }


class SiglipTextTower(nnx.Module):
  """Token + absolute position embeddings -> bidirectional layers -> final_norm; the last
  position pooled through a linear head."""

  def __init__(self, config: SiglipTextConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d = config.hidden_size
    self.token_embedding = Embed(config.vocab_size, d, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.position_embedding = param(rngs, default_kernel_init, (config.max_position_embeddings, d),
                                    (None, "embed"), pdt)
    self.layers = encoder_layers(config, rngs)
    self.final_norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=pdt, rngs=rngs)
    self.head = Linear(d, config.projection_size, axes=("embed", None), use_bias=True, dtype=dt,
                       param_dtype=pdt, rngs=rngs)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """input_ids: int [B, T]; attention_mask: [B, T] (1 = real) or None -> (last hidden
    [B, T, D], pooled head(last position) [B, E]).

    SigLIP was trained on texts padded to max_length without a mask: the last position is
    pooled whatever it holds, as in HF; a mask only hides padded keys.
    """
    b, t = input_ids.shape
    if t > self.config.max_position_embeddings:
      raise ValueError(f"text length {t} exceeds max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    x = self.token_embedding(input_ids)
    x = x + self.position_embedding[:t].astype(x.dtype)
    mask = None if attention_mask is None else jnp.broadcast_to(
        (attention_mask > 0)[:, None, None, :], (b, 1, t, t))
    for layer in self.layers:
      x = layer(x, mask)
    x = self.final_norm(x)
    return x, self.head(x[:, -1])


class SiglipPoolingHead(nnx.Module):
  """SigLIP's multi-head attention pooling (MAP): a learned probe attends over the patches, then a
  pre-norm MLP residual; torch's nn.MultiheadAttention's packed q/k/v projection."""

  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d = config.hidden_size
    kw = dict(use_bias=True, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.probe = param(rngs, nnx.initializers.normal(1.0), (1, 1, d), (None, None, "embed"), pdt)
    self.in_proj = Linear(d, 3 * d, axes=("embed", "heads"), **kw)
    self.out_proj = Linear(d, d, axes=("heads", "embed"), **kw)
    self.norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=pdt, rngs=rngs)
    self.mlp = MLP(d, config.intermediate_size, hidden_act=config.hidden_act, dtype=dt,
                   param_dtype=pdt, rngs=rngs)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """hidden: [B, P, D] (the tower's post-normed last hidden state) -> pooled [B, D]."""
    b, p, d = hidden.shape
    h = self.config.num_heads
    probe = jnp.broadcast_to(self.probe[...].astype(hidden.dtype), (b, 1, d))
    q = self.in_proj(probe)[..., :d].reshape(b, 1, h, d // h)
    kv = self.in_proj(hidden)[..., d:].reshape(b, p, 2, h, d // h)
    k, v = kv[:, :, 0].swapaxes(1, 2), kv[:, :, 1].swapaxes(1, 2)            # [B, H, P, Dh]
    x = self.out_proj(dot_product_attention(q, k, v, None).reshape(b, 1, d))
    return (x + self.mlp(self.norm(x)))[:, 0]


class SiglipModel(nnx.Module):
  """The SigLIP image-text model: pooled, normalised image and text embeddings whose scaled and
  biased cosine is a pairwise sigmoid logit (CSR's image-text scorer, as CLIPModel)."""

  def __init__(self, config: SiglipConfig, *, rngs: nnx.Rngs):
    self.config = config
    pdt = jnp.dtype(config.text.param_dtype)
    self.vision = SiglipVisionTower(config.vision, rngs=rngs)
    self.vision_head = SiglipPoolingHead(config.vision, rngs=rngs)
    self.text = SiglipTextTower(config.text, rngs=rngs)
    self.logit_scale = param(rngs, nnx.initializers.zeros, (1,), (None,), pdt)
    self.logit_bias = param(rngs, nnx.initializers.zeros, (1,), (None,), pdt)

  def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float [B, H, W, C] -> pooled, unnormalised [B, D] (HF `get_image_features`)."""
    return self.vision_head(self.vision(pixel_values))

  def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids: int [B, T], attention_mask: [B, T] or None -> pooled, unnormalised [B, E]."""
    return self.text(input_ids, attention_mask)[1]

  def _scale_and_bias(self) -> tuple[jax.Array, jax.Array]:
    return (jnp.exp(self.logit_scale[...].astype(jnp.float32)[0]),
            self.logit_bias[...].astype(jnp.float32)[0])

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """-> float32 logits_per_image [B_img, B_txt] = exp(logit_scale) * cosine + logit_bias."""
    image = unit_norm(self.image_embeds(pixel_values))
    text = unit_norm(self.text_embeds(input_ids, attention_mask))
    scale, bias = self._scale_and_bias()
    return scale * image @ text.T + bias

  def score(self, pixel_values: jax.Array, input_ids: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
    """Image i against text i: float32 [B] = exp(logit_scale) * cos + logit_bias (a sigmoid
    logit: trained SigLIP puts matching pairs above 0)."""
    image = unit_norm(self.image_embeds(pixel_values))
    text = unit_norm(self.text_embeds(input_ids, attention_mask))
    scale, bias = self._scale_and_bias()
    return scale * jnp.sum(image * text, axis=-1) + bias
