"""Decoder-only LLMs: LLaMA / Vicuna / Mistral and Qwen2 (GQA, RoPE, RMSNorm, SwiGLU).

One module covers the families; they differ only in config fields (QKV bias, tied embeddings,
rope scaling, sliding-window attention). Attention takes an optional static-size KV cache so the
same code serves training (no cache), prefill and one-token decode.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models.layers import (DEFAULT_QUERY_CHUNK, Embed, RMSNorm, activation,
                                    dot_product_attention)
from lvlm_jax.models.lora import Linear
from lvlm_jax.sharding import constrain

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants `rope_inverse_frequencies` computes, with the keys each one needs.
SUPPORTED_ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
LAYER_TYPES = ("full_attention", "sliding_attention")

# Activation checkpointing of each decoder layer in training: what the backward pass may keep
# instead of recomputing. "dots" keeps matmul outputs; "dots_no_batch" keeps only the weight
# matmuls (attention scores are recomputed); "full" keeps nothing but the layer inputs.
# On XLA:CPU they save little: the optimised program has no optimisation barriers left and
# computes each layer's recomputed attention scores beside its forward pass (the `small`
# benchmark's SFT step needs 1499 MiB of compiled scratch with "none", 1433 with any policy).
# Attention scores, the largest activations, are recomputed in the backward by query-chunked
# attention instead (`LLM.attention_query_chunk`): 1115 MiB with "none", 1049 with "full" or
# "dots_no_batch", 1193 with "dots".
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Hyperparameters of a decoder LLM; `from_hf`/`to_hf` read and write an HF `config.json` dict."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  model_type: str = "llama"
  rope_theta: float = 10000.0
  # HF rope_parameters minus theta, as sorted items with `rope_type`; None = unscaled RoPE.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  max_position_embeddings: int = 4096
  # A query sees itself and the sliding_window - 1 positions before it (transformers' mask,
  # `kv > q - sliding_window`) in the layers that layer_types marks "sliding_attention" (every
  # layer when layer_types is None, as in Mistral); None = full causal attention everywhere.
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  # M-RoPE (Qwen2-VL): how many of the Dh/2 rotary frequencies the temporal, height and width
  # positions turn, in that order (transformers' `mrope_section`); None = one position per token.
  mrope_section: tuple[int, int, int] | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  dtype: str = "float32"        # compute dtype (bfloat16 on accelerators)
  param_dtype: str = "float32"  # master weights

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "LLMConfig":
    """Raises UserError for what we cannot run exactly as transformers does, naming the key."""
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise UserError(f"model_type {model_type!r} is not a supported LLM; supported: "
                      f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    theta, scaling = _rope_from_hf(hf)
    window, layer_types = _sliding_window_from_hf(hf, model_type)
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    attention_bias = hf.get("attention_bias", False)
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        model_type=model_type,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=hf.get("mlp_bias", False),
        hidden_act=hf.get("hidden_act", "silu"),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        sliding_window=window,
        layer_types=layer_types,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    fields.update(overrides)
    return cls(**fields)

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of decoder layer `layer`, or None for full causal attention."""
    if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
      return None
    return self.sliding_window

  def to_hf(self) -> dict:
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling:
      rope.update(dict(self.rope_scaling))
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}[self.model_type]
    hf = {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rope_parameters": rope,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "hidden_act": self.hidden_act,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                        else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    }
    if self.model_type == "qwen2":
      if not self.qkv_bias or self.o_bias:
        raise ValueError("Qwen2 checkpoints always have a q/k/v bias and no o_proj bias")
    else:
      if self.qkv_bias != self.o_bias:
        raise ValueError(f"{self.model_type} has one attention_bias flag for q/k/v and o_proj")
      hf["attention_bias"] = self.qkv_bias
      hf["mlp_bias"] = self.mlp_bias
    if self.model_type == "mistral":
      if self.layer_types is not None:
        raise ValueError("transformers' Mistral slides the window in every layer; "
                         "it has no layer_types")
      hf["sliding_window"] = self.sliding_window
    elif self.model_type == "qwen2":
      layer_types = [("full_attention" if self.layer_window(i) is None else "sliding_attention")
                     for i in range(self.num_layers)]
      hf["use_sliding_window"] = self.sliding_window is not None
      hf["sliding_window"] = self.sliding_window
      hf["layer_types"] = layer_types
      # Read by transformers 4, which slides the window in layers from this index on.
      hf["max_window_layers"] = (layer_types.index("sliding_attention")
                                 if "sliding_attention" in layer_types else self.num_layers)
    elif self.sliding_window is not None:
      raise ValueError(f"transformers' {self.model_type} has no sliding-window attention")
    return hf


def _rope_from_hf(hf: dict) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
  """(theta, scaling items with their `rope_type`, None when unscaled), as transformers reads them.

  transformers 4 spelled it `rope_scaling` ({"type": ...} or {"rope_type": ...}) beside a top-level
  `rope_theta`; transformers 5 writes `rope_parameters` with the theta inside. As in
  transformers 5, a `rope_scaling` dict replaces `rope_parameters`.
  """
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  rope = dict(hf.get(key) or {})
  if any(isinstance(v, dict) for v in rope.values()):
    raise UserError(f"{key}: per-layer-type RoPE parameters are not supported; give one dict")
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  old_spelling = rope.pop("type", "default")
  rope_type = rope.pop("rope_type", old_spelling)
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise UserError(f"{key}: RoPE type {rope_type!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}")
  if rope_type == "llama3":  # transformers' default for a missing pretraining length
    rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
  missing = [k for k in SUPPORTED_ROPE_TYPES[rope_type] if rope.get(k) is None]
  if missing:
    raise UserError(f"{key}: RoPE type {rope_type!r} needs {', '.join(missing)}")
  if rope_type == "default":
    return float(theta), None
  return float(theta), tuple(sorted({**rope, "rope_type": rope_type}.items()))


def _sliding_window_from_hf(hf: dict, model_type: str) -> tuple[int | None, tuple[str, ...] | None]:
  """(sliding_window, layer_types) as transformers' Mistral and Qwen2 read them; Llama has none.

  Mistral slides in every layer whenever `sliding_window` is set. Qwen2 only with
  `use_sliding_window`, in the layers `layer_types` names, or else from `max_window_layers` on.
  """
  if model_type == "mistral":  # a missing key is transformers' default, 4096
    window, layer_types = hf.get("sliding_window", 4096), None
  elif model_type == "qwen2" and hf.get("use_sliding_window", False):
    window = hf.get("sliding_window", 4096)
    layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
      first = hf.get("max_window_layers", 28)
      layer_types = ["full_attention" if i < first else "sliding_attention" for i in range(layers)]
    if len(layer_types) != layers or set(layer_types) - set(LAYER_TYPES):
      raise UserError(f"layer_types must name one of {', '.join(LAYER_TYPES)} for each of the "
                      f"{layers} layers, got {layer_types}")
    layer_types = tuple(layer_types)
  else:
    return None, None
  if window is None:
    return None, None
  if not isinstance(window, int) or window < 1:
    raise UserError(f"sliding_window must be a positive integer or null, got {window!r}")
  return window, layer_types


class KVCache(NamedTuple):
  """A static-size cache shared by all layers.

  keys: per layer [B, Hkv, S, Dh]; values: per layer [B, Hkv, Dh, S] (see `dot_product_attention`
  for why these layouts). positions: [B, S] int32, the position of the token in each slot
  (what the mask compares), -1 for an empty slot or a padding token (never attended).
  index: int32 [] next free slot.
  rope_offsets: int32 [B], added to the positions of tokens fed without explicit RoPE positions
  (M-RoPE's rope deltas: text after images turns on from the images' largest position; else 0).
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  positions: jax.Array
  index: jax.Array
  rope_offsets: jax.Array

  @classmethod
  def empty(cls, config: LLMConfig, batch: int, size: int, dtype=None) -> "KVCache":
    dtype = dtype or jnp.dtype(config.dtype)
    keys = (batch, config.num_kv_heads, size, config.head_dim)
    values = (batch, config.num_kv_heads, config.head_dim, size)
    return cls(keys=tuple(jnp.zeros(keys, dtype) for _ in range(config.num_layers)),
               values=tuple(jnp.zeros(values, dtype) for _ in range(config.num_layers)),
               positions=jnp.full((batch, size), -1, jnp.int32),
               index=jnp.zeros((), jnp.int32),
               rope_offsets=jnp.zeros((batch,), jnp.int32))


def rope_inverse_frequencies(config: LLMConfig) -> jax.Array:
  """float32 [Dh/2]: RoPE frequencies, with HF's `linear` and `llama3` scalings."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if not config.rope_scaling:
    return inv_freq
  scaling = dict(config.rope_scaling)
  rope_type = scaling["rope_type"]
  if rope_type == "linear":
    return inv_freq / scaling["factor"]
  if rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"unsupported rope scaling {rope_type!r}; "
                   f"supported: {list(SUPPORTED_ROPE_TYPES)}")


