"""The generation service against transformers and against itself: two-image and text-only greedy
generation equal `generate`; per-token log-probs equal teacher-forced ones; a branched and
extended prefix equals a fresh prefill of the same text; 8 devices give the 1-device tokens."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conftest import (ONEVISION_SIZES, TINY_CLIP_VISION, TINY_PINPOINTS, anyres_images,
                      bpe_tokenizer, llava_next_image_processor, onevision_image_processor,
                      save_tiny, tiny_llava_next, tiny_llava_onevision)
from lvlm_jax.data.images import ImageProcessing
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.models import hf
from lvlm_jax.sampling.decode import SamplingConfig, generate
from lvlm_jax.sampling.service import DECODE_RULES, GenerationService, Prompt
from lvlm_jax.sharding import logical_to_spec, make_mesh
from lvlm_jax.training.losses import token_logprobs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEW = 12
SENTENCES = ["Image 1: Image 2: What differs between the two images?",
             "Describe the image. A red circle is left of a blue square.",
             "Where is the green one? The green triangle is at the top."]


@pytest.fixture(scope="module")
def tokenizer():
  return bpe_tokenizer(sentences=SENTENCES + ["USER: ASSISTANT: A chat between a user."])


def llama_config(tokenizer):
  return transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def llava(tokenizer, tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**TINY_CLIP_VISION),
      text_config=llama_config(tokenizer),
      image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
      vision_feature_select_strategy="default")
  directory = save_tiny(transformers.LlavaForConditionalGeneration(config),
                        tmp_path_factory.mktemp("llava"))
  return (hf.load_lvlm(directory),
          transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval())


@pytest.fixture(scope="module")
def llama(tokenizer, tmp_path_factory):
  torch.manual_seed(1)
  directory = save_tiny(transformers.LlamaForCausalLM(llama_config(tokenizer)),
                        tmp_path_factory.mktemp("llama"))
  return hf.load_llm(directory), transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def data_config(tokens_per_image=16):
  return DataConfig(template="vicuna_v1", tokens_per_image=tokens_per_image,
                    image=ImageProcessing(size=28))


def images(seed, n):
  rng = np.random.default_rng(seed)
  return tuple(rng.integers(0, 256, (20 + 6 * i, 28, 3), dtype=np.uint8) for i in range(n))


def greedy(tokenizer):
  return SamplingConfig(max_new_tokens=NEW, eos_token_ids=(tokenizer.eos_token_id,),
                        pad_token_id=tokenizer.pad_token_id)


def hf_greedy(model, ids, pixels=None):
  extra = {}
  if pixels is not None:
    extra["pixel_values"] = torch.tensor(np.stack(pixels).transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(ids[None], dtype=torch.long),
                         attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW, **extra)
  return out[0, len(ids):].numpy()


def check_against_transformers(service, prompts, reference, tokenizer):
  completions = service.generate(prompts, greedy(tokenizer))
  for prompt, completion in zip(prompts, completions):
    ids = service.prompt_ids(prompt)
    pixels = [service.data.image(i) for i in prompt.images] or None
    expected = hf_greedy(reference, ids, pixels)
    np.testing.assert_array_equal(completion.token_ids, expected[:len(completion.token_ids)])
    if not completion.stopped:
      assert len(completion.token_ids) == NEW
  return completions


def test_two_images_per_prompt_equal_transformers(llava, tokenizer):
  model, reference = llava
  service = GenerationService(model, tokenizer, data_config(), make_mesh(), batch_size=4)
  prompts = [Prompt.question("Image 1: <image>\nImage 2: <image>\nWhat differs?", images(0, 2)),
             Prompt.question("Describe the image.", images(1, 1)),  # fewer images than slots
             Prompt.question("Image 1: <image>\nImage 2: <image>\nWhere is the green one?",
                             images(2, 2))]
  completions = check_against_transformers(service, prompts, reference, tokenizer)
  assert len(completions) == 3 and all(isinstance(c.text, str) for c in completions)


def test_text_only_llm_equals_transformers(llama, tokenizer):
  model, reference = llama
  service = GenerationService(model, tokenizer, data_config(), make_mesh(), batch_size=2)
  prompts = [Prompt.question(s) for s in SENTENCES]  # two batches, the second padded
  check_against_transformers(service, prompts, reference, tokenizer)
  with pytest.raises(Exception, match="text-only"):
    service.prompt_ids(Prompt.question("<image>\nA?", images(0, 1)))


def test_logprobs_equal_teacher_forced(llava, tokenizer):
  model, _ = llava
  service = GenerationService(model, tokenizer, data_config(), make_mesh(), batch_size=2)
  prompt = Prompt.question("Image 1: <image>\nImage 2: <image>\nWhat differs?", images(3, 2))
  sampling = dataclasses.replace(greedy(tokenizer), do_sample=True, temperature=0.7, top_k=20)
  completion = service.generate([prompt], sampling, jax.random.key(3))[0]
  ids = np.concatenate([service.prompt_ids(prompt), completion.token_ids])[None].astype(np.int32)
  pixels = np.stack([service.data.image(i) for i in prompt.images])[None]
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids),
           "pixel_values": jnp.asarray(pixels)}
  forced = nnx.jit(token_logprobs)(model, batch)[0, -len(completion.token_ids):]
  np.testing.assert_allclose(completion.logprobs, np.asarray(forced), rtol=1e-5, atol=1e-5)


def test_a_branched_extended_prefix_equals_a_fresh_prefill(llava, tokenizer):
  """One prompt (its two images encoded once), branched into 3 rows, each extended by its own
  text (one by nothing): the logits and greedy continuations equal fresh prefills of prompt +
  text."""
  model, _ = llava
  service = GenerationService(model, tokenizer, data_config(), make_mesh(), batch_size=2)
  prompt = Prompt.question("Image 1: <image>\nImage 2: <image>\nDescribe them.", images(4, 2))
  extensions = [tokenizer.encode(t, add_special_tokens=False) for t in
                (" A red circle.", "", " The green triangle is at the top and")]
  prefix, _ = service.start([prompt], room=40 + NEW)
  prefix = service.branch(prefix, 3)  # rows 0..2 continue prompt 0; 3..5 the padding row
  extended = service.extend(prefix, extensions + [[]] * 3)
  completions = service.complete(extended, 3, greedy(tokenizer))
  pixels = np.stack([service.data.image(i) for i in prompt.images])[None]
  for extension, completion, logits in zip(extensions, completions, np.asarray(extended.logits)):
    ids = np.concatenate([service.prompt_ids(prompt), extension]).astype(np.int32)[None]
    fresh = generate(model, ids, config=greedy(tokenizer), pixel_values=pixels)
    np.testing.assert_array_equal(completion.token_ids,
                                  np.asarray(fresh.tokens[0, :fresh.lengths[0]]))
    full, _ = nnx.jit(lambda m, i, p: m(i, pixel_values=p))(model, jnp.asarray(ids),
                                                            jnp.asarray(pixels))
    np.testing.assert_allclose(logits, np.asarray(full[0, -1]), rtol=1e-4, atol=1e-4)


EIGHT_DEVICES = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_service import data_config, greedy, images, tokenizer_for_subprocess
from lvlm_jax.models import hf
from lvlm_jax.sampling.service import DECODE_RULES, GenerationService, Prompt
from lvlm_jax.sharding import logical_to_spec, make_mesh
import jax
tokenizer = tokenizer_for_subprocess()
model = hf.load_lvlm(sys.argv[2])
mesh = make_mesh((len(jax.devices()), 1, 1))
service = GenerationService(model, tokenizer, data_config(), mesh, batch_size=8)
prompts = [Prompt.question("Image 1: <image>\nImage 2: <image>\nWhat differs?", images(i, 2))
           for i in range(5)]
print(json.dumps([c.token_ids.tolist() for c in service.generate(prompts, greedy(tokenizer))]))
"""


