"""CaD-VI end to end on a tiny untrained model: every stage's artifacts, the mixture's repeats,
a training stage stopped and rerun to the same artifacts, and an interrupted phase-2
re-annotation resumed to the same file."""

import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
from training_fixtures import CACHE_DIR  # noqa: E402,F401  (turns the compile cache on)

from lvlm_jax.artifacts import read_jsonl  # noqa: E402
from lvlm_jax.data import training_sources  # noqa: E402
from lvlm_jax.data.tokenizer import load_tokenizer  # noqa: E402
from lvlm_jax.eval.cad_summary import CadEvalConfig  # noqa: E402
from lvlm_jax.eval.shapes import ShapesEvalConfig  # noqa: E402
from lvlm_jax.methods import cadvi  # noqa: E402
from lvlm_jax.models import hf  # noqa: E402
from lvlm_jax.sampling.service import GenerationService  # noqa: E402
from lvlm_jax.sharding import mesh_from_config  # noqa: E402


def tiny_config(tiny_shapes_export: str):
  config = cadvi.default_config()
  config.model.hf_dir = tiny_shapes_export
  config.model.tokenizer = ""
  config.model.use_lora = True
  config.model.lora.rank = 4
  config.model.lora.target = r"llm\.layers\.\d+\..*_proj"
  config.data.shapes.max_objects = 2
  config.data.shapes.image_size = 32
  config.data.phase1_pairs = 6
  config.data.phase2_pairs = 6
  config.data.base_tasks = (("caption", 4),)
  config.data.pipeline.system_prompt = ""
  config.data.pipeline.length_buckets = (64, 128)
  config.data.pipeline.read_threads = 1
  config.cad.summary_prompt = "Summarize the commonalities and differences of the two images."
  config.cad.context_prompt = "{context}\nSummarize the commonalities and differences."
  config.cad.selection_prompt = "{statement} Is it image 1 or image 2?"
  config.cad.generation.max_new_tokens = 6
  config.cad.generation.batch_size = 4
  config.optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.optim.lr = 1e-3
  config.train.batch_size = 4
  config.train.progress_bar = False
  config.train.peak_flops = 1e9
  config.checkpoint.every_steps = 1
  config.checkpoint.export_lora = False
  config.eval.yes_no = 4
  config.eval.grounding = 0
  config.eval.captions = 0
  config.eval.batch_size = 4
  config.cad_eval.selection = 4
  config.cad_eval.summaries = 4
  config.cad_eval.summary_tokens = 6
  config.cad_eval.batch_size = 4
  return cadvi.parse(config)


