"""ViT vision towers: the shared encoder layer, HF `hidden_states` semantics and LLaVA's
feature-layer selection (`VisionTower`), and the CLIP ViT.

`EncoderLayer` (pre-norm attention + MLP, optional LayerScale) serves the CLIP text tower in
`clip.py`, the SigLIP tower in `siglip.py` and the DINOv2 tower in `dinov2.py`.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.models.layers import (LayerNorm, activation, default_kernel_init,
                                    dot_product_attention, param)
from lvlm_jax.models.lora import Linear

FEATURE_STRATEGIES = ("default", "full")


def square_size(size, key: str) -> int:
  """HF allows `image_size`/`patch_size` as an int or a pair; we support square ones."""
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise ValueError(f"only square {key} is supported, got {size}")
    return int(size[0])
  return int(size)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Hyperparameters of a CLIP ViT; `from_hf`/`to_hf` read and write an HF CLIPVisionConfig dict."""
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  image_size: int
  patch_size: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  dtype: str = "float32"        # compute dtype (bfloat16 on accelerators)
  param_dtype: str = "float32"  # master weights

  MODEL_TYPE: ClassVar[str] = "clip_vision_model"
  # transformers' defaults for keys an HF config leaves out.
  HF_DEFAULTS: ClassVar[dict] = dict(image_size=224, patch_size=32, num_channels=3,
                                     layer_norm_eps=1e-5, hidden_act="quick_gelu")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patches in every hidden state: the CLS token."""
    return 1

  @classmethod
  def from_hf(cls, hf: dict, **overrides):
    hf = {**cls.HF_DEFAULTS, **hf}
    fields = dict(
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        image_size=square_size(hf["image_size"], "image_size"),
        patch_size=square_size(hf["patch_size"], "patch_size"),
        num_channels=hf["num_channels"],
        layer_norm_eps=hf["layer_norm_eps"],
        hidden_act=hf["hidden_act"],
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    return {
        "model_type": self.MODEL_TYPE,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "image_size": self.image_size,
        "patch_size": self.patch_size,
        "num_channels": self.num_channels,
        "layer_norm_eps": self.layer_norm_eps,
        "hidden_act": self.hidden_act,
    }


class SelfAttention(nnx.Module):
  """Multi-head self-attention; the out projection is biased, q/k/v are unless qkv_bias=False."""

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, dtype, param_dtype,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"hidden size {dim} is not a multiple of num_heads {num_heads}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(dim, dim, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
    self.k_proj = Linear(dim, dim, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
    self.v_proj = Linear(dim, dim, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
    self.out_proj = Linear(dim, dim, axes=("heads", "embed"), use_bias=True, **kw)
    self.num_heads = num_heads

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x: [B, T, D], mask: bool [B, 1, T, T] or None -> [B, T, D]."""
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    heads_first = lambda y: split(y).swapaxes(1, 2)  # keys and values: [B, H, T, Dh]
    out = dot_product_attention(split(self.q_proj(x)), heads_first(self.k_proj(x)),
                                heads_first(self.v_proj(x)), mask)
    return self.out_proj(out.reshape(b, t, d))


