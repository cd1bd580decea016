"""Generate text with an LLM or a LLaVA model, from the command line.

  python -m lvlm_jax.generate --model DIR --image a.jpg [b.jpg ...] --prompt "Describe the image."
  python -m lvlm_jax.generate --model DIR --input_jsonl in.jsonl --output_jsonl out.jsonl

DIR is an HF model directory (config.json, safetensors, tokenizer; for LLaVA also
preprocessor_config.json) or an lvlm_jax checkpoint with the tokenizer files beside it.
Each input line is a JSON object with "prompt" and optionally "image" or "images" (paths relative
to --image_root, default the JSONL's directory) and "system"; each output line is that object
plus "response" (and "responses", plus "scores" for beam search, when several are returned).
Answers are written batch by batch to OUTPUT.partial, renamed to OUTPUT at the end; the same
command after an interruption resumes after the last complete batch. A record that cannot be
used (an unreadable image, say) is skipped and counted: its output line carries "error" (naming
the input file and line) instead of "response"; more than --max_skip_fraction of them stops.
Prompts are rendered by the generation service exactly as training renders the same turns
(`sampling/service.py`, the one prompt builder), batched and left-padded to a multiple of
--pad_to_multiple tokens so that few shapes (compilations) occur.
"""

import argparse
import json
import os
import sys


from lvlm_jax.cli import print_devices, run_cli
from lvlm_jax.data import images as images_lib
from lvlm_jax.data import text
from lvlm_jax.errors import UserError
from lvlm_jax.input_files import read_jsonl
from lvlm_jax.output_paths import check_output_file

