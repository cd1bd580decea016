"""STIC end to end on a tiny untrained model: every stage's artifacts, the corrupted-image branch,
a rerun that skips finished stages, and an interrupted generation stage resumed to the same file."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
from training_fixtures import CACHE_DIR  # noqa: E402,F401  (turns the compile cache on)

from lvlm_jax.data.shapes import ShapesConfig, ShapesSource  # noqa: E402
from lvlm_jax.data.tokenizer import load_tokenizer  # noqa: E402
from lvlm_jax.methods import stic  # noqa: E402
from lvlm_jax.artifacts import read_jsonl  # noqa: E402
from lvlm_jax.sampling.service import GenerationService  # noqa: E402
from lvlm_jax.sharding import mesh_from_config  # noqa: E402

def tiny_config(tiny_shapes_export: str):
  config = stic.default_config()
  config.model.hf_dir = tiny_shapes_export
  config.model.tokenizer = ""
  config.model.use_lora = True
  config.model.lora.rank = 4
  config.model.lora.target = r"llm\.layers\.\d+\..*_proj"
  config.data.shapes.max_objects = 2
  config.data.shapes.image_size = 32
  config.data.num_unlabeled = 12
  config.data.sft_tasks = (("caption", 4), ("yes_no", 4))
  config.data.pipeline.system_prompt = ""
  config.data.pipeline.length_buckets = (64, 128)
  config.data.pipeline.read_threads = 1
  config.stic.low_resolution_side = 4
  config.stic.generation.max_new_tokens = 6
  config.stic.generation.batch_size = 4
  config.dpo.nll_coef = 1 / 1024
  config.dpo.reference = "precomputed"
  config.dpo_optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.dpo_optim.lr = 1e-3
  config.sft_optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.sft_optim.lr = 1e-3
  for section in ("dpo_train", "sft_train"):
    config[section].batch_size = 4
    config[section].progress_bar = False
    config[section].peak_flops = 1e9
  config.checkpoint.every_steps = 1
  config.checkpoint.export_lora = False
  config.eval.yes_no = 4
  config.eval.grounding = 0
  config.eval.captions = 4
  config.eval.batch_size = 4
  config.eval.caption_tokens = 6
  return stic.parse(config)


@pytest.fixture(scope="module")
def finished(tiny_shapes_export, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stic"))
  config = tiny_config(tiny_shapes_export)
  # Stopped in the middle of stage-1 training, as a preemption does; the rerun resumes there.
  first = stic.run(config, workdir, stop_at={"dpo": 2})
  assert first["status"] == "preempted"
  assert not os.path.exists(os.path.join(workdir, "dpo", "export"))
  return config, workdir, stic.run(config, workdir)


def test_every_stage_leaves_its_artifacts(finished):
  config, workdir, summary = finished
  assert summary["status"] == "done"
  assert set(summary["eval"]) == {"base", "dpo", "sft"}
  for metrics in summary["eval"].values():
    assert {"yes_no_accuracy", "dar_yes_no_accuracy", "caption_chair_i", "caption_chair_s",
            "caption_recall"} <= set(metrics)
  pairs = read_jsonl(os.path.join(workdir, "preferences", "preferences.ref.jsonl"))
  assert len(pairs) == 12
  simple = stic.load_prompts("shapes")["simple"]
  for pair in pairs:
    assert pair["prompt"].removeprefix("<image>\n") in simple
    assert isinstance(pair["ref_chosen_logp"], float) and pair["ref_chosen_logp"] < 0
    assert os.path.exists(os.path.join(workdir, "images", pair["image"]))
  kinds = {p["rejected_kind"] for p in pairs}
  assert kinds == {"misleading_prompt", "corrupted_image"}, kinds
  dpo_summary = json.load(open(os.path.join(workdir, "dpo", "summary.json")))
  assert dpo_summary["status"] == "done" and dpo_summary["step"] == 3  # 12 pairs / 4
  infused = read_jsonl(os.path.join(workdir, "sft_data", "infused.jsonl"))
  descriptions = read_jsonl(os.path.join(workdir, "sft_data", "descriptions.jsonl"))
  assert len(infused) == len(descriptions) == 8
  for record, described in zip(infused, descriptions):
    question = record["conversations"][0]["value"]
    assert question.startswith("<image>\nImage description:\n" + described["description"] + "\n\n")
  assert os.path.isdir(os.path.join(workdir, "sft", "export", "hf"))


def test_a_rerun_skips_finished_stages(finished, capsys):
  config, workdir, summary = finished
  mtimes = {p: os.path.getmtime(os.path.join(workdir, p)) for p in
            ("preferences/preferences.jsonl", "sft_data/infused.jsonl", "eval/sft.json")}
  again = stic.run(config, workdir)
  assert again["eval"] == summary["eval"]
  assert mtimes == {p: os.path.getmtime(os.path.join(workdir, p)) for p in mtimes}
  assert "preferences:" not in capsys.readouterr().out


def test_interrupted_generation_resumes_to_the_same_file(finished, tmp_path, monkeypatch):
  """Kill simulated in the middle of stage 1's generation: the partial file holds one complete
  batch, part of the next and a torn line. The resumed stage writes what the uninterrupted run
  wrote, byte for byte."""
  config, workdir, _ = finished
  done = open(os.path.join(workdir, "preferences", "preferences.jsonl")).read()
  lines = done.splitlines(keepends=True)
  path = str(tmp_path / "preferences.jsonl")
  with open(path + ".partial", "w") as f:
    f.write("".join(lines[:6]) + lines[6][:17])
  messages = []
  monkeypatch.setattr(stic, "_log", messages.append)
  mesh = mesh_from_config(config.mesh)
  model, data = stic._load(config, config.model.hf_dir, mesh)  # noqa: SLF001
  tokenizer = load_tokenizer(config.model)
  service = GenerationService(model, tokenizer, data, mesh, config.stic.generation.batch_size)
  stic.generate_preferences(service, stic.Inputs(config, workdir), stic.load_prompts("shapes"),
                            config.stic, path, "<image>")
  assert "preferences: resuming after 4 of 12 pairs" in messages
  assert messages[-1] == "preferences: 12/12"
  assert len([m for m in messages if m.startswith("preferences: ") and "/" in m]) == 2
  assert open(path).read() == done


def test_files_source_gives_the_same_pairs(finished, tmp_path):
  """source='files' (STIC's COCO list + LLaVA SFT file) over the shapes run's own files: the same
  images in the same batches give the same preference pairs."""
  config, workdir, _ = finished
  images = os.path.join(workdir, "images")
  files = dataclasses.replace(
      config, data=dataclasses.replace(
          config.data, source="files", num_unlabeled=8, image_root=images,
          unlabeled_list=os.path.join(images, "unlabeled.json"),
          sft_conversations=os.path.join(images, "sft.jsonl")),
      eval=dataclasses.replace(config.eval, yes_no=0, captions=0))
  out = str(tmp_path / "run")
  assert stic.run(files, out, stop_at={"dpo": 1})["status"] == "preempted"
  assert not os.path.exists(os.path.join(out, "images"))
  pairs = read_jsonl(os.path.join(out, "preferences", "preferences.jsonl"))
  assert pairs == read_jsonl(os.path.join(workdir, "preferences", "preferences.jsonl"))[:8]


def test_the_corrupted_branch_corrupts_the_image():
  """STIC's released code forgets the corruption; here a corrupted_image pair's rejected answer is
  generated from an image that differs from the clean one."""
  settings = stic.STICSettings(low_resolution_side=4)
  prompts = stic.load_prompts("shapes")
  image = ShapesSource(ShapesConfig(), "unlabeled", 1)[0]["images"][0]
  plans = [stic.pair_plan(i, image, prompts, settings) for i in range(40)]
  corrupted = [p for p in plans if p["rejected_kind"] == "corrupted_image"]
  misleading = [p for p in plans if p["rejected_kind"] == "misleading_prompt"]
  assert 10 < len(corrupted) < 30 and misleading
  assert {p["corruption"] for p in corrupted} == {"low_resolution", "color_jitter"}
  for p in corrupted:
    assert p["rejected_image"].shape == image.shape
    assert not np.array_equal(p["rejected_image"], image)
    assert p["rejected_prompt"] == p["prompt"] in prompts["simple"]
  for p in misleading:
    assert p["rejected_image"] is image and p["rejected_prompt"] in prompts["misleading"]
  assert stic.pair_plan(3, image, prompts, settings)["prompt"] == plans[3]["prompt"]


def stage(summary: dict, name: str) -> dict:
  return next(s for s in summary["stages"] if s["name"] == name)


def test_pair_quality_judges_every_pair_against_its_scene(finished):
  config, workdir, summary = finished
  rows = read_jsonl(os.path.join(workdir, "preferences", "quality.jsonl"))
  pairs = read_jsonl(os.path.join(workdir, "preferences", "preferences.jsonl"))
  assert [r["id"] for r in rows] == [p["id"] for p in pairs]
  quality = stage(summary, "pair_quality")["quality"]
  assert quality["all"]["pairs"] == 12
  assert sum(quality[k]["pairs"] for k in quality if k != "all") == 12
  assert set(quality) - {"all"} <= {"misleading_prompt", "low_resolution", "color_jitter"}
  for row, pair in zip(rows, pairs):
    assert row["kind"] == (pair["corruption"] or "misleading_prompt")


def test_the_oracle_filter_keeps_the_truly_better_pairs(finished, tmp_path):
  """Pairs rewritten so that the truth is known: chosen the exact caption and rejected empty
  (truly better), or the other way round. The oracle keeps exactly the first kind."""
  import shutil
  from lvlm_jax.artifacts import write_jsonl
  from lvlm_jax.data.shapes import Scene, caption
  config, workdir, _ = finished
  out = tmp_path / "oracle"
  shutil.copytree(os.path.join(workdir, "images"), out / "images")
  pairs = read_jsonl(os.path.join(workdir, "preferences", "preferences.jsonl"))
  source = ShapesSource(stic._world(config, stic._UNLABELED_WORLD), "unlabeled", 12)  # noqa: SLF001
  for i, pair in enumerate(pairs):
    truth = caption(Scene.from_json(source[i]["scene"]))
    pair["chosen"], pair["rejected"] = (truth, "") if i % 3 == 0 else ("", truth)
  write_jsonl(str(out / "preferences" / "preferences.jsonl"), pairs)
  oracle = dataclasses.replace(
      config, stic=dataclasses.replace(config.stic, pair_filter="oracle"),
      eval=dataclasses.replace(config.eval, yes_no=0, captions=0),
      pipeline=dataclasses.replace(config.pipeline, stop_after="oracle_filter"))
  summary = stic.run(oracle, str(out))
  assert stage(summary, "oracle_filter")["pairs"] == 4
  kept = read_jsonl(str(out / "preferences" / "preferences.oracle.jsonl"))
  assert [p["id"] for p in kept] == [p["id"] for i, p in enumerate(pairs) if i % 3 == 0]
  assert stage(summary, "pair_quality")["quality"]["all"]["chosen_better"] == 4 / 12
