"""ScienceQA-IMG, MMBench-dev (circular) and SEED-Bench: their layouts, the letter parsing and
the scoring, by hand and on a tiny model."""

import base64
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import choices
from lvlm_jax.eval.benchmarks.benchmark import LETTER_ANSWER

from bench_helpers import answered, bench_service, save_image  # noqa: F401 (a fixture)


def test_letters_are_read_from_answers():
  options = {"A": "red", "B": "blue", "C": "green"}
  assert choices.letter("B", options) == "B" and choices.letter("C. green", options) == "C"
  assert choices.letter("(A)", options) == "A" and choices.letter("Blue.", options) == "B"
  assert choices.letter("D", options) is None and choices.letter("Because", options) is None
  assert choices.sqa_letter("B") == "B" and choices.sqa_letter("C. a cat") == "C"
  assert choices.sqa_letter("The answer is D.") == "D" and choices.sqa_letter("Bb") == "FAILED"


@pytest.fixture
def sqa_file(tmp_path):
  rows = [{"id": "4", "image": "4/image.png", "conversations": [
              {"from": "human", "value": "Context: A map.\nQuestion: Which is a state?\n"
               "Options: (A) Ohio (B) Lima\n<image>"},
              {"from": "gpt", "value": "The answer is A."}]},
          {"id": "7", "conversations": [  # no image: not in the IMG subset
              {"from": "human", "value": "Question: 2+2?\nOptions: (A) 4 (B) 5"},
              {"from": "gpt", "value": "A"}]},
          {"id": "9", "image": "9/image.png", "conversations": [
              {"from": "human", "value": "<image>\nQuestion: Which is hot?\nOptions: (A) ice "
               "(B) fire\n" + LETTER_ANSWER},
              {"from": "gpt", "value": "B"}]}]
  save_image(tmp_path / "images" / "test" / "4" / "image.png", 10)
  save_image(tmp_path / "images" / "test" / "9" / "image.png", 200)
  path = tmp_path / "llava_test_CQM-A.json"
  path.write_text(json.dumps(rows))
  return path


def test_scienceqa_img_on_a_tiny_model(sqa_file, bench_service, tmp_path):
  items, answers, metrics = answered(choices.SCIENCEQA, sqa_file,
                                     sqa_file.parent / "images" / "test", bench_service,
                                     tmp_path / "out")
  assert [i.id for i in items] == ["4", "9"]
  assert items[0].question == ("Context: A map.\nQuestion: Which is a state?\nOptions: (A) Ohio "
                               "(B) Lima\n" + LETTER_ANSWER)
  assert items[1].question.count(LETTER_ANSWER) == 1
  truth = {"4": "A", "9": "B"}
  assert metrics["img_accuracy"] == pytest.approx(
      sum(choices.sqa_letter(answers[i].strip()) == truth[i] for i in truth) / 2)


def _b64_png(value: int) -> str:
  buffer = io.BytesIO()
  Image.fromarray(np.full((9, 11, 3), value, np.uint8)).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def mmbench_file(tmp_path):
  path = tmp_path / "mmbench_dev_20230712.tsv"
  fields = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
            "source", "l2-category", "comment", "split"]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fields, delimiter="\t")
    writer.writeheader()
    writer.writerow({"index": 0, "question": "What colour is it?", "hint": "nan", "A": "red",
                     "B": "blue", "C": "green", "D": "nan", "answer": "B",
                     "category": "attribute", "image": _b64_png(30), "split": "dev"})
    writer.writerow({"index": 1, "question": "Which animal?", "hint": "A farm.", "A": "cow",
                     "B": "pig", "C": "", "D": "", "answer": "A", "category": "recognition",
                     "image": _b64_png(220), "split": "dev"})
  return path


def test_mmbench_rotates_the_options(mmbench_file):
  items = choices.load_mmbench(str(mmbench_file), None)
  assert [i.id for i in items] == ["0/0", "0/1", "0/2", "1/0", "1/1"]
  assert items[1].question == ("What colour is it?\nA. blue\nB. green\nC. red\n" + LETTER_ANSWER)
  assert [i.truth["answer"] for i in items] == ["B", "A", "C", "A", "B"]
  assert items[3].question.startswith("A farm.\nWhich animal?\nA. cow\nB. pig\n")
  assert isinstance(items[0].images[0], bytes)


def test_circular_scoring_by_hand(mmbench_file):
  items = choices.load_mmbench(str(mmbench_file), None)
  # Question 0 right in every rotation (once by the option's text); question 1 wrong once.
  answers = {"0/0": "B", "0/1": "blue", "0/2": "C.", "1/0": "A", "1/1": "A"}
  metrics = choices.score_mmbench(items, answers)
  assert metrics["circular_accuracy"] == 0.5 and metrics["round0_accuracy"] == 1.0
  assert metrics["by_category"] == {"attribute": 1.0, "recognition": 0.0}


def test_mmbench_on_a_tiny_model(mmbench_file, bench_service, tmp_path):
  items, answers, metrics = answered(choices.MMBENCH, mmbench_file, None, bench_service,
                                     tmp_path / "out")
  assert len(answers) == 5
  right = {i.id: choices.letter(answers[i.id], i.truth["options"]) == i.truth["answer"]
           for i in items}
  circular = [all(right[f"0/{r}"] for r in range(3)), all(right[f"1/{r}"] for r in range(2))]
  assert metrics["circular_accuracy"] == pytest.approx(sum(circular) / 2)


def test_a_bad_mmbench_answer_names_the_line(mmbench_file):
  text = mmbench_file.read_text().splitlines()
  text[2] = text[2].replace("\tA\trecognition", "\tC\trecognition")
  mmbench_file.write_text("\n".join(text) + "\n")
  with pytest.raises(UserError, match=r"mmbench_dev_20230712.tsv:3: answer 'C'"):
    choices.load_mmbench(str(mmbench_file), None)


@pytest.fixture
def seed_file(tmp_path):
  questions = [{"answer": "A", "choice_a": "a dog", "choice_b": "a cat", "choice_c": "a cow",
                "choice_d": "a bird", "data_id": "1454426_2591111986.jpg", "data_type": "image",
                "question": "What animal is shown?", "question_id": "101669",
                "question_type_id": 1},
               {"answer": "C", "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4",
                "data_id": "2039217_1234", "data_type": "image",
                "question": "How many people?", "question_id": "101670", "question_type_id": 5},
               {"answer": "B", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
                "data_id": "v1001.mp4", "data_type": "video", "question": "What happens?",
                "question_id": "9", "question_type_id": 10}]
  save_image(tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg", 40)
  save_image(tmp_path / "SEED-Bench-image" / "2039217_1234.jpg", 140)
  path = tmp_path / "SEED-Bench.json"
  path.write_text(json.dumps({"questions": questions, "question_type": {
      "Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 10}}))
  return path


def test_seed_image_questions_on_a_tiny_model(seed_file, bench_service, tmp_path):
  items, answers, metrics = answered(choices.SEED, seed_file, seed_file.parent /
                                     "SEED-Bench-image", bench_service, tmp_path / "out")
  assert [i.id for i in items] == ["101669", "101670"]
  assert items[1].images == ("2039217_1234.jpg",)
  assert items[0].question == ("What animal is shown?\nA. a dog\nB. a cat\nC. a cow\nD. a bird\n"
                               + LETTER_ANSWER)
  right = [choices.letter(answers[i.id], i.truth["options"]) == i.truth["answer"] for i in items]
  assert metrics["accuracy"] == pytest.approx(sum(right) / 2)
  assert set(metrics["by_question_type"]) == {"Scene Understanding", "Instances Counting"}