TEMPLATES = ("auto", "none", "vicuna_v1", "llama3", "chatml", "mistral", "tokenizer")
# Where read_records keeps a record's input line; removed before the record is written out.
LINE_KEY = "__line__"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m lvlm_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True,
                 help="HF model directory or lvlm_jax checkpoint directory (with tokenizer files)")
  p.add_argument("--prompt", help="one prompt to answer; the response goes to stdout")
  p.add_argument("--image", nargs="+", default=[], metavar="PATH",
                 help="image(s) for --prompt, in order; a prompt without <image> placeholders gets "
                 "one '<image>\\n' per image in front (LLaVA's rule)")
  p.add_argument("--system", default=None,
                 help="system prompt (default: the template's own; '' for none); in batch mode "
                 "for the records without a 'system' of their own")
  p.add_argument("--input_jsonl", help="batch mode: one JSON object per line with 'prompt' and "
                 "optional 'image'/'images' and 'system'")
  p.add_argument("--output_jsonl", help="batch mode: where to write each input object plus "
                 "'response' (written to a .partial file, renamed when complete)")
  p.add_argument("--image_root", default=None,
                 help="batch mode: directory that image paths are relative to (default: the "
                 "directory of --input_jsonl); paths leading outside it are refused")
  p.add_argument("--template", default="auto", choices=TEMPLATES,
                 help="chat template: 'auto' = the tokenizer's own if it has one, else vicuna_v1; "
                 "'none' = the prompt text as is")
  p.add_argument("--answer_start", default="", metavar="TEXT",
                 help="text every answer is known to begin with (e.g. '<box>' for grounding): "
                 "the prompt then ends exactly where training's context for such an answer "
                 "ends, as the evaluators' prompts do (the answer still starts with TEXT)")
  p.add_argument("--max_new_tokens", type=int, default=128,
                 help="most tokens generated per answer; a prompt that leaves no room for them "
                 "in the model's context (max_position_embeddings) is refused")
  p.add_argument("--min_new_tokens", type=int, default=0,
                 help="end-of-sequence tokens are suppressed until this many tokens exist")
  p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
  p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
  p.add_argument("--top_k", type=int, default=0,
                 help="sample among the k most likely tokens; 0 = all")
  p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off")
  p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
  p.add_argument("--stop", nargs="+", default=[], metavar="TEXT",
                 help="stop strings: an answer ends right after the token that completes one "
                 "(greedy/sampling only)")
  p.add_argument("--num_beams", type=int, default=1,
                 help="beam search with this many beams; 1 = off")
  p.add_argument("--num_beam_groups", type=int, default=1,
                 help="diverse beam search groups (must divide --num_beams)")
  p.add_argument("--diversity_penalty", type=float, default=0.0,
                 help="diverse beam search: penalty for repeating another group's token (> 0)")
  p.add_argument("--length_penalty", type=float, default=1.0,
                 help="beam scores are log-prob sums / length ** length_penalty")
  p.add_argument("--early_stopping", default="false", choices=("true", "false", "never"),
                 help="beam search stopping rule, as transformers' early_stopping")
  p.add_argument("--num_return_sequences", type=int, default=1,
                 help="answers returned per prompt (beam search: <= --num_beams; sampling: "
                 "independent samples)")
  p.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
  p.add_argument("--pad_to_multiple", type=int, default=32,
                 help="prompt lengths are padded up to a multiple of this (fewer compilations)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of the model")
  p.add_argument("--max_skip_fraction", type=float, default=0.05,
                 help="batch mode: largest share of records that may be skipped (unreadable "
                 "image, ...) before the run stops")
  p.add_argument("--allow_pickle", action="store_true",
                 help="accept pickled .bin/.pt weights; pickles can run code when loaded, "
                 "so use this only for files you trust")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  p = build_parser()
  args = p.parse_args(argv)
  if (args.prompt is None) == (args.input_jsonl is None):
    p.error("give exactly one of --prompt or --input_jsonl")
  if args.input_jsonl and not args.output_jsonl:
    p.error("--input_jsonl needs --output_jsonl")
  if args.input_jsonl and args.image:
    p.error("--image goes with --prompt; in batch mode put images in the JSONL records")
  for name in ("batch_size", "pad_to_multiple", "num_return_sequences"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be at least 1")
  if not 0 <= args.max_skip_fraction <= 1:
    p.error("--max_skip_fraction must be in [0, 1]")
  return args


def image_paths(record: dict) -> list[str]:
  """A record's images: its "images" list, or its one "image"."""
  return record.get("images", [record["image"]] if "image" in record else [])


def read_records(path: str) -> list[dict]:
  """The JSONL's objects, each with its line number under `LINE_KEY`; a malformed line is a
  UserError naming it, and so is a file without records."""
  records = []
  for number, record in read_jsonl(path, "one object per line with a string 'prompt'"):
    if not isinstance(record.get("prompt"), str):
      raise UserError(f"{path}:{number}: expected an object with a string 'prompt'")
    images = image_paths(record)
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
      raise UserError(f"{path}:{number}: 'image' must be a path and 'images' a list of paths")
    records.append({**record, LINE_KEY: number})
  return records


def generation_service(model_dir: str, model, template: str = "auto", system: str | None = None,
                       batch_size: int = 8, pad_to: int = 32):
  """The generation service for the model in `model_dir`: its tokenizer, `template` ('auto':
  the tokenizer's own if it has one, else vicuna_v1) and `system` prompt, the model's image
  processing and image-token counts (`DataConfig.for_model`: AnyRes for LLaVA-NeXT)."""
  from transformers import AutoTokenizer

  from lvlm_jax.data.pipeline import DataConfig
  from lvlm_jax.models.lvlm import LVLM
  from lvlm_jax.sampling.service import GenerationService
  from lvlm_jax.sharding import batch_shards, make_mesh
  try:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
  except (OSError, ValueError) as e:
    raise UserError(f"{model_dir}: cannot load a tokenizer ({e}); copy the tokenizer files "
                    "next to the weights") from None
  if template == "auto":
    template = "tokenizer" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
  data = DataConfig(template="vicuna_v1" if template == "none" else template,
                    system_prompt=system).for_model(model, model_dir)
  if (isinstance(model, LVLM)
      and text.image_token_id(tokenizer, data.image_token) != model.config.image_token_id):
    raise UserError(f"{model_dir}: the tokenizer's {data.image_token} id differs from the "
                    f"model's image_token_id {model.config.image_token_id}")
  mesh = make_mesh()
  # Rows are split over the mesh's batch axes: the batch rounds up to a multiple of them.
  size = -(-batch_size // batch_shards(mesh)) * batch_shards(mesh)
  return GenerationService(model, tokenizer, data, mesh, size, pad_to=pad_to)


def make_prompt(record: dict, images: list, template: str, answer_start: str = ""):
  """A record's `Prompt`: its text under the chat template (its own "system" if it has one),
  or, with --template none, the text as is."""
  from lvlm_jax.sampling.service import Prompt
  if template == "none":
    if images:
      raise UserError("--template none cannot place images; pick a chat template")
    return Prompt.continuation(record["prompt"])
  return Prompt.question(record["prompt"], images, answer_start, system=record.get("system"))


def _prepared(service, record: dict, files: list[str], args: argparse.Namespace):
  """One record's `Prompt`, checked against the model's context; a UserError (BadImage
  included) when the record cannot be used."""
  if files and not service.is_lvlm:
    raise UserError("images were given but the model is text-only")
  prompt = make_prompt(record, [images_lib.load_image(f) for f in files], args.template,
                       args.answer_start)
  service.check_room(prompt, args.max_new_tokens)
  return prompt


def _stop_token_ids(model_dir: str, model, tokenizer) -> tuple[int, ...]:
  """generation_config.json's eos_token_id, else the model config's, else the tokenizer's."""
  from lvlm_jax.sampling.decode import language_model
  path = os.path.join(model_dir, "generation_config.json")
  eos = None
  if os.path.exists(path):
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
  if eos is None:
    eos = language_model(model).config.eos_token_id
  if eos is None:
    eos = tokenizer.eos_token_id
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def _load_model(directory: str, dtype: str, allow_pickle: bool = False):
  from lvlm_jax.models import hf, params_io
  from lvlm_jax.models.llm import LLM
  from lvlm_jax.models.lvlm import LVLM
  if not os.path.isdir(directory):
    raise UserError(f"--model {directory}: no such directory")
  overrides = {} if dtype == "float32" else {"dtype": dtype}
  if os.path.isdir(os.path.join(directory, "params")):
    model = params_io.load_model(directory, **overrides)
  else:
    model = hf.load_model(directory, allow_pickle=allow_pickle, **overrides)
  if not isinstance(model, (LLM, LVLM)):
    raise UserError(f"--model {directory}: a {type(model).__name__} cannot generate text")
  return model


def run(args: argparse.Namespace) -> None:
  import jax

  from lvlm_jax.sampling import beam, decode, stop_strings

  records = None
  if args.output_jsonl:  # before any work: a bad output path found at the end loses all of it
    if os.path.abspath(args.output_jsonl) == os.path.abspath(args.input_jsonl):
      raise UserError("--output_jsonl must not be --input_jsonl")
    check_output_file(args.output_jsonl, "--output_jsonl")
    records = read_records(args.input_jsonl)
  print_devices("lvlm_jax.generate")
  model = _load_model(args.model, args.dtype, args.allow_pickle)
  service = generation_service(args.model, model, args.template, args.system, args.batch_size,
                               args.pad_to_multiple)
  tokenizer = service.tokenizer
  eos = _stop_token_ids(args.model, model, tokenizer)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
  beams = args.num_beams > 1
  if beams:
    if args.stop or args.do_sample:
      raise UserError("--stop and --do_sample work with greedy/sampling decoding, not beam search")
    config = beam.BeamConfig(
        num_beams=args.num_beams, num_beam_groups=args.num_beam_groups,
        diversity_penalty=args.diversity_penalty, length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False, "never": "never"}[args.early_stopping],
        num_return_sequences=args.num_return_sequences, max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens, eos_token_ids=eos, pad_token_id=pad)
    stops = None
  else:
    if args.num_return_sequences > 1 and not args.do_sample:
      raise UserError("several answers per prompt need --do_sample or --num_beams > 1")
    config = decode.SamplingConfig(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_token_ids=eos, pad_token_id=pad,
        num_return_sequences=args.num_return_sequences)
    vocab = decode.language_model(model).config.vocab_size
    stops = None
    if args.stop:
      stops = stop_strings.stop_strings_for_tokenizer(tokenizer, args.stop, vocab)

  if args.prompt is not None:
    record = {"prompt": args.prompt, "images": args.image}
    prompts = [_prepared(service, record, args.image, args)]
    answers, _ = _answer(service, prompts, config, stops,
                         jax.random.fold_in(jax.random.key(args.seed), 0))
    print("\n".join(answers[0]))
    return
  _answer_jsonl(records, args, service, config, stops)


def _answer_jsonl(records: list[dict], args, service, config, stops) -> None:
  """Batch mode: answers every record into --output_jsonl, as the module docstring says."""
  import jax
  from tqdm import tqdm

  from lvlm_jax.artifacts import JsonlWriter
  root = args.image_root or os.path.dirname(os.path.abspath(args.input_jsonl))
  files, problems = [], {}  # per record: its image files; record index -> why it is unusable
  for n, record in enumerate(records):
    try:
      files.append([images_lib.resolve_image_path(p, [root]) for p in image_paths(record)])
    except UserError as e:
      files.append([])
      problems[n] = str(e)
  skips = _Skips(args.input_jsonl, len(records), args.max_skip_fraction)
  for n in sorted(problems):  # before any work: inputs this broken stop at once
    skips.add(records[n], problems[n], args.output_jsonl + ".partial")
  skips.reset()
  batch_size = min(service.batch_size, len(records))
  writer = JsonlWriter(args.output_jsonl, batch_size)
  start = writer.resume()
  if start:
    print(f"resuming {args.output_jsonl}: {start} of {len(records)} records already answered",
          file=sys.stderr)
    with open(writer.partial) as f:
      for line in f:
        if "error" in json.loads(line):
          skips.count += 1
  key = jax.random.key(args.seed)
  with tqdm(total=len(records), initial=start, desc="generating", unit="prompt",
            file=sys.stderr) as bar:
    for first in range(start, len(records), batch_size):
      chunk = range(first, min(first + batch_size, len(records)))
      rows, errors = {}, {}
      for n in chunk:
        try:
          if n in problems:
            raise UserError(problems[n])
          rows[n] = _prepared(service, records[n], files[n], args)
        except UserError as e:
          errors[n] = skips.add(records[n], str(e), writer.partial)
      answers, scores = [], []
      if rows:
        answers, scores = _answer(service, list(rows.values()), config, stops,
                                  jax.random.fold_in(key, first))
      results = dict(zip(rows, zip(answers, scores or [None] * len(answers))))
      out = []
      for n in chunk:
        record = {k: v for k, v in records[n].items() if k != LINE_KEY}
        if n in errors:
          record["error"] = errors[n]
        else:
          texts, beam_scores = results[n]
          record["response"] = texts[0]
          if len(texts) > 1:
            record["responses"] = texts
          if beam_scores is not None:
            record["scores"] = beam_scores
        out.append(record)
      writer.append(out)
      bar.update(len(chunk))
  writer.close()
  print(f"wrote {len(records)} records to {args.output_jsonl}"
        + (f"; {skips.count} skipped (first: {skips.first})" if skips.count else ""),
        file=sys.stderr)


class _Skips:
  """Counts the batch's unusable records and stops once more than the tolerated share are."""

  def __init__(self, path: str, total: int, max_fraction: float):
    self.path, self.total, self.max_fraction = path, total, max_fraction
    self.count, self.first = 0, None

  def add(self, record: dict, reason: str, partial: str) -> str:
    """Counts `record` as skipped; returns the error its output line carries."""
    where = f"{self.path}:{record[LINE_KEY]}: {reason}"
    self.count += 1
    self.first = self.first or where
    if self.count > self.max_fraction * self.total:
      raise UserError(f"{self.count} of {self.total} records cannot be used, more than "
                      f"--max_skip_fraction={self.max_fraction}; {where}. Answers so far are in "
                      f"{partial}: the same command resumes after them")
    return where

  def reset(self) -> None:
    self.count, self.first = 0, None


def _answer(service, prompts: list, config, stops, rng):
  """Generates for up to a batch of prompts: (per prompt its answers, per prompt its beam
  scores or [] without beam search). Each prompt and its images are encoded once."""
  from lvlm_jax.sampling import beam
  if not isinstance(config, beam.BeamConfig):
    completions = service.generate(prompts, config, rng, stop=stops)
    k = config.num_return_sequences  # several samples of a prompt come as rows i * k + j
    return [[c.text for c in completions[i * k:(i + 1) * k]] for i in range(len(prompts))], []
  prefix, rows = service.start(prompts, config.max_new_tokens)
  out = service.beams(prefix, config)
  answers = [[service.tokenizer.decode(out.tokens[i, j, :out.lengths[i, j]],
                                       skip_special_tokens=True).strip()
              for j in range(out.tokens.shape[1])] for i in range(rows)]
  return answers, out.scores[:rows].tolist()


def main(argv=None) -> None:
  run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
  main()
