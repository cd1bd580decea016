"""Shapes-world metrics of a model: yes/no accuracy, grounding Acc@IoU>=0.5, caption hallucination,
self-consistency Acc@IoU>=0.5 (box -> its own description -> its own box); with a CaD-VI config
also two-image selection and the commonalities/differences summary scores
(lvlm_jax/eval/cad_summary.py).

  python -m lvlm_jax.evaluate --workdir workdir/quickstart            # a run's latest checkpoint
  python -m lvlm_jax.evaluate --model DIR --config configs/quickstart.py

--workdir evaluates the latest checkpoint of a training run with that run's own settings (chat
template, world, metric sizes). --model takes an HF directory or an lvlm_jax checkpoint (with its
tokenizer files, as `train` exports them) and the settings of --config (default: the SFT
defaults). Questions come from a held-out world: other scenes of the training distribution.
The metrics are printed and written as JSON (--output; default <workdir>/eval.json with --workdir).

  python -m lvlm_jax.evaluate --model DIR --config configs/sctune_shapes.py --grounding_file refs.jsonl

--grounding_file evaluates boxes on real images instead (a grounding JSONL: `image` or
`image_id`, `box` or `bbox` normalised to [0, 1], optional `expression`): REC Acc@0.5
(grounding_acc50: the expression -> the model's box) over the records with an expression, and
SC-Tune's self-consistency Acc@0.5 (self_consistency_acc50: the box -> the model's description
-> the model's box) over all of them, with the config's prompts and box format.

  python -m lvlm_jax.evaluate --model DIR --benchmark NAME --data PATH [--images DIR]

--benchmark evaluates on a public benchmark read from its published files (POPE, MME, GQA,
TextVQA, ScienceQA-IMG, MMBench-dev, SEED-Bench, CHAIR, RefCOCO-family REC, CaD-VI's two-image
sets and CaD-QA with --judge; `lvlm_jax/eval/benchmarks/`, the README lists the files): greedy
answers with LLaVA-1.5's prompt suffixes, written to <output_dir>/predictions.jsonl as they
come (a rerun skips the items answered), metrics to <output_dir>/metrics.json.
"""

import argparse
import dataclasses
import importlib
import json
import os
import sys

from lvlm_jax.cli import print_devices, run_cli
from lvlm_jax.dataclass_config import load_config_file
from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import BENCHMARKS


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m lvlm_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training run's workdir: its latest checkpoint and its "
                      "config.json")
  source.add_argument("--model", help="an HF model directory or lvlm_jax checkpoint directory")
  p.add_argument("--config", help="with --model: a train config file whose data and eval "
                 "settings to use (template, system prompt, shapes world, metric sizes)")
  p.add_argument("--yes_no", type=int, help="number of yes/no questions (overrides the config)")
  p.add_argument("--grounding", type=int, help="number of grounding expressions (overrides the "
                 "config)")
  p.add_argument("--captions", type=int, help="number of captions (overrides the config)")
  p.add_argument("--self_consistency", type=int, help="number of boxes to describe and ground "
                 "back (overrides the config)")
  p.add_argument("--grounding_file", help="a grounding JSONL to evaluate REC and "
                 "self-consistency on, instead of the shapes world")
  p.add_argument("--image_root", help="with --grounding_file: the folder its image paths are "
                 "relative to (default: the file's folder)")
  p.add_argument("--limit", type=int, default=0,
                 help="with --grounding_file or --benchmark: evaluate its first N records or "
                 "items (0: all; for CHAIR its default of 500 images)")
  p.add_argument("--benchmark", choices=sorted(BENCHMARKS),
                 help="a public benchmark to evaluate on, read from --data (see below)")
  p.add_argument("--data", help="with --benchmark: its file or folder, in its published layout")
  p.add_argument("--images", help="with --benchmark: the folder its image paths are relative "
                 "to (default: the folder of --data)")
  p.add_argument("--output_dir", help="with --benchmark: where predictions.jsonl (resumable: "
                 "a rerun skips the items answered) and metrics.json go (default: "
                 "eval_<benchmark>)")
  p.add_argument("--batch_size", type=int, default=8,
                 help="with --benchmark: prompts decoded together")
  p.add_argument("--judge", help="with --benchmark cadqa: the HF causal LM directory that rates "
                 "the answers 0-5")
  p.add_argument("--max_skip_fraction", type=float, default=0.05,
                 help="with --benchmark: largest share of items whose images are missing "
                 "before the run stops (checked before the model loads)")
  p.add_argument("--weights_dtype", choices=("float32", "bfloat16"),
                 help="with --benchmark: the dtype decoding reads the weights in (bfloat16 "
                 "halves what each step reads on an accelerator; default: as loaded)")
  p.add_argument("--max_new_tokens", type=int,
                 help="with --benchmark: most tokens an answer gets (default: the benchmark's)")
  p.add_argument("--output", help="JSON file for the metrics")
  p.add_argument("--allow_pickle", action="store_true",
                 help="with --model: accept pickled .bin/.pt weights; pickles can run code when "
                 "loaded, so use this only for files you trust")
  args = p.parse_args(argv)
  if args.image_root and not args.grounding_file:
    p.error("--image_root goes with --grounding_file")
  if args.limit and not (args.grounding_file or args.benchmark):
    p.error("--limit goes with --grounding_file or --benchmark")
  if args.benchmark and args.grounding_file:
    p.error("give --benchmark or --grounding_file, not both")
  if bool(args.benchmark) != bool(args.data):
    p.error("--benchmark and --data go together")
  if (args.images or args.output_dir or args.max_new_tokens or args.judge
      or args.weights_dtype) and not args.benchmark:
    p.error("--images, --output_dir, --max_new_tokens, --judge and --weights_dtype go with "
            "--benchmark")
  if not 0 <= args.max_skip_fraction <= 1:
    p.error("--max_skip_fraction must be in [0, 1]")
  if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
    p.error("--batch_size and --max_new_tokens must be at least 1")
  if args.limit < 0:
    p.error("--limit must be >= 0")
  return args


