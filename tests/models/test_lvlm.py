"""LLaVA port against transformers: one and two images per sequence, padded image slots, export."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from conftest import forward, TINY_CLIP_VISION, TINY_LLAMA, save_tiny, torch_llava_logits
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.lora import LoraConfig, apply_lora, lora_disabled

TOL = 1e-4
IMAGE_TOKEN = 127
TOKENS_PER_IMAGE = 16


def sequence(rng, images: int, text_len: int = 6) -> list[int]:
  """Text, then for each image a block of image tokens followed by more text."""
  ids = list(rng.integers(3, 120, text_len))
  for _ in range(images):
    ids += [IMAGE_TOKEN] * TOKENS_PER_IMAGE + list(rng.integers(3, 120, 3))
  return ids


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
  ours = hf.load_lvlm(tiny_llava_dir)
  ref = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
  return ours, ref


def test_config_read_from_hf(llava):
  ours, _ = llava
  assert ours.config.image_token_id == IMAGE_TOKEN
  assert ours.config.vision_feature_layer == -2
  assert ours.config.tokens_per_image == TOKENS_PER_IMAGE


def test_one_image_logits(llava):
  ours, ref = llava
  rng = np.random.default_rng(0)
  ids = np.asarray([sequence(rng, 1)], np.int32)
  mask = np.ones_like(ids)
  images = rng.normal(size=(1, 1, 28, 28, 3)).astype(np.float32)
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(images))
  expected = torch_llava_logits(ref, ids, mask, images[:, 0])
  np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=0)


def test_two_images_and_a_padded_image_slot(llava):
  """Row 0 holds two images; row 1 one image, a padded second slot and right padding."""
  ours, ref = llava
  rng = np.random.default_rng(1)
  row0, row1 = sequence(rng, 2), sequence(rng, 1)
  length = len(row0)
  ids = np.zeros((2, length), np.int32)
  mask = np.zeros((2, length), np.int32)
  ids[0], mask[0] = row0, 1
  ids[1, :len(row1)], mask[1, :len(row1)] = row1, 1
  images = rng.normal(size=(2, 2, 28, 28, 3)).astype(np.float32)
  images[1, 1] = 1e3  # garbage in the padded slot must not leak anywhere
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(images))
  real_images = np.stack([images[0, 0], images[0, 1], images[1, 0]])
  expected = torch_llava_logits(ref, ids, mask, real_images)
  real = mask.astype(bool)
  assert np.abs(np.asarray(logits)[real] - expected[real]).max() <= TOL


def test_full_feature_strategy_and_last_layer(tmp_path):
  """vision_feature_layer=-1 with the CLS token kept ('full'): 17 tokens per image."""
  torch.manual_seed(3)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**TINY_CLIP_VISION),
      text_config=transformers.LlamaConfig(**TINY_LLAMA), image_token_id=IMAGE_TOKEN,
      vision_feature_layer=-1, vision_feature_select_strategy="full")
  directory = save_tiny(transformers.LlavaForConditionalGeneration(config), tmp_path)
  ours = hf.load_lvlm(directory)
  assert ours.config.tokens_per_image == TOKENS_PER_IMAGE + 1
  rng = np.random.default_rng(2)
  ids = np.asarray([[5, 6] + [IMAGE_TOKEN] * 17 + [7, 8]], np.int32)
  mask = np.ones_like(ids)
  images = rng.normal(size=(1, 1, 28, 28, 3)).astype(np.float32)
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(images))
  ref = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
  np.testing.assert_allclose(np.asarray(logits), torch_llava_logits(ref, ids, mask, images[:, 0]),
                             atol=TOL, rtol=0)


def test_export_reloads_in_transformers(llava, tmp_path):
  ours, _ = llava
  hf.save_hf(ours, str(tmp_path))
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  rng = np.random.default_rng(4)
  ids = np.asarray([sequence(rng, 1)], np.int32)
  mask = np.ones_like(ids)
  images = rng.normal(size=(1, 1, 28, 28, 3)).astype(np.float32)
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(logits), torch_llava_logits(reloaded, ids, mask, images[:, 0]),
                             atol=TOL, rtol=0)
  # Reloading our own export gives the same parameters bit for bit.
  again = hf.load_lvlm(str(tmp_path))
  a, b = nnx.state(ours, nnx.Param), nnx.state(again, nnx.Param)
  assert all(np.array_equal(x, y) for x, y in zip(jax_leaves(a), jax_leaves(b)))


def jax_leaves(state):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_lora_merged_export_equals_lora_model(tiny_llava_dir, tmp_path):
  model = hf.load_lvlm(tiny_llava_dir)
  paths = apply_lora(model, LoraConfig(rank=4, alpha=8, target=r"llm\.layers\.\d+\..*_proj"),
                     rngs=nnx.Rngs(0))
  assert len(paths) == 2 * 7
  rng = np.random.default_rng(5)
  for _, lora_b in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    lora_b.set_value(jnp.asarray(rng.normal(0, 0.05, lora_b.get_value().shape), jnp.float32))
  ids = jnp.asarray([sequence(rng, 1)], jnp.int32)
  images = jnp.asarray(rng.normal(size=(1, 1, 28, 28, 3)), jnp.float32)
  with lora_disabled(model):
    base_logits, _ = forward(model, ids, pixel_values=images)
  lora_logits, _ = forward(model, ids, pixel_values=images)
  assert np.abs(np.asarray(lora_logits - base_logits)).max() > 1e-2  # the adapters matter
  hf.save_hf(model, str(tmp_path))
  merged = hf.load_lvlm(str(tmp_path))
  merged_logits, _ = forward(merged, ids, pixel_values=images)
  np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(lora_logits), atol=TOL, rtol=0)
  reference = hf.load_lvlm(tiny_llava_dir)
  exact_base, _ = forward(reference, ids, pixel_values=images)
  np.testing.assert_array_equal(np.asarray(base_logits), np.asarray(exact_base))


def test_sharded_index_export(tiny_llama_dir, tmp_path):
  model = hf.load_llm(tiny_llama_dir)
  hf.save_hf(model, str(tmp_path), max_shard_bytes=40_000)
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  ids = np.asarray([[5, 9, 20, 33]], np.int32)
  with torch.no_grad():
    expected = reloaded(input_ids=torch.tensor(ids)).logits.numpy()
  logits, _ = forward(hf.load_llm(str(tmp_path)), jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=0)


def test_pickled_checkpoint_refused_unless_opted_in(tiny_llama_dir, tmp_path):
  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(open(os.path.join(tiny_llama_dir, "config.json")).read())
  with pytest.raises(UserError, match="pickle"):
    hf.load_llm(str(tmp_path))
  loaded = hf.load_llm(str(tmp_path), allow_pickle=True)
  ids = jnp.asarray([[5, 9, 20]], jnp.int32)
  np.testing.assert_allclose(np.asarray(forward(loaded, ids)[0]), np.asarray(forward(hf.load_llm(tiny_llama_dir), ids)[0]),
                             atol=1e-6)


def test_shape_mismatch_names_the_tensor(tiny_llama_dir, tmp_path):
  config = json.load(open(os.path.join(tiny_llama_dir, "config.json")))
  config["intermediate_size"] = 80
  (tmp_path / "config.json").write_text(json.dumps(config))
  os.symlink(os.path.join(tiny_llama_dir, "model.safetensors"), tmp_path / "model.safetensors")
  with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape .* expects"):
    hf.load_llm(str(tmp_path))


def test_llava_mistral_sliding_window_logits_and_export(tmp_path):
  """Window 8 on 27-token sequences (one image): logits and the export as transformers'."""
  torch.manual_seed(6)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**TINY_CLIP_VISION),
      text_config=transformers.MistralConfig(**{**TINY_LLAMA, "sliding_window": 8}),
      image_token_id=IMAGE_TOKEN)
  directory = save_tiny(transformers.LlavaForConditionalGeneration(config), tmp_path / "hf")
  ours = hf.load_lvlm(directory)
  assert ours.config.text.sliding_window == 8
  rng = np.random.default_rng(7)
  ids = np.asarray([sequence(rng, 1, text_len=8)], np.int32)
  assert ids.shape[1] == 27
  mask = np.ones_like(ids)
  images = rng.normal(size=(1, 1, 28, 28, 3)).astype(np.float32)
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                      pixel_values=jnp.asarray(images))
  ref = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
  expected = torch_llava_logits(ref, ids, mask, images[:, 0])
  np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=0)
  hf.save_hf(ours, str(tmp_path / "export"))
  text = json.load(open(tmp_path / "export" / "config.json"))["text_config"]
  assert (text["sliding_window"], text["max_position_embeddings"]) == (8, 128)
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "export"))
  assert reloaded.config.text_config.sliding_window == 8
  np.testing.assert_allclose(torch_llava_logits(reloaded.eval(), ids, mask, images[:, 0]),
                             expected, atol=TOL, rtol=0)