def tokenizer_for_subprocess():
  return bpe_tokenizer(sentences=SENTENCES + ["USER: ASSISTANT: A chat between a user."])


def test_eight_devices_give_the_one_device_tokens(llava, tokenizer, tmp_path):
  model, reference = llava
  directory = str(tmp_path / "llava")
  reference.save_pretrained(directory)
  service = GenerationService(model, tokenizer, data_config(), make_mesh(), batch_size=8)
  prompts = [Prompt.question("Image 1: <image>\nImage 2: <image>\nWhat differs?", images(i, 2))
             for i in range(5)]
  one = [c.token_ids.tolist() for c in service.generate(prompts, greedy(tokenizer))]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, os.path.dirname(__file__),
                         directory], env=env, capture_output=True, text=True, timeout=300,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == one


def test_bfloat16_decoding_weights(llama, tokenizer):
  """weights_dtype casts what decoding reads (half the bytes per step), and the weights are laid
  out whole per replica (no FSDP split), while the model stays as it was."""
  model, _ = llama
  service = GenerationService(model, tokenizer, data_config(), make_mesh(), batch_size=2,
                              weights_dtype="bfloat16")
  floats = [x for x in jax.tree.leaves(service.state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.bfloat16 for x in floats)
  # On a data 1 x fsdp 4 x tensor 2 mesh a [embed, mlp] kernel trains split over fsdp and tensor;
  # decoding keeps it whole over fsdp.
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2})
  spec = lambda rules: logical_to_spec(("embed", "mlp"), (64, 96), mesh, rules)
  assert spec(None) == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert spec(DECODE_RULES) == jax.sharding.PartitionSpec(None, "tensor")
  assert nnx.state(model, nnx.Param)["lm_head"]["kernel"][...].dtype == jnp.float32
  completion = service.generate([Prompt.question(SENTENCES[0])], greedy(tokenizer))[0]
  assert len(completion.token_ids) > 0 and np.all(np.isfinite(completion.logprobs))


