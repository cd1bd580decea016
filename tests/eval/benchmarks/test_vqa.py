"""GQA and TextVQA: their published layouts, the VQA normalisation and VQA accuracy, computed by
hand."""

import json

import pytest

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import vqa, vqa_answers
from lvlm_jax.eval.benchmarks.benchmark import SHORT_ANSWER, Item

from bench_helpers import answered, bench_service, save_image  # noqa: F401 (a fixture)


@pytest.mark.parametrize("raw, want", [
    ("Two dogs.", "2 dogs"),
    ("The Cat", "cat"),
    ("an apple; a pear", "apple pear"),  # "; " touches a space: removed
    ("red/blue", "red blue"),  # touches no space: a space
    ("dont", "don't"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("yes!", "yes"),
    ("1,000", "1000"),  # commas go first (EvalAI's word_tokenize)
    ("the man's hat", "man 's hat"),
    ("What?\tNone", "what 0"),
])
def test_the_vqa_normalisation(raw, want):
  assert vqa_answers.normalize(raw) == want


def test_vqa_accuracy_by_hand():
  # Ten references, k of them "2": each leave-one-out subset scores min(1, matches / 3).
  two = lambda k: ["2"] * k + ["3"] * (10 - k)
  assert vqa_answers.accuracy("two", two(0)) == 0.0
  assert vqa_answers.accuracy("two", two(1)) == pytest.approx((9 * 1 / 3) / 10)
  assert vqa_answers.accuracy("Two.", two(2)) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
  assert vqa_answers.accuracy("2", two(3)) == pytest.approx((3 * 2 / 3 + 7) / 10)
  assert vqa_answers.accuracy("2", two(4)) == 1.0


def test_gqa_scoring_by_hand():
  items = [Item(q, "", (), {"answer": a, "structural": s})
           for q, a, s in (("1", "left", "query"), ("2", "yes", "verify"), ("3", "cat", "query"))]
  metrics = vqa.score_gqa(items, {"1": "Left.", "2": "no", "3": "a cat"})
  assert metrics["accuracy"] == pytest.approx(1 / 3)
  assert metrics["accuracy_normalized"] == pytest.approx(2 / 3)
  assert metrics["by_structural_type"] == {"query": 0.5, "verify": 0.0}


@pytest.fixture
def gqa_file(tmp_path):
  questions = {f"20{n}": {"imageId": f"n{n}", "question": q, "answer": a,
                          "types": {"structural": "query", "semantic": "rel"}}
               for n, (q, a) in enumerate((("What is left of the cup?", "plate"),
                                           ("Is the sky blue?", "yes"),
                                           ("What color is the car?", "red")))}
  for n in range(2):  # the third image is missing
    save_image(tmp_path / "images" / f"n{n}.jpg", 80 * n)
  path = tmp_path / "testdev_balanced_questions.json"
  path.write_text(json.dumps(questions))
  return path


def test_gqa_on_a_tiny_model(gqa_file, bench_service, tmp_path):
  items, answers, metrics = answered(vqa.GQA, gqa_file, gqa_file.parent / "images",
                                     bench_service, tmp_path / "out")
  assert [i.images for i in items] == [("n0.jpg",), ("n1.jpg",), ("n2.jpg",)]
  assert set(answers) == {"200", "201"}
  truth = {"200": "plate", "201": "yes"}
  assert metrics["accuracy"] == pytest.approx(
      sum(answers[q].rstrip(".").lower() == truth[q] for q in truth) / 2)


@pytest.fixture
def textvqa_file(tmp_path):
  rows = [{"question_id": 34602 + n, "image_id": f"{n:016x}", "question": q, "answers": a,
           "image_classes": ["Sign"], "set_name": "val"}
          for n, (q, a) in enumerate((("what does the sign say?", ["stop"] * 7 + ["halt"] * 3),
                                      ("what brand is it?", ["nokia"] * 2 + ["nokla"] * 8)))]
  for n in range(2):
    save_image(tmp_path / "train_images" / f"{n:016x}.jpg", 100 + n)
  path = tmp_path / "TextVQA_0.5.1_val.json"
  path.write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "data": rows}))
  return path


def test_textvqa_on_a_tiny_model(textvqa_file, bench_service, tmp_path):
  items, answers, metrics = answered(vqa.TEXTVQA, textvqa_file,
                                     textvqa_file.parent / "train_images", bench_service,
                                     tmp_path / "out")
  assert len(answers) == 2
  want = [vqa_answers.accuracy(answers[i.id], i.truth["answers"]) for i in items]
  assert metrics["vqa_accuracy"] == pytest.approx(sum(want) / 2)


def test_textvqa_takes_llavas_ocr_prompts_when_they_are_beside_it(textvqa_file):
  ocr = "what does the sign say?\nReference OCR token: STOP, 24\n" + SHORT_ANSWER
  (textvqa_file.parent / vqa.LLAVA_OCR_PROMPTS).write_text(json.dumps(
      {"question_id": 34602, "image": "0000000000000000.jpg", "text": ocr}) + "\n")
  items = vqa.load_textvqa(str(textvqa_file), None)
  assert items[0].question == ocr
  assert items[1].question == "what brand is it?\n" + SHORT_ANSWER  # not in LLaVA's file


def test_textvqa_scores_a_known_answer():
  items = [Item("1", "", (), {"answers": ["stop"] * 7 + ["halt"] * 3}),
           Item("2", "", (), {"answers": ["nokia"] * 2 + ["nokla"] * 8})]
  metrics = vqa.score_textvqa(items, {"1": "Halt.", "2": "Nokia"})
  assert metrics["vqa_accuracy"] == pytest.approx(((3 * 2 / 3 + 7) / 10
                                                   + (2 * 1 / 3 + 8 * 2 / 3) / 10) / 2)


def test_a_malformed_textvqa_row_names_it(tmp_path):
  path = tmp_path / "TextVQA_0.5.1_val.json"
  path.write_text(json.dumps({"data": [{"question_id": 1, "image_id": "a", "question": "q",
                                        "answers": ["x"]},
                                       {"question_id": 2, "image_id": "b", "question": "q"}]}))
  with pytest.raises(UserError, match=r"data\[1\]: missing 'answers'"):
    vqa.load_textvqa(str(path), None)
