"""A model from its config: built abstractly (shapes only), then filled from an HF directory
(one tensor at a time onto the mesh) or initialised shard by shard; LoRA and remat on top.

A run first builds `abstract_model` (which gives the train state's structure and shardings
without allocating anything), then `load_params` fills it.
"""

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from lvlm_jax.data.text import image_token_id
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.layers import ATTENTION_IMPLEMENTATIONS
from lvlm_jax.models.llm import REMAT_POLICIES, LLMConfig
from lvlm_jax.models.lora import Linear, LoraConfig, apply_lora
from lvlm_jax.models.lvlm import LVLM, LVLMConfig
from lvlm_jax.models.vision import CLIPVisionConfig

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionSize:
  """The CLIP ViT of a model built from scratch."""
  hidden_size: int = help_field(64, "Width of the vision tower.")
  intermediate_size: int = help_field(128, "MLP width of the vision tower.")
  num_layers: int = help_field(2, "Transformer layers of the vision tower.")
  num_heads: int = help_field(4, "Attention heads of the vision tower.")
  image_size: int = help_field(32, "Input image side in pixels.")
  patch_size: int = help_field(8, "Patch side in pixels; (image_size "
                               "/ patch_size)^2 tokens per image.")


@dataclasses.dataclass(frozen=True)
class TextSize:
  """The LLaMA-style decoder of a model built from scratch (vocabulary from the tokenizer)."""
  hidden_size: int = help_field(128, "Width of the decoder.")
  intermediate_size: int = help_field(256, "SwiGLU width of the decoder.")
  num_layers: int = help_field(2, "Decoder layers.")
  num_heads: int = help_field(4, "Attention heads.")
  num_kv_heads: int = help_field(2, "Key/value heads (grouped-query attention).")
  max_position_embeddings: int = help_field(512, "Longest sequence the model is meant for.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which model trains and how it computes."""
  hf_dir: str = help_field("", "An HF LLaVA directory (config.json + safetensors) to start from; "
                           "'' builds a new model from `vision` and `text`.")
  tokenizer: str = help_field("shapes", "'shapes' (the shapes world's word-level tokenizer) or a "
                              "tokenizer directory; '' takes the one in hf_dir.")
  dtype: str = help_field("float32", f"Compute dtype, one of {DTYPES}: bfloat16 "
                          "on TPU/GPU, float32 on CPU.")
  param_dtype: str = help_field("float32", "Dtype of the master weights (and optimizer moments).")
  remat: str = help_field("none", "Activation checkpointing of decoder layers, "
                          f"one of {tuple(REMAT_POLICIES)}.")
  attention: str = help_field("auto", "The decoder's attention implementation: 'xla' (the "
                              "reference, query blocks), 'fused' (jax.nn.dot_product_attention: "
                              "cuDNN flash attention on a GPU), 'auto' ('fused' on GPU, 'xla' "
                              "on CPU and TPU).")
  allow_pickle: bool = help_field(False, "Accept pickled .bin/.pt weights "
                                  "in hf_dir (they can run code).")
  init_seed: int = help_field(0, "Seed of the random initialisation (new models, LoRA adapters).")
  number_code: float = help_field(0.0, "New models: start the embedding rows and LM-head columns "
                                  "of the number tokens ('0'..'999') on an ordered code of "
                                  "this scale (`number_code`), so that nearby coordinates start "
                                  "alike; 0: random like every other token.")
  vision: VisionSize = help_field(VisionSize(), "Vision tower of a new model (hf_dir='').")
  text: TextSize = help_field(TextSize(), "Decoder of a new model (hf_dir='').")
  use_lora: bool = help_field(False, "Attach LoRA adapters (`lora`) to the matching Linear layers.")
  lora: LoraConfig = help_field(LoraConfig(), "LoRA rank, alpha, dropout and target regex.")

  def __post_init__(self):
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise UserError(f"model.{key}={getattr(self, key)!r} is not one of {DTYPES}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"model.remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise UserError(f"model.attention={self.attention!r} is not one of "
                      f"{ATTENTION_IMPLEMENTATIONS}")
    if self.hf_dir and not os.path.isdir(self.hf_dir):
      raise UserError(f"model.hf_dir={self.hf_dir!r}: no such directory")
    if self.number_code < 0:
      raise UserError(f"model.number_code={self.number_code} must be >= 0")


def _scratch_config(config: ModelConfig, tokenizer) -> LVLMConfig:
  v, t = config.vision, config.text
  if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
    raise UserError("model.text: hidden_size must divide by num_heads, num_heads by num_kv_heads")
  dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype)
  vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            num_layers=v.num_layers, num_heads=v.num_heads,
                            image_size=v.image_size, patch_size=v.patch_size, **dtypes)
  text = LLMConfig(vocab_size=len(tokenizer), hidden_size=t.hidden_size,
                   intermediate_size=t.intermediate_size, num_layers=t.num_layers,
                   num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                   head_dim=t.hidden_size // t.num_heads,
                   max_position_embeddings=t.max_position_embeddings,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, **dtypes)
  # A new tower's last layer is as good as any, and -2 would leave it untrained.
  return LVLMConfig(vision=vision, text=text, image_token_id=image_token_id(tokenizer),
                    vision_feature_layer=-1)


def _finish(model: nnx.Module, config: ModelConfig) -> nnx.Module:
  """LoRA adapters and the remat policy: the same on the abstract and the concrete model."""
  if config.use_lora:
    try:
      apply_lora(model, config.lora, rngs=nnx.Rngs(params=config.init_seed + 1,
                                                   dropout=config.init_seed + 2))
    except ValueError as e:
      raise UserError(f"model.lora.target: {e}") from None
  language_model = model.llm if isinstance(model, LVLM) else model
  language_model.remat = config.remat
  language_model.attention_implementation = config.attention
  return model


