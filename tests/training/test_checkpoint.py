"""Checkpoints: an interrupted run resumes exactly (bitwise, on the same machine and program), a
SIGTERM saves and exits, kill -9 in the middle of a save leaves the previous checkpoint usable,
and the final exports are written."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from training_fixtures import REPO, run_python, subprocess_env, tiny_run_config, write_config_file
from lvlm_jax.methods import sft


def train_losses(workdir) -> dict[int, float]:
  """step -> loss from a run's metrics.jsonl (a resumed run appends to the same file)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["kind"] == "train":
        assert record["step"] not in out, f"step {record['step']} logged twice"
        out[record["step"]] = record["loss"]
  return out


def run(workdir, stop_at=None, **overrides):
  config = tiny_run_config(**overrides)
  return sft.run(sft.parse(config), str(workdir), raw_config=config, stop_at=stop_at)


def trained_step(summary) -> int:
  """The step the SFT pipeline's training stage reached."""
  return next(s for s in summary["stages"] if s["name"] == "sft")["step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  summary = run(workdir, **{"train.num_steps": 40, "checkpoint.every_steps": 5})
  assert summary["status"] == "done" and trained_step(summary) == 40
  return workdir


def test_interrupted_run_resumes_bitwise(straight, tmp_path):
  """Steps 1-6, stop (as preempted), restart, steps 7-40: the same losses, bit for bit. The data
  iterator, RNG and optimizer state are restored exactly and the compiled program is the same,
  so nothing can differ; keep-last-2 leaves only the newest checkpoints."""
  settings = {"train.num_steps": 40, "checkpoint.every_steps": 5}
  first = run(tmp_path, stop_at=6, **settings)
  assert first["status"] == "preempted" and trained_step(first) == 6
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5", "6"]
  second = run(tmp_path, **settings)
  assert second["status"] == "done" and trained_step(second) == 40
  resumed, expected = train_losses(tmp_path), train_losses(straight)
  assert sorted(resumed) == list(range(1, 41))
  assert resumed == expected
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["35", "40"]


def test_sigterm_saves_and_the_rerun_finishes(straight, tmp_path):
  """The real CLI: SIGTERM mid-run -> checkpoint + exit 75; the same command again resumes."""
  config = write_config_file(tmp_path / "tiny.py", **{"train.num_steps": 40,
                                                       "checkpoint.every_steps": 5})
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "lvlm_jax.train", "--config", config, "--workdir", str(workdir)]
  # The default XLA optimisation level, as in this process: the same program as `straight`.
  env = subprocess_env(fast_compile=False)
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and sum(1 for _ in open(metrics)) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.01)
  _, stderr = proc.communicate(timeout=240)
  assert proc.returncode == 75, stderr[-3000:]
  stopped_at = max(train_losses(workdir))
  assert 3 <= stopped_at < 40
  assert str(stopped_at) in os.listdir(workdir / "checkpoints")
  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resuming from step {stopped_at}" in rerun.stdout
  assert train_losses(workdir) == train_losses(straight)


KILL_SCRIPT = r"""
import os, signal, sys
import jax.numpy as jnp
from lvlm_jax.training.checkpoint import CheckpointConfig, Checkpointer
checkpointer = Checkpointer(sys.argv[1], CheckpointConfig(every_steps=1, keep=3))
checkpointer.save(1, {"w": jnp.full((64, 1024, 1024), 1.0), "step": jnp.asarray(1)}, None)
checkpointer.wait()
checkpointer.save(2, {"w": jnp.full((64, 1024, 1024), 2.0), "step": jnp.asarray(2)}, None)
os.kill(os.getpid(), signal.SIGKILL)  # while the 256 MB of step 2 are being written
"""