def rope_angles(positions: jax.Array, inv_freq: jax.Array,
                mrope_section: tuple[int, ...] | None = None) -> jax.Array:
  """positions: int [B, T], or [3, B, T] (temporal, height, width) with mrope_section
  -> float32 [B, T, Dh/2]: the angle of each rotary frequency.

  M-RoPE turns the first mrope_section[0] frequencies by the temporal position, the next
  mrope_section[1] by the height and the rest by the width (transformers' Qwen2-VL
  `recomposition_frequencies`); a [B, T] position is all three.
  """
  positions = positions.astype(jnp.float32)
  if mrope_section is None:
    return positions[..., None] * inv_freq
  if sum(mrope_section) != inv_freq.shape[0]:
    raise ValueError(f"mrope_section {mrope_section} must add up to head_dim / 2 = "
                     f"{inv_freq.shape[0]}")
  if positions.ndim == 2:
    positions = jnp.broadcast_to(positions, (3, *positions.shape))
  chosen = positions[np.repeat(np.arange(3), mrope_section)]  # [Dh/2, B, T]
  return jnp.moveaxis(chosen, 0, -1) * inv_freq


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """x: [B, T, H, Dh], angles: float32 [B, T, Dh/2] (`rope_angles`) -> [B, T, H, Dh] (HF's
  rotate-half layout)."""
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def attention_weights_mask(q_positions: jax.Array, k_positions: jax.Array,
                           window: int | None = None) -> jax.Array:
  """q_positions [B, T], k_positions [B, S] -> bool [B, 1, T, S]: a query sees keys that exist
  (position >= 0) and are not in its future; with a window, only the keys less than `window`
  positions behind it (itself and window - 1 before, transformers' sliding-window mask).

  Positions rather than slots: a cache holds every past key and the mask slides over them, so
  prefill, decoding and the full forward see the same keys.
  """
  q, k = q_positions[:, :, None], k_positions[:, None, :]
  allowed = (k >= 0) & (k <= q)
  if window is not None:
    allowed = allowed & (k > q - window)
  return allowed[:, None, :, :]