class MLP(nnx.Module):
  """fc2(act(fc1(x)))."""

  def __init__(self, dim: int, hidden: int, *, hidden_act: str, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.fc2 = Linear(hidden, dim, axes=("mlp", "embed"), **kw)
    self.act = activation(hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  With `layer_scale` (DINOv2's LayerScale, its initial value) each branch is scaled per channel
  by its own learned vector before the residual add.
  """

  def __init__(self, dim: int, intermediate_size: int, num_heads: int, *, eps: float,
               hidden_act: str, qkv_bias: bool = True, layer_scale: float | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm1 = LayerNorm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = MLP(dim, intermediate_size, hidden_act=hidden_act, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)
    if layer_scale is None:
      self.layer_scale1 = self.layer_scale2 = None
    else:
      init = nnx.initializers.constant(layer_scale)
      self.layer_scale1 = param(rngs, init, (dim,), ("embed",), param_dtype)
      self.layer_scale2 = param(rngs, init, (dim,), ("embed",), param_dtype)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: [B, T, D], mask: bool [B, 1, T, T] or None (attend everywhere) -> [B, T, D]."""
    x = x + self._scaled(self.attn(self.norm1(x), mask), self.layer_scale1)
    return x + self._scaled(self.mlp(self.norm2(x)), self.layer_scale2)

  @staticmethod
  def _scaled(y: jax.Array, scale: nnx.Param | None) -> jax.Array:
    return y if scale is None else y * scale[...].astype(y.dtype)


def encoder_layers(config, rngs: nnx.Rngs, **layer_options) -> nnx.List:
  """The `config.num_layers` EncoderLayers of a tower (any config with the CLIP field names);
  layer_options: EncoderLayer's `qkv_bias`, `layer_scale`."""
  dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  return nnx.List([
      EncoderLayer(config.hidden_size, config.intermediate_size, config.num_heads,
                   eps=config.layer_norm_eps, hidden_act=config.hidden_act, dtype=dt,
                   param_dtype=pdt, rngs=rngs, **layer_options)
      for _ in range(config.num_layers)])


def patches(pixel_values: jax.Array, config) -> jax.Array:
  """pixel_values: float [B, H, W, C] (H = W = config.image_size) -> [B, P, p*p*C], each patch
  flattened as (kh, kw, c), the layout of our patch-embedding kernels."""
  b, h, w, c = pixel_values.shape
  if (h, w, c) != (config.image_size, config.image_size, config.num_channels):
    raise ValueError(f"images must be [B, {config.image_size}, {config.image_size}, "
                     f"{config.num_channels}] (NHWC), got {pixel_values.shape}")
  p = config.patch_size
  x = pixel_values.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class VisionTower(nnx.Module):
  """What every ViT tower shares: HF `hidden_states` over `embed` + `layers`, and LLaVA's features.

  A subclass sets `config` and `layers` (an nnx.List of EncoderLayers) and defines
  `embed(pixel_values [B, H, W, C]) -> [B, T, D]`, the input of the first layer.
  """

  def hidden_states(self, pixel_values: jax.Array, num_layers: int | None = None) -> list[jax.Array]:
    """pixel_values: [B, H, W, C] -> num_layers + 1 arrays [B, T, D].

    As HF `hidden_states`: element 0 is the embeddings (pre-normed for CLIP), element i the output
    of layer i. Only the first `num_layers` layers run (all by default).
    """
    n = len(self.layers) if num_layers is None else num_layers
    if not 0 <= n <= len(self.layers):
      raise ValueError(f"num_layers must be in [0, {len(self.layers)}], got {n}")
    states = [self.embed(pixel_values)]
    for layer in self.layers[:n]:
      states.append(layer(states[-1]))
    return states

  def features(self, pixel_values: jax.Array, layer: int | tuple[int, ...] = -2,
               strategy: str = "default") -> jax.Array:
    """pixel_values: [B, H, W, C] -> LLaVA image features [B, T - 1, D] ([B, T, D] for "full").

    `layer` indexes the hidden_states list (negative counts from the end, so -2 is the penultimate
    layer); a tuple concatenates those layers on the feature axis. "default" drops the first
    token, as transformers' LLaVA does whatever the tower: the CLS token of CLIP and DINOv2, but
    SigLIP's first patch (SigLIP LLaVAs use "full").
    """
    if strategy not in FEATURE_STRATEGIES:
      raise ValueError(f"unknown feature strategy {strategy!r}; known: {FEATURE_STRATEGIES}")
    total = len(self.layers) + 1
    layers = (layer,) if isinstance(layer, int) else tuple(layer)
    if not layers or any(not -total <= i < total for i in layers):
      raise ValueError(f"feature layer {layer} out of range for {total} hidden states")
    indices = [i % total for i in layers]
    states = self.hidden_states(pixel_values, num_layers=max(indices))
    x = jnp.concatenate([states[i] for i in indices], axis=-1)
    return x[:, 1:] if strategy == "default" else x


class CLIPVisionTower(VisionTower):
  """CLIP ViT: patch embedding + class token + positions -> pre_norm -> layers (-> post_norm on CLS)."""

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d, p, c = config.hidden_size, config.patch_size, config.num_channels
    self.patch_embed = Linear(p * p * c, d, axes=(None, "embed"), use_bias=False, dtype=dt,
                              param_dtype=pdt, rngs=rngs)
    self.class_embedding = param(rngs, default_kernel_init, (d,), ("embed",), pdt)
    self.position_embedding = param(rngs, default_kernel_init, (config.num_patches + 1, d),
                                    (None, "embed"), pdt)
    self.pre_norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=pdt, rngs=rngs)
    self.layers = encoder_layers(config, rngs)
    self.post_norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=pdt, rngs=rngs)

  def embed(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float [B, H, W, C] -> pre-normed embeddings [B, P + 1, D] (CLS first)."""
    x = self.patch_embed(patches(pixel_values, self.config))
    dt = x.dtype
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (x.shape[0], 1, x.shape[2]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(dt)
    return self.pre_norm(x)

  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pixel_values: [B, H, W, C] -> (last hidden [B, P + 1, D], pooled post_norm(CLS) [B, D])."""
    last = self.hidden_states(pixel_values)[-1]
    return last, self.post_norm(last[:, 0])