def test_tied_embeddings_set_only_at_the_top_level(tmp_path):
  """transformers ties LLaVA's lm_head on the top-level flag; the text config says untied."""
  torch.manual_seed(8)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**TINY_CLIP_VISION),
      text_config=transformers.LlamaConfig(**TINY_LLAMA), image_token_id=IMAGE_TOKEN,
      tie_word_embeddings=True)
  directory = save_tiny(transformers.LlavaForConditionalGeneration(config), tmp_path)
  written = json.load(open(os.path.join(directory, "config.json")))
  assert written["tie_word_embeddings"] and not written["text_config"]["tie_word_embeddings"]
  ours = hf.load_lvlm(directory)
  assert ours.config.text.tie_word_embeddings and ours.llm.lm_head is None
  rng = np.random.default_rng(9)
  ids = np.asarray([sequence(rng, 1)], np.int32)
  mask = np.ones_like(ids)
  images = rng.normal(size=(1, 1, 28, 28, 3)).astype(np.float32)
  logits, _ = forward(ours, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                      pixel_values=jnp.asarray(images))
  ref = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
  np.testing.assert_allclose(np.asarray(logits), torch_llava_logits(ref, ids, mask, images[:, 0]),
                             atol=TOL, rtol=0)


@pytest.mark.parametrize("section,config,message", [
    ("vision_config", transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, image_size=28,
                                                             patch_size=7),
     "vision_config.model_type 'dinov2_with_registers' is not supported; supported: "
     "clip_vision_model, siglip_vision_model, dinov2"),
    ("text_config", transformers.GemmaConfig(vocab_size=128, hidden_size=64,
                                             intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2),
     "text_config.model_type 'gemma' is not a supported LLM; supported: llama, mistral, qwen2"),
])
def test_unsupported_llava_parts_are_refused_by_model_type(tmp_path, section, config, message):
  parts = {"vision_config": transformers.CLIPVisionConfig(**TINY_CLIP_VISION),
           "text_config": transformers.LlamaConfig(**TINY_LLAMA), section: config}
  transformers.LlavaConfig(**parts, image_token_id=IMAGE_TOKEN).save_pretrained(str(tmp_path))
  with pytest.raises(UserError) as error:
    hf.load_lvlm(str(tmp_path))
  assert str(error.value) == f"{tmp_path}/config.json: {message}"


