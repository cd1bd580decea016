"""MME: both folder layouts, calculation.py's answer parsing, acc / acc+ and the summed scores."""

import pytest

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import mme
from lvlm_jax.eval.benchmarks.benchmark import Item

from bench_helpers import answered, bench_service, save_image  # noqa: F401 (a fixture)


@pytest.fixture
def mme_dir(tmp_path):
  """existence (images and texts side by side) and artwork (images/ + questions_answers_YN/),
  two images each, two questions an image; and code_reasoning (cognition) with one."""
  root = tmp_path / "MME_Benchmark_release_version"
  for n in range(2):
    save_image(root / "existence" / f"{n:012d}.jpg", 50 * n)
    (root / "existence" / f"{n:012d}.txt").write_text(
        "Is there a dog in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image? Please answer yes or no.\tNo\n")
    save_image(root / "artwork" / "images" / f"{10 + n}.jpg", 90 + n)
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
    (root / "artwork" / "questions_answers_YN" / f"{10 + n}.txt").write_text(
        "Is this artwork by Monet? Please answer yes or no.\tNo\n"
        "Is this artwork by Manet? Please answer yes or no.\tYes\n")
  save_image(root / "code_reasoning" / "0020.png", 7)
  (root / "code_reasoning" / "0020.txt").write_text("Does it print 3?\tYes\nDoes it print 4?\tNo\n")
  return root


def test_both_layouts_are_read(mme_dir):
  items = mme.load(str(mme_dir), None)
  assert len(items) == 10
  assert items[0].images == ("existence/000000000000.jpg",)
  assert items[0].question.endswith("Please answer yes or no.\nAnswer the question using a "
                                    "single word or phrase.")
  artwork = [i for i in items if i.truth["subtask"] == "artwork"]
  assert artwork[0].images == ("artwork/images/10.jpg",) and artwork[1].truth["label"] == "yes"
  assert items[-1].images == ("code_reasoning/0020.png",)


def test_answers_are_parsed_as_calculation_py():
  assert mme.parse("Yes") == "yes" and mme.parse("no") == "no"
  assert mme.parse("Yes, it is.") == "yes" and mme.parse("No.") == "no"
  assert mme.parse("Not really") == "no"  # "no" within the first four characters
  assert mme.parse("I think yes") == "other"


def test_acc_plus_and_the_summed_scores_by_hand():
  items = [Item(f"existence/{img}/{k}", "", (), {"subtask": "existence", "image": img,
                                                 "label": label})
           for img in ("a", "b") for k, label in enumerate(("yes", "no"))]
  items += [Item(f"code_reasoning/c/{k}", "", (), {"subtask": "code_reasoning", "image": "c",
                                                  "label": label})
            for k, label in enumerate(("yes", "no"))]
  answers = {"existence/a/0": "Yes", "existence/a/1": "No", "existence/b/0": "Yes",
             "existence/b/1": "Yes", "code_reasoning/c/0": "yes", "code_reasoning/c/1": "no"}
  metrics = mme.score(items, answers)
  assert metrics["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
  assert metrics["code_reasoning"]["score"] == 200.0
  assert metrics["perception"] == 125.0 and metrics["cognition"] == 200.0


def test_a_tiny_model_is_scored(mme_dir, bench_service, tmp_path):
  items, answers, metrics = answered(mme.MME, mme_dir, None, bench_service, tmp_path)
  assert len(answers) == 10
  for subtask in ("existence", "artwork", "code_reasoning"):
    chosen = [i for i in items if i.truth["subtask"] == subtask]
    said = {}
    for i in chosen:
      text = answers[i.id].lower()
      said[i.id] = text if text in ("yes", "no") else (
          "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other")
    acc = 100 * sum(said[i.id] == i.truth["label"] for i in chosen) / len(chosen)
    images = {i.truth["image"] for i in chosen}
    plus = 100 * sum(all(said[i.id] == i.truth["label"] for i in chosen
                         if i.truth["image"] == image) for image in images) / len(images)
    assert metrics[subtask]["acc"] == pytest.approx(acc)
    assert metrics[subtask]["acc_plus"] == pytest.approx(plus)
  assert metrics["perception"] == pytest.approx(metrics["existence"]["score"]
                                                + metrics["artwork"]["score"])


def test_a_malformed_question_line_names_the_file_and_line(mme_dir):
  (mme_dir / "existence" / "000000000001.txt").write_text("Is there a dog?\tYes\nno tab here\n")
  with pytest.raises(UserError, match=r"existence/000000000001.txt:2: expected"):
    mme.load(str(mme_dir), None)
