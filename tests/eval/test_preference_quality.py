"""Preference-pair diagnostics on hand-made descriptions of a known scene, against hand counts."""

import pytest

from lvlm_jax.data.shapes import Scene, ShapeObject
from lvlm_jax.eval import preference_quality as pq
from lvlm_jax.eval.hallucination import DescriptionCounts, description_counts

SCENE = Scene(objects=(ShapeObject("circle", "red", "small", (0.1, 0.1, 0.2, 0.2)),
                       ShapeObject("square", "blue", "large", (0.5, 0.5, 0.8, 0.8))),
              shapes=("circle", "square", "triangle"), colors=("red", "blue", "green"),
              background=(230, 230, 230))


def test_description_counts_by_hand():
  # mentions: red circle (true), green triangle (false), blue square (true): 3, 1 false, 2 recalled
  counts = description_counts("A red circle, a green triangle and a blue square.", SCENE)
  assert counts == DescriptionCounts(mentions=3, hallucinated=1, objects=2, recalled=2, words=10)
  # the same mention twice counts once; a large circle matches nothing (the circle is small)
  assert description_counts("A large circle. A large circle.", SCENE) == DescriptionCounts(
      1, 1, 2, 0, 6)


@pytest.mark.parametrize("chosen, rejected, want", [
    ("a red circle and a blue square", "a red circle and a green square", "better"),
    ("a red circle", "a red circle and a blue square", "worse"),
    ("a red circle", "a blue square", "tie"),  # both: 0 hallucinated, 1 recalled
    ("a red circle, a blue square and a green circle", "a red circle", "mixed"),
])
def test_verdicts(chosen, rejected, want):
  assert pq.pair_quality(chosen, rejected, SCENE)["verdict"] == want


def test_summary_by_kind_by_hand():
  rows = [pq.pair_quality("a red circle and a blue square", "a green triangle", SCENE),  # better
          pq.pair_quality("a green circle", "a red circle", SCENE),  # worse
          pq.pair_quality("a red circle", "a blue square", SCENE)]  # tie
  summary = pq.summarize(rows, ["misleading_prompt", "low_resolution", "misleading_prompt"])
  assert set(summary) == {"all", "misleading_prompt", "low_resolution"}
  misleading = summary["misleading_prompt"]
  assert misleading["pairs"] == 2
  assert misleading["chosen_better"] == misleading["chosen_tie"] == 0.5
  assert misleading["chosen_worse"] == misleading["chosen_mixed"] == 0.0
  # chosen: mentions 2 + 1, hallucinated 0; recalled 2 + 1 of 4 objects; words 7 + 3
  assert misleading["chosen_chair_i"] == 0.0 and misleading["chosen_recall"] == 0.75
  assert misleading["chosen_words"] == 5.0
  # rejected: green triangle (false), blue square (true): chair_i 1/2, recall 1/4
  assert misleading["rejected_chair_i"] == 0.5 and misleading["rejected_recall"] == 0.25
  everything = summary["all"]
  assert everything["pairs"] == 3 and everything["chosen_worse"] == pytest.approx(1 / 3)
  assert everything["chosen_chair_i"] == pytest.approx(1 / 4)  # green circle: 1 of 4 mentions
