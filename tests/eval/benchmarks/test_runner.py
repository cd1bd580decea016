"""The benchmark runner: resumable predictions keyed by id, counted skips, unique ids."""

import json

import pytest

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import runner
from lvlm_jax.eval.benchmarks.benchmark import Item
from lvlm_jax.eval.benchmarks.predictions import PredictionLog

from bench_helpers import bench_service, save_image  # noqa: F401 (a fixture)


def _items(tmp_path, count=5):
  for i in range(count):
    save_image(tmp_path / f"{i}.png", 30 * i)
  return [Item(f"q{i}", f"Is there a red circle? {i}", (f"{i}.png",)) for i in range(count)]


def test_a_rerun_generates_only_what_is_missing(bench_service, tmp_path, monkeypatch):
  items = _items(tmp_path)
  log = PredictionLog(str(tmp_path / "out" / "predictions.jsonl"))
  first = runner.answer(items, bench_service, log, str(tmp_path), 6)
  assert [r["id"] for r in first.values()] == [i.id for i in items]
  lines = open(log.path).read().splitlines()
  # A kill mid-batch: the last batch (item q4) lost, and half a line written.
  with open(log.path, "w") as f:
    f.write("\n".join(lines[:4]) + "\n" + lines[4][:10])
  asked = []
  texts = bench_service.texts
  monkeypatch.setattr(bench_service, "texts", lambda prompts, *a, **k: (
      asked.extend(prompts), texts(prompts, *a, **k))[1])
  second = runner.answer(items, bench_service, log, str(tmp_path), 6)
  assert len(asked) == 1 and asked[0].turns[0]["value"].endswith(" 4")
  assert second == first
  assert [json.loads(line)["id"] for line in open(log.path)] == [i.id for i in items]


def test_a_missing_image_is_a_counted_skip(bench_service, tmp_path):
  items = _items(tmp_path, 2) + [Item("gone", "Is there a cat?", ("nowhere.png",))]
  records = runner.answer(items, bench_service, PredictionLog(str(tmp_path / "p.jsonl")),
                          str(tmp_path), 4)
  assert "answer" in records["q0"] and "answer" in records["q1"]
  assert "nowhere.png" in records["gone"]["error"] and "answer" not in records["gone"]


def test_duplicate_ids_are_refused(bench_service, tmp_path):
  items = _items(tmp_path, 2)
  with pytest.raises(UserError, match="'q0' twice"):
    runner.answer(items + items[:1], bench_service, PredictionLog(str(tmp_path / "p.jsonl")),
                  str(tmp_path), 4)


def test_a_damaged_middle_line_names_the_file_and_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"id": "a", "answer": "yes"}\nnot json\n{"id": "b", "answer": "no"}\n')
  with pytest.raises(UserError, match=r"p.jsonl:2: not valid JSON"):
    PredictionLog(str(path)).read()


def test_a_skip_is_tried_again_once_its_image_exists(bench_service, tmp_path):
  items = _items(tmp_path, 1) + [Item("late", "Is there a cat?", ("late.png",))]
  log = PredictionLog(str(tmp_path / "p.jsonl"))
  assert "error" in runner.answer(items, bench_service, log, str(tmp_path), 4)["late"]
  save_image(tmp_path / "late.png", 99)
  records = runner.answer(items, bench_service, log, str(tmp_path), 4)
  assert "answer" in records["late"] and "error" not in records["late"]
