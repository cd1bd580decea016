"""The CaD summary scorer on hand-written summaries (hand-counted precision and recall), the
caption-only phase-1 writer against the pairs' truth, and the held-out selection questions."""

import numpy as np
import pytest

from lvlm_jax.data import caption_pairs
from lvlm_jax.data.shapes import ShapesConfig, caption, make_pair
from lvlm_jax.eval.cad_summary import score_summary, selection_records, statements, summary_metrics

TRUTH = ("Commonalities: Both images show colored shapes on a plain background. Both images have "
         "two objects. Both images contain a small red circle at the top left and a large blue "
         "square on the right. Differences: 1. The small green circle at the top in image 1 is "
         "missing from image 2. 2. Image 2 has an extra small red square at the bottom.")
WORLD = ShapesConfig(max_objects=2, shapes=("circle", "square", "triangle"),
                     colors=("red", "green", "blue", "yellow"))


def test_statements_split_sentences_lists_and_numbers():
  common, differences = statements(TRUTH)
  assert common == ["both images show colored shapes on a plain background",
                    "both images have two objects",
                    "both images contain a small red circle at the top left",
                    "both images contain a large blue square on the right"]
  assert differences == ["the small green circle at the top in image 1 is missing from image 2",
                         "image 2 has an extra small red square at the bottom"]


def test_hand_written_summaries_give_hand_counted_precision_and_recall():
  # Commonalities: 3 stated, 2 right (background, the blue square), one wrong count; differences:
  # 3 stated, 1 right (the missing circle; case and spacing do not matter), a wrong colour and
  # a difference the pair does not have.
  first = ("commonalities:  both images show colored shapes on a plain background. Both images "
           "have three objects. Both images contain a large blue square on the right. "
           "Differences: 1. The small green circle at the top in image 1 is missing from "
           "image 2. 2. Image 2 has an extra small blue square at the bottom. 3. The large "
           "blue square moved from the right to the left.")
  counts = score_summary(first, TRUTH)
  assert counts == {"common_right": 2, "common_predicted": 3, "common_true": 4,
                    "difference_right": 1, "difference_predicted": 3, "difference_true": 2}
  # No 'Differences:' header: all of it reads as commonalities; a statement said twice is
  # right once.
  second = "Both images have two objects. Both images have two objects."
  counts2 = score_summary(second, TRUTH)
  assert counts2 == {"common_right": 1, "common_predicted": 2, "common_true": 4,
                     "difference_right": 0, "difference_predicted": 0, "difference_true": 2}
  metrics = summary_metrics([counts, counts2])
  assert metrics["cad_commonality_precision"] == pytest.approx(3 / 5)
  assert metrics["cad_commonality_recall"] == pytest.approx(3 / 8)
  assert metrics["cad_difference_precision"] == pytest.approx(1 / 3)
  assert metrics["cad_difference_recall"] == pytest.approx(1 / 4)
  assert metrics["cad_summary_precision"] == pytest.approx(4 / 8)
  assert metrics["cad_summary_recall"] == pytest.approx(4 / 12)
  assert metrics["cad_summary_f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
  assert summary_metrics([score_summary(TRUTH, TRUTH)])["cad_summary_f1"] == 1.0
  assert summary_metrics([score_summary("", TRUTH)])["cad_summary_f1"] == 0.0


def test_caption_only_writer_recovers_most_of_the_truth():
  """From the two captions alone: every pair it can tell apart right, F1 high but below 1 (an
  edit that reads as another is told as that one)."""
  counts, exact = [], 0
  for i in range(200):
    pair = make_pair(WORLD, i)
    summary = caption_pairs.summarize(caption(pair.scene_a), caption(pair.scene_b))
    counts.append(score_summary(summary, pair.summary))
    exact += sorted(statements(summary)[1]) == sorted(statements(pair.summary)[1])
  metrics = summary_metrics(counts)
  assert metrics["cad_commonality_recall"] == 1.0
  assert 0.9 < metrics["cad_summary_f1"] < 1.0
  assert 0.9 < exact / 200 < 1.0


def test_the_writer_reads_a_move_and_a_recolour_from_captions():
  a = ("There are two objects in the image. A small red circle is at the top left. A large "
       "blue square is on the right. The circle is to the left of the square.")
  b = ("There are two objects in the image. A small red circle is at the bottom. A large "
       "green square is on the right. The circle is to the left of the square.")
  assert caption_pairs.summarize(a, b) == (
      "Commonalities: Both images show colored shapes on a plain background. Both images have "
      "two objects. Differences: 1. The small red circle moved from the top left to the bottom. "
      "2. The large square on the right is blue in image 1 and green in image 2.")


def test_selection_questions_are_true_of_their_image_only_and_balanced():
  prompt = "Image 1: <image>\nImage 2: <image>\n{statement} Is it image 1 or image 2?"
  records = selection_records(WORLD, 40, prompt, ("1", "2"))
  assert len(records) == 40
  assert sum(r["target"] == 1 for r in records) == 20
  for i, record in enumerate(records):
    pair = make_pair(WORLD, i)
    statement = record["question"].split("\n")[2].split(" Is it")[0]
    captions = (caption(pair.scene_a), caption(pair.scene_b))
    assert statement in captions[record["target"] - 1]
    assert statement not in captions[2 - record["target"]]
    assert record["answer"] == str(record["target"])
    assert len(record["images"]) == 2
  rng = np.random.default_rng(0)
  assert caption_pairs.selection_statement(captions[0], captions[0], 1, rng) is None
