"""Mixed precision: LoRA adapters in fp32 on a bfloat16 frozen base (the default), or in the
base's dtype; the LM head's logits accumulated in fp32 under bfloat16 compute."""

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


@pytest.mark.parametrize("tied", [False, True])
def test_bfloat16_logits_are_accumulated_in_float32(tied):
  from lvlm_jax.models.llm import LLM, LLMConfig
  config = LLMConfig(vocab_size=512, hidden_size=256, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=tied,
                     dtype="bfloat16", param_dtype="bfloat16")
  model = LLM(config, rngs=nnx.Rngs(0))
  hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 256)), jnp.bfloat16)
  logits = model.logits(hidden)
  weight = (model.embed_tokens.embedding[...].T if tied else model.lm_head.kernel[...])
  exact = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64)
  assert logits.dtype == jnp.float32
  scale = np.abs(exact).max()
  assert np.abs(np.asarray(logits) - exact).max() <= 1e-5 * scale
  # What rounding them to bfloat16 first would have cost, ~1e-3 of their size: far above it.
  rounded = np.asarray(jnp.dot(hidden, weight).astype(jnp.float32))
  assert np.abs(rounded - exact).max() > 1e-3 * scale
