"""AnyRes preprocessing and batches against transformers' LLaVA-NeXT processor and model."""

import numpy as np
import torch
import transformers

from conftest import (ANYRES_SIZES, TINY_PINPOINTS, anyres_images, bpe_tokenizer, forward,
                      llava_next_image_processor, tiny_llava_next)
from lvlm_jax.data import text
from lvlm_jax.data.anyres import AnyResProcessing
from lvlm_jax.data.images import ImageProcessing
from lvlm_jax.data.pipeline import DataConfig, make_dataset
from lvlm_jax.models import hf
from lvlm_jax.models.llava_next import AnyResImages, batch_images, select_best_resolution


def _processing():
  return AnyResProcessing(tile=ImageProcessing(size=28),
                          pinpoints=tuple(map(tuple, TINY_PINPOINTS)), patch_size=7, tile_tokens=16)


def test_views_match_transformers_image_processor():
  want = llava_next_image_processor()(anyres_images(), return_tensors="np")
  assert want["image_sizes"].tolist() == [list(s) for s in ANYRES_SIZES]
  ours = [_processing()(image) for image in anyres_images()]
  assert [grid for _, grid in ours] == [(1, 2), (2, 1), (2, 2)]
  for (views, grid), pixels in zip(ours, want["pixel_values"]):
    used = 1 + grid[0] * grid[1]
    np.testing.assert_allclose(views[:used], pixels[:used].transpose(0, 2, 3, 1), atol=1e-5)
    assert views.shape[0] == 5


def test_select_best_resolution_is_transformers():
  from transformers.image_processing_utils import select_best_resolution as theirs
  rng = np.random.default_rng(0)
  pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
  for h, w in rng.integers(1, 2000, (300, 2)):
    assert select_best_resolution(int(h), int(w), pinpoints) == theirs((h, w), list(pinpoints))


def test_tokenize_expands_each_image_to_its_own_count():
  tokenizer = bpe_tokenizer()
  turns = [{"from": "human", "value": "<image>\n<image>\nWhat differs?"},
           {"from": "gpt", "value": "the red one"}]
  ids, mask = text.tokenize_conversation(turns, tokenizer, tokens_per_image=[3, 5])
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  runs = np.diff(np.flatnonzero(np.diff(np.r_[0, ids == image_id, 0])))[::2]
  assert runs.tolist() == [3, 5] and not mask[ids == image_id].any()


def test_a_batch_of_mixed_image_sizes_gives_transformers_logits(tmp_path):
  """Records with images of three sizes through the pipeline (tiles, per-image token counts, a
  length bucket) -> LlavaNext logits equal transformers' on its own processor's pixels."""
  tokenizer = bpe_tokenizer()
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  directory = tiny_llava_next(tmp_path, image_id, vocab_size=len(tokenizer),
                              max_position_embeddings=256)
  ref = transformers.LlavaNextForConditionalGeneration.from_pretrained(directory).eval()
  model = hf.load_lvlm(directory)
  images = anyres_images()
  answer = {"from": "gpt", "value": "the red one"}
  records = [
      {"conversations": [{"from": "human", "value": "<image>\n<image>\nWhat differs?"}, answer],
       "images": images[:2]},
      {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, answer],
       "images": images[2:]}]
  data = DataConfig(batch_size=2, length_buckets=(64, 256), max_images=2, shuffle=False,
                    num_epochs=1, anyres=AnyResProcessing.for_config(model.config,
                                                                    ImageProcessing(size=28)))
  batch = next(iter(make_dataset(records, tokenizer, data)))
  assert batch["input_ids"].shape == (2, 256)
  assert batch["pixel_values"].shape == (2, 2, 5, 28, 28, 3)
  assert batch["image_grids"].tolist() == [[[1, 2], [2, 1]], [[2, 2], [0, 0]]]
  processor = transformers.LlavaNextProcessor(
      image_processor=llava_next_image_processor(), tokenizer=tokenizer, patch_size=7,
      vision_feature_select_strategy="default", num_additional_image_tokens=1)
  theirs = processor(images=images, text=["<image><image>", "<image>"], padding=True,
                     return_tensors="pt")
  for row, want in zip(batch["input_ids"], theirs["input_ids"].numpy()):
    assert (row == image_id).sum() == (want == image_id).sum()
  mask = batch["attention_mask"]
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(mask),
                   pixel_values=theirs["pixel_values"],
                   image_sizes=theirs["image_sizes"]).logits.numpy()
  images = batch_images(batch)  # uint8 pixels, normalised as the training step does
  assert isinstance(images, AnyResImages)
  logits, _ = forward(model, batch["input_ids"], batch["positions"], mask, images)
  real = mask.astype(bool)
  diff = np.abs(np.asarray(logits)[real] - expected[real]).max()
  assert diff <= 1e-4 * np.abs(expected[real]).max(), diff


def test_onevision_token_counts_are_transformers_processor_at_its_real_geometry():
  """LLaVA-OneVision's 384 px SigLIP tiles (27 x 27 patches), its 36 default pinpoints and the
  anyres_max_9 cap: our counts equal the processor's own for random and square image sizes."""
  from lvlm_jax.models.llava_next import ONEVISION_PINPOINTS, feature_grid
  processor = object.__new__(transformers.LlavaOnevisionProcessor)  # its video processor needs
  processor.num_image_tokens, processor.vision_aspect_ratio = 729, "anyres_max_9"  # torchvision
  processor.image_processor = transformers.LlavaOnevisionImageProcessorPil()
  ours = AnyResProcessing(tile=ImageProcessing(size=384), pinpoints=ONEVISION_PINPOINTS,
                          patch_size=14, tile_tokens=729, max_feature_tiles=9)
  rng = np.random.default_rng(1)
  sizes = [tuple(map(int, hw)) for hw in rng.integers(1, 3000, (300, 2))]
  sizes += [(s, s) for s in range(100, 3000, 97)]
  capped = 0
  for h, w in sizes:
    assert ours.image_tokens(h, w) == processor._get_number_of_features(h, w, 384, 384), (h, w)
    capped += ours.feature_grid(h, w) != feature_grid(h, w, ours.grid(h, w), 27)
  assert capped > 100  # most of these sizes are shrunk by the cap
