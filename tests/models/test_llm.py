"""LLM ports against transformers' PyTorch models on tiny random configs (fp32, max abs diff <= 1e-4)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import forward, TINY_LLAMA, save_tiny
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf, params_io
from lvlm_jax.models.llm import KVCache, attention_weights_mask

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


WINDOW = 8
SLIDING = {
    "mistral": (transformers.MistralConfig, dict(sliding_window=WINDOW)),
    # Layer 0 full, layer 1 sliding: transformers' Qwen2 slides from max_window_layers on.
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW,
                                             max_window_layers=1)),
}


@pytest.fixture(scope="module", params=sorted(SLIDING))
def sliding(request, tmp_path_factory):
  """(family, our model, transformers' model, directory) with a window of 8 tokens."""
  config_class, window = SLIDING[request.param]
  torch.manual_seed(5)
  config = config_class(**{**TINY_LLAMA, **window})
  directory = save_tiny(transformers.AutoModelForCausalLM.from_config(config),
                        tmp_path_factory.mktemp(request.param))
  return (request.param, hf.load_llm(directory),
          transformers.AutoModelForCausalLM.from_pretrained(directory), directory)


def test_sliding_window_mask_sees_the_token_and_window_minus_one_before():
  """transformers' `kv > q - sliding_window`: 8 keys per query, the query's own included."""
  positions = jnp.arange(20)[None]
  mask = np.asarray(attention_weights_mask(positions, positions, WINDOW))[0, 0]
  for q in range(20):
    np.testing.assert_array_equal(np.flatnonzero(mask[q]), np.arange(max(0, q - WINDOW + 1), q + 1))


def test_sliding_window_logits_past_the_window(sliding):
  """27 tokens, window 8, one row left padded: every logit as transformers' (within 1e-4)."""
  family, ours, ref, directory = sliding
  assert ours.config.sliding_window == WINDOW
  assert [ours.config.layer_window(i) for i in range(2)] == (
      [WINDOW, WINDOW] if family == "mistral" else [None, WINDOW])
  ids = tokens(length=27, seed=6)
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  expected = torch_logits(ref, ids, mask)
  real = mask.astype(bool)
  assert np.abs(np.asarray(logits)[real] - expected[real]).max() <= TOL
  # The window matters here: full attention is far from these logits after the window.
  full = hf.build_model({**json.load(open(os.path.join(directory, "config.json"))),
                         "sliding_window": None, "use_sliding_window": False})
  nnx.update(full, nnx.state(ours))
  unwindowed, _ = forward(full, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(unwindowed)[0, WINDOW + 2:] - expected[0, WINDOW + 2:]).max() > 1e-2


def test_sliding_window_cached_decode_equals_full_forward(sliding):
  """Prefill 5 tokens, then 22 one-token steps through the cache, far past the window."""
  _, ours, _, _ = sliding
  ids = tokens(length=27, seed=7)
  full, _ = forward(ours, jnp.asarray(ids))
  positions = np.broadcast_to(np.arange(27, dtype=np.int32), ids.shape)
  ones = np.ones_like(ids)
  cache = KVCache.empty(ours.config, batch=2, size=27)
  logits, cache = forward(ours, jnp.asarray(ids[:, :5]), jnp.asarray(positions[:, :5]),
                          jnp.asarray(ones[:, :5]), cache)
  pieces = [np.asarray(logits)]
  for t in range(5, 27):
    logits, cache = forward(ours, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]),
                            jnp.asarray(ones[:, t:t + 1]), cache)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), atol=TOL, rtol=0)


