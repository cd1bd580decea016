"""SC-Tune end to end on a tiny untrained model: the phases alternate, the rollouts carry what the
PPO step needs, and a run stopped in the middle of the describer phase resumes bitwise equal to
an uninterrupted one."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import safetensors.numpy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
from training_fixtures import CACHE_DIR  # noqa: E402,F401  (turns the compile cache on)

from lvlm_jax.data import text  # noqa: E402
from lvlm_jax.methods import sctune  # noqa: E402


def tiny_config(tiny_shapes_export: str, num_steps: int = 5, length_buckets=None):
  config = sctune.default_config()
  config.model.hf_dir = tiny_shapes_export
  config.model.tokenizer = ""
  config.data.shapes.max_objects = 2
  config.data.shapes.image_size = 32
  config.data.num_boxes = 32
  config.data.pipeline.system_prompt = ""
  if length_buckets:
    config.data.pipeline.length_buckets = length_buckets
  config.sctune.describer_steps = 2
  config.sctune.locator_steps = 1
  config.sctune.describer_lr = 1e-3
  config.sctune.locator_lr = 1e-3
  config.sctune.max_description_tokens = 6
  config.sctune.max_box_tokens = 6
  config.optim.trainable = r"llm\..*|projector\..*"
  config.train.num_steps = num_steps  # describer 1-2, locator 3, describer 4-5
  config.train.batch_size = 4
  config.train.log_every = 1
  config.train.progress_bar = False
  config.train.peak_flops = 1e9
  config.train.tensorboard = False
  config.checkpoint.every_steps = 1
  config.checkpoint.export_lora = False
  config.eval.yes_no = 4
  config.eval.grounding = 4
  config.eval.captions = 0
  config.eval.self_consistency = 4
  config.eval.batch_size = 4
  config.eval.box_tokens = 6
  return sctune.parse(config)


def train_log(workdir) -> dict[int, dict]:
  with open(os.path.join(workdir, "sctune", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r["kind"] == "train"]
  assert len({r["step"] for r in train}) == len(train), "a step logged twice"
  return {r["step"]: r for r in train}


@pytest.fixture(scope="module")
def straight(tiny_shapes_export, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary = sctune.run(tiny_config(tiny_shapes_export), workdir)
  assert summary["status"] == "done"
  return workdir, summary


def test_the_cycle_runs_and_reports_its_metrics(straight):
  workdir, summary = straight
  assert set(summary["eval"]) == {"base", "sctune"}
  for metrics in summary["eval"].values():
    assert {"self_consistency_acc50", "grounding_acc50", "yes_no_accuracy"} <= set(metrics)
  log = train_log(workdir)
  assert [int(log[s]["phase"]) for s in range(1, 6)] == [0, 0, 1, 0, 0]
  for step in (1, 2, 4, 5):  # describer: PPO metrics
    record = log[step]
    assert {"reward", "baseline", "advantage", "kl", "clip_fraction", "ratio", "policy_kl",
            "epochs_run"} <= set(record)
    assert 0 <= record["reward"] <= 1 and 1 <= record["epochs_run"] <= 2
    assert np.isfinite(record["loss"])
  assert np.isfinite(log[3]["loss"]) and "reward" not in log[3]  # locator: SFT
  assert os.path.isdir(os.path.join(workdir, "sctune", "export", "hf"))


@pytest.mark.parametrize("hf_dir", ["shapes_llava_next_dir", "shapes_llava_onevision_dir"])
def test_an_anyres_cycle_trains_both_phases(hf_dir, request, tmp_path):
  """From an HF LLaVA-NeXT or LLaVA-OneVision (its feature cap shrinking every 2 x 2 tile
  image): rollouts, PPO and locator batches carry AnyRes images with each image's token count
  (and OneVision's feature grids)."""
  config = tiny_config(request.getfixturevalue(hf_dir), num_steps=3, length_buckets=(128,))
  summary = sctune.run(config, str(tmp_path))
  assert summary["status"] == "done"
  log = train_log(str(tmp_path))
  assert [int(log[s]["phase"]) for s in (1, 2, 3)] == [0, 0, 1]
  assert all(np.isfinite(log[s]["loss"]) for s in (1, 2, 3)) and 0 <= log[1]["reward"] <= 1
  assert 0 <= summary["eval"]["sctune"]["self_consistency_acc50"] <= 1


def test_a_qwen2_vl_cycle_trains_both_phases(tiny_qwen2_vl_dir, tmp_path):
  """From an HF Qwen2-VL with configs/sctune_qwen2vl.py's prompts and box markup: rollouts, PPO
  and locator batches carry each image's patches and M-RoPE grids; the evaluators run on it."""
  from lvlm_jax.dataclass_config import load_config_file
  recipe = load_config_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                         "sctune_qwen2vl.py"))
  config = tiny_config(tiny_qwen2_vl_dir, num_steps=3, length_buckets=(128,))
  pipeline = recipe.data.pipeline
  config = dataclasses.replace(config, data=dataclasses.replace(
      config.data, pipeline=dataclasses.replace(
          config.data.pipeline, template=pipeline.template, grounding_prompt=pipeline.grounding_prompt,
          box_format=text.BoxFormat(**pipeline.box_format))),
      sctune=dataclasses.replace(config.sctune, describer_prompt=recipe.sctune.describer_prompt,
                                 describer_answer_start=""))
  assert config.data.pipeline.box_format == text.QWEN2_VL_BOXES
  summary = sctune.run(config, str(tmp_path))
  assert summary["status"] == "done"
  log = train_log(str(tmp_path))
  assert [int(log[s]["phase"]) for s in (1, 2, 3)] == [0, 0, 1]
  assert all(np.isfinite(log[s]["loss"]) for s in (1, 2, 3)) and 0 <= log[1]["reward"] <= 1
  # The locator's loss is on the box tokens after <|box_start|>, which a box of 4 numbers has.
  assert log[3]["loss_tokens"] >= 4 * config.train.batch_size
  assert 0 <= summary["eval"]["sctune"]["self_consistency_acc50"] <= 1


