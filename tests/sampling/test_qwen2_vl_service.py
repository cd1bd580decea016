"""Qwen2-VL through the data pipeline and the generation service: prompts as transformers'
Qwen2VLProcessor builds them, greedy answers as its generate gives them, training batches."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import transformers

from conftest import QWEN2_VL_PIXELS
from lvlm_jax.data import text
from lvlm_jax.data.pipeline import Collate, DataConfig, Preprocess, patch_slots
from lvlm_jax.models import hf
from lvlm_jax.sampling.decode import SamplingConfig
from lvlm_jax.sampling.service import Prompt, prompt_ids

MIN_PIXELS, MAX_PIXELS = QWEN2_VL_PIXELS
SIZES = [(50, 90), (100, 60), (60, 60)]  # 2 x 3, 4 x 2 and 2 x 2 merged tokens


def image_processor():
  return transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def qwen_dir(tiny_qwen2_vl_dir):
  ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2_vl_dir).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_vl_dir)
  return tiny_qwen2_vl_dir, ref, tokenizer, hf.load_lvlm(tiny_qwen2_vl_dir)


def _images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _processor_inputs(tokenizer, texts, images):
  """What transformers' Qwen2VLProcessor returns for texts with one <|image_pad|> per image:
  each expanded to its image's grid.prod() / 4 copies (`replace_image_token`), tokenized,
  left-padded. (The processor itself cannot be built here: it needs the video processor,
  which needs torchvision.)"""
  pixels = image_processor()(images, return_tensors="pt")
  counts = iter((pixels["image_grid_thw"].prod(-1) // 4).tolist())
  expanded = []
  for row in texts:
    pieces = row.split("<|image_pad|>")
    expanded.append(pieces[0] + "".join("<|image_pad|>" * next(counts) + p for p in pieces[1:]))
  tokenizer = copy.deepcopy(tokenizer)  # padding sets state that the pipeline's use refuses
  tokenizer.padding_side = "left"
  inputs = dict(tokenizer(expanded, padding=True, return_tensors="pt"))
  image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
  return {**inputs, **pixels, "mm_token_type_ids": (inputs["input_ids"] == image_id).long()}


QUESTIONS = [("Compare the two images.", 2), ("What is in the picture?", 1)]


def _prompts():
  images = _images()
  return [Prompt.question(QUESTIONS[0][0], images[:2]), Prompt.question(QUESTIONS[1][0], images[2:])]


def _rendered(data, tokenizer):
  """Each prompt's text with one <|image_pad|> per image, as Qwen2VLProcessor takes it."""
  return [text.render(data.place_images([{"from": "human", "value": q}], n), tokenizer, "chatml",
                      add_generation_prompt=True).text for q, n in QUESTIONS]