def test_sliding_window_export_keeps_window_and_context(sliding, tmp_path):
  _, ours, _, directory = sliding
  hf.save_hf(ours, str(tmp_path))
  written = json.load(open(tmp_path / "config.json"))
  assert written["sliding_window"] == WINDOW
  assert written["max_position_embeddings"] == TINY_LLAMA["max_position_embeddings"]
  original = transformers.AutoConfig.from_pretrained(directory)
  exported = transformers.AutoConfig.from_pretrained(str(tmp_path))
  for field in ("sliding_window", "max_position_embeddings", "layer_types", "use_sliding_window",
                "max_window_layers"):
    assert getattr(exported, field, None) == getattr(original, field, None), field
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  ids = tokens(length=27, seed=8)
  logits, _ = forward(ours, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), torch_logits(reloaded, ids), atol=TOL, rtol=0)
  assert hf.load_llm(str(tmp_path)).config == ours.config


def old_style_rope_dir(directory, rope_scaling, key="rope_scaling"):
  """A tiny Llama whose config.json gives `key` (transformers 4 spelled it rope_scaling, beside a
  top-level rope_theta)."""
  torch.manual_seed(9)
  directory = save_tiny(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)),
                        directory)
  path = os.path.join(directory, "config.json")
  config = json.load(open(path))
  config.pop("rope_parameters")
  config.update({"rope_theta": 10000.0, key: rope_scaling})
  with open(path, "w") as f:
    json.dump(config, f)
  return directory


def test_old_style_linear_rope_scaling_logits_and_conversions(tmp_path):
  directory = old_style_rope_dir(tmp_path / "hf", {"type": "linear", "factor": 4.0})
  ref = transformers.AutoModelForCausalLM.from_pretrained(directory)
  # transformers reads the old spelling: its frequencies are the unscaled ones over 4.
  base = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
  np.testing.assert_allclose(ref.model.rotary_emb.inv_freq.numpy(), base / 4, rtol=1e-6)
  ours = hf.load_llm(directory)
  assert dict(ours.config.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
  ids = tokens(length=40, seed=9)
  logits, _ = forward(ours, jnp.asarray(ids))
  expected = torch_logits(ref, ids)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=0)
  # Both conversions keep the scaling: HF export reloaded by transformers, and our checkpoint.
  hf.save_hf(ours, str(tmp_path / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
  np.testing.assert_allclose(torch_logits(reloaded, ids), expected, atol=TOL, rtol=0)
  params_io.save_model(ours, str(tmp_path / "ours"))
  again = params_io.load_model(str(tmp_path / "ours"))
  assert again.config == ours.config
  np.testing.assert_allclose(np.asarray(forward(again, jnp.asarray(ids))[0]), expected, atol=TOL,
                             rtol=0)


@pytest.mark.parametrize("key,rope", [
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}),
])
def test_unsupported_rope_type_is_refused_at_load(tmp_path, key, rope):
  directory = old_style_rope_dir(tmp_path, rope, key)
  with pytest.raises(UserError) as error:
    hf.load_llm(directory)
  rope_type = rope.get("type", rope.get("rope_type"))
  assert str(error.value) == (f"{directory}/config.json: {key}: RoPE type {rope_type!r} is not "
                              "supported; supported: default, linear, llama3")


def test_tied_checkpoint_with_a_head_tensor(tiny_llama_dir, tmp_path):
  """Tied embeddings beside an lm_head tensor: a copy of the embedding loads tied (transformers
  ties it too); a different one is refused (transformers would silently untie)."""
  config = json.load(open(os.path.join(tiny_llama_dir, "config.json")))
  config["tie_word_embeddings"] = True
  tensors = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  for name in ("copy", "other"):
    os.makedirs(tmp_path / name)
    json.dump(config, open(tmp_path / name / "config.json", "w"))
    save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
  ours = hf.load_llm(str(tmp_path / "copy"))
  assert ours.lm_head is None
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "copy"))
  ids = tokens(seed=10)
  np.testing.assert_allclose(np.asarray(forward(ours, jnp.asarray(ids))[0]), torch_logits(ref, ids),
                             atol=TOL, rtol=0)
  with pytest.raises(UserError, match=r"ties the embeddings but the checkpoint's lm_head\.weight "
                     r"differs from model\.embed_tokens\.weight"):
    hf.load_llm(str(tmp_path / "other"))
