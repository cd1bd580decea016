"""Convert models between HF directories (safetensors + config.json) and lvlm_jax checkpoints.

  python -m lvlm_jax.convert HF_DIR OUT_DIR --to lvlm_jax      # HF -> our Orbax checkpoint
  python -m lvlm_jax.convert CKPT_DIR OUT_DIR --to hf          # ours (or HF) -> HF safetensors
Tokenizer, processor and generation files next to the weights are copied along.
"""

import argparse
import os
import shutil

from lvlm_jax.cli import run_cli
from lvlm_jax.errors import UserError

# Files beside the weights that a user of the converted model needs as well.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "processor_config.json", "generation_config.json")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m lvlm_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("input", help="an HF model directory (config.json + *.safetensors) or an "
                      "lvlm_jax checkpoint directory (config.json + params/)")
  parser.add_argument("output", help="directory to write; created if missing")
  parser.add_argument("--to", choices=("hf", "lvlm_jax"), required=True,
                      help="output format: 'hf' = safetensors that transformers loads (LoRA "
                      "adapters merged); 'lvlm_jax' = Orbax checkpoint (adapters kept apart)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="dtype of the exported HF tensors (default float32)")
  parser.add_argument("--max_shard_gb", type=float, default=5.0,
                      help="largest safetensors shard of an HF export, in GiB (default 5)")
  parser.add_argument("--allow_pickle", action="store_true",
                      help="accept pickled .bin/.pt weights; pickles can run code when loaded, "
                      "so use this only for files you trust")
  parser.add_argument("--allow_unused", default=None, metavar="REGEX",
                      help="checkpoint tensor names (a regular expression, matched whole) that "
                      "the model may leave unread; by default an unread tensor is an error")
  return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> None:
  # Imported here so that --help answers without loading JAX.
  from lvlm_jax.models import hf, params_io
  from lvlm_jax.output_paths import check_output_dir
  if not os.path.isdir(args.input):
    raise UserError(f"{args.input}: no such directory")
  if os.path.abspath(args.input) == os.path.abspath(args.output):
    raise UserError("input and output must be different directories")
  if not args.max_shard_gb > 0:
    raise UserError(f"--max_shard_gb {args.max_shard_gb}: must be a positive number of GiB")
  check_output_dir(args.output, "output")  # before the (long) load, not after
  if os.path.isdir(os.path.join(args.input, "params")):
    model = params_io.load_model(args.input)
  else:
    model = hf.load_model(args.input, allow_pickle=args.allow_pickle,
                          allow_unused=args.allow_unused)
  if args.to == "hf":
    try:
      hf.save_hf(model, args.output, dtype=args.dtype,
                 max_shard_bytes=int(args.max_shard_gb * 2**30))
    except OSError as e:  # the disk filled up, the folder went away
      raise UserError(f"cannot write {args.output}: {e.strerror or e}") from None
  else:
    params_io.save_model(model, args.output)
  for name in COMPANION_FILES:
    source = os.path.join(args.input, name)
    if os.path.exists(source):
      try:
        shutil.copy(source, os.path.join(args.output, name))
      except OSError as e:
        raise UserError(f"cannot copy {source} to {args.output}: {e.strerror or e}") from None
  print(f"wrote {args.output} ({args.to})")


def main(argv=None) -> None:
  run_cli(lambda: convert(parse_args(argv)))


if __name__ == "__main__":
  main()
