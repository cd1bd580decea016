"""`python -m lvlm_jax.convert`: HF -> lvlm_jax -> HF keeps the model exact, errors are one line."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import forward
from lvlm_jax.models import hf, params_io
from lvlm_jax.models.lora import LoraConfig, apply_lora


def run_convert(*args):
  return subprocess.run([sys.executable, "-m", "lvlm_jax.convert", *args], capture_output=True,
                        text=True, timeout=300)


def test_help_lists_every_flag():
  result = run_convert("--help")
  assert result.returncode == 0
  for flag in ("--to", "--dtype", "--max_shard_gb", "--allow_pickle", "--allow_unused"):
    assert flag in result.stdout


def test_round_trip_through_our_checkpoint(tiny_llava_dir, tmp_path):
  ours, back = tmp_path / "ours", tmp_path / "back"
  first = run_convert(tiny_llava_dir, str(ours), "--to", "lvlm_jax")
  assert first.returncode == 0, first.stderr
  second = run_convert(str(ours), str(back), "--to", "hf")
  assert second.returncode == 0, second.stderr
  original, restored = hf.load_lvlm(tiny_llava_dir), hf.load_lvlm(str(back))
  for a, b in zip(jax_leaves(original), jax_leaves(restored)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(model):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_lora_adapters_survive_our_checkpoint(tiny_llama_dir, tmp_path):
  model = hf.load_llm(tiny_llama_dir)
  apply_lora(model, LoraConfig(rank=2, alpha=4, dropout=0.1, target=r"layers\.\d+\.attn\.(q|v)_proj"),
             rngs=nnx.Rngs(0))
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    variable.set_value(variable.get_value() + 0.05)
  params_io.save_model(model, str(tmp_path))
  restored = params_io.load_model(str(tmp_path))
  ids = jnp.asarray([[4, 8, 15, 16, 23, 42]], jnp.int32)
  model.eval(), restored.eval()  # no dropout
  np.testing.assert_array_equal(np.asarray(forward(model, ids)[0]), np.asarray(forward(restored, ids)[0]))


@pytest.mark.parametrize("case", ["missing", "not_a_model", "dynamic_rope"])
def test_bad_input_is_one_line_exit_2(tmp_path, case):
  source = tmp_path / "in"
  if case == "not_a_model":
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "bert"}')
  if case == "dynamic_rope":  # refused from the config, before any tensor is read
    source.mkdir()
    (source / "config.json").write_text(
        '{"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}}')
  result = run_convert(str(source), str(tmp_path / "out"), "--to", "hf")
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
  assert "Traceback" not in result.stderr
  if case == "dynamic_rope":
    assert "rope_scaling: RoPE type 'dynamic' is not supported" in result.stderr
