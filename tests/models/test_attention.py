"""Query-chunked attention (`dot_product_attention` with T > query_chunk) against the one-piece
path: same values and gradients within fp32 rounding, less memory for the backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvlm_jax.models.layers import _attention, dot_product_attention
from lvlm_jax.models.llm import LLM, KVCache, LLMConfig, attention_weights_mask


def qkv(b, t, s, heads, kv_heads, d=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d))
  k = jax.random.normal(keys[1], (b, kv_heads, s, d))
  v = jax.random.normal(keys[2], (b, kv_heads, s, d))
  cotangent = jax.random.normal(keys[3], (b, t, heads, d))
  return q, k, v, cotangent


def padded_positions(b, t):
  """Row 0 full, row 1 left-padded by 5, row 2 right-padded by 6: -1 marks padding."""
  mask = np.ones((b, t), np.int32)
  mask[1, :5] = 0
  mask[2, t - 6:] = 0
  return jnp.asarray(np.where(mask > 0, np.cumsum(mask, axis=1) - 1, -1), jnp.int32)


def value_and_grads(q, k, v, cotangent, mask, query_chunk=0, **options):
  """The attention's output and its (q, k, v) gradients under `cotangent`; options go to
  `dot_product_attention` (implementation, values_transposed)."""
  attend = lambda q, k, v: dot_product_attention(q, k, v, mask, query_chunk=query_chunk,
                                                 **options)
  grads = jax.grad(lambda *a: jnp.sum(attend(*a) * cotangent), argnums=(0, 1, 2))
  return jax.jit(attend)(q, k, v), jax.jit(grads)(q, k, v)


def assert_same(a, b, scaled=False):
  """Equal within fp32 rounding; `scaled`: absolute tolerance relative to the largest |b| (sums
  over a whole model, where a tiny entry may be the difference of large ones)."""
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * (np.abs(b).max() if scaled else 1.0))


@pytest.mark.parametrize("query_chunk", [4, 8, 13])
def test_padded_gqa_self_attention(query_chunk):
  """GQA (4 query heads on 2 kv heads), left and right padding, T = 37 not a multiple of the
  chunk: padding queries stay exactly zero and every value and gradient matches."""
  b, t = 3, 37
  q, k, v, cotangent = qkv(b, t, t, heads=4, kv_heads=2)
  positions = padded_positions(b, t)
  mask = attention_weights_mask(positions, positions)
  out, grads = value_and_grads(q, k, v, cotangent, mask, query_chunk)
  ref_out, ref_grads = value_and_grads(q, k, v, cotangent, mask, 0)
  assert_same(out, ref_out)
  for g, ref in zip(grads, ref_grads):
    assert_same(g, ref)
  padding = np.asarray(positions) < 0
  assert np.all(np.asarray(out)[padding] == 0.0)


def test_queries_against_a_cache():
  """Prefill-like: 10 new queries at positions 6..15 against 24 cache slots, some empty (-1)."""
  b, t, s = 2, 10, 24
  q, k, v, cotangent = qkv(b, t, s, heads=4, kv_heads=1, seed=1)
  q_positions = jnp.tile(jnp.arange(6, 6 + t, dtype=jnp.int32), (b, 1))
  slots = np.full((b, s), -1, np.int32)
  slots[:, :16] = np.arange(16)
  slots[1, :3] = -1  # a left-padded row's padding slots
  mask = attention_weights_mask(q_positions, jnp.asarray(slots))
  out, grads = value_and_grads(q, k, v, cotangent, mask, 3)
  ref_out, ref_grads = value_and_grads(q, k, v, cotangent, mask, 0)
  assert_same(out, ref_out)
  for g, ref in zip(grads, ref_grads):
    assert_same(g, ref)
  # The cache's layout for values, [B, Hkv, Dh, S], chunked or not, computes the same.
  v_t = v.swapaxes(2, 3)
  for chunk in (0, 3):
    out_t = jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, mask, query_chunk=chunk, values_transposed=True))(q, k, v_t)
    assert_same(out_t, ref_out)


def test_no_mask_and_short_sequences():
  """Without a mask (the vision tower) chunks match too; T <= query_chunk is the one-piece path."""
  q, k, v, cotangent = qkv(2, 19, 19, heads=3, kv_heads=3, seed=2)
  out, grads = value_and_grads(q, k, v, cotangent, None, 5)
  ref_out, ref_grads = value_and_grads(q, k, v, cotangent, None, 0)
  assert_same(out, ref_out)
  for g, ref in zip(grads, ref_grads):
    assert_same(g, ref)
  np.testing.assert_array_equal(np.asarray(dot_product_attention(q, k, v, None, query_chunk=19)),
                                np.asarray(_attention(q, k, v, None)))


def test_backward_keeps_no_full_score_matrix():
  """The compiled gradient of chunked attention needs far less scratch memory than one piece
  (which keeps fp32 [B, H, T, S] scores and probabilities for the backward)."""
  b, t = 2, 512
  q, k, v, cotangent = qkv(b, t, t, heads=4, kv_heads=2)
  positions = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
  mask = attention_weights_mask(positions, positions)

  def temp_bytes(query_chunk):
    fn = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, mask, query_chunk=query_chunk)
                                 * cotangent)
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  # Measured: one piece 4.0x the bytes of one [B, H, T, T] fp32 matrix, 64-query blocks 0.54x.
  scores_bytes = b * 4 * t * t * 4
  one_piece = temp_bytes(0)
  assert one_piece >= 2 * scores_bytes
  assert temp_bytes(64) * 4 <= one_piece


def decoder_results(configure):
  """(logits, parameter gradients, cached-prefill logits) of a small GQA decoder on a batch with
  left and right padding; configure(model) sets its trace-time switches first."""
  config = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 20)), jnp.int32)
  mask = np.ones((3, 20), np.int32)
  mask[1, :4] = 0
  mask[2, 15:] = 0
  mask = jnp.asarray(mask)
  model = LLM(config, rngs=nnx.Rngs(0))
  configure(model)
  graphdef, params = nnx.split(model)

  def loss(p):
    logits, _ = nnx.merge(graphdef, p)(ids, attention_mask=mask)
    return jnp.sum(jnp.where(mask[..., None] > 0, jnp.tanh(logits), 0.0)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  cached, _ = nnx.jit(lambda m, x: m(x, attention_mask=mask[:, :14],
                                      cache=KVCache.empty(config, 3, 16)))(model, ids[:, :14])
  return logits, grads, cached


def assert_decoders_agree(results, reference):
  (logits, grads, cached), (ref_logits, ref_grads, ref_cached) = results, reference
  assert_same(logits, ref_logits, scaled=True)
  assert_same(cached, ref_cached, scaled=True)
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert_same(g, ref, scaled=True)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_llm_logits_and_gradients(remat):
  """A whole decoder with chunked attention (also under layer remat): same logits and
  parameter gradients on a padded batch, and the same prefill through a cache."""
  def chunked(chunk):
    def configure(model):
      model.remat, model.attention_query_chunk = remat, chunk
    return configure
  assert_decoders_agree(decoder_results(chunked(6)), decoder_results(chunked(0)))


@pytest.mark.parametrize("case", ["padded_causal_gqa", "sliding_window", "cache", "no_mask"])
def test_fused_attention_matches_the_reference(case):
  """jax.nn.dot_product_attention (cuDNN on a GPU; its XLA path here) against the reference in
  values and gradients: causal with left and right padding (padding queries exactly zero), GQA,
  a sliding window, queries against a cache with empty slots (values in the cache's layout),
  and no mask (the vision towers)."""
  b, t = 3, 37
  values_transposed = False
  if case == "cache":
    q, k, v, cotangent = qkv(2, 10, 24, heads=4, kv_heads=1, seed=1)
    slots = np.full((2, 24), -1, np.int32)
    slots[:, :16] = np.arange(16)
    slots[1, :3] = -1
    mask = attention_weights_mask(jnp.tile(jnp.arange(6, 16, dtype=jnp.int32), (2, 1)),
                                  jnp.asarray(slots))
    v, values_transposed = v.swapaxes(2, 3), True
  elif case == "no_mask":
    q, k, v, cotangent = qkv(2, 19, 19, heads=3, kv_heads=3, seed=2)
    mask = None
  else:
    q, k, v, cotangent = qkv(b, t, t, heads=4, kv_heads=2)
    positions = padded_positions(b, t)
    mask = attention_weights_mask(positions, positions, 5 if case == "sliding_window" else None)
  out, grads = value_and_grads(q, k, v, cotangent, mask, implementation="fused",
                               values_transposed=values_transposed)
  ref_out, ref_grads = value_and_grads(q, k, v, cotangent, mask, implementation="xla",
                                       values_transposed=values_transposed)
  assert_same(out, ref_out)
  for g, ref in zip(grads, ref_grads):
    assert_same(g, ref)
  if case == "padded_causal_gqa":
    assert np.all(np.asarray(out)[np.asarray(padded_positions(b, t)) < 0] == 0.0)


def test_auto_is_the_reference_off_a_gpu_and_a_bad_name_is_refused():
  from lvlm_jax.models.layers import attention_implementation
  assert attention_implementation("auto") == ("fused" if jax.default_backend() == "gpu"
                                              else "xla")
  with pytest.raises(ValueError, match="'flash' is not one of"):
    attention_implementation("flash")


def test_llm_with_fused_attention_gives_the_same_logits_and_gradients():
  """A padded batch through a whole decoder, and a prefill through a cache, with each backend."""
  def backend(implementation):
    def configure(model):
      model.attention_implementation = implementation
    return configure
  assert_decoders_agree(decoder_results(backend("fused")), decoder_results(backend("xla")))
