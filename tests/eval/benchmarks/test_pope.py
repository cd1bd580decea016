"""POPE: the annotation files' layout, LLaVA's answer normalisation, the confusion metrics, and
the command line end to end."""

import json

import pytest

from lvlm_jax import evaluate
from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import pope

from bench_helpers import answered, bench_service, save_image  # noqa: F401 (a fixture)


@pytest.fixture
def pope_dir(tmp_path):
  """coco_pope_random.json and coco_pope_adversarial.json, three questions each, one image
  missing."""
  folder = tmp_path / "pope"
  for i in range(3):
    save_image(folder / "val2014" / f"COCO_val2014_{i:012d}.jpg", 60 * i)
  for split, labels in (("random", "yes no yes"), ("adversarial", "no no yes")):
    rows = [{"question_id": n + 1, "image": f"COCO_val2014_{n:012d}.jpg",
             "text": f"Is there a {obj} in the image?", "label": label}
            for n, (obj, label) in enumerate(zip(("dog", "cup", "car"), labels.split()))]
    if split == "adversarial":
      rows[2]["image"] = "COCO_val2014_999999999999.jpg"
    (folder / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder


def test_answers_are_normalised_as_llavas_eval_pope():
  assert pope.normalize("Yes, there is a dog.") == "yes"
  assert pope.normalize("No, there is not.") == "no"
  assert pope.normalize("There is no dog in the image.") == "no"
  assert pope.normalize("The dog is not visible") == "no"
  assert pope.normalize("Yes. But no cat.") == "yes"  # only the first sentence counts
  assert pope.normalize("Nope") == "yes"  # LLaVA's rule looks for whole words
  assert pope.normalize("NO") == "yes"


def test_the_metrics_of_a_known_confusion_matrix():
  # TP 3, FN 2, FP 1, TN 2.
  labels = ["yes"] * 5 + ["no"] * 3
  predicted = ["yes", "yes", "yes", "no", "no", "yes", "no", "no"]
  m = pope.binary_metrics(predicted, labels)
  assert m["accuracy"] == pytest.approx(5 / 8) and m["precision"] == pytest.approx(3 / 4)
  assert m["recall"] == pytest.approx(3 / 5) and m["yes_ratio"] == pytest.approx(4 / 8)
  assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)


def test_a_tiny_model_is_scored_per_split(pope_dir, bench_service, tmp_path):
  items, answers, metrics = answered(pope.POPE, pope_dir, pope_dir / "val2014", bench_service,
                                     tmp_path)
  assert len(items) == 6 and len(answers) == 5 and "adversarial/3" not in answers
  truth = {"random/1": "yes", "random/2": "no", "random/3": "yes",
           "adversarial/1": "no", "adversarial/2": "no"}
  for split in ("random", "adversarial"):
    ids = [i for i in truth if i.startswith(split)]
    said = {i: "no" if {"no", "No", "not"} & set(answers[i].split(".")[0].replace(",", "").split(
        " ")) else "yes" for i in ids}
    right = sum(said[i] == truth[i] for i in ids)
    assert metrics[split]["accuracy"] == pytest.approx(right / len(ids))
    assert metrics[split]["yes_ratio"] == pytest.approx(
        sum(s == "yes" for s in said.values()) / len(ids))
  assert metrics["mean_accuracy"] == pytest.approx(
      (metrics["random"]["accuracy"] + metrics["adversarial"]["accuracy"]) / 2)


def test_a_bad_label_names_the_file_and_line(tmp_path):
  path = tmp_path / "coco_pope_popular.json"
  rows = [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"},
          {"question_id": 2, "image": "b.jpg", "text": "Is there a cat?", "label": "maybe"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(UserError, match=r"coco_pope_popular.json:2: label 'maybe'"):
    pope.load(str(path), None)


def test_the_command_writes_predictions_and_metrics(pope_dir, tiny_shapes_export, tmp_path,
                                                    capsys):
  out = tmp_path / "out"
  argv = ["--model", tiny_shapes_export, "--benchmark", "pope", "--data",
          str(pope_dir / "coco_pope_random.json"), "--images", str(pope_dir / "val2014"),
          "--output_dir", str(out), "--batch_size", "2", "--max_new_tokens", "4",
          "--weights_dtype", "float32"]
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(argv)
  assert exit_info.value.code == 0, capsys.readouterr().err
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["items"] == 3 and metrics["answered"] == 3 and metrics["skipped"] == 0
  assert set(metrics["random"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
  predictions = [json.loads(line) for line in open(out / "predictions.jsonl")]
  assert [p["id"] for p in predictions] == ["random/1", "random/2", "random/3"]
  # The same folder for another benchmark file would mix two runs' predictions: refused.
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main([*argv[:4], "--data", str(pope_dir / "coco_pope_adversarial.json"),
                   *argv[6:]])
  assert exit_info.value.code == 2
  assert "holds the predictions of another run" in capsys.readouterr().err


def test_a_missing_image_is_counted_and_too_many_stop_the_run(pope_dir, tiny_shapes_export,
                                                              tmp_path, capsys):
  argv = ["--model", tiny_shapes_export, "--benchmark", "pope", "--data",
          str(pope_dir / "coco_pope_adversarial.json"), "--images", str(pope_dir / "val2014"),
          "--output_dir", str(tmp_path / "out"), "--max_new_tokens", "2"]
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(argv)  # 1 of 3 images missing: over the default 5%
  assert exit_info.value.code == 2
  assert "1 of 3 items have no usable image" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main([*argv, "--max_skip_fraction", "0.5"])
  assert exit_info.value.code == 0
  metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert metrics["skipped"] == 1 and "COCO_val2014_999999999999.jpg" in metrics["first_skip"]
  assert metrics["adversarial"]["questions"] == 2


def test_missing_data_is_one_line_with_exit_2(tiny_shapes_export, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--model", tiny_shapes_export, "--benchmark", "pope", "--data",
                   str(tmp_path / "nothing.json"), "--output_dir", str(tmp_path / "o")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --data") and err.count("\n") == 1