class Attention(nnx.Module):

  def __init__(self, config: LLMConfig, *, window: int | None = None, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    self.q_proj = Linear(d, h * hd, axes=("embed", "heads"), use_bias=config.qkv_bias,
                         dtype=dt, param_dtype=pdt, rngs=rngs)
    self.k_proj = Linear(d, kv * hd, axes=("embed", "kv_heads"), use_bias=config.qkv_bias,
                         dtype=dt, param_dtype=pdt, rngs=rngs)
    self.v_proj = Linear(d, kv * hd, axes=("embed", "kv_heads"), use_bias=config.qkv_bias,
                         dtype=dt, param_dtype=pdt, rngs=rngs)
    self.o_proj = Linear(h * hd, d, axes=("heads", "embed"), use_bias=config.o_bias,
                         dtype=dt, param_dtype=pdt, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
    self.window = window

  def __call__(self, x: jax.Array, positions: jax.Array, angles: jax.Array,
               layer_cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None,
               query_chunk: int = DEFAULT_QUERY_CHUNK, implementation: str = "xla"):
    """x: [B, T, D], positions: [B, T] (-1 = padding), which the mask compares; angles: float32
    [B, T, Dh/2] their RoPE (`rope_angles`).

    layer_cache: None, or (keys [B,Hkv,S,Dh], values [B,Hkv,Dh,S], slot positions [B,S] already
    including this call's tokens, write index []). query_chunk, implementation: see
    `dot_product_attention`.
    Returns (y [B, T, D], (keys, values) or None).
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, angles)
    k = apply_rope(k, angles).swapaxes(1, 2)  # [B, Hkv, T, Dh]
    if layer_cache is None:
      k_positions, new_kv = positions, None
      v = v.swapaxes(1, 2)  # [B, Hkv, T, Dh]
    else:
      v = v.transpose(0, 2, 3, 1)  # [B, Hkv, Dh, T], the cache's layout
      cache_k, cache_v, k_positions, index = layer_cache
      k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=3)
      new_kv = (k, v)
    mask = attention_weights_mask(positions, k_positions, self.window)
    out = dot_product_attention(q, k, v, mask, query_chunk=query_chunk,
                                values_transposed=layer_cache is not None,
                                implementation=implementation)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_kv


class MLP(nnx.Module):
  """SwiGLU: down(act(gate(x)) * up(x))."""

  def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(use_bias=config.mlp_bias, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
    self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)
    self.act = activation(config.hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, config: LLMConfig, *, window: int | None = None, rngs: nnx.Rngs):
    pdt = jnp.dtype(config.param_dtype)
    self.input_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.attn = Attention(config, window=window, rngs=rngs)
    self.post_attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pdt,
                                  rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, angles, layer_cache, query_chunk=DEFAULT_QUERY_CHUNK,
               implementation="xla"):
    attn_out, new_kv = self.attn(self.input_norm(x), positions, angles, layer_cache, query_chunk,
                                 implementation)
    x = x + attn_out
    x = x + self.mlp(self.post_attn_norm(x))
    return x, new_kv


class LLM(nnx.Module):
  """Decoder LLM. `embed` -> `hidden` -> `logits`; `__call__` chains them for token inputs."""

  def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
    self.config = config
    dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dt, param_dtype=pdt,
                              rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, window=config.layer_window(i), rngs=rngs)
                            for i in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else Linear(
        config.hidden_size, config.vocab_size, axes=("embed", "vocab"), dtype=dt, param_dtype=pdt,
        rngs=rngs)
    # A key of REMAT_POLICIES; trainers set it (a trace-time choice that changes no parameter).
    self.remat = "none"
    # Attention over more tokens than this goes in query blocks that the backward recomputes
    # (`dot_product_attention`); 0 = never. Also trace-time only.
    self.attention_query_chunk = DEFAULT_QUERY_CHUNK
    # A name of layers.ATTENTION_IMPLEMENTATIONS (`dot_product_attention`); trace-time only.
    self.attention_implementation = "auto"

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens: int [B, T] -> [B, T, D]."""
    return self.embed_tokens(tokens)

  def hidden(self, embeds: jax.Array, positions: jax.Array, cache: KVCache | None = None,
             rope_positions: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """embeds: [B, T, D]; positions: int [B, T], -1 for padding -> (final-normed hidden [B, T, D], cache).

    With a cache, the T new tokens are written at slots [cache.index, cache.index + T).
    rope_positions: int [3, B, T] (M-RoPE) or [B, T], what RoPE turns by where it is not
    `positions` (+ the cache's rope_offsets); positions alone decide what a token attends to.
    """
    if rope_positions is None:
      rope_positions = positions if cache is None else positions + cache.rope_offsets[:, None]
    angles = rope_angles(rope_positions, rope_inverse_frequencies(self.config),
                         self.config.mrope_section)
    if cache is not None:
      slot_positions = jax.lax.dynamic_update_slice_in_dim(
          cache.positions, positions.astype(jnp.int32), cache.index, axis=1)
    x = embeds
    new_keys, new_values = [], []
    query_chunk, implementation = self.attention_query_chunk, self.attention_implementation

    def run(layer, x, positions, angles, layer_cache):
      return layer(x, positions, angles, layer_cache, query_chunk, implementation)

    if REMAT_POLICIES[self.remat] is not None:
      run = nnx.remat(run, policy=REMAT_POLICIES[self.remat])
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.keys[i], cache.values[i], slot_positions,
                                                cache.index)
      x, new_kv = run(layer, constrain(x, ("batch", "length", "embed")), positions, angles,
                      layer_cache)
      if new_kv is not None:
        new_keys.append(new_kv[0])
        new_values.append(new_kv[1])
    x = self.norm(x)
    if cache is None:
      return x, None
    new_cache = KVCache(tuple(new_keys), tuple(new_values), slot_positions,
                        cache.index + embeds.shape[1], cache.rope_offsets)
    return x, new_cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden: [B, T, D] -> float32 logits [B, T, V], accumulated in fp32 whatever the compute
    dtype (bfloat16 logits would carry ~3 significant digits into every log-prob)."""
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden, jnp.float32)
    return self.lm_head(hidden, jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """tokens: int [B, T]; attention_mask: [B, T] (1 = real token) -> (logits [B, T, V], cache)."""
    positions = default_positions(tokens, positions, attention_mask)
    hidden, cache = self.hidden(self.embed(tokens), positions, cache)
    return self.logits(hidden), cache


def default_positions(tokens: jax.Array, positions: jax.Array | None,
                      attention_mask: jax.Array | None) -> jax.Array:
  """int32 [B, T]: the given positions, or 0.. over real tokens; -1 wherever attention_mask is 0."""
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape, jnp.int32)
  if positions is None:
    positions = jnp.cumsum(attention_mask, axis=1) - 1
  return jnp.where(attention_mask > 0, positions, -1).astype(jnp.int32)
