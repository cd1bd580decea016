"""`python -m lvlm_jax.train`: help, and clear one-line errors for bad configs."""

import os
import subprocess
import sys

import pytest

from lvlm_jax import train
from lvlm_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


def test_help_lists_every_config_key_with_its_help(capsys):
  assert train.main(["train", "--help"]) == 0
  out = capsys.readouterr().out
  assert "--config FILE" in out and "--workdir DIR" in out
  assert "config.optim.lr (default 0.0002): Peak learning rate" in out
  assert "config.model.lora.rank (default 8): adapter rank r." in out
  lines = [l for l in out.splitlines() if l.startswith("  config.")]
  assert len(lines) > 60 and all(": " in l for l in lines), [l for l in lines if ": " not in l]


@pytest.mark.parametrize("method", ["sft", "sctune", "stic", "cadvi"])
def test_fields_the_run_derives_are_no_config_keys(method):
  """The pipeline fields set from the model and the run (image processing, AnyRes, ...) are
  neither in a method's defaults nor in its help."""
  import importlib
  from lvlm_jax.data.training_sources import DERIVED_PIPELINE_FIELDS
  module = importlib.import_module(f"lvlm_jax.methods.{method}")
  pipeline = module.default_config().data.pipeline
  help_keys = [l.split()[0] for l in module.config_help()]
  for field in DERIVED_PIPELINE_FIELDS:
    assert field.removeprefix("pipeline.") not in pipeline, field
    assert not any(k.endswith("data." + field) for k in help_keys), field


def test_misspelled_key_is_one_line_exit_2():
  proc = subprocess.run([sys.executable, "-m", "lvlm_jax.train", "--config", QUICKSTART,
                         "--config.optim.lrr=1e-3"], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "lrr" in lines[0], proc.stderr


@pytest.mark.parametrize("flag, words", [
    ("--config.train.num_steps=many", ("num_steps", "many")),
    ("--config.optim.schedule=linear", ("schedule", "linear")),
    ("--config.model.remat=everything", ("remat", "everything")),
    ("--config.data.shapes_tasks=(('dance', 4),)", ("dance",)),
])
def test_bad_values_name_the_key(flag, words, tmp_path):
  with pytest.raises(UserError) as info:
    train.main(["train", "--config", QUICKSTART, flag, "--workdir", str(tmp_path),
                "--config.train.num_steps=1"] if "num_steps" not in flag else
               ["train", "--config", QUICKSTART, flag, "--workdir", str(tmp_path)])
  assert all(w in str(info.value) for w in words), str(info.value)
  assert "\n" not in str(info.value)


def test_misspelled_key_in_a_config_file(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from lvlm_jax.methods import sft\n\ndef get_config():\n"
                  "  config = sft.default_config()\n  config.optim.learning_rate = 1e-4\n"
                  "  return config\n")
  with pytest.raises(UserError, match="learning_rate"):
    train.main(["train", "--config", str(path)])


def test_missing_config_flag():
  with pytest.raises(UserError, match="--config FILE is required"):
    train.main(["train"])


def test_wrong_type_in_a_config_file_names_the_line(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from lvlm_jax.methods import sft\n\ndef get_config():\n"
                  "  config = sft.default_config()\n  config.train.num_steps = 'ten'\n"
                  "  return config\n")
  with pytest.raises(UserError, match="line 5: TypeError: .*num_steps"):
    train.main(["train", "--config", str(path)])


def test_unknown_override_suggests_the_key():
  with pytest.raises(UserError, match="config.optim has no key 'lrr'; did you mean 'lr'"):
    train.main(["train", "--config", QUICKSTART, "--config.optim.lrr=1"])


def test_llava_7b_recipe_trains_adapters_and_projector_only(tiny_llava_dir):
  """The TPU recipe, pointed at a tiny HF LLaVA: it parses, and its regexes pick exactly the LoRA
  adapters of the LLM projections and the projector as trainable (nothing is built or run)."""
  import importlib.util
  from flax import nnx
  from lvlm_jax.methods import sft
  from lvlm_jax.models import building
  from lvlm_jax.training import optim, state as train_state
  spec = importlib.util.spec_from_file_location("recipe", os.path.join(REPO, "configs", "sft_llava15_7b.py"))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  raw = recipe.get_config()
  raw.model.hf_dir = tiny_llava_dir
  raw.model.tokenizer = "shapes"  # the tiny checkpoint has no tokenizer files
  config = sft.parse(raw)
  model = building.abstract_model(config.model, tokenizer=None)
  _, params, frozen = train_state.split_model(model, optim.trainable_filter(config.optim))
  paths = lambda tree: {optim.path_str(p) for p, v in nnx.to_flat_state(tree)
                       if isinstance(v, nnx.Param)}  # frozen also holds LoRA dropout's RNG
  trained, kept = paths(params), paths(frozen)
  assert all(p.startswith("projector.") or ".lora." in p for p in trained)
  assert "llm.layers.1.mlp.down_proj.lora.lora_b" in trained
  assert not any(".lora." in p for p in kept) and "vision.layers.0.mlp.fc1.kernel" in kept
  assert "llm.lm_head.kernel" in kept  # LoRA leaves lm_head alone
  assert {optim.group_of(p, config.optim) for p in trained} == {"default", r"projector\..*"}
