"""Generate text with an LLM or a LLaVA model, from the command line.

  python -m lvlm_jax.generate --model DIR --image a.jpg [b.jpg ...] --prompt "Describe the image."
  python -m lvlm_jax.generate --model DIR --input_jsonl in.jsonl --output_jsonl out.jsonl

DIR is an HF model directory (config.json, safetensors, tokenizer; for LLaVA also
preprocessor_config.json) or an lvlm_jax checkpoint with the tokenizer files beside it.
Each input line is a JSON object with "prompt" and optionally "image" or "images" (paths relative
to --image_root, default the JSONL's directory) and "system"; each output line is that object
plus "response" (and "responses", plus "scores" for beam search, when several are returned).
Prompts are rendered with a chat template and batched, left-padded to a multiple of
--pad_to_multiple tokens so that few shapes (compilations) occur.
"""

import argparse
import json
import os
import sys

import numpy as np

from lvlm_jax.cli import run_cli
from lvlm_jax.data import images as images_lib
from lvlm_jax.data import text
from lvlm_jax.errors import UserError

TEMPLATES = ("auto", "none", "vicuna_v1", "llama3", "chatml", "mistral", "tokenizer")


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
  return args


def image_paths(record: dict) -> list[str]:
  """A record's images: its "images" list, or its one "image"."""
  return record.get("images", [record["image"]] if "image" in record else [])


def read_records(path: str) -> list[dict]:
  """The JSONL's objects; a malformed line is a UserError naming it."""
  try:
    with open(path) as f:
      lines = f.readlines()
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from None
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
      raise UserError(f"{path}:{number}: expected an object with a string 'prompt'")
    images = image_paths(record)
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
      raise UserError(f"{path}:{number}: 'image' must be a path and 'images' a list of paths")
    records.append(record)
  return records


class Prompter:
  """Records -> token ids and pixels for one model: template, tokenizer, image processing."""

  def __init__(self, model_dir: str, model, template: str, system: str | None = None,
               max_new_tokens: int = 0):
    """`system`: the system prompt of records without their own; `max_new_tokens`: the answer
    budget that every prompt must leave room for in the model's context."""
    from transformers import AutoTokenizer

    from lvlm_jax.models.lvlm import LVLM
    from lvlm_jax.sampling.decode import language_model
    self.system, self.max_new_tokens = system, max_new_tokens
    self.context = language_model(model).config.max_position_embeddings
    try:
      self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
      raise UserError(f"{model_dir}: cannot load a tokenizer ({e}); copy the tokenizer files "
                      "next to the weights") from None
    self.is_lvlm = isinstance(model, LVLM)
    if template == "auto":
      template = "tokenizer" if getattr(self.tokenizer, "chat_template", None) else "vicuna_v1"
    self.template = template
    if self.is_lvlm:
      config = model.config
      self.tokens_per_image = config.tokens_per_image
      if text.image_token_id(self.tokenizer) != config.image_token_id:
        raise UserError(f"{model_dir}: the tokenizer's <image> id differs from the model's "
                        f"image_token_id {config.image_token_id}")
      processor_file = os.path.join(model_dir, "preprocessor_config.json")
      if os.path.exists(processor_file):
        self.processing = images_lib.ImageProcessing.from_hf_preprocessor_config(processor_file)
      else:
        self.processing = images_lib.ImageProcessing(size=config.vision.image_size)

  def token_ids(self, record: dict) -> list[int]:
    """The prompt's ids; a `UserError` when they and max_new_tokens overflow the context (past
    max_position_embeddings a model returns garbage)."""
    ids = self._ids(record)
    if len(ids) + self.max_new_tokens > self.context:
      raise UserError(f"prompt {record['prompt'][:40]!r}: its {len(ids)} tokens plus "
                      f"--max_new_tokens {self.max_new_tokens} exceed the model's context of "
                      f"{self.context} (max_position_embeddings); shorten it or lower "
                      "--max_new_tokens")
    return ids

  def _ids(self, record: dict) -> list[int]:
    num_images = len(image_paths(record))
    if num_images and not self.is_lvlm:
      raise UserError("images were given but the model is text-only")
    if self.template == "none":
      if num_images:
        raise UserError("--template none cannot place images; pick a chat template")
      return self.tokenizer(record["prompt"]).input_ids
    turns = [{"from": "human", "value": record["prompt"]}]
    if self.is_lvlm:
      turns = text.ensure_image_placeholders(turns, num_images)
    rendered = text.render(turns, self.tokenizer, self.template,
                           system=record.get("system", self.system), add_generation_prompt=True)
    # As in training: LLaVA's templates tokenize piece by piece (text.tokenize knows how).
    ids, _ = text.tokenize(rendered, self.tokenizer,
                           tokens_per_image=self.tokens_per_image if self.is_lvlm else 1)
    return ids.tolist()

  def image(self, path: str):
    """An image file -> float32 [S, S, 3] vision-tower pixels."""
    return self.processing(images_lib.load_image(path))