def test_kill_9_during_a_save_keeps_the_previous_checkpoint(tmp_path):
  import jax
  import jax.numpy as jnp
  from lvlm_jax.training.checkpoint import CheckpointConfig, Checkpointer
  directory = str(tmp_path / "checkpoints")
  proc = run_python(["-c", KILL_SCRIPT, directory])
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  checkpointer = Checkpointer(directory, CheckpointConfig(every_steps=1, keep=3))
  assert checkpointer.latest_step() == 1
  abstract = {"w": jax.ShapeDtypeStruct((64, 1024, 1024), jnp.float32),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
  restored = checkpointer.restore(1, abstract, None)
  assert int(restored["step"]) == 1 and float(restored["w"].min()) == float(restored["w"].max()) == 1.0
  # The partial step 2 is gone (cleaned up on start) or was never made visible.
  assert not any(name.startswith("2") for name in os.listdir(directory)), os.listdir(directory)
  checkpointer.close()


@pytest.fixture(scope="module")
def shapes_llava_dir(tmp_path_factory):
  """A tiny HF LLaVA whose vocabulary is the shapes tokenizer's (image token <image> = 4)."""
  import torch
  import transformers
  from lvlm_jax.data.pipeline import DataConfig
  from lvlm_jax.data.tokenizer import load_tokenizer
  from lvlm_jax.models.building import ModelConfig
  torch.manual_seed(0)
  vocab = len(load_tokenizer(ModelConfig(), (DataConfig().grounding_prompt,)))
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2, num_attention_heads=2,
                                                  image_size=16, patch_size=8),
      text_config=transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, max_position_embeddings=128),
      image_token_id=4, vision_feature_layer=-2)
  directory = tmp_path_factory.mktemp("shapes_llava")
  transformers.LlavaForConditionalGeneration(config).eval().save_pretrained(str(directory))
  return str(directory)


def test_lora_run_from_hf_resumes_and_exports(shapes_llava_dir, tmp_path):
  """From an HF LLaVA with LoRA, frozen weights not checkpointed: stop at step 2, resume (the
  frozen base re-read from hf_dir) to step 4, export the merged model and the adapters."""
  import safetensors.numpy
  import transformers
  settings = {"train.num_steps": 4, "checkpoint.every_steps": 2, "model.hf_dir": shapes_llava_dir,
              "model.use_lora": True, "model.lora.rank": 4,
              "model.lora.target": r"llm\.layers\.\d+\..*_proj",
              "optim.trainable": r".*\.lora_[ab]|projector\..*",
              "optim.lr_groups": ((r"projector\..*", 1e-3),),
              "checkpoint.save_frozen": False, "checkpoint.export_hf": True,
              "checkpoint.export_lora": True}
  assert run(tmp_path, stop_at=2, **settings)["status"] == "preempted"
  with open(tmp_path / "checkpoints" / "2" / "state" / "_METADATA") as f:
    saved = json.load(f)["tree_metadata"]
  assert not any(key.startswith("('frozen'") for key in saved)
  assert any(key.startswith("('params', 'projector'") for key in saved)
  assert run(tmp_path, **settings)["status"] == "done"
  losses = train_losses(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert all("lr/projector\\..*" in r for r in records if r["kind"] == "train")
  hf_dir = tmp_path / "export" / "hf"
  model = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_dir))
  assert model.config.text_config.num_hidden_layers == 2
  assert transformers.AutoTokenizer.from_pretrained(str(hf_dir)).convert_tokens_to_ids("<image>") == 4
  adapter = safetensors.numpy.load_file(str(tmp_path / "export" / "lora" / "adapter_model.safetensors"))
  config = json.load(open(tmp_path / "export" / "lora" / "adapter_config.json"))
  assert config["r"] == 4 and config["lora_alpha"] == 16.0 and "q_proj" in config["target_modules"]
  assert config["base_model_name_or_path"] == shapes_llava_dir
  a = adapter["base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"]
  b = adapter["base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_B.weight"]
  assert a.shape == (4, 32) and b.shape == (32, 4) and np.abs(b).max() > 0
  # The export merged the adapters: base q_proj + B @ A * alpha / r.
  base = transformers.LlavaForConditionalGeneration.from_pretrained(shapes_llava_dir)
  merged = model.model.language_model.layers[0].self_attn.q_proj.weight.detach().numpy()
  original = base.model.language_model.layers[0].self_attn.q_proj.weight.detach().numpy()
  np.testing.assert_allclose(merged, original + b @ a * 4.0, rtol=1e-5, atol=1e-6)