def test_qwen25_pixel_boxes_are_written_in_each_images_resized_size(tiny_qwen2_vl_dir, tmp_path):
  """Qwen2.5-VL's JSON boxes in absolute pixels of the image as the model sees it: the describer
  prompt, the locator target and the parsed answers each use their image's resized size, and the
  locator's loss covers the whole JSON answer (the format has no opening token)."""
  config = tiny_config(tiny_qwen2_vl_dir, num_steps=3, length_buckets=(128,))
  config = dataclasses.replace(config, data=dataclasses.replace(
      config.data, pipeline=dataclasses.replace(
          config.data.pipeline, template="chatml", box_format=text.QWEN25_VL_BOXES,
          grounding_prompt="<image>\nOutput the bounding box of {expression} as JSON.")),
      sctune=dataclasses.replace(config.sctune, describer_prompt=(
          "<image>\nWhat is the object at {box}? Answer with a short description."),
          describer_answer_start="", max_box_tokens=24))
  from lvlm_jax.models import building
  data = config.data.pipeline.for_model(building.abstract_model(config.model, None),
                                        tiny_qwen2_vl_dir)
  image = np.zeros((40, 70, 3), np.uint8)
  height, width = data.qwen2_vl.resized_size(40, 70)
  assert (height, width) != (40, 70)  # the resize changes the pixel coordinates
  box = [0.25, 0.5, 0.75, 1.0]
  written = data.box_text(box, image)
  assert written == text.QWEN25_VL_BOXES.to_text(box, (height, width))
  assert f"[{round(0.25 * width)}, {round(0.5 * height)}, {round(0.75 * width)}, {height}]" in written
  np.testing.assert_allclose(data.parse_box(written, image), box, atol=1 / min(height, width))

  summary = sctune.run(config, str(tmp_path))
  assert summary["status"] == "done"
  log = train_log(str(tmp_path))
  assert [int(log[s]["phase"]) for s in (1, 2, 3)] == [0, 0, 1]
  # The whole answer '{"bbox_2d": [x1, y1, x2, y2]}' and the end token: far more than 4 a row.
  assert log[3]["loss_tokens"] >= 10 * config.train.batch_size
  assert 0 <= summary["eval"]["sctune"]["self_consistency_acc50"] <= 1


def test_stopped_mid_describer_phase_resumes_bitwise(tiny_shapes_export, straight, tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(tiny_shapes_export)
  assert sctune.run(config, workdir, stop_at=1)["status"] == "preempted"
  assert sctune.run(config, workdir)["status"] == "done"
  assert_same_but_timing(train_log(workdir), train_log(straight[0]))
  a = safetensors.numpy.load_file(os.path.join(workdir, "sctune", "export", "hf",
                                               "model.safetensors"))
  b = safetensors.numpy.load_file(os.path.join(straight[0], "sctune", "export", "hf",
                                               "model.safetensors"))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def assert_same_but_timing(a: dict, b: dict) -> None:
  """The logs agree on every step and every number but the timings."""
  timing = {"step_time", "tokens_per_s", "mfu", "compile_s"}
  strip = lambda log: {s: {k: v for k, v in r.items() if k not in timing} for s, r in log.items()}
  assert strip(a) == strip(b)
