"""The DINOv2 ViT vision tower: CLS token, LayerScale, position embeddings interpolated to the input.

A DINOv2 checkpoint's position table covers its training resolution (518 px = 37 x 37 patches
of 14 px); at another input size the patch positions are resized bicubically, exactly as HF's
`Dinov2Embeddings.interpolate_pos_encoding` does (torch's bicubic, align_corners=False, no
antialias, in float32).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models.layers import LayerNorm, default_kernel_init, param
from lvlm_jax.models.lora import Linear
from lvlm_jax.models.vision import VisionTower, encoder_layers, patches, square_size

# Our key for an input resolution that differs from the checkpoint's position grid. An HF config
# names only the table's resolution (the input size lives in the image processor), so without it
# a LLaVA config.json would describe the tower at 518 px; transformers keeps unknown keys, so it
# survives a round trip through transformers.
INPUT_SIZE_KEY = "lvlm_jax_input_size"
# The cubic convolution coefficient torch's bicubic uses.
_CUBIC_A = -0.75


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
  """Hyperparameters of a DINOv2 ViT; `from_hf`/`to_hf` read and write an HF Dinov2Config dict.

  image_size is the input resolution; position_grid the side of the checkpoint's position table
  (HF `image_size // patch_size`).
  """
  hidden_size: int
  num_layers: int
  num_heads: int
  image_size: int
  patch_size: int
  position_grid: int
  mlp_ratio: int = 4
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  layerscale_value: float = 1.0
  dtype: str = "float32"        # compute dtype (bfloat16 on accelerators)
  param_dtype: str = "float32"  # master weights

  MODEL_TYPE: ClassVar[str] = "dinov2"

  @property
  def intermediate_size(self) -> int:
    return self.hidden_size * self.mlp_ratio

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_prefix_tokens(self) -> int:
    return 1

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "DINOv2Config":
    if hf.get("use_swiglu_ffn"):
      raise UserError("use_swiglu_ffn is true (DINOv2 ViT-g); only the MLP "
                      "DINOv2 towers (ViT-S/B/L) are supported")
    if hf.get("num_register_tokens", 0):
      raise UserError(f"num_register_tokens={hf['num_register_tokens']}: DINOv2 "
                      "register tokens are not supported")
    patch = square_size(hf.get("patch_size", 14), "patch_size")
    trained = square_size(hf.get("image_size", 518), "image_size")
    size = hf.get(INPUT_SIZE_KEY, trained)
    if size % patch:
      raise UserError(f"{INPUT_SIZE_KEY}={size} is not a multiple of patch_size {patch}")
    fields = dict(
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        image_size=size,
        patch_size=patch,
        position_grid=trained // patch,
        mlp_ratio=hf.get("mlp_ratio", 4),
        num_channels=hf.get("num_channels", 3),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "gelu"),
        qkv_bias=hf.get("qkv_bias", True),
        layerscale_value=hf.get("layerscale_value", 1.0),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    """`use_mask_token: false`: the masked-image-modelling token is not part of this tower."""
    hf = {
        "model_type": self.MODEL_TYPE,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "image_size": self.position_grid * self.patch_size,
        "patch_size": self.patch_size,
        "mlp_ratio": self.mlp_ratio,
        "num_channels": self.num_channels,
        "layer_norm_eps": self.layer_norm_eps,
        "hidden_act": self.hidden_act,
        "qkv_bias": self.qkv_bias,
        "layerscale_value": self.layerscale_value,
        "use_swiglu_ffn": False,
        "use_mask_token": False,
    }
    if self.image_size != self.position_grid * self.patch_size:
      hf[INPUT_SIZE_KEY] = self.image_size
    return hf


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float32 [n_out, n_in]: torch's 1-D bicubic resize (align_corners=False, A=-0.75, no
  antialias, edge samples repeated) as a matrix; a 2-D resize is this on each axis."""
  scale = n_in / n_out
  source = (np.arange(n_out) + 0.5) * scale - 0.5
  left = np.floor(source)
  t = source - left
  a = _CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1          # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a      # 1 < |x| < 2
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # [n_out, 4]
  taps = np.clip(left[:, None].astype(int) + np.arange(-1, 3), 0, n_in - 1)
  matrix = np.zeros((n_out, n_in), np.float64)
  np.add.at(matrix, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
  return matrix.astype(np.float32)


def interpolate_positions(table: jax.Array, grid: int) -> jax.Array:
  """table: [1, 1 + G*G, D] (CLS first) -> [1, 1 + grid*grid, D], patch positions resized in fp32."""
  side = int(round((table.shape[1] - 1) ** 0.5))
  if side == grid:
    return table
  m = jnp.asarray(bicubic_matrix(side, grid))
  patch = table[0, 1:].astype(jnp.float32).reshape(side, side, -1)
  resized = jnp.einsum("oi,ijd,pj->opd", m, patch, m).astype(table.dtype)
  return jnp.concatenate([table[:, :1], resized.reshape(1, grid * grid, -1)], axis=1)


class DINOv2Tower(VisionTower):
  """DINOv2 ViT: biased patch embedding + CLS + (interpolated) positions -> LayerScale layers
  (-> final_norm on every token)."""

  def __init__(self, config: DINOv2Config, *, rngs: nnx.Rngs):
    if config.image_size % config.patch_size:
      raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size "
                       f"{config.patch_size}")
    self.config = config
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d, p, c = config.hidden_size, config.patch_size, config.num_channels
    self.patch_embed = Linear(p * p * c, d, axes=(None, "embed"), use_bias=True, dtype=dt,
                              param_dtype=pdt, rngs=rngs)
    self.cls_token = param(rngs, default_kernel_init, (1, 1, d), (None, None, "embed"), pdt)
    self.position_embeddings = param(rngs, default_kernel_init,
                                     (1, config.position_grid ** 2 + 1, d),
                                     (None, None, "embed"), pdt)
    self.layers = encoder_layers(config, rngs, qkv_bias=config.qkv_bias,
                                 layer_scale=config.layerscale_value)
    self.final_norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=pdt, rngs=rngs)

  def embed(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float [B, H, W, C] -> embeddings [B, P + 1, D] (CLS first)."""
    x = self.patch_embed(patches(pixel_values, self.config))
    dt = x.dtype
    cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (x.shape[0], 1, x.shape[2]))
    positions = interpolate_positions(self.position_embeddings[...],
                                      self.config.image_size // self.config.patch_size)
    return jnp.concatenate([cls, x], axis=1) + positions.astype(dt)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: [B, H, W, C] -> final_norm(last hidden) [B, P + 1, D] (HF `last_hidden_state`)."""
    return self.final_norm(self.hidden_states(pixel_values)[-1])
