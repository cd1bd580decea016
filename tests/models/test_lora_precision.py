"""LoRA adapters in fp32 on a bfloat16 frozen base (the default), or in the base's dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models import params_io
from lvlm_jax.models.lora import Linear, LoraConfig, apply_lora, merge_lora


class Block(nnx.Module):
  def __init__(self):
    self.proj = Linear(8, 4, axes=(None, None), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                       rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.proj(x)


@pytest.mark.parametrize("param_dtype, want", [("float32", jnp.float32), ("base", jnp.bfloat16)])
def test_adapter_weights_dtype_and_their_gradients(param_dtype, want):
  model = Block()
  apply_lora(model, LoraConfig(rank=2, target="proj", param_dtype=param_dtype), rngs=nnx.Rngs(1))
  assert model.proj.kernel[...].dtype == jnp.bfloat16
  assert model.proj.lora.lora_a[...].dtype == want and model.proj.lora.lora_b[...].dtype == want
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32)
  assert model(x).dtype == jnp.bfloat16  # they compute in the layer's compute dtype
  graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
  grads = jax.grad(lambda a: jnp.sum(nnx.merge(graphdef, a, rest)(x).astype(jnp.float32)))(
      adapters)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(want)}
  assert params_io._lora_config(model).param_dtype == param_dtype  # how a save records them
  merge_lora(model)
  assert model.proj.kernel[...].dtype == jnp.bfloat16 and model.proj.lora is None


def test_a_bad_adapter_dtype_is_refused():
  with pytest.raises(UserError, match="model.lora.param_dtype='bfloat16' is not"):
    LoraConfig(param_dtype="bfloat16")
