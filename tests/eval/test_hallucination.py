"""CHAIR-style metric on the shapes world: ground-truth captions are perfect, edits are caught."""

import pytest

from lvlm_jax.data.shapes import Scene, ShapeObject, ShapesConfig, caption, make_scene
from lvlm_jax.eval.hallucination import hallucination_metrics


def test_ground_truth_captions_have_no_hallucination_and_full_recall():
  scenes = [make_scene(ShapesConfig(seed=5), i) for i in range(50)]
  metrics = hallucination_metrics([caption(s) for s in scenes], scenes)
  assert metrics["chair_i"] == 0.0 and metrics["chair_s"] == 0.0
  assert metrics["recall"] == 1.0
  assert metrics["mentions_per_description"] >= 1.0


def test_counts_on_a_hand_made_scene():
  scene = Scene(objects=(ShapeObject("circle", "red", "small", (0.1, 0.1, 0.2, 0.2)),
                         ShapeObject("square", "blue", "large", (0.5, 0.5, 0.8, 0.8))),
                shapes=("circle", "square", "triangle"), colors=("red", "blue", "green"),
                background=(230, 230, 230))
  texts = [
      "A small red circle. A large blue square.",           # exact
      "A red circle and a green triangle.",                 # 1 of 2 hallucinated, square missed
      "A large red circle. A red circle. A blue square.",   # wrong size; duplicate counted once
  ]
  metrics = hallucination_metrics(texts, [scene] * 3)
  # mentions: 2 + 2 + 3 (large red circle, red circle, blue square) = 7; hallucinated: 0 + 1 + 1
  assert metrics["chair_i"] == pytest.approx(2 / 7)
  assert metrics["chair_s"] == pytest.approx(2 / 3)
  assert metrics["recall"] == pytest.approx((2 + 1 + 2) / 6)


def test_lengths_must_agree():
  with pytest.raises(ValueError):
    hallucination_metrics(["a red circle"], [])
