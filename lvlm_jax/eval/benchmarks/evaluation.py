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
from lvlm_jax.eval.benchmarks.benchmark import GroundingBenchmark
from lvlm_jax.eval.benchmarks.predictions import PredictionLog


def run(args, config, load_model) -> dict:
  """load_model(args, config, mesh) -> (model, reference, step, tokenizer, data config)."""
  from lvlm_jax.output_paths import check_output_file
  from lvlm_jax.sharding import make_mesh
  benchmark = BENCHMARKS[args.benchmark]
  output_dir = args.output_dir or f"eval_{args.benchmark}"
  metrics_path = args.output or os.path.join(output_dir, "metrics.json")
  check_output_file(metrics_path, "--output")
  if not os.path.exists(args.data):
    raise UserError(f"--data {args.data}: no such file or folder ({benchmark.files})")
  judged = getattr(benchmark, "judge", None) is not None
  if judged and not args.judge:
    raise UserError(f"--benchmark {args.benchmark} is rated by a judge LLM: give --judge DIR "
                    "(a local HF causal LM)")
  if args.judge and not judged:
    raise UserError(f"--judge goes with a judged benchmark (cadqa), not {args.benchmark}")
  if args.judge and not os.path.isdir(args.judge):
    raise UserError(f"--judge {args.judge}: no such directory")
  _claim(output_dir, {"benchmark": args.benchmark, "model": os.path.abspath(
      args.workdir or args.model), "data": os.path.abspath(args.data)})
  limit = args.limit or benchmark.default_limit
  if isinstance(benchmark, GroundingBenchmark):
    records, skipped = benchmark.records(args.data, args.images, limit)
    count, unusable = len(records) + len(skipped), skipped
  else:
    root = files.folder(args.images, args.data)
    items = benchmark.load(args.data, args.images)
    items = items[:limit] if limit else items
    count = len(items)
    unusable = [m for m in (_missing_image(item, root) for item in items) if m]
  if len(unusable) > args.max_skip_fraction * count:
    raise UserError(f"{len(unusable)} of {count} items have no usable image, more than "
                    f"--max_skip_fraction={args.max_skip_fraction}; the first: {unusable[0]}")
  print_devices("lvlm_jax.evaluate")
  mesh = make_mesh()
  model, _, step, tokenizer, data = load_model(args, config, mesh)
  model.eval()
  if isinstance(benchmark, GroundingBenchmark):
    answered, unreadable, scores = _grounded(args, records, model, tokenizer, data, config, mesh,
                                             output_dir)
    skipped = skipped + unreadable
  else:
    answered, skipped, scores = _answered(args, benchmark, items, model, tokenizer, data, mesh,
                                          root, output_dir)
  result = {"benchmark": args.benchmark, "model": args.workdir or args.model, "step": step,
            "data": args.data, "items": count, "answered": answered, "skipped": len(skipped),
            **({"first_skip": skipped[0]} if skipped else {}), **scores}
  print(json.dumps(result, indent=2))
  write_json(metrics_path, result)
  return result


def _missing_image(item, root: str) -> str | None:
  """Why one of the item's image files is missing or outside `root`, or None."""
  from lvlm_jax.data.images import BadImage, resolve_image_path
  try:
    for image in item.images:
      if not isinstance(image, bytes):
        resolve_image_path(image, [root])
  except BadImage as e:
    return f"item {item.id}: {e}"
  return None


def _claim(output_dir: str, run: dict) -> None:
  """Marks output_dir as this run's (run.json), or refuses it when it holds another run's
  predictions, which a resume would otherwise mix into this run's metrics."""
  path = os.path.join(output_dir, "run.json")
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        before = json.load(f)
    except (OSError, ValueError):
      before = None
    if before != run:
      raise UserError(f"--output_dir {output_dir} holds the predictions of another run "
                      f"({path}: {before}); give another --output_dir, or delete it to start "
                      "over")
  else:
    write_json(path, run)