def _batch_arrays(prompter: Prompter, chunk: list[tuple[dict, list[str]]], batch_size: int,
                  multiple: int):
  """(record, image files) pairs -> left-padded ids/mask [batch_size, T] and pixels
  [batch_size, N, H, W, 3] (or None); rows past the chunk repeat its first, so that every batch
  has the same shape."""
  chunk = chunk + [chunk[0]] * (batch_size - len(chunk))
  rows = [prompter.token_ids(record) for record, _ in chunk]
  width = -(-max(len(r) for r in rows) // multiple) * multiple
  ids = np.full((batch_size, width), prompter.tokenizer.pad_token_id or 0, np.int32)
  mask = np.zeros((batch_size, width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
  count = max(len(files) for _, files in chunk)
  if not prompter.is_lvlm or not count:
    return ids, mask, None
  size = prompter.processing.size
  pixels = np.zeros((batch_size, count, size, size, 3), np.float32)
  for i, (_, files) in enumerate(chunk):
    for j, file in enumerate(files):  # unused slots stay zero: no image token refers to them
      pixels[i, j] = prompter.image(file)
  return ids, mask, pixels


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


def _load_model(directory: str, dtype: str):
  from lvlm_jax.models import hf, params_io
  from lvlm_jax.models.llm import LLM
  from lvlm_jax.models.lvlm import LVLM
  if not os.path.isdir(directory):
    raise UserError(f"--model {directory}: no such directory")
  overrides = {} if dtype == "float32" else {"dtype": dtype}
  if os.path.isdir(os.path.join(directory, "params")):
    model = params_io.load_model(directory, **overrides)
  else:
    model = hf.load_model(directory, **overrides)
  if not isinstance(model, (LLM, LVLM)):
    raise UserError(f"--model {directory}: a {type(model).__name__} cannot generate text")
  return model


def run(args: argparse.Namespace) -> None:
  import jax
  from tqdm import tqdm

  from lvlm_jax.sampling import beam, decode, stop_strings

  model = _load_model(args.model, args.dtype)
  prompter = Prompter(args.model, model, args.template, args.system, args.max_new_tokens)
  tokenizer = prompter.tokenizer
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
    records = [{"prompt": args.prompt, "images": args.image}]
    files = [args.image]
  else:
    records = read_records(args.input_jsonl)
    root = args.image_root or os.path.dirname(os.path.abspath(args.input_jsonl))
    files = [[images_lib.resolve_image_path(p, [root]) for p in image_paths(r)] for r in records]

  work = list(zip(records, files))
  texts, scores = [], []  # per item of `work`: its answers, and their beam scores
  key = jax.random.key(args.seed)
  batch_size = min(args.batch_size, len(work))
  with tqdm(total=len(work), desc="generating", unit="prompt", file=sys.stderr,
            disable=args.prompt is not None) as bar:
    for start in range(0, len(work), batch_size):
      chunk = work[start:start + batch_size]
      ids, mask, pixels = _batch_arrays(prompter, chunk, batch_size, args.pad_to_multiple)
      if beams:
        out = beam.beam_search(model, ids, mask, config=config, pixel_values=pixels)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        scores += np.asarray(out.scores)[:len(chunk)].tolist()
      else:
        out = decode.generate(model, ids, mask, config=config, pixel_values=pixels,
                              rng=jax.random.fold_in(key, start), stop=stops)
        # Several samples of a prompt share its prefill; they come as rows i * k + j.
        k = config.num_return_sequences
        tokens = np.asarray(out.tokens).reshape(-1, k, out.tokens.shape[-1])
        lengths = np.asarray(out.lengths).reshape(-1, k)
      texts += [[tokenizer.decode(tokens[i, j, :lengths[i, j]], skip_special_tokens=True)
                 for j in range(tokens.shape[1])] for i in range(len(chunk))]
      bar.update(len(chunk))

  for n, record in enumerate(records):
    answers = texts[n]
    record["response"] = answers[0]
    if len(answers) > 1:
      record["responses"] = answers
    if beams:
      record["scores"] = scores[n]
  if args.prompt is not None:
    print("\n".join(records[0].get("responses", [records[0]["response"]])))
    return
  partial = args.output_jsonl + ".partial"
  with open(partial, "w") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(partial, args.output_jsonl)
  print(f"wrote {len(records)} records to {args.output_jsonl}", file=sys.stderr)


def main(argv=None) -> None:
  run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
  main()
