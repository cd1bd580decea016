"""Every CLI names the backend and device count it runs on in its first stderr line."""

import os
import sys

import jax
import pytest

from lvlm_jax import cli, evaluate, generate, train
from lvlm_jax.methods import sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected(tool: str) -> str:
  return (f"{tool}: JAX {jax.__version__} on {jax.devices()[0].platform}, {len(jax.devices())} "
          f"devices ({len(jax.local_devices())} on this host, {jax.process_count()} processes)")


def run(main, capsys, monkeypatch) -> tuple[int, list[str]]:
  monkeypatch.setattr(cli, "_exit", sys.exit)  # never os._exit the test process
  with pytest.raises(SystemExit) as exit_info:
    cli.run_cli(main)
  return exit_info.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("tool", ["generate", "evaluate"])
def test_generate_and_evaluate_print_the_devices_before_reading_the_model(tool, tmp_path,
                                                                         monkeypatch, capsys):
  missing = str(tmp_path / "nothing")
  main = {"generate": lambda: generate.run(generate.parse_args(["--model", missing,
                                                                "--prompt", "hi"])),
          "evaluate": lambda: evaluate.evaluate(evaluate.parse_args(["--model", missing]))}[tool]
  code, lines = run(main, capsys, monkeypatch)
  assert code == 2 and len(lines) == 2, lines
  assert lines[0] == expected(f"lvlm_jax.{tool}")
  assert lines[1].startswith("error: ") and "nothing" in lines[1]


def test_train_prints_the_devices_after_starting_the_processes(tmp_path, monkeypatch, capsys):
  ran = []
  monkeypatch.setattr(train.preemption, "install", lambda: None)  # pytest keeps its SIGTERM
  monkeypatch.setattr(sft, "run", lambda parsed, workdir, raw_config: ran.append(workdir)
                      or {"status": "done"})
  workdir = str(tmp_path / "run")
  code, lines = run(lambda: train.main(["train", "--config",
                                        os.path.join(REPO, "configs", "quickstart.py"),
                                        "--workdir", workdir]), capsys, monkeypatch)
  assert code == 0 and ran == [workdir]
  assert lines == [expected("lvlm_jax.train")]
