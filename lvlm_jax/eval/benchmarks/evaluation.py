"""`python -m lvlm_jax.evaluate --benchmark NAME --data PATH`: load the benchmark's items, answer
them (resumably) with the model, score them, write the metrics.

The items are read before the model loads, so a bad file costs seconds. Predictions go to
<output_dir>/predictions.jsonl (one record per item: id, answer, or error for a counted skip),
the metrics to <output_dir>/metrics.json (or --output) and stdout.
"""

import json
import os

from lvlm_jax.artifacts import write_json
from lvlm_jax.cli import print_devices
from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import BENCHMARKS, files
from lvlm_jax.eval.benchmarks.predictions import PredictionLog


def run(args, config, load_model) -> dict:
  """load_model(args, config, mesh) -> (model, reference, step, tokenizer, data config)."""
  from lvlm_jax.eval.benchmarks import runner
  from lvlm_jax.output_paths import check_output_file
  from lvlm_jax.sampling.service import GenerationService
  from lvlm_jax.sharding import batch_shards, make_mesh
  benchmark = BENCHMARKS[args.benchmark]
  output_dir = args.output_dir or f"eval_{args.benchmark}"
  metrics_path = args.output or os.path.join(output_dir, "metrics.json")
  check_output_file(metrics_path, "--output")
  if not os.path.exists(args.data):
    raise UserError(f"--data {args.data}: no such file or folder ({benchmark.files})")
  root = files.folder(args.images, args.data)
  items = benchmark.load(args.data, args.images)
  if args.limit:
    items = items[:args.limit]
  print_devices("lvlm_jax.evaluate")
  mesh = make_mesh()
  model, _, step, tokenizer, data = load_model(args, config, mesh)
  model.eval()
  # Rows are split over the mesh's batch axes: the batch rounds up to a multiple of them.
  size = -(-args.batch_size // batch_shards(mesh)) * batch_shards(mesh)
  service = GenerationService(model, tokenizer, data, mesh, size)
  log = PredictionLog(os.path.join(output_dir, "predictions.jsonl"))
  records = runner.answer(items, service, log, root,
                          args.max_new_tokens or benchmark.max_new_tokens, desc=args.benchmark)
  answered = [item for item in items if "answer" in records[item.id]]
  skipped = [records[item.id]["error"] for item in items if "answer" not in records[item.id]]
  result = {"benchmark": args.benchmark, "model": args.workdir or args.model, "step": step,
            "data": args.data, "items": len(items), "answered": len(answered),
            "skipped": len(skipped), **({"first_skip": skipped[0]} if skipped else {}),
            **benchmark.score(answered, {i.id: records[i.id]["answer"] for i in answered})}
  print(json.dumps(result, indent=2))
  write_json(metrics_path, result)
  return result
