"""Run a method's ablations, one ordinary training run each, and tabulate their evaluations.

  python -m lvlm_jax.ablate --config configs/stic_shapes.py --ablations configs/stic_shapes_ablations.py

The ablations file defines `ABLATIONS`, an ordered dict {name: {config key: value}} (the empty
overrides are the method's own recipe). Each ablation is `python -m lvlm_jax.train --config
CONFIG --workdir WORKDIR/NAME --config.KEY=VALUE ...`, so each resumes, skips its finished
stages and is killed and rerun like any run; a finished one is not run again. At the end
WORKDIR/ablations.json holds every run's summary.json and a table is printed: per run and
evaluated stage, the metrics asked for, and the share of preference pairs whose chosen answer is
truly better (STIC's pair_quality stage). Exit codes: those of the first run that fails.
"""

import argparse
import os
import subprocess
import sys

from lvlm_jax.artifacts import read_json, write_json
from lvlm_jax.cli import run_cli
from lvlm_jax.errors import UserError

METRICS = ("yes_no_accuracy", "caption_chair_i", "caption_recall",
           "caption_mentions_per_description")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m lvlm_jax.ablate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="the method's config file")
  p.add_argument("--ablations", required=True,
                 help="a Python file defining ABLATIONS = {name: {config key: value}}")
  p.add_argument("--workdir", default=None,
                 help="where the runs go, one folder each (default: workdir/<config file "
                 "name>_ablations)")
  p.add_argument("--only", nargs="+", default=[], metavar="NAME",
                 help="run (and tabulate) only these ablations")
  p.add_argument("--metrics", nargs="+", default=list(METRICS), metavar="KEY",
                 help="evaluation metrics in the table")
  return p


def load_ablations(path: str) -> dict[str, dict]:
  """The file's ABLATIONS, checked: a UserError names the file and what is wrong."""
  namespace = {"__file__": os.path.abspath(path)}
  try:
    with open(path) as f:
      exec(compile(f.read(), path, "exec"), namespace)  # a config file, as train's are
  except OSError as e:
    raise UserError(f"--ablations {path}: {e.strerror}") from None
  ablations = namespace.get("ABLATIONS")
  if not isinstance(ablations, dict) or not ablations:
    raise UserError(f"{path}: define ABLATIONS = {{name: {{config key: value}}}}, not empty")
  for name, overrides in ablations.items():
    if not isinstance(name, str) or not name or os.sep in name or not isinstance(overrides, dict):
      raise UserError(f"{path}: ablation {name!r} needs a plain name and a dict of overrides")
  return ablations


def command(config: str, workdir: str, overrides: dict) -> list[str]:
  return [sys.executable, "-m", "lvlm_jax.train", "--config", config, "--workdir", workdir,
          *(f"--config.{key}={value}" for key, value in overrides.items())]


def table(results: dict[str, dict], metrics: list[str]) -> str:
  """Markdown: one row per (ablation, evaluated stage)."""
  head = ["ablation", "overrides", "stage", *metrics, "pairs chosen truly better"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, result in results.items():
    summary = result["summary"]
    quality = next((s.get("quality") for s in summary.get("stages", [])
                    if s.get("name") == "pair_quality"), None)
    better = f"{quality['all']['chosen_better']:.3f}" if quality else "-"
    overrides = ", ".join(f"{k}={v}" for k, v in result["overrides"].items()) or "(the recipe)"
    for stage, values in summary.get("eval", {}).items():
      cells = [f"{values[m]:.3f}" if isinstance(values.get(m), float) else "-" for m in metrics]
      lines.append("| " + " | ".join([name, overrides, stage, *cells, better]) + " |")
  return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
  ablations = load_ablations(args.ablations)
  unknown = sorted(set(args.only) - set(ablations))
  if unknown:
    raise UserError(f"--only {' '.join(unknown)}: not in {args.ablations} ({', '.join(ablations)})")
  names = [n for n in ablations if not args.only or n in args.only]
  stem = os.path.splitext(os.path.basename(args.config))[0]
  root = args.workdir or os.path.join("workdir", f"{stem}_ablations")
  results = {}
  for i, name in enumerate(names, 1):
    workdir = os.path.join(root, name)
    print(f"[ablate] {i}/{len(names)} {name}: {' '.join(command(args.config, workdir, ablations[name])[3:])}",
          file=sys.stderr, flush=True)
    code = subprocess.call(command(args.config, workdir, ablations[name]))
    if code:
      print(f"error: ablation {name} exited {code}; the same command resumes it", file=sys.stderr)
      sys.exit(code)
    results[name] = {"overrides": ablations[name],
                     "summary": read_json(os.path.join(workdir, "summary.json"))}
  write_json(os.path.join(root, "ablations.json"), results)
  print(table(results, args.metrics))


def main(argv=None) -> None:
  run_cli(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
  main()