def test_evaluate_cli_on_a_workdir_and_an_export(shapes_llava_dir, tmp_path, capsys):
  """`python -m lvlm_jax.evaluate` on a run's latest checkpoint (frozen base from hf_dir) and on
  its HF export: the same model, so the same teacher-forced yes/no answers."""
  from lvlm_jax import evaluate
  settings = {"train.num_steps": 2, "model.hf_dir": shapes_llava_dir, "model.use_lora": True,
              "model.lora.rank": 4, "model.lora.dropout": 0.05,
              "model.lora.target": r"llm\.layers\.\d+\..*_proj",
              "optim.trainable": r".*\.lora_[ab]|projector\..*", "checkpoint.save_frozen": False,
              "checkpoint.export_hf": True}
  run(tmp_path / "run", **settings)
  sizes = ["--yes_no", "8", "--grounding", "2", "--captions", "2"]
  from_workdir = evaluate.evaluate(evaluate.parse_args(["--workdir", str(tmp_path / "run"), *sizes]))
  assert from_workdir["step"] == 2 and os.path.exists(tmp_path / "run" / "eval.json")
  config = write_config_file(tmp_path / "tiny.py", **settings)
  from_export = evaluate.evaluate(evaluate.parse_args(
      ["--model", str(tmp_path / "run" / "export" / "hf"), "--config", config, *sizes]))
  assert from_export["yes_no_accuracy"] == from_workdir["yes_no_accuracy"]
  assert 0 <= from_export["grounding_acc50"] <= 1
  assert '"yes_no_accuracy"' in capsys.readouterr().out


def test_kill_9_mid_run_logs_each_step_once_and_sums_wall_time(tmp_path):
  """kill -9 a few steps after a checkpoint, then the same command: the steps after it run
  again, but metrics.jsonl holds every step once, with an uninterrupted run's losses; the wall
  time counts both attempts."""
  settings = {"train.num_steps": 300, "checkpoint.every_steps": 5}
  straight = train_losses_of(run(tmp_path / "straight", **settings), tmp_path / "straight")
  config = write_config_file(tmp_path / "tiny.py", **settings)
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "lvlm_jax.train", "--config", config, "--workdir", str(workdir)]
  env = subprocess_env(fast_compile=False)
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics, checkpoints = workdir / "metrics.jsonl", workdir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    saved = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] if checkpoints.exists() else []
    if saved and sum(1 for _ in open(metrics)) >= max(saved) + 2:
      proc.kill()
      break
    time.sleep(0.002)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  logged = [json.loads(line)["step"] for line in open(metrics)]
  first_attempt = json.load(open(workdir / "wall_time.json"))["last_attempt_s"]
  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  resumed = int(rerun.stdout.split("resuming from step ")[1].split()[0])
  assert resumed < max(logged), "the kill came after the last checkpoint: nothing to re-log"
  assert train_losses(workdir) == straight  # train_losses asserts each step once
  summary = json.load(open(workdir / "train_summary.json"))
  assert summary["wall_time_s"] > first_attempt > 0


def train_losses_of(summary, workdir) -> dict[int, float]:
  assert summary["status"] == "done"
  return train_losses(workdir)


def test_every_steps_0_saves_only_at_the_end(tmp_path):
  summary = run(tmp_path, **{"train.num_steps": 4, "checkpoint.every_steps": 0})
  assert trained_step(summary) == 4
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_torn_summaries_only_redo_their_stage(tmp_path):
  """A crash that leaves zeroed summary files: the rerun finds the finished training in its
  checkpoints and completes, instead of failing on the JSON."""
  settings = {"train.num_steps": 4, "checkpoint.every_steps": 2}
  first = run(tmp_path, **settings)
  for name in ("pipeline.json", "summary.json", "train_summary.json"):
    open(tmp_path / name, "w").close()
  again = run(tmp_path, **settings)
  assert again["status"] == "done" and trained_step(again) == 4
  assert trained_step(first) == 4
  assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4]


