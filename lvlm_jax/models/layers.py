"""Small building blocks shared by every model family: parameters with logical axes, norms, embeddings.

Every parameter carries `axes`: one logical axis name (or None) per dimension. `lvlm_jax.sharding`
maps those names onto mesh axes; no model code names a mesh axis.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

default_kernel_init: Initializer = nnx.initializers.normal(0.02)


def param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype=jnp.float32) -> nnx.Param:
  """A trainable parameter of `shape` with one logical axis name per dimension."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation an HF config names (`hidden_act`)."""
  table = {
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "relu": jax.nn.relu,
  }
  if name not in table:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(table)}")
  return table[name]


class RMSNorm(nnx.Module):
  """LLaMA/Qwen2 RMSNorm, computed in fp32 and cast back to the input dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D]."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (CLIP), statistics in fp32."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D]."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding table [V, D]; `attend` reuses it as a tied output projection."""

  def __init__(self, num_embeddings: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.embedding = param(rngs, default_kernel_init, (num_embeddings, dim), ("vocab", "embed"),
                           param_dtype)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids: int [...] -> [..., D]."""
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> logits [..., V]."""
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None) -> jax.Array:
  """q: [B, T, H, Dh], k/v: [B, S, Hkv, Dh], mask: bool [B, 1, T, S] or None -> [B, T, H, Dh].

  Grouped-query attention (Hkv divides H) without repeating k/v; softmax in fp32.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(d))
  if mask is not None:
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if mask is not None:
    # A row with nothing to attend to (a padding query) gets zeros rather than a uniform average.
    probs = jnp.where(mask[:, :, None], probs, 0.0)
  probs = probs.astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)
