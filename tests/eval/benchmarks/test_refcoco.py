"""RefCOCO-family REC files (Qwen-VL's JSONL layout) through the grounding-file evaluator."""

import json

import numpy as np
import pytest

from lvlm_jax import evaluate
from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import refcoco

from bench_helpers import save_image


@pytest.fixture
def rec_file(tmp_path):
  rows = [{"image": "coco/train2014/COCO_train2014_000000000001.jpg", "sent": "the left dog",
           "bbox": [2, 1, 8, 5], "width": 12, "height": 10},
          {"image": "coco/train2014/COCO_train2014_000000000002.jpg", "sent": "man on right",
           "bbox": [6, 0, 12, 10], "width": 12, "height": 10},
          {"image": "coco/train2014/COCO_train2014_000000000404.jpg", "sent": "gone",
           "bbox": [0, 0, 1, 1], "width": 12, "height": 10}]
  for n in (1, 2):
    save_image(tmp_path / "coco" / "train2014" / f"COCO_train2014_{n:012d}.jpg", 90 * n)
  path = tmp_path / "refcoco_testA.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_boxes_are_normalised_and_missing_images_counted(rec_file):
  records, skipped = refcoco.records(str(rec_file), None)
  assert len(records) == 2 and len(skipped) == 1 and "refcoco_testA.jsonl:3" in skipped[0]
  np.testing.assert_allclose(records[0]["box"], [2 / 12, 1 / 10, 8 / 12, 5 / 10])
  assert records[1]["expression"] == "man on right" and [r["id"] for r in records] == ["1", "2"]
  assert records[0]["image"].endswith("COCO_train2014_000000000001.jpg")  # decoded when asked


def test_a_bad_box_names_the_line(tmp_path):
  path = tmp_path / "refcocog_val.jsonl"
  path.write_text(json.dumps({"image": "a.jpg", "sent": "x", "bbox": [1, 2, 3], "width": 4,
                              "height": 4}) + "\n")
  with pytest.raises(UserError, match=r"refcocog_val.jsonl:1: 'bbox' must be 4"):
    refcoco.records(str(path), None)


def test_the_command_reports_rec_and_self_consistency(rec_file, tiny_shapes_export, tmp_path,
                                                      capsys):
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--model", tiny_shapes_export, "--benchmark", "refcoco", "--data",
                   str(rec_file), "--output_dir", str(out), "--max_skip_fraction", "0.5"])
  assert exit_info.value.code == 0, capsys.readouterr().err
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["items"] == 3 and metrics["answered"] == 2 and metrics["skipped"] == 1
  assert metrics["expressions"] == 2
  for key in ("grounding_acc50", "grounding_mean_iou", "self_consistency_acc50"):
    assert 0.0 <= metrics[key] <= 1.0
  # Resumable: a run killed after its first record's results asks only the second again.
  log = out / "predictions.jsonl"
  lines = log.read_text().splitlines()
  assert [json.loads(line)["id"] for line in lines] == ["1", "2"]
  log.write_text(lines[0] + "\n" + lines[1][:7])  # a torn last line, as a kill leaves it
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--model", tiny_shapes_export, "--benchmark", "refcoco", "--data",
                   str(rec_file), "--output_dir", str(out), "--max_skip_fraction", "0.5"])
  assert exit_info.value.code == 0
  assert "1 of 2 records already answered" in capsys.readouterr().err
  assert log.read_text().splitlines() == lines
  again = json.loads((out / "metrics.json").read_text())
  assert {k: again[k] for k in metrics} == metrics


def test_more_missing_images_than_tolerated_stop_before_loading(rec_file, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:  # --model is no model: it is never loaded
    evaluate.main(["--model", str(tmp_path), "--benchmark", "refcoco", "--data", str(rec_file),
                   "--output_dir", str(tmp_path / "out"), "--max_skip_fraction", "0.2"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "1 of 3 items have no usable image" in err and "refcoco_testA.jsonl:3" in err