def test_sigterm_during_an_evaluation_stage_exits_75_and_resumes(tmp_path):
  """SIGTERM outside the training loop (here: while the base model is evaluated) stops the run
  at the next safe point with exit 75, not the default kill (143); the rerun finishes."""
  settings = {"train.num_steps": 4, "eval.yes_no": 8, "eval.batch_size": 8,
              "checkpoint.export_hf": True}
  config = write_config_file(tmp_path / "tiny.py", **settings)
  workdir = tmp_path / "run"
  command = [sys.executable, "-u", "-m", "lvlm_jax.train", "--config", config, "--workdir",
             str(workdir)]
  env = subprocess_env()
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if "stage eval_base: starting" in line:
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 75, err[-3000:]
  state = json.load(open(workdir / "pipeline.json"))["stages"]
  assert state["eval_base"]["status"] == "done" and "sft" not in state
  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  summary = json.load(open(workdir / "summary.json"))
  assert summary["status"] == "done" and set(summary["eval"]) == {"base", "sft"}


def test_export_prompts_as_training_and_loads_with_auto_processor(tmp_path, monkeypatch):
  """A scratch shapes model's export: its chat template renders the training prompt (vicuna_v1 with
  the run's empty system prompt, not the shapes tokenizer's own system line), AutoProcessor loads
  a LlavaProcessor with a CLIPImageProcessor, and every file has the mode of the umask."""
  import stat
  import transformers
  from PIL import Image
  from lvlm_jax import generate
  from lvlm_jax.data import text
  from lvlm_jax.models import hf
  from lvlm_jax.sampling.service import Prompt
  umask = os.umask(0o022)
  try:
    assert run(tmp_path, **{"train.num_steps": 1, "checkpoint.export_hf": True})["status"] == "done"
  finally:
    os.umask(umask)
  hf_dir = tmp_path / "export" / "hf"
  modes = {name: oct(stat.S_IMODE(os.stat(hf_dir / name).st_mode)) for name in os.listdir(hf_dir)}
  assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
  assert type(processor).__name__ == "LlavaProcessor"
  assert type(processor.image_processor).__name__.startswith("CLIPImageProcessor")
  turns = [{"from": "human", "value": "<image>\nis there a red circle?"},
           {"from": "gpt", "value": "yes"}, {"from": "human", "value": "is it small?"}]
  for prompt, generation in ((turns, True), (turns[:2], False)):
    training = text.render(prompt, tokenizer, "vicuna_v1", system="",
                           add_generation_prompt=generation).text
    assert tokenizer.apply_chat_template(text.to_messages(prompt), tokenize=False,
                                         add_generation_prompt=generation) == training
  assert training.startswith("<s> USER: <image>")  # the run's system prompt: none

  model = hf.load_model(str(hf_dir))
  tokens = model.config.tokens_per_image
  service = generate.generation_service(str(hf_dir), model, "auto")
  ids = service.check_room(Prompt.question("is there a red circle?",
                                           [np.zeros((20, 30, 3), np.uint8)]), 4).tolist()
  want, _ = text.tokenize_conversation(turns[:1], tokenizer, "vicuna_v1", system="",
                                       add_generation_prompt=True, tokens_per_image=tokens)
  assert ids == want.tolist()
  image = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
  inputs = processor(images=image, text=training, return_tensors="np")
  assert inputs["pixel_values"].shape == (1, 3, model.config.vision.image_size,
                                          model.config.vision.image_size)
  assert (inputs["input_ids"] == model.config.image_token_id).sum() == tokens


def test_length_buckets_past_the_model_context_refuse_to_train(tmp_path):
  from lvlm_jax.errors import UserError
  with pytest.raises(UserError, match=r"go past the model's context of 512 tokens"):
    run(tmp_path, **{"data.pipeline.length_buckets": (32, 1024)})
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_config_refused_by_the_checkpoints_leaves_the_run_readable(tmp_path):
  """A relaunch with another model than the workdir's checkpoints hold is refused, and the run's
  config.json is still the one its checkpoints were made with (`evaluate --workdir` reads it)."""
  from lvlm_jax.errors import UserError
  run(tmp_path, **{"train.num_steps": 2, "checkpoint.every_steps": 1})
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(UserError, match="does not match this config's train state"):
    run(tmp_path, **{"train.num_steps": 2, "checkpoint.every_steps": 1,
                     "model.text.hidden_size": 64, "model.text.intermediate_size": 128})
  assert (tmp_path / "config.json").read_text() == before


