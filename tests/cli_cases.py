"""Runs many CLI invocations in one Python (imports paid once), each with its own stderr.

  python tests/cli_cases.py CASES.json RESULTS.jsonl

CASES.json: a list of {"name", "cli": train|generate|evaluate|convert, "argv"}. Each case runs
the CLI's entry point under `run_cli`; its stderr (the file descriptor, so that C++ and logging
output are caught too) and exit code go to one line of RESULTS.jsonl, written as soon as the
case ends, so a case that hangs is the one after the last line.
"""

import importlib
import json
import os
import sys
import tempfile
import traceback

from lvlm_jax import cli


def _entry(name: str, argv: list[str]):
  module = importlib.import_module(f"lvlm_jax.{name}")
  if name == "train":
    return lambda: module.main(["train", *argv])
  if name == "generate":
    return lambda: module.run(module.parse_args(argv))
  if name == "convert":
    return lambda: module.convert(module.parse_args(argv))
  return lambda: module.evaluate(module.parse_args(argv)) and 0


def main(cases_path: str, results_path: str) -> None:
  with open(cases_path) as f:
    cases = json.load(f)
  cli._exit = sys.exit  # one process runs every case: never os._exit it
  with open(results_path, "w") as results:
    for case in cases:
      with tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
          cli.run_cli(_entry(case["cli"], case["argv"]))
          code = 0
        except SystemExit as e:
          code = e.code if isinstance(e.code, int) else 1
        except Exception:  # what run_cli let through: shown as the traceback it would print
          traceback.print_exc()
          code = 1
        finally:
          sys.stderr.flush()
          os.dup2(saved, 2)
          os.close(saved)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
      results.write(json.dumps({"name": case["name"], "code": code, "stderr": stderr}) + "\n")
      results.flush()


if __name__ == "__main__":
  main(*sys.argv[1:])
