"""The tokenizer a run names: the shapes world's, a tokenizer directory, or the HF model's."""

import re

from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer
from lvlm_jax.errors import UserError


def load_tokenizer(config, prompts: tuple[str, ...] = ()):
  """The tokenizer a `ModelConfig` (models/building.py) names ('shapes', a directory, or the HF model's). The shapes
  tokenizer also learns the words of `prompts` (e.g. the grounding prompt), which it would
  otherwise read as <unk>."""
  if config.tokenizer == "shapes":
    # Format fields ('{expression}') are filled in later; they are not words of the prompt.
    return shapes_tokenizer(extra_texts=[re.sub(r"\{\w*\}", " ", p) for p in prompts])
  directory = config.tokenizer or config.hf_dir
  if not directory:
    raise UserError("model.tokenizer='' needs model.hf_dir to read the tokenizer from")
  import transformers
  try:
    return transformers.AutoTokenizer.from_pretrained(directory)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot load a tokenizer from {directory}: {e}") from None
