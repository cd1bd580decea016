"""CSR end to end on a tiny untrained model and a tiny CLIP: every stage's artifacts, the LLaVA
pair layout, and resumption: a run stopped in a round's DPO, and a search cut mid-file, resume to
the artifacts of an uninterrupted run."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
from training_fixtures import CACHE_DIR  # noqa: E402,F401  (turns the compile cache on)

from lvlm_jax.artifacts import read_jsonl  # noqa: E402
from lvlm_jax.data.tokenizer import load_tokenizer  # noqa: E402
from lvlm_jax.eval.clip_score import CLIPScorer  # noqa: E402
from lvlm_jax.methods import clip, csr  # noqa: E402
from lvlm_jax.sampling.service import GenerationService  # noqa: E402
from lvlm_jax.sharding import mesh_from_config  # noqa: E402


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
  config = clip.default_config()
  config.model.hidden_size = 16
  config.model.intermediate_size = 32
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.image_size = 16
  config.model.projection_dim = 8
  config.train.num_steps = 2
  config.train.batch_size = 4
  config.train.shapes.image_size = 32
  directory = str(tmp_path_factory.mktemp("clip") / "hf")
  clip.train(clip.parse(config), directory)
  return directory


def tiny_config(base: str, clip_dir: str, rounds: int = 2):
  config = csr.default_config()
  config.model.hf_dir = base
  config.model.tokenizer = ""
  config.model.use_lora = True
  config.model.lora.rank = 4
  config.model.lora.target = r"llm\.layers\.\d+\..*_proj"
  config.data.shapes.max_objects = 2
  config.data.shapes.image_size = 32
  config.data.num_prompts = 4
  config.data.pipeline.system_prompt = ""
  config.data.pipeline.length_buckets = (64, 128)
  config.data.pipeline.read_threads = 1
  config.csr.rounds = rounds
  config.csr.clip_dir = clip_dir
  config.csr.search_batch_size = 2
  config.csr.tree.sentences.max_new_tokens = 4
  config.csr.tree.max_response_tokens = 12
  config.csr.tree.max_sentences = 3
  config.dpo_optim.trainable = r".*\.lora_[ab]|projector\..*"
  config.dpo_optim.lr = 1e-3
  config.dpo_train.batch_size = 2
  config.dpo_train.progress_bar = False
  config.dpo_train.peak_flops = 1e9
  config.checkpoint.every_steps = 1
  config.checkpoint.export_lora = False
  config.eval.yes_no = 4
  config.eval.grounding = 0
  config.eval.captions = 4
  config.eval.batch_size = 4
  config.eval.caption_tokens = 6
  return csr.parse(config)


@pytest.fixture(scope="module")
def runs(tiny_shapes_export, clip_export, tmp_path_factory):
  """(config, straight workdir, its summary, resumed workdir, its summary)."""
  config = tiny_config(tiny_shapes_export, clip_export)
  straight = str(tmp_path_factory.mktemp("straight"))
  summary = csr.run(config, straight)
  resumed = str(tmp_path_factory.mktemp("resumed"))
  first = csr.run(config, resumed, stop_at={"round_1/dpo": 1})
  assert first["status"] == "preempted"
  assert not os.path.exists(os.path.join(resumed, "round_1", "dpo", "export"))
  return config, straight, summary, resumed, csr.run(config, resumed)


def test_every_stage_leaves_its_artifacts(runs):
  config, workdir, summary, _, _ = runs
  assert summary["status"] == "done"
  assert list(summary["eval"]) == ["base", "round_1", "round_2"]
  for metrics in summary["eval"].values():
    assert {"yes_no_accuracy", "caption_chair_i", "caption_chair_s",
            "caption_recall"} <= set(metrics)
  assert [s["name"] for s in summary["stages"]] == [
      "images", "eval_base", "round_1/search", "round_1/pairs", "round_1/dpo", "eval_round_1",
      "round_2/search", "round_2/pairs", "round_2/dpo", "eval_round_2"]
  prompts = csr.load_prompts("shapes")
  for k in (1, 2):
    trees = read_jsonl(os.path.join(workdir, f"round_{k}", "search", "trees.jsonl"))
    assert len(trees) == 4
    pairs = read_jsonl(os.path.join(workdir, f"round_{k}", "pairs", "pairs.jsonl"))
    assert 1 <= len(pairs) <= 4
    for pair in pairs:
      question = pair["conversations"][0]["value"]
      assert question.replace("<image>", "").strip() in prompts
      assert pair["conversations"][0] == pair["rejected_conversations"][0]
      assert [t["from"] for t in pair["conversations"]] == ["human", "gpt"]
      chosen, rejected = pair["conversations"][1]["value"], pair[
          "rejected_conversations"][1]["value"]
      assert chosen != rejected and pair["chosen_score"] >= pair["rejected_score"]
      nodes = next(t for t in trees if t["id"] == pair["id"])["nodes"]
      finals = {n["text"] for n in nodes if n["final"]}
      assert chosen in finals and rejected in finals
    dpo = json.load(open(os.path.join(workdir, f"round_{k}", "dpo", "summary.json")))
    assert dpo["status"] == "done" and dpo["step"] == -(-len(pairs) // 2)
    assert os.path.isdir(os.path.join(workdir, f"round_{k}", "dpo", "export", "hf"))
  assert summary["eval"]["round_2"]["model"].endswith("round_2/dpo/export/hf")


def test_a_run_stopped_in_dpo_resumes_to_the_same_artifacts(runs):
  _, straight, summary, resumed, again = runs
  assert again["status"] == "done"
  for name in ("round_1/search/trees.jsonl", "round_1/pairs/pairs.jsonl",
               "round_2/search/trees.jsonl", "round_2/pairs/pairs.jsonl"):
    assert open(os.path.join(straight, name)).read() == open(os.path.join(resumed, name)).read()
  strip = lambda evals: {k: {m: v for m, v in e.items() if m != "model"} for k, e in evals.items()}
  assert strip(again["eval"]) == strip(summary["eval"])


def test_a_rerun_skips_finished_stages(runs, capsys):
  config, straight, summary, _, _ = runs
  assert csr.run(config, straight)["eval"] == summary["eval"]
  assert "search:" not in capsys.readouterr().out


def test_interrupted_search_resumes_to_the_same_file(runs, tmp_path, monkeypatch, clip_export):
  """The partial file holds one complete batch, part of the next and a torn line."""
  config, straight, _, _, _ = runs
  done = open(os.path.join(straight, "round_1", "search", "trees.jsonl")).read()
  lines = done.splitlines(keepends=True)
  path = str(tmp_path / "trees.jsonl")
  with open(path + ".partial", "w") as f:
    f.write("".join(lines[:3]) + lines[3][:40])
  messages = []
  monkeypatch.setattr(csr, "_log", messages.append)
  mesh = mesh_from_config(config.mesh)
  model, data = csr._load(config, config.model.hf_dir, mesh)  # noqa: SLF001
  service = GenerationService(model, load_tokenizer(config.model), data, mesh, 2)
  scorer = CLIPScorer.load(clip_export, clamp=True)
  csr.search_trees(service, scorer, csr.Inputs(config, straight, "<image>"), config.csr.tree,
                   path)
  assert messages[0] == "search: resuming after 2 of 4 prompts"
  assert open(path).read() == done
