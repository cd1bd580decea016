"""Qwen2-VL's and Qwen2.5-VL's vision transformers: native-resolution patches with 2D RoPE,
merged 2x2 into tokens (Qwen2.5-VL: RMSNorm, SwiGLU, window attention in most blocks).

An image of H x W pixels (multiples of patch_size * spatial_merge_size) is cut into a grid of
(H / p) x (W / p) patches, each `temporal_patch_size` frames deep (a still image repeats itself),
which transformers' Qwen2VLImageProcessor lays out merge block by merge block: the m x m patches
that become one LLM token are consecutive. Each image attends only to itself; the patches of a
row's images are concatenated (and padded) into one sequence, `Qwen2VLImages`.
"""

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models.layers import LayerNorm, RMSNorm, activation, dot_product_attention
from lvlm_jax.models.llm import apply_rope
from lvlm_jax.models.lora import Linear
from lvlm_jax.models.vision import MLP


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig:
  """Hyperparameters of the tower; `from_hf`/`to_hf` read and write an HF Qwen2VLVisionConfig.

  hidden_size is the merged tokens' size (the LLM's), embed_dim the tower's own width.
  """
  depth: int = 32
  embed_dim: int = 1280
  hidden_size: int = 3584
  num_heads: int = 16
  mlp_ratio: int = 4
  hidden_act: str = "quick_gelu"
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  rope_theta: float = 10000.0
  dtype: str = "float32"
  param_dtype: str = "float32"

  MODEL_TYPE: ClassVar[str] = "qwen2_vl_vision"
  # Checkpoints from before transformers 4.47 call the tower by the model's type.
  MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen2_vl_vision", "qwen2_vl")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def patch_dim(self) -> int:
    """The values of one flattened patch: (channels, frames, rows, columns), HF's layout."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "Qwen2VLVisionConfig":
    model_type = hf.get("model_type", cls.MODEL_TYPE)
    if model_type not in cls.MODEL_TYPES:
      raise UserError(f"model_type {model_type!r} is not a {cls.MODEL_TYPE} tower")
    rope = dict(hf.get("rope_parameters") or {})
    if rope.get("rope_type", "axial") != "axial":
      raise UserError(f"rope_parameters.rope_type {rope['rope_type']!r} is not supported; the "
                      "tower's RoPE is axial")
    for key in ("patch_size", "temporal_patch_size"):
      if not isinstance(hf.get(key, 1), int):
        raise UserError(f"{key} {hf[key]!r} is not supported; give one integer")
    defaults = cls()
    fields = dict(
        depth=hf.get("depth", defaults.depth),
        embed_dim=hf.get("embed_dim", defaults.embed_dim),
        hidden_size=hf.get("hidden_size", defaults.hidden_size),
        num_heads=hf.get("num_heads", defaults.num_heads),
        mlp_ratio=hf.get("mlp_ratio", defaults.mlp_ratio),
        hidden_act=hf.get("hidden_act", defaults.hidden_act),
        in_channels=hf.get("in_channels", hf.get("in_chans", defaults.in_channels)),
        patch_size=hf.get("patch_size", hf.get("spatial_patch_size", defaults.patch_size)),
        spatial_merge_size=hf.get("spatial_merge_size", defaults.spatial_merge_size),
        temporal_patch_size=hf.get("temporal_patch_size", defaults.temporal_patch_size),
        rope_theta=float(rope.get("rope_theta", defaults.rope_theta)),
    )
    try:
      activation(fields["hidden_act"])
    except ValueError as e:
      raise UserError(f"hidden_act: {e}") from None
    if fields["embed_dim"] % fields["num_heads"] or (fields["embed_dim"] // fields["num_heads"]) % 4:
      raise UserError(f"embed_dim {fields['embed_dim']} must split into num_heads "
                      f"{fields['num_heads']} heads of a multiple of 4 (2D RoPE)")
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    return {
        "model_type": self.MODEL_TYPE,
        "depth": self.depth,
        "embed_dim": self.embed_dim,
        "hidden_size": self.hidden_size,
        "num_heads": self.num_heads,
        "mlp_ratio": self.mlp_ratio,
        "hidden_act": self.hidden_act,
        "in_channels": self.in_channels,
        "patch_size": self.patch_size,
        "spatial_merge_size": self.spatial_merge_size,
        "temporal_patch_size": self.temporal_patch_size,
        "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
    }


@dataclasses.dataclass(frozen=True)
class Qwen25VLVisionConfig(Qwen2VLVisionConfig):
  """Qwen2.5-VL's tower: RMSNorm and a biased SwiGLU MLP of intermediate_size, attention within
  windows of window_size pixels a side except in the fullatt_block_indexes blocks. HF calls the
  tower's width hidden_size and the merged tokens' out_hidden_size (our embed_dim, hidden_size).
  """
  embed_dim: int = 1280
  hidden_size: int = 3584
  intermediate_size: int = 3420
  hidden_act: str = "silu"
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)

  MODEL_TYPE: ClassVar[str] = "qwen2_5_vl_vision"
  MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen2_5_vl_vision", "qwen2_5_vl")

  @property
  def window_blocks(self) -> int:
    """A window's side in merge blocks (transformers' vit_merger_window_size)."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "Qwen25VLVisionConfig":
    defaults = cls()
    renamed = {**hf, "embed_dim": hf.get("hidden_size", defaults.embed_dim),
               "hidden_size": hf.get("out_hidden_size", defaults.hidden_size)}
    base = super().from_hf(renamed)
    fields = dict(
        intermediate_size=hf.get("intermediate_size", defaults.intermediate_size),
        window_size=hf.get("window_size", defaults.window_size),
        fullatt_block_indexes=tuple(hf.get("fullatt_block_indexes",
                                           defaults.fullatt_block_indexes)),
    )
    config = dataclasses.replace(base, **fields, **overrides)
    if config.window_blocks < 1:
      raise UserError(f"window_size {config.window_size} must span at least one merge block "
                      f"({config.patch_size * config.spatial_merge_size} pixels)")
    if any(not 0 <= i < config.depth for i in config.fullatt_block_indexes):
      raise UserError(f"fullatt_block_indexes {list(config.fullatt_block_indexes)} must be blocks "
                      f"of the {config.depth}")
    return config

  def to_hf(self) -> dict:
    hf = super().to_hf()
    del hf["embed_dim"], hf["mlp_ratio"]
    return {**hf, "hidden_size": self.embed_dim, "out_hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "window_size": self.window_size,
            "fullatt_block_indexes": list(self.fullatt_block_indexes)}


