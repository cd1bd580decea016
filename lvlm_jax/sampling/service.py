"""The generation service: how every method stage, evaluator and the `generate` CLI generate.

A `Prompt` is a conversation so far (LLaVA `from`/`value` turns ending with the user's turn) with
0..N images (uint8 [H, W, 3]); a text-only LLM takes prompts without images. The service renders
it with the chat template exactly as training renders the same turns (`data.text`'s
`tokenize_conversation`, the one prompt builder), batches prompts to a fixed batch size and
length bucket (few compilations), splits the rows over the mesh's data axes, decodes, and
returns `Completion`s: text, token ids, per-token log-probs and whether a stop token ended it.

Prefix sharing: `start` runs prompts (images included) into a KV cache once; `branch` copies
rows, `extend` feeds more text after them, and `complete` / `beams` decode from there, so a
search tree (CSR) never re-encodes a prompt or its images. Every process must make the same
calls with the same prompts (the rows are split over devices, each host feeds its share).
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.text import tokenize_conversation
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.llava_next import batch_images
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.sampling import beam as beam_search
from lvlm_jax.sampling.decode import (Generation, Prefix, SamplingConfig, branch, decode,
                                      decode_from, extend_prefix, language_model, start)
from lvlm_jax.sampling.stop_strings import StopStrings
from lvlm_jax.sharding import DEFAULT_RULES, batch_sharding, batch_shards, place, tree_shardings

_branch = jax.jit(branch, static_argnums=1)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How a stage generates (stop and pad tokens come from the tokenizer)."""
  max_new_tokens: int = help_field(128, "Most tokens per answer.")
  do_sample: bool = help_field(False, "Sample (with temperature/top_k/top_p); False is greedy.")
  temperature: float = help_field(1.0, "Sampling temperature (STIC: 0.2).")
  top_k: int = help_field(0, "Sample among the k most likely tokens; 0 disables.")
  top_p: float = help_field(1.0, "Nucleus sampling mass; 1.0 disables it.")
  batch_size: int = help_field(32, "Prompts decoded together (a multiple "
                               "of the mesh's batch shards).")

  def sampling(self, tokenizer, min_new_tokens: int = 0) -> SamplingConfig:
    eos = tokenizer.eos_token_id
    return SamplingConfig(
        max_new_tokens=self.max_new_tokens, min_new_tokens=min_new_tokens,
        do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
        top_p=self.top_p, pad_token_id=pad_id(tokenizer),
        eos_token_ids=(eos,) if eos is not None else ())


@dataclasses.dataclass(frozen=True)
class Prompt:
  """turns: the conversation so far, ending with the user's turn. images: uint8 [H, W, 3] each,
  one per `<image>` (placed at the start of the first turn when the text has none).
  answer_start: text the answer is known to begin with (a box's `<box>`, a caption's first
  word): the prompt then ends exactly where training's context for the answer's first token
  ends, which a generation prompt may not (a tokenizer that splits the space before it off).
  system: this prompt's system prompt (None: the data config's). raw: text to continue as it
  is, without a chat template (text only; `turns` is then empty)."""
  turns: tuple
  images: tuple = ()
  answer_start: str = ""
  system: str | None = None
  raw: str | None = None

  @classmethod
  def question(cls, text: str, images: Sequence[np.ndarray] = (), answer_start: str = "",
               system: str | None = None):
    return cls(({"from": "human", "value": text},), tuple(images), answer_start, system)

  @classmethod
  def continuation(cls, text: str):
    return cls((), raw=text)


@dataclasses.dataclass(frozen=True)
class Completion:
  """text: the new tokens decoded (special tokens and the stop token left out). token_ids:
  int32 [L] the generated tokens, the stop token included; logprobs: float32 [L] their log-probs
  under the model's unmodified distribution; stopped: a stop token ended it (else the length)."""
  text: str
  token_ids: np.ndarray
  logprobs: np.ndarray
  stopped: bool


def prompt_ids(prompt: Prompt, tokenizer, data: DataConfig) -> np.ndarray:
  """int32 [L]: `prompt` tokenized as training tokenizes the same turns (`data`'s template,
  system prompt and image tokens), ending with the generation prompt, or, with an
  `answer_start`, exactly where training's targets for such an answer begin."""
  if prompt.raw is not None:
    if prompt.images:
      raise UserError("a prompt without a chat template cannot place images; pick a template")
    ids = np.asarray(tokenizer(prompt.raw).input_ids, np.int32)
    if not ids.size:
      raise UserError("the prompt is empty and no template adds to it: there is nothing to "
                      "continue")
    return ids
  turns = data.place_images(list(prompt.turns), len(prompt.images))
  system = data.system_prompt if prompt.system is None else prompt.system
  render = dict(system=system, image_token=data.image_token,
                tokens_per_image=data.image_tokens(prompt.images))
  if not prompt.answer_start:
    ids, _ = tokenize_conversation(turns, tokenizer, data.template, add_generation_prompt=True,
                                   **render)
    return ids
  ids, mask = tokenize_conversation(turns + [{"from": "gpt", "value": prompt.answer_start}],
                                    tokenizer, data.template, **render)
  return ids[:int(np.argmax(mask > 0))]