def _tiny_tower_lvlm(vision, tokenizer, strategy):
  from flax import nnx
  from lvlm_jax.models.llm import LLMConfig
  from lvlm_jax.models.lvlm import LVLM, LVLMConfig
  text = LLMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=4, num_kv_heads=2, head_dim=8)
  return LVLM(LVLMConfig(vision=vision, text=text, vision_feature_select_strategy=strategy,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>")),
              rngs=nnx.Rngs(0))


def test_export_of_a_siglip_llava_expands_images_as_the_model(tmp_path, monkeypatch):
  """SigLIP has no class token: the exported LlavaProcessor expands <image> to the model's
  tokens_per_image (16 patches, "full"), not one more as for CLIP."""
  import transformers
  from PIL import Image
  from conftest import bpe_tokenizer
  from lvlm_jax.data.images import ImageProcessing
  from lvlm_jax.data.pipeline import DataConfig
  from lvlm_jax.models.siglip import SiglipVisionConfig
  from lvlm_jax.training import checkpoint
  tokenizer = bpe_tokenizer()
  model = _tiny_tower_lvlm(SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_layers=1,
                                              num_heads=2, image_size=28, patch_size=7),
                           tokenizer, "full")
  data = DataConfig(image=ImageProcessing.for_model("", model))
  checkpoint.export_hf(model, str(tmp_path), tokenizer=tokenizer, data=data)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  processor = transformers.AutoProcessor.from_pretrained(str(tmp_path))
  inputs = processor(images=Image.fromarray(np.zeros((20, 30, 3), np.uint8)),
                     text="USER: <image>\nhi", return_tensors="np")
  tokens = (inputs["input_ids"] == model.config.image_token_id).sum()
  assert tokens == model.config.tokens_per_image == 16


def test_lora_export_of_a_dinov2_llava_names_the_towers_modules(tmp_path):
  """Adapters on DINOv2 and LLM layers are named as the HF export names their base tensors
  (DINOv2's `encoder.layer.N.attention.attention.query`, not CLIP's names)."""
  from safetensors import safe_open
  from conftest import bpe_tokenizer
  from flax import nnx
  from lvlm_jax.models import hf
  from lvlm_jax.models.dinov2 import DINOv2Config
  from lvlm_jax.models.lora import LoraConfig, apply_lora
  from lvlm_jax.training import checkpoint
  model = _tiny_tower_lvlm(DINOv2Config(hidden_size=32, num_layers=1, num_heads=2, image_size=28,
                                        patch_size=14, position_grid=2), bpe_tokenizer(), "default")
  apply_lora(model, LoraConfig(rank=2, target=r"(vision|llm)\.layers\.0\.attn\.q_proj"),
             rngs=nnx.Rngs(1))
  modules = checkpoint.export_lora(model, str(tmp_path / "lora"))
  hf.save_hf(model, str(tmp_path / "hf"))
  with safe_open(str(tmp_path / "hf" / "model.safetensors"), "np") as f:
    exported = set(f.keys())
  assert sorted(modules) == ["language_model.model.layers.0.self_attn.q_proj",
                             "vision_tower.encoder.layer.0.attention.attention.query"]
  assert all(m + ".weight" in exported for m in modules)


