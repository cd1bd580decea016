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