def _answered(args, benchmark, items, model, tokenizer, data, mesh, root, output_dir):
  """(items answered, reasons of the skips, metrics) of the model on the items, answered
  through the prediction log in output_dir."""
  from lvlm_jax.eval.benchmarks import runner
  from lvlm_jax.sampling.service import GenerationService
  from lvlm_jax.sharding import batch_shards
  # Rows are split over the mesh's batch axes: the batch rounds up to a multiple of them.
  size = -(-args.batch_size // batch_shards(mesh)) * batch_shards(mesh)
  service = GenerationService(model, tokenizer, data, mesh, size,
                              weights_dtype=args.weights_dtype)
  log = PredictionLog(os.path.join(output_dir, "predictions.jsonl"))
  records = runner.answer(items, service, log, root,
                          args.max_new_tokens or benchmark.max_new_tokens, desc=args.benchmark)
  answered = [item for item in items if "answer" in records[item.id]]
  skipped = [records[item.id]["error"] for item in items if "answer" not in records[item.id]]
  answers = {i.id: records[i.id]["answer"] for i in answered}
  if benchmark.judge is not None:
    del service  # the model's decoding copy of its weights, before the judge loads
    answers = _judgements(args, benchmark.judge(answered, answers), mesh, output_dir)
  return len(answered), skipped, benchmark.score(answered, answers)


def _grounded(args, records, model, tokenizer, data, config, mesh, output_dir):
  """(records answered, reasons of the skips, metrics) of the grounding-file evaluator over box
  records, a batch of them at a time: each batch's images are decoded when it is asked and its
  results appended to predictions.jsonl before the next (a rerun skips the records there; a
  record whose image cannot be decoded is a counted skip, tried again on a rerun)."""
  import sys

  import jax
  import tqdm
  from jax.experimental import multihost_utils

  from lvlm_jax import preemption
  from lvlm_jax.data.images import BadImage, load_image
  from lvlm_jax.eval import grounding_file
  log = PredictionLog(os.path.join(output_dir, "predictions.jsonl"))
  done = log.read()
  if jax.process_count() > 1:  # every host reads the log before process 0 appends to it
    multihost_utils.sync_global_devices("grounding predictions read")
  todo = [r for r in records if "self_consistency_iou" not in done.get(r["id"], {})]
  if done and todo:
    print(f"resuming {log.path}: {len(records) - len(todo)} of {len(records)} records already "
          "answered", file=sys.stderr)
  size = args.batch_size * _GROUNDING_BATCHES
  with tqdm.tqdm(total=len(records), initial=len(records) - len(todo), desc=args.benchmark,
                 unit="box", file=sys.stderr, dynamic_ncols=True,
                 disable=jax.process_index() != 0) as bar:
    for first in range(0, len(todo), size):
      chunk, results, decoded = todo[first:first + size], {}, []
      for record in chunk:
        try:
          decoded.append({**record, "images": [load_image(record["image"])]})
        except BadImage as e:
          results[record["id"]] = {"id": record["id"], "error": f"{args.data}:{record['id']}: {e}"}
      scores = grounding_file.scores(model, tokenizer, data, config, mesh, decoded)
      results.update((r["id"], {"id": r["id"], **s}) for r, s in zip(decoded, scores))
      batch = [results[r["id"]] for r in chunk]
      log.append(batch)
      done.update((r["id"], r) for r in batch)
      bar.update(len(chunk))
      preemption.check()  # SIGTERM in a pipeline stage: stop here, the log has every result
  finished = [done[r["id"]] for r in records]
  answered = [r for r in finished if "error" not in r]
  return (len(answered), [r["error"] for r in finished if "error" in r],
          grounding_file.summary(answered) if answered else {})


# Box records per grounding batch: this many decoding batches of --batch_size (its images are
# decoded together and its results logged together).
_GROUNDING_BATCHES = 8


def _judgements(args, prompts, mesh, output_dir) -> dict[str, str]:
  """The judge LLM's replies (greedy, resumable in judgements.jsonl) by item id; '' where the
  prompt did not fit the judge's context."""
  from lvlm_jax.eval.benchmarks import runner
  from lvlm_jax.generate import generation_service
  from lvlm_jax.models import hf
  judge = hf.load_model(args.judge, mesh=mesh)
  judge.eval()
  service = generation_service(args.judge, judge, batch_size=args.batch_size, pad_to=16)
  log = PredictionLog(os.path.join(output_dir, "judgements.jsonl"))
  records = runner.answer(prompts, service, log, output_dir, _JUDGE_TOKENS, desc="judging")
  return {i: r.get("answer", "") for i, r in records.items()}


_JUDGE_TOKENS = 16  # the judge replies with one digit; room for a word or two around it
