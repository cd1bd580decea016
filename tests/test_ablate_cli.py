"""`python -m lvlm_jax.ablate`: every ablation an ordinary run, one summary of them all, and
one-line errors for a bad ablations file."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "training"))
from training_fixtures import run_python, write_config_file  # noqa: E402

from lvlm_jax import ablate  # noqa: E402


def test_two_ablations_run_and_are_tabulated(tmp_path):
  config = write_config_file(tmp_path / "tiny.py", **{
      "train.num_steps": 3, "checkpoint.export_hf": True, "eval.yes_no": 8,
      "eval.batch_size": 8})
  grid = tmp_path / "grid.py"
  grid.write_text('ABLATIONS = {"recipe": {}, "one_step": {"train.num_steps": 1}}\n')
  result = run_python(["-m", "lvlm_jax.ablate", "--config", config, "--ablations", str(grid),
                       "--workdir", str(tmp_path / "runs"), "--metrics", "yes_no_accuracy"],
                      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "runs" / "ablations.json").read_text())
  assert list(results) == ["recipe", "one_step"]
  assert results["one_step"]["overrides"] == {"train.num_steps": 1}
  steps = {name: next(s for s in r["summary"]["stages"] if s["name"] == "sft")["step"]
           for name, r in results.items()}
  assert steps == {"recipe": 3, "one_step": 1}
  rows = [line for line in result.stdout.splitlines() if line.startswith("| one_step")]
  assert [row.split(" | ")[2] for row in rows] == ["base", "sft"]
  assert "train.num_steps=1" in rows[0]


@pytest.mark.parametrize("text, message", [
    ("X = 1\n", "define ABLATIONS"),
    ("ABLATIONS = {'a/b': {}}\n", "needs a plain name"),
])
def test_a_bad_ablations_file_is_named(tmp_path, text, message):
  path = tmp_path / "grid.py"
  path.write_text(text)
  with pytest.raises(ablate.UserError, match=message) as error:
    ablate.load_ablations(str(path))
  assert str(path) in str(error.value)


def test_an_unknown_only_is_one_line_with_exit_2(tmp_path, capsys):
  path = tmp_path / "grid.py"
  path.write_text("ABLATIONS = {'recipe': {}}\n")
  with pytest.raises(SystemExit) as exit_info:
    ablate.main(["--config", "c.py", "--ablations", str(path), "--only", "nope"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --only nope: not in") and err.count("\n") == 1