@pytest.fixture(scope="module")
def llava_next(tokenizer, tmp_path_factory):
  """A tiny LLaVA-NeXT HF directory with the tokenizer (no preprocessor config: the tower's CLIP
  normalisation, as transformers' LlavaNextImageProcessor defaults)."""
  directory = tiny_llava_next(tmp_path_factory.mktemp("llava_next"),
                              tokenizer.convert_tokens_to_ids("<image>"),
                              vocab_size=len(tokenizer), max_position_embeddings=256,
                              bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
  tokenizer.save_pretrained(directory)
  return (directory, hf.load_model(directory),
          transformers.LlavaNextForConditionalGeneration.from_pretrained(directory).eval())


def hf_next_greedy(model, ids, images):
  """transformers' greedy continuation of one unpadded prompt with its LLaVA-NeXT images."""
  pixels = llava_next_image_processor()(list(images), return_tensors="pt")
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(ids[None], dtype=torch.long),
                         attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                         pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                         do_sample=False, max_new_tokens=NEW)
  return out[0, len(ids):].numpy()


def test_llava_next_images_of_different_sizes_equal_transformers(llava_next, tokenizer):
  """The generate CLI's service for a LLaVA-NeXT export: AnyRes from the model's pinpoints, each
  image's token count from its size; a left-padded batch of a wide + tall image pair and a
  square-ish image greedily decodes as transformers' generate of each prompt alone, and a
  started, branched, extended prefix as transformers' generate of prompt + extension."""
  from lvlm_jax.generate import generation_service
  directory, model, reference = llava_next
  service = generation_service(directory, model, "vicuna_v1", system="A chat.", batch_size=2,
                               pad_to=16)
  assert service.data.anyres is not None
  assert service.data.anyres.pinpoints == tuple(map(tuple, TINY_PINPOINTS))
  wide, tall, square = anyres_images()
  prompts = [Prompt.question("Image 1: <image>\nImage 2: <image>\nWhat differs?", (wide, tall)),
             Prompt.question("Describe the image.", (square,))]
  completions = service.generate(prompts, greedy(tokenizer))
  counts = [model.config.image_tokens(*i.shape[:2]) for i in (wide, tall, square)]
  image_id = model.config.image_token_id
  for prompt, completion, count in zip(prompts, completions, (counts[0] + counts[1], counts[2])):
    ids = service.prompt_ids(prompt)
    assert (ids == image_id).sum() == count
    expected = hf_next_greedy(reference, ids, prompt.images)
    np.testing.assert_array_equal(completion.token_ids, expected[:len(completion.token_ids)])
    assert completion.stopped or len(completion.token_ids) == NEW

  extensions = [tokenizer.encode(t, add_special_tokens=False)
                for t in (" A red circle.", " The green one is")]
  prefix, rows = service.start(prompts[:1], room=20 + NEW)
  extended = service.extend(service.branch(prefix, 2), extensions + [[]] * 2)
  for extension, completion in zip(extensions, service.complete(extended, 2, greedy(tokenizer))):
    ids = np.concatenate([service.prompt_ids(prompts[0]), extension])
    expected = hf_next_greedy(reference, ids, prompts[0].images)
    np.testing.assert_array_equal(completion.token_ids, expected[:len(completion.token_ids)])