def pad_id(tokenizer) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# Decoding reads every weight once per new token. Weights left FSDP-sharded (as training keeps
# them) would be all-gathered in every layer at every step; decoding keeps each weight whole on
# every data/fsdp replica, split over the tensor axis only.
DECODE_RULES = {**DEFAULT_RULES, "embed": None}


def decoding_weights(state: nnx.State, mesh: Mesh, dtype: str | None = None) -> nnx.State:
  """The model's variables laid out for decoding (DECODE_RULES), floating ones cast to `dtype`
  (e.g. 'bfloat16' on accelerators: half the bytes each step reads); None keeps their dtype."""
  if dtype is not None:
    target = jnp.dtype(dtype)
    state = jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating)
                         else x, state)
  return jax.device_put(state, tree_shardings(state, mesh, DECODE_RULES))


def _to_host(array: jax.Array) -> np.ndarray:
  if not array.is_fully_addressable:
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array)


class GenerationService:
  """Generation with one model (an LVLM, or an LLM for text-only prompts).

  data: the pipeline config the model was trained with (template, system prompt, image
  processing, tokens per image). batch_size: rows per decoding call, a multiple of the mesh's
  batch shards. progress: a progress bar with ETA over batches (process 0). weights_dtype: the
  dtype decoding reads the weights in (None: as the model holds them). pad_to: prompt lengths
  round up to a multiple of it (one compilation per length).
  """

  def __init__(self, model, tokenizer, data: DataConfig, mesh: Mesh, batch_size: int = 32,
               progress: bool = False, weights_dtype: str | None = None, pad_to: int = 16):
    if batch_size % batch_shards(mesh):
      raise UserError(f"generation batch_size={batch_size} must be a multiple of the "
                      f"{batch_shards(mesh)} ways the mesh splits the batch")
    self.graphdef, self.state = nnx.split(model)
    self.state = decoding_weights(self.state, mesh, weights_dtype)
    self.is_lvlm = isinstance(model, LVLM)
    self.tokenizer, self.data, self.mesh = tokenizer, data, mesh
    self.batch_size, self.progress, self.pad_to = batch_size, progress, pad_to
    self.pad_id = pad_id(tokenizer)
    self.context = language_model(model).config.max_position_embeddings

  # Prompts.

  def prompt_ids(self, prompt: Prompt) -> np.ndarray:
    """int32 [L]: the prompt as training tokenizes the same turns (image tokens expanded)."""
    if prompt.images and not self.is_lvlm:
      raise UserError("this model is text-only: its prompts cannot have images")
    return prompt_ids(prompt, self.tokenizer, self.data)

  def check_room(self, prompt: Prompt, max_new_tokens: int) -> np.ndarray:
    """The prompt's ids; a `UserError` when they and max_new_tokens overflow the model's
    context (past max_position_embeddings a model returns garbage)."""
    ids = self.prompt_ids(prompt)
    if len(ids) + max_new_tokens > self.context:
      text = prompt.raw if prompt.raw is not None else prompt.turns[-1]["value"]
      raise UserError(f"prompt {text[:40]!r}: its {len(ids)} tokens plus {max_new_tokens} new "
                      f"ones exceed the model's context of {self.context} "
                      "(max_position_embeddings); shorten it or generate fewer tokens")
    return ids

  def _batch(self, prompts: Sequence[Prompt], room: int) -> tuple:
    """(ids, attention int32 [B, T] left-padded, pixels or None) of a full batch (the last rows
    repeat the first prompt), placed on the mesh; each prompt must leave `room` new tokens in
    the context. pixels: float32 [B, N, S, S, 3], or with AnyRes `AnyResImages`."""
    rows = [self.check_room(p, room) for p in prompts]
    rows += [rows[0]] * (self.batch_size - len(rows))
    length = -(-max(len(r) for r in rows) // self.pad_to) * self.pad_to
    ids = np.full((self.batch_size, length), self.pad_id, np.int32)
    attention = np.zeros((self.batch_size, length), np.int32)
    for i, row in enumerate(rows):
      ids[i, length - len(row):], attention[i, length - len(row):] = row, 1
    pixels = None
    images = [p.images for p in prompts] + [prompts[0].images] * (self.batch_size - len(prompts))
    if self.is_lvlm and max(len(i) for i in images):
      pixels = batch_images(self.data.image_arrays(images))
    sharding = batch_sharding(self.mesh)
    ids, attention = place((ids, attention), (sharding, sharding))
    if pixels is not None:
      pixels = place(pixels, jax.tree.map(lambda _: sharding, pixels))
    return ids, attention, pixels

  def _chunks(self, items: Sequence, desc: str):
    bar = tqdm.tqdm(total=len(items), desc=desc, dynamic_ncols=True,
                    disable=not (self.progress and jax.process_index() == 0))
    for first in range(0, len(items), self.batch_size):
      yield items[first:first + self.batch_size]
      bar.update(min(self.batch_size, len(items) - first))
    bar.close()

  def _completions(self, out: Generation, rows: int, copies: int = 1) -> list[Completion]:
    tokens, logprobs = _to_host(out.tokens), _to_host(out.logprobs)
    lengths, stopped = _to_host(out.lengths), _to_host(out.stopped)
    result = []
    for i in range(rows * copies):
      ids = tokens[i, :lengths[i]]
      text_ids = ids[:-1] if stopped[i] else ids
      result.append(Completion(
          self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(), ids.copy(),
          logprobs[i, :lengths[i]].copy(), bool(stopped[i])))
    return result

  # Generation.

  def generate(self, prompts: Sequence[Prompt], config: SamplingConfig,
               rng: jax.Array | None = None, desc: str = "generate",
               stop: StopStrings | None = None) -> list[Completion]:
    """Completions of every prompt, `config.num_return_sequences` per prompt (prompt-major).
    Batch b samples with `fold_in(rng, b)`: a batch's answers depend only on its prompts and
    its index, so a resumed stage regenerates the same text. stop: stop strings (an answer
    ends with the token that completes one)."""
    out = []
    for index, chunk in enumerate(self._chunks(list(prompts), desc)):
      ids, attention, pixels = self._batch(chunk, config.max_new_tokens)
      key = None if rng is None else jax.random.fold_in(rng, index)
      with jax.set_mesh(self.mesh):
        generation = decode(self.graphdef, self.state, ids, attention, config=config,
                            pixel_values=pixels, rng=key, stop=stop)
      out += self._completions(generation, len(chunk), config.num_return_sequences)
    return out

  def texts(self, prompts: Sequence[Prompt], config: SamplingConfig,
            rng: jax.Array | None = None, desc: str = "generate",
            stop: StopStrings | None = None) -> list[str]:
    return [c.text for c in self.generate(prompts, config, rng, desc, stop)]

  # Prefix sharing (a batch of at most batch_size prompts at a time).

  def start(self, prompts: Sequence[Prompt], room: int) -> tuple[Prefix, int]:
    """(the prompts' prefix with `room` free cache slots after the longest, rows used): each
    prompt and its images are encoded once, here."""
    if len(prompts) > self.batch_size:
      raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch_size}")
    ids, attention, pixels = self._batch(prompts, room)
    with jax.set_mesh(self.mesh):
      prefix = start(self.graphdef, self.state, ids, attention, cache_size=ids.shape[1] + room,
                     pixel_values=pixels)
    return prefix, len(prompts)

  def branch(self, prefix: Prefix, copies: int) -> Prefix:
    """Row i * copies + j continues row i."""
    with jax.set_mesh(self.mesh):
      return _branch(prefix, copies)

  def extend(self, prefix: Prefix, token_ids: Sequence[np.ndarray]) -> Prefix:
    """Feeds token_ids[i] (possibly empty) after row i; the prefix's cache needs the room."""
    width = -(-max(max((len(t) for t in token_ids), default=1), 1) // self.pad_to) * self.pad_to
    rows = prefix.logits.shape[0]
    ids = np.full((rows, width), self.pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for i, row in enumerate(token_ids):
      ids[i, :len(row)], mask[i, :len(row)] = row, 1
    sharding = batch_sharding(self.mesh)
    ids, mask = place((ids, mask), (sharding, sharding))
    with jax.set_mesh(self.mesh):
      return extend_prefix(self.graphdef, self.state, prefix, ids, mask)

  def complete(self, prefix: Prefix, rows: int, config: SamplingConfig,
               rng: jax.Array | None = None) -> list[Completion]:
    """One completion per prefix row (the first `rows` are returned)."""
    with jax.set_mesh(self.mesh):
      generation = decode_from(self.graphdef, self.state, prefix, config=config, rng=rng)
    return self._completions(generation, rows)

  def beams(self, prefix: Prefix, config: beam_search.BeamConfig) -> beam_search.Beams:
    """Beam search after a prefix of B rows (copied num_beams times here); host arrays
    [B, R, ...] of every row, padding rows included."""
    with jax.set_mesh(self.mesh):
      result = beam_search.beams_from(self.graphdef, self.state,
                                      self.branch(prefix, config.num_beams), config=config)
    return beam_search.Beams(*(_to_host(x) for x in result))
