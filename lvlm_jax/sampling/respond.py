"""A LVLM's answers to (image, question) pairs, in fixed-shape batches.

Questions are rendered with the chat template exactly as in training (`tokenize_conversation`
with the generation prompt), left-padded to a multiple of 16 tokens, and decoded by the jitted
`decode`: one compilation per prompt-length bucket. Rows are split over the mesh's batch axes.
A batch's answers depend only on its rows and its key, so regenerating a batch (a resumed stage)
gives the same text.
"""

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.text import ensure_image_placeholders, tokenize_conversation
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.sampling.decode import SamplingConfig, decode
from lvlm_jax.sharding import batch_sharding, batch_shards, place

_PAD_TO = 16


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How answers are generated (stop and pad tokens come from the tokenizer)."""
  max_new_tokens: int = help_field(128, "Most tokens per answer.")
  do_sample: bool = help_field(False, "Sample (with temperature/top_p); False is greedy.")
  temperature: float = help_field(1.0, "Sampling temperature (STIC: 0.2).")
  top_p: float = help_field(1.0, "Nucleus sampling mass; 1.0 disables it.")
  batch_size: int = help_field(32, "Prompts decoded together (a multiple "
                               "of the mesh's batch shards).")


def _to_host(array: jax.Array) -> np.ndarray:
  if not array.is_fully_addressable:
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array)


class Responder:
  """Answers batches of (uint8 [H, W, 3] image, question) pairs with one model.

  data: the run's pipeline config (template, system prompt, image processing, tokens_per_image).
  """

  def __init__(self, model: LVLM, tokenizer, data: DataConfig, config: GenerationConfig,
               mesh: Mesh):
    if config.batch_size % batch_shards(mesh):
      raise UserError(f"generation batch_size={config.batch_size} must be a multiple of the "
                      f"{batch_shards(mesh)} ways the mesh splits the batch")
    self.graphdef, self.state = nnx.split(model)
    self.tokenizer, self.data, self.config, self.mesh = tokenizer, data, config, mesh
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    self.sampling = SamplingConfig(
        max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
        temperature=config.temperature, top_p=config.top_p, pad_token_id=self.pad_id,
        eos_token_ids=(eos,) if eos is not None else ())

  def _prompt(self, question: str) -> np.ndarray:
    turns = ensure_image_placeholders([{"from": "human", "value": question}], 1,
                                      self.data.image_token)
    ids, _ = tokenize_conversation(turns, self.tokenizer, self.data.template,
                                   system=self.data.system_prompt, add_generation_prompt=True,
                                   image_token=self.data.image_token,
                                   tokens_per_image=self.data.tokens_per_image)
    return ids

  def __call__(self, images: list[np.ndarray], questions: list[str], rng: jax.Array) -> list[str]:
    """Answers (without the stop token) of up to `batch_size` pairs; `rng` seeds the sampling."""
    n, size = len(questions), self.config.batch_size
    if not 0 < n <= size or len(images) != n:
      raise ValueError(f"{n} questions and {len(images)} images for a batch of {size}")
    prompts = [self._prompt(q) for q in questions]
    prompts += [prompts[0]] * (size - n)
    images = list(images) + [images[0]] * (size - n)
    length = -(-max(len(p) for p in prompts) // _PAD_TO) * _PAD_TO
    ids = np.full((size, length), self.pad_id, np.int32)
    attention = np.zeros((size, length), np.int32)
    for i, p in enumerate(prompts):
      ids[i, length - len(p):], attention[i, length - len(p):] = p, 1
    pixels = np.stack([self.data.image(image) for image in images])[:, None]
    sharding = batch_sharding(self.mesh)
    ids, attention, pixels = place((ids, attention, pixels), (sharding,) * 3)
    with jax.set_mesh(self.mesh):
      out = decode(self.graphdef, self.state, ids, attention, config=self.sampling,
                   pixel_values=pixels, rng=rng)
    tokens, lengths = _to_host(out.tokens), _to_host(out.lengths)
    return [self.tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True).strip()
            for i in range(n)]
