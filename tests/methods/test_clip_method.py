"""The shapes CLIP trainer: its export loads in transformers with the same logits, and retrieval
accuracy is measured on held-out scenes. (Whether it learns takes minutes: configs/clip_shapes.py
reports it.)"""

import os
import sys

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
from training_fixtures import CACHE_DIR  # noqa: E402,F401  (turns the compile cache on)

from lvlm_jax.data.shapes import (ShapesConfig, caption, has_object, make_scene,  # noqa: E402
                                  mentioned_objects, render)
from lvlm_jax.eval.clip_score import CLIPScorer  # noqa: E402
from lvlm_jax.methods import clip  # noqa: E402


def test_training_exports_an_hf_clip(tmp_path):
  config = clip.default_config()
  config.model.hidden_size = 32
  config.model.intermediate_size = 64
  config.model.num_layers = 1
  config.model.image_size = 16
  config.model.projection_dim = 16
  config.train.num_steps = 3
  config.train.batch_size = 32
  config.train.warmup_steps = 1
  config.train.log_every = 20
  config.train.shapes.image_size = 32
  config.train.shapes.max_objects = 2
  directory = str(tmp_path / "hf")
  summary = clip.train(clip.parse(config), directory)
  assert summary["step"] == 3 and np.isfinite(summary["final_loss"])

  scorer = CLIPScorer.load(directory)
  world = ShapesConfig(image_size=32, max_objects=2, seed=123)
  scenes = [make_scene(world, i) for i in range(3)]
  images = [render(s, 32) for s in scenes]
  texts = [clip.sentences(caption(s))[1] for s in scenes]
  ours = scorer.scores(images, [0, 1, 2], texts)
  model = transformers.CLIPModel.from_pretrained(directory).eval()
  processor = transformers.CLIPImageProcessor.from_pretrained(directory)
  encoded = transformers.AutoTokenizer.from_pretrained(directory)(texts, padding=True,
                                                                   return_tensors="pt")
  with torch.no_grad():
    logits = model(pixel_values=processor(images, return_tensors="pt")["pixel_values"],
                   **encoded).logits_per_image.numpy()
  # transformers resizes with its own resampling code: pixels differ slightly from ours.
  np.testing.assert_allclose(ours, np.diag(logits), rtol=0, atol=0.05 * np.abs(logits).max())

  metrics = clip.retrieval_accuracy(scorer, world, 20)
  assert 0 <= metrics["retrieval_chance"] < 0.5 and 0 <= metrics["retrieval_accuracy"] <= 1
  assert 0 <= clip.hallucination_accuracy(scorer, world, 20) <= 1


def test_hallucination_pairs_name_a_present_then_an_absent_object():
  world = ShapesConfig(image_size=32, max_objects=2, seed=5)
  images, texts = clip.hallucination_pairs(world, 30)
  assert len(images) == 30 and len(texts) == 60
  for i in range(30):
    scene = make_scene(world, i)
    (true,), (false,) = mentioned_objects(texts[2 * i]), mentioned_objects(texts[2 * i + 1])
    assert has_object(scene, *true) and not has_object(scene, "", *false[1:])
    assert texts[2 * i].split(" is ")[1] == texts[2 * i + 1].split(" is ")[1]  # same place
