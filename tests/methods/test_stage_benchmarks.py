"""pipeline.benchmarks: a public benchmark after each evaluated stage, its metrics in the summary
per stage, resumable, started over when the stage's model changed, refused in one line when it
cannot run."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from lvlm_jax.errors import UserError
from lvlm_jax.methods import sft, stage_benchmarks
from lvlm_jax.methods.pipeline import Pipeline, PipelineConfig, Stage



def save_image(path, value: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path)


@pytest.fixture
def pope_file(tmp_path):
  folder = tmp_path / "pope"
  for i in range(2):
    save_image(folder / "val2014" / f"COCO_val2014_{i:012d}.jpg", 90 * i)
  rows = [{"question_id": n + 1, "image": f"COCO_val2014_{n:012d}.jpg",
           "text": f"Is there a {obj} in the image?", "label": label}
          for n, (obj, label) in enumerate((("dog", "yes"), ("cup", "no")))]
  path = folder / "coco_pope_random.json"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path), str(folder / "val2014")


def _stages(base: str, trained: str, calls: list):
  def evaluation(name):
    def run():
      calls.append(name)
      return {"yes_no_accuracy": 0.5}
    return run
  return [Stage("eval_base", evaluation("base"), eval_label="base", model=base),
          Stage("train", lambda: calls.append("train") or "done"),
          Stage("eval_trained", evaluation("trained"), eval_label="trained", model=trained)]


def test_each_evaluated_stage_gets_the_benchmark(pope_file, tiny_shapes_export, tmp_path,
                                                 capsys):
  trained = str(tmp_path / "trained")
  shutil.copytree(tiny_shapes_export, trained)
  workdir, calls = str(tmp_path / "run"), []
  config = PipelineConfig(benchmarks=(("pope", *pope_file),), benchmark_batch_size=2)
  settings = sft.parse(sft.default_config())
  summary = Pipeline("toy", workdir, _stages(tiny_shapes_export, trained, calls), config,
                     settings=settings).run()
  assert summary["status"] == "done" and calls == ["base", "train", "trained"]
  assert [s["name"] for s in summary["stages"]] == [
      "eval_base", "eval_base/pope", "train", "eval_trained", "eval_trained/pope"]
  assert list(summary["eval"]) == ["base", "base/pope", "trained", "trained/pope"]
  for label in ("base", "trained"):
    metrics = summary["eval"][f"{label}/pope"]
    assert metrics["answered"] == 2 and 0.0 <= metrics["mean_accuracy"] <= 1.0
    predictions = os.path.join(workdir, "benchmarks", label, "pope", "predictions.jsonl")
    assert len(open(predictions).read().splitlines()) == 2
  out = capsys.readouterr().out
  assert "metrics by stage:" in out and "pope by stage:" in out
  # A finished pipeline's rerun asks nothing again.
  again = Pipeline("toy", workdir, _stages(tiny_shapes_export, trained, calls), config,
                   settings=settings).run()
  assert again["eval"] == summary["eval"] and calls == ["base", "train", "trained"]


def test_a_changed_model_starts_its_benchmark_over(tiny_shapes_export, tmp_path):
  model = str(tmp_path / "model")
  shutil.copytree(tiny_shapes_export, model)
  output = str(tmp_path / "bench")
  stage_benchmarks._fresh(output, model)
  with open(os.path.join(output, "predictions.jsonl"), "w") as f:
    f.write('{"id": "1", "answer": "yes"}\n')
  stage_benchmarks._fresh(output, model)  # the same model: its answers stay
  assert os.path.exists(os.path.join(output, "predictions.jsonl"))
  with open(os.path.join(model, "config.json"), "a") as f:
    f.write(" ")  # trained again: another export in the same place
  stage_benchmarks._fresh(output, model)
  assert os.listdir(output) == ["model.json"]


@pytest.mark.parametrize("entries, message", [
    ((("popee", "x"),), r"pipeline.benchmarks\[0\]=\('popee', 'x'\): unknown benchmark"),
    ((("pope",),), r"pipeline.benchmarks\[0\].*expected \(benchmark, data\)"),
    ((("pope", "/no/such/file"),), r"pipeline.benchmarks\[0\].*data /no/such/file: no such"),
    ((("cadqa", "/"),), r"cadqa is rated by a judge LLM"),
    ((("pope", "/tmp"), ("pope", "/tmp/")), r"has pope:tmp twice"),
])
def test_an_entry_that_cannot_run_is_refused_at_start(entries, message, tmp_path):
  config = PipelineConfig(benchmarks=entries)
  with pytest.raises(UserError, match=message):
    Pipeline("toy", str(tmp_path), _stages("a", "b", []), config, settings=object())


def test_a_method_without_a_model_to_ask_refuses_them(pope_file, tmp_path):
  config = PipelineConfig(benchmarks=(("pope", *pope_file),))
  stages = [Stage("eval", lambda: {"recall": 1.0}, eval_label="retrieval")]  # no model
  with pytest.raises(UserError, match="no stage of this method evaluates a model"):
    Pipeline("clip", str(tmp_path), stages, config, settings=object())


def test_repeated_benchmarks_are_labelled_by_their_file():
  assert stage_benchmarks.labels((("refcoco", "/d/refcoco_val.jsonl"),
                                  ("refcoco", "/d/refcoco_testA.jsonl"), ("pope", "/p"))) == [
      "refcoco:refcoco_val", "refcoco:refcoco_testA", "pope"]


def test_the_config_field_reads_from_a_config_and_the_command_line():
  raw = sft.default_config()
  raw.pipeline.benchmarks = (("pope", "/data/pope", "/data/coco"), ["chair", "/data/ann"])
  assert sft.parse(raw).pipeline.benchmarks == (("pope", "/data/pope", "/data/coco"),
                                                ("chair", "/data/ann"))