def test_prompts_match_transformers_processor(qwen_dir):
  directory, _, tokenizer, model = qwen_dir
  data = DataConfig(template="chatml").for_model(model, directory)
  assert (data.qwen2_vl.min_pixels, data.qwen2_vl.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
  assert data.image_token == "<|image_pad|>"
  rendered = _rendered(data, tokenizer)
  assert rendered[0].count("<|vision_start|><|image_pad|><|vision_end|>") == 2
  images = _images()
  for prompt, row, row_images in zip(_prompts(), rendered, (images[:2], images[2:])):
    expected = _processor_inputs(tokenizer, [row], row_images)["input_ids"][0].numpy()
    np.testing.assert_array_equal(prompt_ids(prompt, tokenizer, data), expected)
  # Markup already in the text is kept, not doubled; LLaVA's <image> placeholders become it.
  marked = "<|vision_start|><|image_pad|><|vision_end|>Compare the two images."
  assert data.place_images([{"from": "human", "value": marked}], 1)[0]["value"] == marked
  llava = [{"from": "human", "value": "<image>\nCompare the two images."}]
  assert data.place_images(llava, 1)[0]["value"] == marked.replace("<|vision_end|>",
                                                                   "<|vision_end|>\n")


def test_service_greedy_answers_match_transformers_generate(qwen_dir):
  from lvlm_jax.generate import generation_service
  directory, ref, tokenizer, model = qwen_dir
  service = generation_service(directory, model, template="chatml", batch_size=2)
  new = 8
  out = service.generate(_prompts(), SamplingConfig(max_new_tokens=new, min_new_tokens=new))
  inputs = _processor_inputs(tokenizer, _rendered(service.data, tokenizer), _images())
  with torch.no_grad():
    expected = ref.generate(**inputs, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                            pad_token_id=0)
  np.testing.assert_array_equal(np.stack([c.token_ids for c in out]),
                                expected[:, inputs["input_ids"].shape[1]:].numpy())


def test_training_batches_hold_patches_and_grids(qwen_dir):
  directory, _, tokenizer, model = qwen_dir
  data = DataConfig(template="chatml", max_images=2, length_buckets=(64, 128)).for_model(
      model, directory)
  images = _images()
  records = [{"id": 0, "images": images[:2], "conversations": [
                 {"from": "human", "value": "Compare the two images."},
                 {"from": "gpt", "value": "A red circle."}]},
             {"id": 1, "images": images[2:], "conversations": [
                 {"from": "human", "value": "What is in the picture?"},
                 {"from": "gpt", "value": "A blue square."}]}]
  preprocess = Preprocess(records, tokenizer, data)
  batch = Collate(data, 0)([preprocess(0), preprocess(1)])
  expected = image_processor()(images, return_tensors="np")
  grids = expected["image_grid_thw"]
  np.testing.assert_array_equal(batch["patch_grids"], [grids[:2], [grids[2], [0, 0, 0]]])
  first = grids[0].prod() + grids[1].prod()
  assert batch["pixel_values"].shape == (2, patch_slots(first), expected["pixel_values"].shape[1])
  np.testing.assert_allclose(batch["pixel_values"][0, :first], expected["pixel_values"][:first],
                             rtol=0, atol=1e-5)
  image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
  assert [(row == image_id).sum() for row in batch["input_ids"]] == [6 + 8, 4]
  # The same tokens as transformers' processor makes of the rendered conversations, and the
  # training log-probs of the batch (M-RoPE included) as its model gives them.
  from lvlm_jax.training.losses import token_logprobs
  rendered = [text.render(data.place_images(r["conversations"], len(r["images"])), tokenizer,
                          "chatml").text for r in records]
  inputs = _processor_inputs(tokenizer, rendered, images)
  real = inputs["attention_mask"].numpy().astype(bool)
  width = real.shape[1]
  # The batch is right-padded, transformers' inputs left-padded: compare each row's tokens.
  for ours, theirs, keep in zip(batch["input_ids"], inputs["input_ids"].numpy(), real):
    np.testing.assert_array_equal(ours[:keep.sum()], theirs[keep])
  assert not batch["attention_mask"][:, width:].any()
  with torch.no_grad():
    logits = qwen_dir[1](**inputs).logits
  logp = torch.log_softmax(logits, -1).numpy()
  expected = np.take_along_axis(logp[:, :-1], inputs["input_ids"].numpy()[:, 1:, None], -1)[..., 0]
  ours = np.asarray(token_logprobs(model, batch))
  for row, (theirs, keep) in enumerate(zip(expected, real[:, 1:] & real[:, :-1])):
    n = keep.sum()  # log-probs of tokens 1..n of the row
    np.testing.assert_allclose(ours[row, 1:n + 1], theirs[keep], atol=1e-4, rtol=0)


def test_export_writes_the_image_processor_transformers_and_we_read_back(qwen_dir, tmp_path):
  from lvlm_jax.data.qwen2_vl_images import Qwen2VLImageProcessing
  from lvlm_jax.training.checkpoint import export_hf
  directory, _, tokenizer, model = qwen_dir
  data = DataConfig(template="chatml").for_model(model, directory)
  smaller = dataclasses.replace(data.qwen2_vl, max_pixels=28 * 28 * 8)
  data = dataclasses.replace(data, qwen2_vl=smaller)
  export_hf(model, str(tmp_path), tokenizer=tokenizer, data=data)
  theirs = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
  images = _images()
  expected = theirs(images, return_tensors="np")
  ours = Qwen2VLImageProcessing.for_model(str(tmp_path), model.config.vision)
  assert ours == data.qwen2_vl
  processed = [ours(image) for image in images]
  np.testing.assert_array_equal([g for _, g in processed], expected["image_grid_thw"])
  np.testing.assert_allclose(np.concatenate([p for p, _ in processed]), expected["pixel_values"],
                             rtol=0, atol=1e-5)