def test_llava_next_run_from_hf_trains_and_exports(shapes_llava_next_dir, tmp_path, monkeypatch,
                                                   capsys):
  """SFT from an HF LLaVA-NeXT: the derived data config tiles at the model's pinpoints, two
  steps train on AnyRes batches, the evaluator runs before and after, and the export reloads in
  transformers with our logits and loads with AutoProcessor as a LlavaNextProcessor that counts
  each image's tokens as we do."""
  import torch
  import transformers
  from PIL import Image
  from lvlm_jax.data.anyres import AnyResProcessing
  from lvlm_jax.data.images import ImageProcessing
  from lvlm_jax.models import hf
  from lvlm_jax.models.llava_next import AnyResImages
  from training_fixtures import logits_of
  settings = {"train.num_steps": 2, "checkpoint.every_steps": 2,
              "model.hf_dir": shapes_llava_next_dir, "model.tokenizer": "",
              "data.pipeline.length_buckets": (64,),
              "checkpoint.export_hf": True, "eval.yes_no": 4, "eval.grounding": 2,
              "eval.batch_size": 4}
  summary = run(tmp_path, **settings)
  assert summary["status"] == "done"
  # The evaluator scores (teacher-forced yes/no) and generates (grounding) on AnyRes images.
  for name in ("base", "sft"):
    assert 0 <= summary["eval"][name]["yes_no_accuracy"] <= 1
    assert 0 <= summary["eval"][name]["grounding_acc50"] <= 1
  losses = train_losses(tmp_path)
  assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
  hf_dir = str(tmp_path / "export" / "hf")
  ours = hf.load_model(hf_dir)
  theirs = transformers.LlavaNextForConditionalGeneration.from_pretrained(hf_dir).eval()
  base = transformers.LlavaNextForConditionalGeneration.from_pretrained(shapes_llava_next_dir)
  trained = theirs.model.language_model.layers[0].mlp.down_proj.weight
  assert not torch.equal(trained, base.model.language_model.layers[0].mlp.down_proj.weight)

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  processor = transformers.AutoProcessor.from_pretrained(hf_dir)
  assert type(processor).__name__ == "LlavaNextProcessor"
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in ((10, 30), (30, 12), (20, 24))]
  inputs = processor(images=[Image.fromarray(i) for i in images],
                     text=["<image> a <image> b <image>"], return_tensors="pt")
  counts = [ours.config.image_tokens(*i.shape[:2]) for i in images]
  assert (inputs["input_ids"] == 4).sum() == sum(counts)
  assert len(set(counts)) == 3  # each size its own count
  with torch.no_grad():
    expected = theirs(**inputs).logits.numpy()
  anyres = AnyResProcessing.for_config(ours.config,
                                       ImageProcessing.from_hf_preprocessor_config(hf_dir))
  views, grids = zip(*(anyres(i) for i in images))
  ids = inputs["input_ids"].numpy().astype(np.int32)
  batch = {"input_ids": ids, "positions": np.arange(ids.shape[1], dtype=np.int32)[None],
           "attention_mask": np.ones_like(ids),
           "pixel_values": AnyResImages(np.stack(views)[None],
                                        np.asarray([i.shape[:2] for i in images], np.int32)[None],
                                        np.asarray(grids, np.int32)[None])}
  got = np.asarray(logits_of(ours, batch))
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
  # The generate CLI on the export: a prompt alone and in a JSONL batch with an image of another
  # size (another token count, so other padding) gives the same greedy answer.
  from lvlm_jax import generate
  for name, image in zip(("a.png", "b.png"), images):
    Image.fromarray(image).save(tmp_path / name)
  flags = ["--model", hf_dir, "--max_new_tokens", "6", "--min_new_tokens", "6",
           "--batch_size", "2", "--pad_to_multiple", "16"]
  records = [{"prompt": "is there a red circle?", "image": name} for name in ("a.png", "b.png")]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  printed = []
  for argv in (["--prompt", "is there a red circle?", "--image", str(tmp_path / "a.png")],
               ["--input_jsonl", str(tmp_path / "in.jsonl"),
                "--output_jsonl", str(tmp_path / "out.jsonl")]):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
      generate.main(flags + argv)
    printed.append(capsys.readouterr())
    assert exit_info.value.code == 0, printed[-1].err
  answers = [json.loads(line)["response"] for line in open(tmp_path / "out.jsonl")]
  assert len(answers) == 2 and printed[0].out == answers[0] + "\n"