def grounding_file_records(path: str, image_root: str | None, limit: int) -> list[dict]:
  """The file's records with their image decoded (uint8 [H, W, 3]): "images", "box",
  "expression" (None when absent)."""
  from lvlm_jax.data.images import load_image
  from lvlm_jax.data.sources import GroundingSource
  source = GroundingSource(path, (image_root,) if image_root else None)
  count = min(limit or len(source), len(source))
  records = []
  for i in range(count):
    record = source[i]
    records.append({"images": [load_image(record["images"][0])], "box": record["box"],
                    "expression": record["expression"]})
  return records


def _config(args):
  from lvlm_jax.methods import sft
  if args.workdir:
    path = os.path.join(args.workdir, "config.json")
    if not os.path.exists(path):
      raise UserError(f"{args.workdir}: no config.json; is it a training workdir?")
    try:
      with open(path) as f:
        raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise UserError(f"{path}: not valid JSON ({e}); the run's config is damaged: restore it "
                      "or evaluate its export with --model") from None
    if not isinstance(raw, dict):
      raise UserError(f"{path}: expected a JSON object of config sections")
  elif args.config:
    raw = load_config_file(args.config)
  else:
    raw = sft.default_config()
  from lvlm_jax.train import METHODS
  method = raw.get("method", "sft")
  if method not in METHODS:
    raise UserError(f"config.method={method!r} is not one of {METHODS}")
  if method != "sft" and args.workdir:
    raise UserError(f"{args.workdir} is a {method} pipeline: evaluate a stage's model with "
                    "--model <stage>/export/hf --config <its config file>")
  module = importlib.import_module(f"lvlm_jax.methods.{method}")
  config = module.parse(raw)
  overrides = {k: getattr(args, k) for k in ("yes_no", "grounding", "captions", "self_consistency")
               if getattr(args, k) is not None}
  return dataclasses.replace(config, eval=dataclasses.replace(config.eval, **overrides))


