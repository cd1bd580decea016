"""`python -m lvlm_jax.evaluate --grounding_file`: REC and self-consistency on a grounding JSONL
of real image files, with the records read as the file says."""

import json

import numpy as np
import pytest
from PIL import Image

from lvlm_jax import evaluate
from lvlm_jax.data.shapes import ShapesConfig, ShapesSource


@pytest.fixture(scope="module")
def grounding_file(tmp_path_factory):
  """Three shapes-world boxes as a file: PNGs, SC-Tune's image_id/bbox spelling, one record
  without an expression."""
  folder = tmp_path_factory.mktemp("refs")
  records = list(ShapesSource(ShapesConfig(seed=4, max_objects=2), "grounding", 3))
  lines = []
  for i, record in enumerate(records):
    Image.fromarray(record["images"][0]).save(folder / f"{i}.png")
    line = {"image_id": f"{i}.png", "bbox": record["box"]}
    if i != 1:
      line["expression"] = record["expression"]
    lines.append(json.dumps(line) + "\n")
  (folder / "refs.jsonl").write_text("".join(lines))
  return str(folder / "refs.jsonl"), records


def test_records_are_read_as_the_file_says(grounding_file):
  path, truth = grounding_file
  records = evaluate.grounding_file_records(path, None, 0)
  assert len(records) == 3 and len(evaluate.grounding_file_records(path, None, 2)) == 2
  for i, (record, want) in enumerate(zip(records, truth)):
    np.testing.assert_array_equal(record["images"][0], want["images"][0])
    assert record["box"] == want["box"]
    assert record["expression"] == (None if i == 1 else want["expression"])


def test_the_cli_reports_rec_and_self_consistency(grounding_file, tiny_shapes_export, tmp_path,
                                                  capsys):
  path, _ = grounding_file
  output = tmp_path / "metrics.json"
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--model", tiny_shapes_export, "--grounding_file", path, "--output",
                   str(output)])
  assert exit_info.value.code == 0, capsys.readouterr().err
  metrics = json.loads(output.read_text())
  assert metrics["records"] == 3 and metrics["expressions"] == 2
  for key in ("grounding_acc50", "grounding_mean_iou", "self_consistency_acc50"):
    assert 0.0 <= metrics[key] <= 1.0
  assert "yes_no_accuracy" not in metrics


def test_a_missing_grounding_file_is_one_line_with_exit_2(tiny_shapes_export, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--model", tiny_shapes_export, "--grounding_file", str(tmp_path / "no.jsonl")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --grounding_file") and err.count("\n") == 1
