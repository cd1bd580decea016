"""A run's pieces from its config: tokenizer, model (from an HF directory or from scratch), data.

Shared by every method: `sft.py` trains with them, and the other methods build their models and
data the same way. Models are first built abstractly (`abstract_model`), which gives the train
state's structure and shardings without allocating anything, then filled (`load_params`): from
safetensors one tensor at a time onto the mesh, or initialised shard by shard.
"""

import dataclasses
import os
import re
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from lvlm_jax.data import sources as data_sources
from lvlm_jax.data.images import BadImage, ImageProcessing
from lvlm_jax.data.pipeline import DataConfig, make_dataset
from lvlm_jax.data.shapes import SFT_TASKS, ShapesConfig, ShapesSource
from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer
from lvlm_jax.data.text import BoxFormat, image_token_id
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.llm import REMAT_POLICIES, LLMConfig
from lvlm_jax.models.lora import Linear, LoraConfig, apply_lora
from lvlm_jax.models.lvlm import LVLM, LVLMConfig
from lvlm_jax.models.vision import CLIPVisionConfig
from lvlm_jax.training.state import init_sharded

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionSize:
  """The CLIP ViT of a model built from scratch."""
  hidden_size: int = help_field(64, "Width of the vision tower.")
  intermediate_size: int = help_field(128, "MLP width of the vision tower.")
  num_layers: int = help_field(2, "Transformer layers of the vision tower.")
  num_heads: int = help_field(4, "Attention heads of the vision tower.")
  image_size: int = help_field(32, "Input image side in pixels.")
  patch_size: int = help_field(8, "Patch side in pixels; (image_size "
                               "/ patch_size)^2 tokens per image.")