class Qwen2VLImages(NamedTuple):
  """A batch's images as Qwen2-VL takes them (a pytree, through jit and the sampling code).

  patches: float32 [B, P, patch_dim], each row's images' patches one after another in
  Qwen2VLImageProcessor's layout, then padding; grids: int32 [B, N, 3] each image's (frames,
  rows, columns) of patches (transformers' image_grid_thw), zeros for a padded image slot.
  P is a multiple of spatial_merge_size ** 2.
  """
  patches: jax.Array
  grids: jax.Array


def slot_of(cumulative: jax.Array, index: jax.Array) -> jax.Array:
  """cumulative: int [B, N] running totals, index: int [B, L] -> int [B, L]: how many totals are
  at most index (the slot an index falls in; N past the last)."""
  return jnp.sum(cumulative[:, None, :] <= index[:, :, None], axis=-1)


def patch_layout(grids: jax.Array, num_patches: int, merge: int) -> tuple[jax.Array, jax.Array]:
  """grids: int [B, N, 3]; num_patches: P -> (segment int [B, P], rows/cols int [B, P, 2]).

  segment: the frame (counted over the row's images) each patch belongs to, -1 for padding;
  patches attend within their segment. rows/cols: each patch's row and column in its image,
  its 2D RoPE position, from the processor's merge-block layout (transformers'
  `get_vision_position_ids`).
  """
  frames, rows, cols = grids[..., 0], grids[..., 1], grids[..., 2]
  per_frame = rows * cols
  ends = jnp.cumsum(frames * per_frame, axis=1)                                  # [B, N]
  index = jnp.broadcast_to(jnp.arange(num_patches), (grids.shape[0], num_patches))
  image = jnp.minimum(slot_of(ends, index), grids.shape[1] - 1)
  take = lambda x: jnp.take_along_axis(x, image, axis=1)
  start = take(ends - frames * per_frame)
  offset = index - start
  frame_size = jnp.maximum(take(per_frame), 1)
  frame, within = offset // frame_size, offset % frame_size
  block, cell = within // (merge * merge), within % (merge * merge)
  blocks_per_row = jnp.maximum(take(cols) // merge, 1)
  row = (block // blocks_per_row) * merge + cell // merge
  col = (block % blocks_per_row) * merge + cell % merge
  frames_before = take(jnp.cumsum(frames, axis=1) - frames)
  segment = jnp.where(index < ends[:, -1:], frames_before + frame, -1)
  return segment, jnp.stack([row, col], axis=-1)


def vision_rope_angles(rows_cols: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """rows_cols: int [B, P, 2] -> float32 [B, P, Dh/2]: Dh/4 frequencies turned by the row, the
  same Dh/4 by the column (transformers' axial Qwen2VLVisionRotaryEmbedding)."""
  quarter = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
  angles = rows_cols.astype(jnp.float32)[..., None] * inv_freq                   # [B, P, 2, Dh/4]
  return angles.reshape(*rows_cols.shape[:-1], -1)


class VisionAttention(nnx.Module):
  """Fused-qkv self-attention with 2D RoPE."""

  def __init__(self, dim: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = Linear(dim, 3 * dim, axes=("embed", "heads"), **kw)
    self.proj = Linear(dim, dim, axes=("heads", "embed"), **kw)
    self.num_heads = num_heads

  def __call__(self, x: jax.Array, angles: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, P, E], angles: [B, P, Dh/2], mask: bool [B, 1, P, P] -> [B, P, E]."""
    b, p, e = x.shape
    qkv = self.qkv(x).reshape(b, p, 3, self.num_heads, e // self.num_heads)
    q, k, v = (qkv[:, :, i] for i in range(3))
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    out = dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)
    return self.proj(out.reshape(b, p, e))


class SwiGLU(nnx.Module):
  """Qwen2.5-VL's vision MLP: down(act(gate(x)) * up(x)), every projection biased."""

  def __init__(self, dim: int, hidden: int, *, hidden_act: str, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.up_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(hidden, dim, axes=("mlp", "embed"), **kw)
    self.act = activation(hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(config: Qwen2VLVisionConfig, rngs: nnx.Rngs) -> LayerNorm | RMSNorm:
  """Qwen2-VL's LayerNorm or Qwen2.5-VL's RMSNorm, both at eps 1e-6."""
  kind = RMSNorm if isinstance(config, Qwen25VLVisionConfig) else LayerNorm
  return kind(config.embed_dim, eps=1e-6, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)


class VisionBlock(nnx.Module):
  """x + attn(norm1(x)), then x + mlp(norm2(x)): Qwen2-VL's fc1/fc2 MLP or Qwen2.5-VL's SwiGLU."""

  def __init__(self, config: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    e = config.embed_dim
    self.norm1 = _norm(config, rngs)
    self.attn = VisionAttention(e, config.num_heads, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.norm2 = _norm(config, rngs)
    kw = dict(hidden_act=config.hidden_act, dtype=dt, param_dtype=pdt, rngs=rngs)
    if isinstance(config, Qwen25VLVisionConfig):
      self.mlp = SwiGLU(e, config.intermediate_size, **kw)
    else:
      self.mlp = MLP(e, e * config.mlp_ratio, **kw)

  def __call__(self, x: jax.Array, angles: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), angles, mask)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """Each m x m block of normed patches, concatenated, through a GELU MLP to the LLM's width."""

  def __init__(self, config: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    e, merged = config.embed_dim, config.embed_dim * config.spatial_merge_size ** 2
    self.ln_q = _norm(config, rngs)
    kw = dict(use_bias=True, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.fc1 = Linear(merged, merged, axes=("embed", "mlp"), **kw)
    self.fc2 = Linear(merged, config.hidden_size, axes=("mlp", "embed"), **kw)
    self.merged = merged

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, P, E] -> [B, P / m**2, D]."""
    x = self.ln_q(x).reshape(x.shape[0], -1, self.merged)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Qwen2VLVisionTower(nnx.Module):
  """patches -> linear patch embedding (HF's Conv3d, stride = kernel) -> blocks -> merger."""

  def __init__(self, config: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.patch_proj = Linear(config.patch_dim, config.embed_dim, axes=(None, "embed"),
                             use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.blocks = nnx.List([VisionBlock(config, rngs=rngs) for _ in range(config.depth)])
    self.merger = PatchMerger(config, rngs=rngs)

  def __call__(self, images: Qwen2VLImages) -> jax.Array:
    """-> merged tokens [B, P / m**2, D], a row's images' tokens in order, then padding."""
    cfg = self.config
    patches = images.patches
    if patches.shape[-1] != cfg.patch_dim or patches.shape[1] % cfg.spatial_merge_size ** 2:
      raise ValueError(f"patches must be [B, P, {cfg.patch_dim}] with P a multiple of "
                       f"{cfg.spatial_merge_size ** 2}, got {patches.shape}")
    segment, rows_cols = patch_layout(images.grids, patches.shape[1], cfg.spatial_merge_size)
    angles = vision_rope_angles(rows_cols, cfg.head_dim, cfg.rope_theta)
    same = lambda x: x[:, :, None] == x[:, None, :]
    full = (same(segment) & (segment[:, :, None] >= 0))[:, None]                  # [B, 1, P, P]
    masks = [full] * len(self.blocks)
    if isinstance(cfg, Qwen25VLVisionConfig):
      # transformers reorders the patches window by window and attends within each; attention
      # does not depend on the order, so a mask keeps each window to itself instead.
      window = rows_cols // (cfg.window_blocks * cfg.spatial_merge_size)
      windowed = full & (same(window[..., 0]) & same(window[..., 1]))[:, None]
      masks = [full if i in cfg.fullatt_block_indexes else windowed
               for i in range(len(self.blocks))]
    x = self.patch_proj(patches)
    for block, mask in zip(self.blocks, masks):
      x = block(x, angles, mask)
    return self.merger(x)