def test_unused_checkpoint_tensors_are_an_error_unless_known_or_allowed(tmp_path):
  """A 3-layer checkpoint under a 2-layer config is refused, naming the extra tensors; rotary
  buffers old checkpoints carry load silently; allow_unused opts out."""
  torch.manual_seed(10)
  deep = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA,
                                                                   "num_hidden_layers": 3}))
  directory = save_tiny(deep, tmp_path / "deep")
  config = json.load(open(os.path.join(directory, "config.json")))
  config["num_hidden_layers"] = 2
  json.dump(config, open(os.path.join(directory, "config.json"), "w"))
  with pytest.raises(UserError) as error:
    hf.load_llm(directory)
  assert str(error.value).startswith(
      f"{directory}: 9 checkpoint tensors are not used by the model its config.json describes "
      "(model.layers.2.input_layernorm.weight, model.layers.2.mlp.down_proj.weight, "
      "model.layers.2.mlp.gate_proj.weight, ...)")
  shallow = hf.load_llm(directory, allow_unused=r"model\.layers\.2\..*")
  assert shallow.config.num_layers == 2
  tensors = {k: v.numpy() for k, v in deep.state_dict().items() if ".layers.2." not in k}
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  os.makedirs(tmp_path / "old")
  save_file(tensors, str(tmp_path / "old" / "model.safetensors"))
  json.dump(config, open(tmp_path / "old" / "config.json", "w"))
  old = hf.load_llm(str(tmp_path / "old"))
  ids = jnp.asarray([[5, 9, 20]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(forward(old, ids)[0]),
                                np.asarray(forward(shallow, ids)[0]))
