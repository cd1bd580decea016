"""Train a model with one of lvlm_jax's methods, from a config file.

  python -m lvlm_jax.train --config configs/quickstart.py [--config.KEY=VALUE ...] [--workdir DIR]

The config file defines `get_config()` returning a ConfigDict (start from
`lvlm_jax.methods.sft.default_config()`); any setting can be overridden on the command line,
e.g. --config.optim.lr=1e-5 --config.train.num_steps=200. A misspelled key or a value of the
wrong type is an error. Running the same command again resumes from the latest checkpoint in
the workdir (default: workdir/<config file name>). On several hosts, run the same command on
every host (see launch/). Exit codes: 0 done (or the stages pipeline.only_stage /
pipeline.stop_after asked for are), 2 bad config or input (or a checkpoint that could not be
written), 75 stopped by SIGTERM at any moment, with everything finished saved (run it again to
resume), 1 an unexpected error (one line; LVLM_JAX_DEBUG=1 shows its traceback).
"""

import difflib
import os
import re
import sys

from lvlm_jax import preemption
from lvlm_jax.cli import print_devices, run_cli
from lvlm_jax.errors import UserError
from lvlm_jax.output_paths import check_output_dir

METHODS = ("sft", "stic", "sctune", "csr", "clip", "cadvi")
# Stopped early by SIGTERM with a checkpoint saved: "try again" (sysexits' EX_TEMPFAIL), so a
# launcher can loop until the run exits 0.
EXIT_STOPPED = 75


def _module(method: str):
  import importlib
  return importlib.import_module(f"lvlm_jax.methods.{method}")


def usage() -> str:
  lines = [__doc__.strip(), "", "flags:",
           "  --config FILE: the config file (required).",
           "  --config.KEY=VALUE: override one setting of the config.",
           "  --workdir DIR: where checkpoints, metrics and exports go (default "
           "workdir/<config file name>); an existing run there is resumed.",
           ]
  for method in METHODS:
    lines += ["", f"config keys (method {method!r}):"] + _module(method).config_help()
  return "\n".join(lines)


def _flag_values(argv: list[str]):
  from absl import flags
  from ml_collections import config_flags
  values = flags.FlagValues()
  # sys_argv: config_flags reads the --config.KEY overrides from it rather than from sys.argv.
  config_flags.DEFINE_config_file("config", None, "the config file", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "where the run's files go", flag_values=values)
  return values


def _one_line(error: Exception, config_file: str | None = None) -> str:
  """The message of an absl/ConfigDict error; for a traceback from inside the config file, its
  last line, prefixed with the file's line where it happened."""
  text = re.sub(r"^flag --\S+: ", "", str(error)).strip()
  if "Traceback" in text:
    where = ""
    if config_file:
      name = re.escape(os.path.basename(config_file))
      lines = re.findall(rf'File "(?:[^"]*/)?{name}", line (\d+)', text)
      where = f"line {lines[-1]}: " if lines else ""
    text = where + text.splitlines()[-1]
  return " ".join(text.split())


def _explain(argv: list[str], error: Exception) -> str:
  """Which part of the command line is wrong: the config file itself, an override naming a key
  that does not exist, or an override's value."""
  from absl import flags
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  base = [a for a in argv if a not in overrides]
  values = _flag_values(base)
  try:
    values(base)
    values.config.keys()
  except flags.UnrecognizedFlagError as e:  # a command-line mistake, not the config file's
    return f"{_one_line(e)} (see --help)"
  except Exception as e:  # the file itself does not load
    path = _config_file(argv)
    return f"{path}: {_one_line(e, path)}"
  for override in overrides:
    path, _, _ = override[len("--config."):].partition("=")
    node, parts = values.config, path.split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        where = "config." + ".".join(parts[:i]) if i else "config"
        known = list(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(part, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
        return f"{override.partition('=')[0]}: {where} has no key {part!r}{hint}"
      node = node[part]
    try:
      _flag_values(base + [override])(base + [override])
    except Exception as e:
      return f"{override}: {_one_line(e)}"
  return _one_line(error)


def _config_file(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.partition("=")[2]
    if arg == "--config":
      return argv[i + 1] if i + 1 < len(argv) else ""
  return None


def parse_flags(argv: list[str]):
  """(config ConfigDict, workdir) from the command line; UserError for anything wrong."""
  path = _config_file(argv)
  if path is None:
    raise UserError("--config FILE is required (e.g. --config configs/quickstart.py); see --help")
  if not os.path.isfile(path):
    raise UserError(f"--config {path}: no such file")
  values = _flag_values(argv)
  try:
    rest = values(argv)
    values.config.keys()  # config_flags defers errors of the file until first use
  except Exception as e:  # absl, ConfigDict and the config file raise all kinds
    raise UserError(_explain(argv, e)) from None
  if len(rest) > 1:
    raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")
  config = values.config
  config_file = values["config"].config_filename
  workdir = values.workdir or os.path.join(
      "workdir", os.path.splitext(os.path.basename(config_file))[0])
  return config, workdir


def main(argv: list[str] | None = None) -> int:
  # First: a SIGTERM from here on (startup, evaluations, exports, generation) stops at the next
  # safe point with everything finished saved, and exits 75.
  preemption.install()
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(usage())
    return 0
  config, workdir = parse_flags(argv)
  method = config.get("method")
  if method not in METHODS:
    raise UserError(f"config.method={method!r} is not one of {METHODS}")
  from lvlm_jax.sharding import initialize
  module = _module(method)
  parsed = module.parse(config)
  check_output_dir(workdir, "--workdir")  # a read-only or misnamed workdir fails now, not at a save
  initialize(parsed.mesh)
  print_devices("lvlm_jax.train")
  try:
    summary = module.run(parsed, workdir, raw_config=config)
  except preemption.Preempted:
    return EXIT_STOPPED
  # 'partial': the stages pipeline.only_stage / stop_after asked for are done.
  return EXIT_STOPPED if summary["status"] == "preempted" else 0


if __name__ == "__main__":
  run_cli(main)
