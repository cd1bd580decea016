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


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N], the product every Linear and output projection uses.

  out_dtype: the result's dtype when it is not the inputs' (float32 logits of bfloat16 inputs:
  the products accumulate and come out in fp32, never rounded to bfloat16 first).

  Its gradient is jnp.dot's. On the CPU backend the weight gradient is computed as
  transpose(x) @ dy from an explicitly transposed copy of the input: written the usual way (x
  contracted over its leading dimension), XLA:CPU hands that product to Eigen instead of YNNPACK
  and first writes a transposed copy of the activation gradient, which cost a fifth of an SFT
  step (benchmarks/profile_step.py shows the breakdown). Other backends use jnp.dot as is.
  """
  if out_dtype is not None and jnp.dtype(out_dtype) != jnp.result_type(x, w):
    return jnp.dot(x, w, preferred_element_type=out_dtype)
  if jax.default_backend() != "cpu":
    return jnp.dot(x, w)
  return _cpu_matmul(x, w)


@jax.custom_vjp
def _cpu_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x, w)


def _cpu_matmul_forward(x, w):
  return jnp.dot(x, w), (x, w)


def _cpu_matmul_backward(residuals, dy):
  x, w = residuals
  rows_x = x.reshape(-1, x.shape[-1])
  # The barrier keeps XLA from folding the transpose back into the product's dimension numbers.
  x_t = jax.lax.optimization_barrier(rows_x.T)
  dx = jnp.dot(dy, w.T)
  dw = jnp.dot(x_t, dy.reshape(-1, dy.shape[-1]))
  return dx, dw


_cpu_matmul.defvjp(_cpu_matmul_forward, _cpu_matmul_backward)


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

  def attend(self, x: jax.Array, out_dtype=None) -> jax.Array:
    """x: [..., D] -> logits [..., V] (in out_dtype: see `matmul`)."""
    return matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T, out_dtype)


# Attention over more queries than this runs block by block (see `dot_product_attention`). On a
# CPU, 128-query blocks take about the time of one piece (attention forward + backward within 3%
# at 384 and 2048 tokens) for a fraction of the memory; one-token decoding stays one piece.
DEFAULT_QUERY_CHUNK = 128


# Attention implementations behind `dot_product_attention`: "xla" is the reference (our einsum
# path, query blocks); "fused" is jax.nn.dot_product_attention, which runs cuDNN's fused flash
# attention on a GPU (XLA's own path elsewhere); "auto" picks "fused" on a GPU, "xla" on CPU and
# TPU (no Pallas TPU kernel is wired in yet).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "fused")


def attention_implementation(name: str) -> str:
  """"xla" or "fused" for a name of ATTENTION_IMPLEMENTATIONS on the default backend."""
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {name!r} is not one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  if name == "auto":
    return "fused" if jax.default_backend() == "gpu" else "xla"
  return name


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                          query_chunk: int = DEFAULT_QUERY_CHUNK,
                          values_transposed: bool = False,
                          implementation: str = "xla") -> jax.Array:
  """q: [B, T, H, Dh], k/v: [B, Hkv, S, Dh], mask: bool [B, 1, T, S] or None -> [B, T, H, Dh].

  implementation: a name of ATTENTION_IMPLEMENTATIONS; every one gives these values (to fp32
  rounding) and these gradients, masks included; "fused" ignores query_chunk (a fused kernel
  never holds the scores whole).

  Grouped-query attention (Hkv divides H) without repeating k/v; softmax in fp32. A query with
  nothing to attend to (a padding query) gets zeros. Keys and values are head-major, the KV
  cache's layout: both products then contract in the layout XLA:CPU's YNNPACK takes as it is,
  where a [B, S, Hkv, Dh] cache was copied into this layout at every decoding step and layer.
  values_transposed: v is [B, Hkv, Dh, S], as the KV cache keeps values: a decoding step's
  probabilities-times-values product then contracts the cache's minor dimension, which XLA:CPU
  runs on YNNPACK (with [B, Hkv, S, Dh] values it went to Eigen at ~3x the time). Training keeps
  [B, Hkv, S, Dh], which saves transposing the values of every layer.

  With T > query_chunk (> 0) the queries go through in blocks of at most query_chunk, one block
  at a time, each block rematerialised in the backward pass: the fp32 [B, H, T, S] scores and
  probabilities are never held whole, in the forward or for the gradient (which otherwise keeps
  several of them per layer until the backward reaches it), at the cost of recomputing one
  block's scores and softmax in the backward (7 attention matmuls instead of 6). Each
  query row's arithmetic is the unchunked one, so results agree to fp32 rounding. Query blocks
  run in a loop, which also keeps XLA from scheduling the recomputation early (as it does with
  layer remat on CPU, see llm.REMAT_POLICIES). query_chunk=0 never chunks.
  """
  b, t, h, d = q.shape
  if attention_implementation(implementation) == "fused":
    return _fused_attention(q, k, v, mask, values_transposed)
  if not query_chunk or t <= query_chunk:
    return _attention(q, k, v, mask, values_transposed)
  n = -(-t // query_chunk)
  size = -(-t // n)  # n blocks of equal size: at most n - 1 padding queries
  pad = n * size - t
  blocks = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)
  q_blocks = blocks(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))))  # [n, B, size, H, Dh]
  if mask is None:
    attend = jax.checkpoint(lambda qb: _attention(qb, k, v, None, values_transposed))
    out = jax.lax.map(attend, q_blocks)
  else:
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, t, k.shape[2]))
    mask_blocks = blocks(jnp.pad(mask.swapaxes(1, 2), ((0, 0), (0, pad), (0, 0), (0, 0))))
    attend = jax.checkpoint(
        lambda qb, mb: _attention(qb, k, v, mb.swapaxes(1, 2), values_transposed))
    out = jax.lax.map(lambda xs: attend(*xs), (q_blocks, mask_blocks))
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * size, h, d)
  return out[:, :t]


def _fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     values_transposed: bool) -> jax.Array:
  """`dot_product_attention` through jax.nn.dot_product_attention (cuDNN on a GPU)."""
  k = k.swapaxes(1, 2)  # [B, S, Hkv, Dh], its layout
  v = v.transpose(0, 3, 1, 2) if values_transposed else v.swapaxes(1, 2)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask)
  if mask is None:
    return out
  # A query with nothing to attend to gets zeros, as in the reference (not an average of values).
  attends = jnp.any(mask, axis=-1).swapaxes(1, 2)[..., None]  # [B, T, 1, 1]
  return jnp.where(attends, out, jnp.zeros((), out.dtype))


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
               values_transposed: bool = False) -> jax.Array:
  """`dot_product_attention` in one piece: the [B, H, T, S] scores at once."""
  b, t, h, d = q.shape
  kv_heads = k.shape[1]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(d))
  if mask is not None:
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if mask is not None:
    # A row with nothing to attend to (a padding query) gets zeros rather than a uniform average.
    probs = jnp.where(mask[:, :, None], probs, 0.0)
  probs = probs.astype(v.dtype)
  out = jnp.einsum("bkgts,bkds->btkgd" if values_transposed else "bkgts,bksd->btkgd", probs, v)
  return out.reshape(b, t, h, d)