@pytest.fixture(scope="module")
def finished(tiny_shapes_export, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cadvi"))
  config = tiny_config(tiny_shapes_export)
  # Stopped in the middle of the final training, as a preemption does; the rerun resumes there.
  first = cadvi.run(config, workdir, stop_at={"phase2": 2})
  assert first["status"] == "preempted"
  assert not os.path.exists(os.path.join(workdir, "phase2", "export"))
  return config, workdir, cadvi.run(config, workdir)


def test_every_stage_leaves_its_artifacts(finished):
  config, workdir, summary = finished
  assert summary["status"] == "done"
  assert set(summary["eval"]) == {"base", "phase1", "phase2"}
  for metrics in summary["eval"].values():
    assert {"pair_selection_accuracy", "pair_selection_exact_match", "cad_summary_f1",
            "cad_summary_precision", "cad_summary_recall", "yes_no_accuracy"} <= set(metrics)
    assert metrics["pair_selection_questions"] == 4
  phase1 = read_jsonl(os.path.join(workdir, "data", "phase1.jsonl"))
  pairs = read_jsonl(os.path.join(workdir, "images", "pairs1.jsonl"))
  summaries = [r for r in phase1 if r["id"].endswith("-summary")]
  selections = [r for r in phase1 if "-select" in r["id"]]
  assert len(summaries) == 6 and 6 <= len(selections) <= 12
  for pair in pairs:
    chosen = [r for r in selections if r["id"].startswith(pair["id"] + "-select")]
    assert chosen and {r["conversations"][1]["value"] for r in chosen} == {
        r["id"].split("-select")[1][0] for r in chosen}  # -select1... answers 1
  for record, pair in zip(summaries, pairs):
    assert record["image"] == pair["images"] and len(record["image"]) == 2
    question = record["conversations"][0]["value"]
    assert question.startswith("Image 1: <image>\nImage 2: <image>\n")
    assert record["conversations"][1]["value"].startswith("Commonalities: ")
  assert {r["conversations"][1]["value"] for r in selections} <= {"1", "2"}
  phase2 = read_jsonl(os.path.join(workdir, "data", "phase2.jsonl"))
  assert len(phase2) == 6
  assert all(r["conversations"][0]["value"] == summaries[0]["conversations"][0]["value"]
             for r in phase2)
  for name, records in (("phase1", 4 + len(phase1)), ("phase2", 4 + 2 * len(phase1) + 6)):
    run = json.load(open(os.path.join(workdir, name, "summary.json")))
    assert run["status"] == "done" and run["step"] == round(records / 4)
    assert os.path.isdir(os.path.join(workdir, name, "export", "hf"))


def test_final_mixture_lists_phase1_data_twice(finished):
  config, workdir, _ = finished
  data = cadvi._training_data(  # noqa: SLF001
      config, (os.path.join(workdir, "data", "phase1.jsonl"),
               os.path.join(workdir, "data", "phase2.jsonl")), (2, 1),
      (os.path.join(workdir, "images"),))
  source = training_sources.training_source(data)
  ids = [source[i]["id"] for i in range(len(source))]
  phase1 = read_jsonl(os.path.join(workdir, "data", "phase1.jsonl"))
  assert sum(i.startswith("pairs1-") for i in ids) == 2 * len(phase1)
  assert sum(i.startswith("shapes-") for i in ids) == 4
  assert sum(i.startswith("pairs2-") for i in ids) == 6


def test_a_stopped_training_resumes_to_the_same_artifacts(finished, tmp_path):
  """A fresh run of the same config, never stopped, exports the same final weights as the run
  stopped at step 2 of its final training and rerun."""
  config, workdir, _ = finished
  straight = str(tmp_path / "straight")
  # Without evaluations, which change no artifact.
  cadvi.run(dataclasses.replace(config, eval=ShapesEvalConfig(0, 0, 0),
                                cad_eval=CadEvalConfig(0, 0)), straight)
  for name in ("data/phase1.jsonl", "data/phase2.jsonl"):
    assert open(os.path.join(straight, name)).read() == open(os.path.join(workdir, name)).read()
  ours = open(os.path.join(workdir, "phase2", "export", "hf", "model.safetensors"), "rb").read()
  assert open(os.path.join(straight, "phase2", "export", "hf", "model.safetensors"),
              "rb").read() == ours


def test_a_rerun_skips_finished_stages(finished, capsys):
  config, workdir, summary = finished
  mtimes = {p: os.path.getmtime(os.path.join(workdir, p)) for p in
            ("data/phase1.jsonl", "data/phase2.jsonl", "eval/phase2.json")}
  again = cadvi.run(config, workdir)
  assert again["eval"] == summary["eval"]
  assert mtimes == {p: os.path.getmtime(os.path.join(workdir, p)) for p in mtimes}
  assert "nothing to do" in capsys.readouterr().out


def test_interrupted_reannotation_resumes_to_the_same_file(finished, tmp_path, monkeypatch):
  """Kill simulated in the middle of phase 2's generation: one complete batch, part of the
  next and a torn line on disk. The resumed stage writes the uninterrupted run's file."""
  config, workdir, _ = finished
  done = open(os.path.join(workdir, "data", "phase2.jsonl")).read()
  lines = done.splitlines(keepends=True)
  path = str(tmp_path / "phase2.jsonl")
  with open(path + ".partial", "w") as f:
    f.write("".join(lines[:5]) + lines[5][:17])
  messages = []
  monkeypatch.setattr(cadvi, "_log", messages.append)
  mesh = mesh_from_config(config.mesh)
  export = os.path.join(workdir, "phase1", "export", "hf")
  model = hf.load_model(export, mesh=mesh)
  data = cadvi._pipeline_data(config, model, export, 4)  # noqa: SLF001
  service = GenerationService(model, load_tokenizer(config.model), data, mesh, 4)
  images = os.path.join(workdir, "images")
  cadvi.reannotate(service, config.cad, read_jsonl(os.path.join(images, "pairs2.jsonl")),
                   (images,), path)
  assert messages[0] == "phase2_data: resuming after 4 of 6 pairs"
  assert open(path).read() == done


def test_the_7b_recipe_parses_with_its_files(tiny_shapes_export, tmp_path):
  """configs/cadvi_llava15_7b.py with its files given: the paper's values, and a files run
  without phase2_data or phase2_pairs_file is refused."""
  from lvlm_jax.dataclass_config import load_config_file
  from lvlm_jax.errors import UserError
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  raw = load_config_file(os.path.join(repo, "configs", "cadvi_llava15_7b.py"))
  for name in ("base.json", "phase1.json", "phase2.json"):
    (tmp_path / name).write_text("[]")
  raw.model.hf_dir = tiny_shapes_export
  raw.data.base_conversations = (str(tmp_path / "base.json"),)
  raw.data.phase1_data = str(tmp_path / "phase1.json")
  raw.data.phase2_data = str(tmp_path / "phase2.json")
  config = cadvi.parse(raw)
  assert (config.model.lora.rank, config.model.lora.alpha, config.optim.lr) == (128, 256.0, 1e-4)
  assert config.optim.lr_groups == ((r"projector\..*", 2e-5),)
  assert config.cad.phase1_repeats == 2 and config.data.pipeline.max_images == 2
  raw.data.phase2_data = ""
  with pytest.raises(UserError, match="phase2_pairs_file"):
    cadvi.parse(raw)


def test_an_llm_phase1_writer_summarises_from_the_captions(finished, tiny_shapes_export,
                                                           tmp_path):
  """cad.phase1_writer = an HF model directory: each summary is that model's answer to the two
  captions and the instruction (here the tiny export, answering text-only), kept beside the
  data so that a rerun regenerates nothing."""
  config, workdir, _ = finished
  settings = dataclasses.replace(config.cad, phase1_writer=tiny_shapes_export)
  settings = dataclasses.replace(settings, llm_generation=dataclasses.replace(
      settings.llm_generation, max_new_tokens=3, batch_size=2))
  out = str(tmp_path / "phase1.jsonl")
  pairs = os.path.join(workdir, "images", "pairs1.jsonl")
  cadvi.write_phase1_data(dataclasses.replace(config, cad=settings), pairs, out,
                          mesh_from_config(config.mesh))
  written = read_jsonl(out + ".llm.jsonl")
  assert [r["id"] for r in written] == [p["id"] for p in read_jsonl(pairs)]
  records = {r["id"]: r for r in read_jsonl(out)}
  for row in written:
    assert records[row["id"] + "-summary"]["conversations"][1]["value"] == row["summary"]
