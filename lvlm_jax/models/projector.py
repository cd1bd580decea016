"""The vision-to-language projector of LLaVA: `mlp2x_gelu` (Linear -> GELU -> Linear) or `linear`."""

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.models.layers import activation
from lvlm_jax.models.lora import Linear

PROJECTOR_TYPES = ("mlp2x_gelu", "linear")


class Projector(nnx.Module):
  """Maps vision features [..., Dv] to LLM embeddings [..., D]. Parameter names follow HF LLaVA."""

  def __init__(self, vision_dim: int, text_dim: int, *, projector_type: str = "mlp2x_gelu",
               hidden_act: str = "gelu", use_bias: bool = True, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if projector_type not in PROJECTOR_TYPES:
      raise ValueError(f"unknown projector_type {projector_type!r}; known: {PROJECTOR_TYPES}")
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = Linear(vision_dim, text_dim, axes=(None, "embed"), **kw)
    self.linear_2 = (Linear(text_dim, text_dim, axes=("mlp", "embed"), **kw)
                     if projector_type == "mlp2x_gelu" else None)
    self.act = activation(hidden_act)

  def __call__(self, features: jax.Array) -> jax.Array:
    """features: [..., Dv] -> [..., D]."""
    x = self.linear_1(features)
    if self.linear_2 is not None:
      x = self.linear_2(self.act(x))
    return x
