"""CHAIR on COCO's annotation layout: the synonym table, the word matching and the metrics by
hand, and a tiny model's descriptions."""

import json

import pytest

from lvlm_jax.eval.benchmarks import chair
from lvlm_jax.eval.benchmarks.benchmark import Item

from bench_helpers import answered, bench_service, save_image  # noqa: F401 (a fixture)


def test_the_table_covers_the_80_categories():
  category_of, _ = chair.tables()
  assert len(set(category_of.values())) == 80
  assert category_of["puppy"] == "dog" and category_of["sofa"] == "couch"
  assert category_of["motorbike"] == "motorcycle" and category_of["ski"] == "skis"
  # chair.py's own table, not a richer one: its entries and only its entries name objects.
  assert category_of["panda"] == "bear" and category_of["phon"] == "cell phone"
  for word in ("grizzly", "meter", "novel", "hair dryer", "motor bike", "cheesecake"):
    assert word not in category_of, word


@pytest.mark.parametrize("text, want", [
    ("Two men walk their puppies past a fire hydrant.", ["person", "dog", "fire hydrant"]),
    ("A toilet seat is up; a toilet and a chair.", ["toilet", "toilet", "chair"]),
    ("A baby elephant and teddy bears on dining tables.",
     ["elephant", "teddy bear", "dining table"]),
    ("A train track beside the road.", []),  # "train track" names no object
    ("Buses, knives and wine glasses.", ["bus", "knife", "wine glass"]),
    ("A hot dog, not a dog.", ["hot dog", "dog"]),
    # chair.py joins "motor bike" but its table's entry never matches; "bike" is not counted
    ("A man on a motor bike eats cheesecake by a parking meter.", ["person", "parking meter"]),
])
def test_mentions_as_chair_py_matches_them(text, want):
  assert chair.mentions(text) == want


def test_the_metrics_by_hand():
  items = [Item("1", "", (), {"objects": ["dog", "person"]}),
           Item("2", "", (), {"objects": ["car"]})]
  answers = {"1": "A man and a woman with a dog and a cat. The cat sleeps.",  # 2 cats wrong
             "2": "A red car."}
  metrics = chair.score(items, answers)
  # Mentions: person, person, dog, cat, cat | car: 6, 2 hallucinated, in 1 of 2 descriptions.
  assert metrics["chair_i"] == pytest.approx(2 / 6) and metrics["chair_s"] == 0.5
  assert metrics["recall"] == pytest.approx(3 / 3)
  assert metrics["mentions_per_description"] == 3.0


@pytest.fixture
def coco(tmp_path):
  annotations = tmp_path / "annotations"
  annotations.mkdir()
  images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 12, "height": 10}
            for i in (42, 73, 139)]
  categories = [{"id": 18, "name": "dog", "supercategory": "animal"},
                {"id": 67, "name": "dining table", "supercategory": "furniture"}]
  instances = [{"id": 1, "image_id": 42, "category_id": 18, "bbox": [0, 0, 2, 2]},
               {"id": 2, "image_id": 139, "category_id": 67, "bbox": [1, 1, 3, 3]}]
  captions = [{"id": 5, "image_id": 42, "caption": "A puppy sleeps on a couch."},
              {"id": 6, "image_id": 73, "caption": "Two people ride bikes."}]
  (annotations / "instances_val2014.json").write_text(json.dumps(
      {"images": images, "annotations": instances, "categories": categories}))
  (annotations / "captions_val2014.json").write_text(json.dumps(
      {"images": images, "annotations": captions}))
  for image in images[:2]:  # the third is missing
    save_image(tmp_path / "val2014" / image["file_name"], image["id"])
  return tmp_path


def test_truth_is_instances_and_reference_captions(coco):
  items = {i.id: i for i in chair.load(str(coco / "annotations"), None)}
  assert items["42"].truth["objects"] == ["couch", "dog"]
  assert items["73"].truth["objects"] == ["bicycle", "person"]
  assert items["139"].truth["objects"] == ["dining table"]
  assert items["42"].question == chair.PROMPT
  assert [i.id for i in chair.load(str(coco / "annotations"), None)] == list(items)  # seeded


def test_a_tiny_model_is_scored(coco, bench_service, tmp_path):
  items, answers, metrics = answered(chair.CHAIR, coco / "annotations", coco / "val2014",
                                     bench_service, tmp_path / "out", max_new_tokens=12)
  assert len(items) == 3 and set(answers) == {"42", "73"}
  scored = [i for i in items if i.id in answers]
  said = {i.id: chair.mentions(answers[i.id]) for i in scored}
  wrong = sum(m not in i.truth["objects"] for i in scored for m in said[i.id])
  assert metrics["chair_i"] == pytest.approx(wrong / max(sum(map(len, said.values())), 1))