def _new_lvlm(lvlm_config: LVLMConfig, seed: int) -> LVLM:
  model = LVLM(lvlm_config, rngs=nnx.Rngs(params=seed))
  fan_in_init(model, jax.random.key(seed + 1))
  return model


def fan_in_init(model: nnx.Module, key: jax.Array) -> None:
  """Redraws every Linear kernel [in, out] from N(0, 1 / in), in place.

  HF's N(0, 0.02) suits widths near 1/0.02^2 = 2500; at width 64 it shrinks each matmul's output
  to ~0.16 of its input. The projector then passes ~3% of the image's variation next to its
  learned (image-independent) bias, the decoder sees near-constant image tokens, and a model
  trained from scratch stays near chance on questions about the image. (With this init the
  quickstart's yes/no accuracy goes 0.53 -> 0.80, README "Quickstart"; the N(0, 0.02) comparison
  was a one-off diagnostic, not a command in this repository.)
  """
  for _, module in nnx.iter_graph(model):
    if isinstance(module, Linear):
      key, sub = jax.random.split(key)
      kernel = module.kernel[...]
      module.kernel[...] = jax.random.normal(sub, kernel.shape, kernel.dtype) * kernel.shape[0] ** -0.5


def number_tokens(tokenizer) -> tuple[list[int], list[int]]:
  """(ids, values) of the tokenizer's tokens that spell a number 0..999 without leading zeros."""
  ids, values = [], []
  for token, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
    if token.isdigit() and len(token) <= 3 and (token == "0" or not token.startswith("0")):
      ids.append(i)
      values.append(int(token))
  return ids, values


def number_code(model: LVLM, tokenizer, scale: float) -> None:
  """Sets, in place, the first half of the width of each number token's embedding row and
  LM-head column to sines and cosines of value / 1000 at hidden_size / 4 frequencies (pi 2^(j - k/2),
  j < k = hidden_size / 4), times `scale`: the head's logits for nearby numbers start alike, so
  a box coordinate is learned as a place on a line rather than as one of 1,000 unrelated
  classes. (Grounding alone on the shapes world, 600 steps: Acc@0.5 0.44 instead of 0.02,
  README "Quickstart".)"""
  ids, values = number_tokens(tokenizer)
  if not ids:
    return
  llm = model.llm
  k = llm.config.hidden_size // 4
  frequencies = jnp.pi * 2.0 ** (jnp.arange(k, dtype=jnp.float32) - k // 2)
  phase = jnp.asarray(values, jnp.float32)[:, None] / 1000.0 * frequencies
  code = jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1) * scale
  ids = jnp.asarray(ids)
  table = llm.embed_tokens.embedding
  table[...] = table[...].at[ids, :2 * k].set(code.astype(table[...].dtype))
  if llm.lm_head is not None:
    head = llm.lm_head.kernel
    head[...] = head[...].at[:2 * k, ids].set(code.T.astype(head[...].dtype))


def build_new(config: ModelConfig, tokenizer):
  """A function that builds the new model `config` describes (run it under jit or eval_shape)."""
  lvlm_config = _scratch_config(config, tokenizer)

  def build():
    model = _new_lvlm(lvlm_config, config.init_seed)
    if config.number_code:
      number_code(model, tokenizer, config.number_code)
    return _finish(model, config)
  return build


def _hf_overrides(config: ModelConfig) -> dict:
  return dict(dtype=config.dtype, param_dtype=config.param_dtype)


def abstract_model(config: ModelConfig, tokenizer) -> nnx.Module:
  """The model with shapes and dtypes only (`nnx.eval_shape`); nothing is allocated."""
  if config.hf_dir:
    hf_config = hf.read_hf_config(config.hf_dir)
    return nnx.eval_shape(lambda: _finish(hf.build_model(hf_config, **_hf_overrides(config)),
                                          config))
  return nnx.eval_shape(build_new(config, tokenizer))


def load_params(config: ModelConfig, tokenizer, mesh: Mesh, trainable,
                shardings: dict[str, Any]) -> tuple[nnx.State, nnx.State]:
  """(trainable params, frozen rest) of the real model on their shardings: read from hf_dir, or
  initialised (each shard on its own device)."""
  if not config.hf_dir:
    return init_sharded(build_new(config, tokenizer), trainable, shardings)
  model = hf.load_model(config.hf_dir, mesh=mesh, allow_pickle=config.allow_pickle,
                        **_hf_overrides(config))
  _, params, frozen = nnx.split(_finish(model, config), trainable, ...)
  return params, frozen


def check_vocabulary(model: nnx.Module, tokenizer) -> None:
  """A token id the embedding table lacks would read NaNs (JAX gathers fill out of range)."""
  language_model = model.llm if isinstance(model, LVLM) else model
  vocab = language_model.config.vocab_size
  if len(tokenizer) > vocab:
    raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                    f"{vocab}; use the tokenizer the model was trained with (model.tokenizer)")


def init_sharded(build: Callable[[], nnx.Module], trainable,
                 shardings: dict[str, Any]) -> tuple[nnx.State, nnx.State]:
  """(params, frozen) of a freshly initialised model, each shard created on its own device: a
  model too big for one device is never whole anywhere."""
  def init():
    _, params, frozen = nnx.split(build(), trainable, ...)
    return params, frozen
  return jax.jit(init, out_shardings=(shardings["params"], shardings["frozen"]))()