def test_llava_onevision_run_from_hf_trains_and_exports(shapes_llava_onevision_dir, tmp_path,
                                                        monkeypatch, capsys):
  """SFT from an HF LLaVA-OneVision (anyres_max_1: its 2 x 2 tile images train on shrunk feature
  grids): two steps, the evaluator before and after, and an export that reloads in transformers
  with our logits on a lone capped image and a row of two untiled ones, and that the generate CLI
  answers from. Its processor config is LlavaOnevisionProcessor's: AutoProcessor itself needs
  torchvision for OneVision's video processor (not installed), so the image processor loads
  through AutoImageProcessor and the processor's own token count runs on the saved keys."""
  import inspect

  import torch
  import transformers
  from PIL import Image
  from lvlm_jax.data.pipeline import DataConfig
  from lvlm_jax.models import hf
  from lvlm_jax.models.llava_next import batch_images
  from training_fixtures import logits_of
  settings = {"train.num_steps": 2, "checkpoint.every_steps": 2,
              "model.hf_dir": shapes_llava_onevision_dir, "model.tokenizer": "",
              "data.pipeline.length_buckets": (64,),
              "checkpoint.export_hf": True, "eval.yes_no": 4, "eval.grounding": 2,
              "eval.batch_size": 4}
  summary = run(tmp_path, **settings)
  assert summary["status"] == "done"
  for name in ("base", "sft"):
    assert 0 <= summary["eval"][name]["yes_no_accuracy"] <= 1
  losses = train_losses(tmp_path)
  assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
  hf_dir = str(tmp_path / "export" / "hf")
  ours = hf.load_model(hf_dir)
  theirs = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir).eval()
  base = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
      shapes_llava_onevision_dir)
  trained = theirs.model.language_model.layers[0].mlp.down_proj.weight
  assert not torch.equal(trained, base.model.language_model.layers[0].mlp.down_proj.weight)
  assert theirs.config.vision_aspect_ratio == "anyres_max_1"

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  image_processor = transformers.AutoImageProcessor.from_pretrained(hf_dir)
  assert type(image_processor).__name__.startswith("LlavaOnevisionImageProcessor")
  saved = json.load(open(os.path.join(hf_dir, "processor_config.json")))
  assert saved["processor_class"] == "LlavaOnevisionProcessor"
  accepted = inspect.signature(transformers.LlavaOnevisionProcessor.__init__).parameters
  assert set(saved) - {"processor_class"} <= set(accepted)
  processor = object.__new__(transformers.LlavaOnevisionProcessor)
  processor.image_processor = image_processor
  for key in ("image_token", "num_image_tokens", "vision_aspect_ratio",
              "vision_feature_select_strategy"):
    setattr(processor, key, saved[key])
  data = DataConfig(max_images=2).for_model(ours, hf_dir)
  rng = np.random.default_rng(0)
  capped, small = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((30, 31), (8, 20)))
  rows = [[capped], [capped, small]]
  pixels = image_processor(rows, return_tensors="pt")
  assert pixels["batch_num_images"].tolist() == [1, 2]
  counts = [processor.replace_image_token(pixels, i).count("<image>") for i in range(3)]
  assert counts == data.image_tokens(rows[0]) + data.image_tokens(rows[1])
  assert counts[0] == 4 + 2 * 3 and counts[1:] == [4 + 1, 4 + 1]  # capped to 2 x 2 features
  ids = np.full((2, 24), 5, np.int32)
  ids[0, 2:2 + counts[0]] = 4
  ids[1, 2:2 + counts[1]] = ids[1, 9:9 + counts[2]] = 4
  with torch.no_grad():
    expected = theirs(input_ids=torch.tensor(ids, dtype=torch.long), **pixels).logits.numpy()
  batch = {"input_ids": ids, "positions": np.broadcast_to(np.arange(24, dtype=np.int32), ids.shape),
           "attention_mask": np.ones_like(ids),
           "pixel_values": batch_images(data.image_arrays(rows))}
  got = np.asarray(logits_of(ours, batch))
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
  # The generate CLI on the export: a JSONL row of both images (untiled) and one of the capped.
  from lvlm_jax import generate
  for name, image in zip(("a.png", "b.png"), (capped, small)):
    Image.fromarray(image).save(tmp_path / name)
  records = [{"prompt": "<image>\n<image>\nis there a red circle?", "images": ["a.png", "b.png"]},
             {"prompt": "is there a red circle?", "image": "a.png"}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    generate.main(["--model", hf_dir, "--max_new_tokens", "4", "--min_new_tokens", "4",
                   "--batch_size", "2", "--input_jsonl", str(tmp_path / "in.jsonl"),
                   "--output_jsonl", str(tmp_path / "out.jsonl")])
  assert exit_info.value.code == 0, capsys.readouterr().err
  assert len([json.loads(line)["response"] for line in open(tmp_path / "out.jsonl")]) == 2
