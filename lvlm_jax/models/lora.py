"""Linear layers with optional LoRA adapters, and the operations on adapters.

Every model builds its projections from `Linear`. `apply_lora` attaches adapters afterwards to the
layers whose dotted path matches a pattern, so a model family never needs to know about LoRA.
The DPO reference model is the policy with its adapters switched off (`lora_disabled`), and
`merge_lora` folds the adapters into the kernels for export.
"""

import contextlib
import dataclasses
import re
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models.layers import Initializer, default_kernel_init, matmul, param


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Where and how large the adapters are.

  rank: adapter rank r. alpha: the update is scaled by alpha / rank. dropout: on the adapter's input.
  target: regex matched (re.fullmatch) against each Linear's dotted path inside the model, e.g.
    `llm\\.layers\\.\\d+\\..*_proj` for every LLM projection of a LVLM.
  param_dtype: the adapters' weights: 'float32' (fp32 adapters and their optimizer moments, also
    on a bfloat16 frozen base, which then holds half the bytes) or 'base' (the kernel's dtype).
    They compute in the layer's compute dtype either way.
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  target: str = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.param_dtype not in ("float32", "base"):
      raise UserError(f"model.lora.param_dtype={self.param_dtype!r} is not 'float32' or 'base'")


class LoRA(nnx.Module):
  """The low-rank update x -> dropout(x) @ A @ B * alpha / r. B starts at zero, so a fresh adapter is a no-op."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None],
               config: LoraConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    a_init = nnx.initializers.he_uniform()
    self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (in_features, config.rank), param_dtype),
                                axes=(axes[0], None))
    self.lora_b = nnx.LoRAParam(jnp.zeros((config.rank, out_features), param_dtype),
                                axes=(None, axes[1]))
    self.scale = config.alpha / config.rank
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None
    self.enabled = True

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    """x: [..., in] -> [..., out]."""
    if self.dropout is not None:
      x = self.dropout(x)
    a = self.lora_a[...].astype(dtype)
    b = self.lora_b[...].astype(dtype)
    return (matmul(matmul(x.astype(dtype), a), b) * self.scale).astype(dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias) (+ LoRA update). kernel: [in, out] with logical `axes`."""

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init: Initializer = default_kernel_init, rngs: nnx.Rngs):
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), (axes[1],), param_dtype)
                 if use_bias else None)
    self.lora: LoRA | None = nnx.data(None)  # set by apply_lora
    self.axes = axes
    self.dtype = dtype

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
    """x: [..., in] -> [..., out] in the compute dtype (or out_dtype: see `layers.matmul`)."""
    y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype), out_dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    if self.lora is not None and self.lora.enabled:
      y = y + self.lora(x, self.dtype).astype(y.dtype)
    return y


def linear_layers(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
  """(dotted path, layer) for every Linear in the model."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Linear):
      yield ".".join(str(p) for p in path), node


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> list[str]:
  """Attaches an adapter to every Linear whose path matches `config.target`; returns those paths.

  Raises ValueError when nothing matches, since a silent no-op would train nothing.
  """
  pattern = re.compile(config.target)
  matched = []
  for path, linear in linear_layers(model):
    if pattern.fullmatch(path):
      in_features, out_features = linear.kernel.shape
      dtype = linear.kernel[...].dtype if config.param_dtype == "base" else jnp.float32
      linear.lora = LoRA(in_features, out_features, linear.axes, config, param_dtype=dtype,
                         rngs=rngs)
      matched.append(path)
  if not matched:
    raise ValueError(f"LoRA target {config.target!r} matches no Linear layer of the model")
  return matched


def set_lora_enabled(model: nnx.Module, enabled: bool) -> None:
  """Switches every adapter of the model on or off (a trace-time switch: no recompilation inside one jit)."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, LoRA):
      node.enabled = enabled


@contextlib.contextmanager
def lora_disabled(model: nnx.Module):
  """Within the block the model computes exactly as its base weights (the DPO reference model)."""
  set_lora_enabled(model, False)
  try:
    yield model
  finally:
    set_lora_enabled(model, True)


def merge_lora(model: nnx.Module) -> None:
  """Folds every adapter into its kernel (kernel += A @ B * alpha / r) and removes the adapters."""
  for _, linear in linear_layers(model):
    if linear.lora is not None:
      lora = linear.lora
      delta = jnp.dot(lora.lora_a[...].astype(jnp.float32), lora.lora_b[...].astype(jnp.float32))
      kernel = linear.kernel[...]
      linear.kernel[...] = (kernel.astype(jnp.float32) + delta * lora.scale).astype(kernel.dtype)
      linear.lora = None
