"""The CLIP scorer against transformers' CLIPModel.logits_per_image on a tiny random CLIP: the
same tokenizer, image processor and weights, through an HF folder."""

import numpy as np
import pytest
import torch
import transformers

from lvlm_jax.data.shapes_tokenizer import shapes_clip_tokenizer
from lvlm_jax.eval.clip_score import CLIPScorer

TEXTS = ["A large red circle is on the left.", "There are two objects in the image.",
         "A small blue square is at the top right. The red circle is to the left of it.",
         "green triangle"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip"))
  tokenizer = shapes_clip_tokenizer()
  text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=12,
              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
              pad_token_id=tokenizer.pad_token_id)
  vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                image_size=28, patch_size=14)
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                         projection_dim=16))
  with torch.no_grad():
    model.logit_scale.fill_(1.7)
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  transformers.CLIPImageProcessor(size={"shortest_edge": 28},
                                  crop_size={"height": 28, "width": 28}).save_pretrained(directory)
  return directory


def _images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(2)]


def test_scores_equal_logits_per_image(clip_dir):
  images, index = _images(), [0, 1, 1, 0]
  scorer = CLIPScorer.load(clip_dir, batch_size=3)  # 4 texts: two batches, the last padded
  ours = scorer.scores(images, index, TEXTS)
  model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
  processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(clip_dir)
  encoded = tokenizer(TEXTS, truncation=True, max_length=12, padding=True, return_tensors="pt")
  assert (encoded["input_ids"][:, -1] != tokenizer.pad_token_id).any()  # truncation happened
  with torch.no_grad():
    logits = model(pixel_values=processor(images, return_tensors="pt")["pixel_values"],
                   **encoded).logits_per_image.numpy()
  expected = logits[index, np.arange(len(TEXTS))]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  assert np.ptp(ours) > 0.1  # the texts score differently

  clamped = CLIPScorer.load(clip_dir, clamp=True, batch_size=3).scores(images, index, TEXTS)
  np.testing.assert_allclose(clamped, np.maximum(ours, 0), rtol=1e-6, atol=1e-6)


def test_each_image_is_embedded_once(clip_dir):
  scorer = CLIPScorer.load(clip_dir, batch_size=4)
  images = _images()
  embeds = scorer.embed_images(images)
  np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, rtol=1e-5)
  direct = scorer.scores_of_embedded(embeds, [1, 0, 1], TEXTS[:3])
  np.testing.assert_allclose(direct, scorer.scores(images, [1, 0, 1], TEXTS[:3]), rtol=1e-6)