@dataclasses.dataclass(frozen=True)
class TextSize:
  """The LLaMA-style decoder of a model built from scratch (vocabulary from the tokenizer)."""
  hidden_size: int = help_field(128, "Width of the decoder.")
  intermediate_size: int = help_field(256, "SwiGLU width of the decoder.")
  num_layers: int = help_field(2, "Decoder layers.")
  num_heads: int = help_field(4, "Attention heads.")
  num_kv_heads: int = help_field(2, "Key/value heads (grouped-query attention).")
  max_position_embeddings: int = help_field(512, "Longest sequence the model is meant for.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which model trains and how it computes."""
  hf_dir: str = help_field("", "An HF LLaVA directory (config.json + safetensors) to start from; "
                           "'' builds a new model from `vision` and `text`.")
  tokenizer: str = help_field("shapes", "'shapes' (the shapes world's word-level tokenizer) or a "
                              "tokenizer directory; '' takes the one in hf_dir.")
  dtype: str = help_field("float32", f"Compute dtype, one of {DTYPES}: bfloat16 "
                          "on TPU/GPU, float32 on CPU.")
  param_dtype: str = help_field("float32", "Dtype of the master weights (and optimizer moments).")
  remat: str = help_field("none", "Activation checkpointing of decoder layers, "
                          f"one of {tuple(REMAT_POLICIES)}.")
  allow_pickle: bool = help_field(False, "Accept pickled .bin/.pt weights "
                                  "in hf_dir (they can run code).")
  init_seed: int = help_field(0, "Seed of the random initialisation (new models, LoRA adapters).")
  vision: VisionSize = help_field(VisionSize(), "Vision tower of a new model (hf_dir='').")
  text: TextSize = help_field(TextSize(), "Decoder of a new model (hf_dir='').")
  use_lora: bool = help_field(False, "Attach LoRA adapters (`lora`) to the matching Linear layers.")
  lora: LoraConfig = help_field(LoraConfig(), "LoRA rank, alpha, dropout and target regex.")

  def __post_init__(self):
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise UserError(f"model.{key}={getattr(self, key)!r} is not one of {DTYPES}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"model.remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
    if self.hf_dir and not os.path.isdir(self.hf_dir):
      raise UserError(f"model.hf_dir={self.hf_dir!r}: no such directory")


@dataclasses.dataclass(frozen=True)
class DataSources:
  """Where the training examples come from (all sources are mixed) and how they become batches."""
  shapes_tasks: tuple[tuple[str, int], ...] = help_field(
      (("caption", 2000), ("grounding", 2000), ("yes_no", 2000)), "(task, number of records) pairs "
      f"from the built-in shapes world; tasks: {SFT_TASKS}.")
  shapes: ShapesConfig = help_field(ShapesConfig(), "The shapes world the shapes tasks draw from.")
  conversations: tuple[str, ...] = help_field((), "LLaVA-format conversation "
                                              "files (JSON or JSONL).")
  grounding: tuple[str, ...] = help_field((), "Grounding files (image + box + expression; JSONL), "
                                          "trained as box-text answers.")
  image_roots: tuple[str, ...] = help_field((), "Folders searched for relative image paths "
                                            "(default: each data file's folder).")
  pipeline: DataConfig = help_field(DataConfig(), "Batching: length buckets, chat "
                                    "template, workers, ...")


# Set by the run, not by the user: from train.batch_size, the model and the processor config.
DERIVED_PIPELINE_FIELDS = ("pipeline.kind", "pipeline.batch_size", "pipeline.tokens_per_image",
                           "pipeline.image")


def load_tokenizer(config: ModelConfig, prompts: tuple[str, ...] = ()):
  """The tokenizer the config names ('shapes', a directory, or the HF model's). The shapes
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


def _scratch_config(config: ModelConfig, tokenizer) -> LVLMConfig:
  v, t = config.vision, config.text
  if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
    raise UserError("model.text: hidden_size must divide by num_heads, num_heads by num_kv_heads")
  dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype)
  vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            num_layers=v.num_layers, num_heads=v.num_heads,
                            image_size=v.image_size, patch_size=v.patch_size, **dtypes)
  text = LLMConfig(vocab_size=len(tokenizer), hidden_size=t.hidden_size,
                   intermediate_size=t.intermediate_size, num_layers=t.num_layers,
                   num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                   head_dim=t.hidden_size // t.num_heads,
                   max_position_embeddings=t.max_position_embeddings,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, **dtypes)
  # A new tower's last layer is as good as any, and -2 would leave it untrained.
  return LVLMConfig(vision=vision, text=text, image_token_id=image_token_id(tokenizer),
                    vision_feature_layer=-1)


def _finish(model: nnx.Module, config: ModelConfig) -> nnx.Module:
  """LoRA adapters and the remat policy: the same on the abstract and the concrete model."""
  if config.use_lora:
    try:
      apply_lora(model, config.lora, rngs=nnx.Rngs(params=config.init_seed + 1,
                                                   dropout=config.init_seed + 2))
    except ValueError as e:
      raise UserError(f"model.lora.target: {e}") from None
  language_model = model.llm if isinstance(model, LVLM) else model
  language_model.remat = config.remat
  return model


def _new_lvlm(lvlm_config: LVLMConfig, seed: int) -> LVLM:
  model = LVLM(lvlm_config, rngs=nnx.Rngs(params=seed))
  fan_in_init(model, jax.random.key(seed + 1))
  return model


def fan_in_init(model: nnx.Module, key: jax.Array) -> None:
  """Redraws every Linear kernel [in, out] from N(0, 1 / in), in place.

  HF's N(0, 0.02) suits widths near 1/0.02^2 = 2500; at width 64 it shrinks each matmul's output
  to ~0.16 of its input. The projector then passes ~3% of the image's variation next to its
  learned (image-independent) bias, the decoder sees near-constant image tokens, and a model
  trained from scratch stays near chance on questions about the image. (With this init the
  quickstart's yes/no accuracy goes 0.53 -> 0.80, README "Quickstart"; the N(0, 0.02) comparison
  was a one-off diagnostic, not a command in this repository.)
  """
  for _, module in nnx.iter_graph(model):
    if isinstance(module, Linear):
      key, sub = jax.random.split(key)
      kernel = module.kernel[...]
      module.kernel[...] = jax.random.normal(sub, kernel.shape, kernel.dtype) * kernel.shape[0] ** -0.5


def _build_new(config: ModelConfig, tokenizer):
  lvlm_config = _scratch_config(config, tokenizer)
  return lambda: _finish(_new_lvlm(lvlm_config, config.init_seed), config)


def _hf_overrides(config: ModelConfig) -> dict:
  return dict(dtype=config.dtype, param_dtype=config.param_dtype)


def abstract_model(config: ModelConfig, tokenizer) -> nnx.Module:
  """The model with shapes and dtypes only (`nnx.eval_shape`); nothing is allocated."""
  if config.hf_dir:
    hf_config = hf.read_hf_config(config.hf_dir)
    return nnx.eval_shape(lambda: _finish(hf.build_model(hf_config, **_hf_overrides(config)),
                                          config))
  return nnx.eval_shape(_build_new(config, tokenizer))


def load_params(config: ModelConfig, tokenizer, mesh: Mesh, trainable,
                shardings: dict[str, Any]) -> tuple[nnx.State, nnx.State]:
  """(trainable params, frozen rest) of the real model on their shardings: read from hf_dir, or
  initialised (each shard on its own device)."""
  if not config.hf_dir:
    return init_sharded(_build_new(config, tokenizer), trainable, shardings)
  model = hf.load_model(config.hf_dir, mesh=mesh, allow_pickle=config.allow_pickle,
                        **_hf_overrides(config))
  _, params, frozen = nnx.split(_finish(model, config), trainable, ...)
  return params, frozen


def check_vocabulary(model: nnx.Module, tokenizer) -> None:
  """A token id the embedding table lacks would read NaNs (JAX gathers fill out of range)."""
  language_model = model.llm if isinstance(model, LVLM) else model
  vocab = language_model.config.vocab_size
  if len(tokenizer) > vocab:
    raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                    f"{vocab}; use the tokenizer the model was trained with (model.tokenizer)")


def image_processing(config: ModelConfig, model: nnx.Module) -> ImageProcessing:
  """Pixels as the vision tower expects them: the HF directory's preprocessor config when it
  has one, else CLIP's normalisation at the tower's image size (pad to square, as LLaVA-1.5)."""
  size = model.config.vision.image_size
  processor = os.path.join(config.hf_dir, "preprocessor_config.json") if config.hf_dir else ""
  if processor and os.path.exists(processor):
    processing = ImageProcessing.from_hf_preprocessor_config(processor)
    if processing.size != size:
      raise UserError(f"{processor}: image size {processing.size}, but the vision tower takes {size}")
    return processing
  return ImageProcessing(size=size)


class GroundingAsConversation:
  """A grounding source as conversations: the question from `prompt`, the box text as answer."""

  def __init__(self, source, prompt: str, box_format: BoxFormat):
    self.source, self.prompt, self.box_format = source, prompt, box_format
    self.skipped = getattr(source, "skipped", {})

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = dict(self.source[index])
    if record.get("expression") is None:
      # The pipeline turns this into a counted skip, as it does for a missing image.
      raise BadImage("no_expression", f"{record.get('origin', record.get('id'))}: a grounding "
                     "record without an expression")
    record["conversations"] = [
        {"from": "human", "value": self.prompt.format(expression=record["expression"])},
        {"from": "gpt", "value": self.box_format.to_text(record["box"])}]
    return record


def training_source(config: DataSources):
  """Every configured source, mixed into one random-access source of conversation records."""
  pipeline = config.pipeline
  parts = []
  for task, count in config.shapes_tasks:
    if task not in SFT_TASKS:
      raise UserError(f"data.shapes_tasks: task {task!r} cannot train SFT; use {SFT_TASKS}")
    source = ShapesSource(config.shapes, task, count, box_format=pipeline.box_format)
    if task == "grounding":
      source = GroundingAsConversation(source, pipeline.grounding_prompt, pipeline.box_format)
    parts.append(source)
  roots = config.image_roots or None
  parts += [data_sources.ConversationSource(path, roots) for path in config.conversations]
  parts += [GroundingAsConversation(data_sources.GroundingSource(path, roots),
                                    pipeline.grounding_prompt, pipeline.box_format)
            for path in config.grounding]
  if not parts:
    raise UserError("no training data: set data.shapes_tasks, data.conversations or data.grounding")
  return parts[0] if len(parts) == 1 else data_sources.Mixture(parts)


def pipeline_config(config: DataSources, model: nnx.Module, model_config: ModelConfig,
                    per_process_batch: int) -> DataConfig:
  """The data layer's config with the fields the run decides filled in."""
  tokens = model.config.tokens_per_image if isinstance(model, LVLM) else 1
  return dataclasses.replace(config.pipeline, kind="sft", batch_size=per_process_batch,
                             tokens_per_image=tokens,
                             image=image_processing(model_config, model))


def training_batches(config: DataSources, tokenizer, data_config: DataConfig):
  """This process's shard of the training batches: a resumable Grain iterator."""
  return iter(make_dataset(training_source(config), tokenizer, data_config))


def held_out_world(world: ShapesConfig) -> ShapesConfig:
  """The same shapes distribution with other scenes: evaluation never sees a training scene."""
  return dataclasses.replace(world, seed=world.seed + 10_000)


def per_process_batch(global_batch: int, mesh: Mesh, accum_steps: int) -> int:
  """Rows each process feeds; the global batch must split evenly over processes and devices."""
  from lvlm_jax.sharding import batch_shards
  shards, processes = batch_shards(mesh), jax.process_count()
  if global_batch % processes:
    raise UserError(f"train.batch_size={global_batch} must be a multiple of the "
                    f"{processes} processes")
  if (global_batch // accum_steps) % shards:
    raise UserError(f"train.batch_size / train.grad_accum_steps = {global_batch // accum_steps} "
                    f"must be a multiple of the {shards} ways the mesh splits the batch")
  return global_batch // processes