@pytest.fixture(scope="module")
def llava_onevision(tokenizer, tmp_path_factory):
  """A tiny LLaVA-OneVision HF directory with the tokenizer and its image processor's config."""
  directory = tiny_llava_onevision(tmp_path_factory.mktemp("llava_onevision"),
                                   tokenizer.convert_tokens_to_ids("<image>"),
                                   vocab_size=len(tokenizer), max_position_embeddings=512,
                                   bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
  tokenizer.save_pretrained(directory)
  return (directory, hf.load_model(directory),
          transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(directory).eval())


def test_llava_onevision_capped_whole_and_untiled_images_equal_transformers(llava_onevision,
                                                                           tokenizer):
  """The generate CLI's service for a LLaVA-OneVision export: a lone capped image (14 x 16
  features shrunk to 11 x 12), a row of it beside a small one (both untiled, as transformers'
  batch_num_images) and the small one alone (whole), in left-padded batches, greedily decode as
  transformers' generate of each prompt alone with its processor's pixels."""
  from lvlm_jax.generate import generation_service
  directory, model, reference = llava_onevision
  service = generation_service(directory, model, "vicuna_v1", system="A chat.", batch_size=2,
                               pad_to=16)
  assert service.data.anyres is not None and service.data.anyres.max_feature_tiles == 9
  rng = np.random.default_rng(5)
  capped, whole = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ONEVISION_SIZES)
  prompts = [Prompt.question("Describe the image.", (capped,)),
             Prompt.question("Image 1: <image>\nImage 2: <image>\nWhat differs?", (capped, whole)),
             Prompt.question("Describe the image.", (whole,))]
  counts = [16 + 11 * 13, 2 * (16 + 1), 16 + 4 * 9]
  processor = onevision_image_processor()
  for prompt, completion, count in zip(prompts, service.generate(prompts, greedy(tokenizer)),
                                       counts):
    ids = service.prompt_ids(prompt)
    assert (ids == model.config.image_token_id).sum() == count
    pixels = processor([list(prompt.images)], return_tensors="pt")
    with torch.no_grad():
      out = reference.generate(input_ids=torch.tensor(ids[None], dtype=torch.long),
                               attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                               pixel_values=pixels["pixel_values"],
                               image_sizes=pixels["image_sizes"],
                               batch_num_images=pixels["batch_num_images"], do_sample=False,
                               max_new_tokens=NEW)
    expected = out[0, len(ids):].numpy()
    np.testing.assert_array_equal(completion.token_ids, expected[:len(completion.token_ids)])
    assert completion.stopped or len(completion.token_ids) == NEW