def _model_from_workdir(config, workdir: str, tokenizer, mesh):
  from lvlm_jax.models import building
  from lvlm_jax.sharding import abstract_tree
  from lvlm_jax.training import checkpoint, optim, state as train_state
  abstract_model = building.abstract_model(config.model, tokenizer)
  trainable = optim.trainable_filter(config.optim)
  graphdef, params, frozen = train_state.split_model(abstract_model, trainable)
  tx = optim.make_optimizer(config.optim, config.train.num_steps, params)
  abstract = train_state.abstract_state(params, frozen, tx)
  shardings = train_state.state_shardings(abstract, mesh)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  step = checkpointer.latest_step()
  if step is None:
    raise UserError(f"{workdir}: no checkpoint yet")
  state = checkpointer.restore(step, abstract_tree(abstract, shardings), None)
  if "frozen" not in state:
    state["frozen"] = building.load_params(config.model, tokenizer, mesh, trainable, shardings)[1]
  checkpointer.close()
  return train_state.merge(graphdef, state), abstract_model, step


def load_evaluated_model(args, config, mesh):
  """(model, the model whose config decides shapes, checkpoint step or None, tokenizer, the
  data pipeline config its prompts are rendered with) of --workdir or --model."""
  from lvlm_jax.data import training_sources
  from lvlm_jax.data.tokenizer import load_tokenizer
  from lvlm_jax.models import building, hf, params_io
  prompts = (config.data.pipeline.grounding_prompt,)
  if args.workdir:
    tokenizer = load_tokenizer(config.model, prompts)
    model, reference, step = _model_from_workdir(config, args.workdir, tokenizer, mesh)
    model_config = config.model
  else:
    if not os.path.isdir(args.model):
      raise UserError(f"--model {args.model}: no such directory")
    has_tokenizer = os.path.exists(os.path.join(args.model, "tokenizer.json"))
    tokenizer = load_tokenizer(
        dataclasses.replace(config.model, tokenizer=args.model) if has_tokenizer else config.model,
        prompts)
    is_ours = os.path.isdir(os.path.join(args.model, "params"))
    model = (params_io.load_model(args.model, mesh=mesh) if is_ours
             else hf.load_model(args.model, mesh=mesh, allow_pickle=args.allow_pickle))
    reference, step = model, None
    model_config = dataclasses.replace(config.model, hf_dir="" if is_ours else args.model)
  building.check_vocabulary(reference, tokenizer)
  data = training_sources.pipeline_config(config.data, reference, model_config.hf_dir, 1)
  return model, reference, step, tokenizer, data


def evaluate(args) -> dict:
  import jax

  from lvlm_jax.eval.shapes import ShapesEvaluator
  from lvlm_jax.data.shapes import held_out_world
  from lvlm_jax.sharding import make_mesh
  from lvlm_jax.output_paths import check_output_file
  config = _config(args)
  if args.benchmark:
    from lvlm_jax.eval.benchmarks import evaluation
    return evaluation.run(args, config, load_evaluated_model)
  output = args.output or (os.path.join(args.workdir, "eval.json") if args.workdir else None)
  if output:  # before the evaluation, not after it
    check_output_file(output, "--output")
  if args.grounding_file and not os.path.exists(args.grounding_file):
    raise UserError(f"--grounding_file {args.grounding_file}: no such file")
  print_devices("lvlm_jax.evaluate")
  mesh = make_mesh()
  model, _, step, tokenizer, data = load_evaluated_model(args, config, mesh)
  if args.grounding_file:
    records = grounding_file_records(args.grounding_file, args.image_root, args.limit)
    from lvlm_jax.eval import grounding_file
    metrics = {"records": len(records), **grounding_file.metrics(
        model, tokenizer, data, config, mesh, records)}
  else:
    evaluator = ShapesEvaluator(tokenizer, data, held_out_world(config.data.shapes),
                                config.eval, mesh)
    with jax.set_mesh(mesh):
      metrics = evaluator(model)
    from lvlm_jax.methods import cadvi
    if isinstance(config, cadvi.CaDVIConfig):  # its held-out pairs: selection and summaries
      metrics.update(cadvi.pair_metrics(model, tokenizer, data, config, mesh))
  result = {"model": args.workdir or args.model, "step": step,
            **({"grounding_file": args.grounding_file} if args.grounding_file else {}), **metrics}
  print(json.dumps(result, indent=2))
  if output:
    with open(output, "w") as f:
      json.dump(result, f, indent=2)
  return result


def main(argv=None) -> None:
  run_cli(lambda: evaluate(parse_args(argv)) and 0)


if __name__ == "__main__":
  main(sys.argv[1:])
