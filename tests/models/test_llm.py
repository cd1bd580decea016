"""LLM ports against transformers' PyTorch models on tiny random configs (fp32, max abs diff <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import forward, TINY_LLAMA, save_tiny
from lvlm_jax.models import hf
from lvlm_jax.models.llm import KVCache

TOL = 1e-4


def torch_logits(model, ids, mask=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
  return out.logits.float().numpy()


def tokens(batch=2, length=12, vocab=128, seed=0):
  return np.random.default_rng(seed).integers(3, vocab, (batch, length)).astype(np.int32)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
  return hf.load_llm(tiny_llama_dir), transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
  torch.manual_seed(1)
  config = transformers.Qwen2Config(**{**TINY_LLAMA, "tie_word_embeddings": True})
  model = transformers.Qwen2ForCausalLM(config)
  # Random init leaves q/k/v biases at zero; make them matter.
  with torch.no_grad():
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        proj.bias.normal_(0, 0.5)
  return save_tiny(model, tmp_path_factory.mktemp("qwen2"))


def test_llama_gqa_untied_logits(llama):
  ours, ref = llama
  assert ours.config.num_kv_heads == 2 and not ours.config.tie_word_embeddings
  ids = tokens()
  logits, _ = forward(ours, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), torch_logits(ref, ids), atol=TOL, rtol=0)


def test_llama_padded_batch_matches_on_real_tokens(llama):
  """Left and right padding: logits at real tokens equal transformers' with the same mask."""
  ours, ref = llama
  ids = tokens(batch=3, length=10, seed=3)
  mask = np.ones_like(ids)
  mask[0, :4] = 0  # left padded
  mask[1, 7:] = 0  # right padded
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  expected = torch_logits(ref, ids, mask)
  real = mask.astype(bool)
  assert np.abs(np.asarray(logits)[real] - expected[real]).max() <= TOL


def test_qwen2_bias_tied_logits(qwen2_dir):
  ours = hf.load_llm(qwen2_dir)
  ref = transformers.AutoModelForCausalLM.from_pretrained(qwen2_dir)
  assert ours.config.qkv_bias and ours.config.tie_word_embeddings and ours.lm_head is None
  ids = tokens(seed=1)
  logits, _ = forward(ours, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), torch_logits(ref, ids), atol=TOL, rtol=0)


def test_llama3_rope_scaling_logits(tmp_path):
  torch.manual_seed(2)
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
  config = transformers.LlamaConfig(**{**TINY_LLAMA, "rope_parameters": rope})
  directory = save_tiny(transformers.LlamaForCausalLM(config), tmp_path)
  ours = hf.load_llm(directory)
  assert dict(ours.config.rope_scaling)["rope_type"] == "llama3"
  ids = tokens(length=40, seed=2)
  logits, _ = forward(ours, jnp.asarray(ids))
  ref = transformers.AutoModelForCausalLM.from_pretrained(directory)
  np.testing.assert_allclose(np.asarray(logits), torch_logits(ref, ids), atol=TOL, rtol=0)


def test_cached_decode_equals_full_forward(llama):
  """Prefill part of a (left-padded) batch, then feed one token at a time through the cache."""
  ours, _ = llama
  ids = tokens(batch=2, length=12, seed=4)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  full, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  positions = np.cumsum(mask, axis=1) - 1
  cache = KVCache.empty(ours.config, batch=2, size=16)
  prefill = 6
  logits, cache = forward(ours, jnp.asarray(ids[:, :prefill]), jnp.asarray(positions[:, :prefill]),
                       jnp.asarray(mask[:, :prefill]), cache)
  pieces = [np.asarray(logits)]
  for t in range(prefill, ids.shape[1]):
    logits, cache = forward(ours, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]),
                         jnp.asarray(mask[:, t:t + 1]), cache)
    pieces.append(np.asarray(logits))
  cached = np.concatenate(pieces, axis=1)
  real = mask.astype(bool)
  assert np.abs(cached[real] - np.asarray(full)[real]).max() <= TOL
  assert int(cache.index) == ids.shape[1]


@pytest.mark.slow
def test_smollm2_real_checkpoint_chat_prompt(smollm2_dir):
  """Real weights (SmolLM2-135M-Instruct, LLaMA architecture, tied embeddings, rope theta 1e5)."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  text = tokenizer.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
      tokenize=False, add_generation_prompt=True)
  ids = np.asarray([tokenizer(text)["input_ids"]], np.int32)
  ours = hf.load_llm(smollm2_dir)
  assert ours.config.num_layers == 30 and ours.config.tie_word_embeddings
  logits, _ = forward(ours, jnp.asarray(ids))
  ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir)
  expected = torch_logits(ref, ids)
  # Real weights give logits up to ~38 after 30 layers; fp32 summation order differs from torch's.
  # Measured: 1.2e-4 max abs diff on this prompt.
  assert np.abs(np.asarray(logits) - expected).max() <= 5e-4
  assert (np.asarray(logits).argmax(-1) == expected.argmax(-1)).all()
