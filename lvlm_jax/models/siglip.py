"""The SigLIP ViT vision tower, as LLaVA-style models use it (LLaVA-OneVision, LLaVA-Interleave).

No CLS token: the hidden states are the patches alone, so LLaVA selects them with the "full"
strategy. SigLIP's attention-pooling head (`vision_use_head`) only makes the pooled image
embedding of the image-text model, which LLaVA never reads; this tower has none.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.models.layers import LayerNorm, default_kernel_init, param
from lvlm_jax.models.lora import Linear
from lvlm_jax.models.vision import CLIPVisionConfig, VisionTower, encoder_layers, patches


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
