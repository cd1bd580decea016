"""Which sources a training run mixes, and the batches they become.

`DataSources` is the `data` section of an SFT config: shapes-world tasks, LLaVA conversation
files and grounding files, mixed into one random-access source (`training_source`) that the
Grain pipeline (data/pipeline.py) turns into this process's batches.
"""

import dataclasses

from flax import nnx

from lvlm_jax.data import sources as data_sources
from lvlm_jax.data.images import BadImage
from lvlm_jax.data.pipeline import DataConfig, make_dataset
from lvlm_jax.data.shapes import SFT_TASKS, ShapesConfig, ShapesSource
from lvlm_jax.data.text import BoxFormat
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.lvlm import LVLM


@dataclasses.dataclass(frozen=True)
class DataSources:
  """Where the training examples come from (all sources are mixed) and how they become batches."""
  shapes_tasks: tuple[tuple[str, int], ...] = help_field(
      (("caption", 2000), ("grounding", 2000), ("yes_no", 2000)), "(task, number of records) pairs "
      f"from the built-in shapes world; tasks: {SFT_TASKS}.")
  shapes: ShapesConfig = help_field(ShapesConfig(), "The shapes world the shapes tasks draw from.")
  conversations: tuple[str, ...] = help_field((), "LLaVA-format conversation "
                                              "files (JSON or JSONL).")
  conversation_repeats: tuple[int, ...] = help_field(
      (), "Times each conversations file is seen per epoch, one count per file (LLaVA/CaD-VI "
      "list a file twice to upsample it); () sees each once.")
  grounding: tuple[str, ...] = help_field((), "Grounding files (image + box + expression; JSONL), "
                                          "trained as box-text answers.")
  image_roots: tuple[str, ...] = help_field((), "Folders searched for relative image paths "
                                            "(default: each data file's folder).")
  pipeline: DataConfig = help_field(DataConfig(), "Batching: length buckets, chat "
                                    "template, workers, ...")


# Set by the run, not by the user: from train.batch_size, the model and the processor config.
DERIVED_PIPELINE_FIELDS = ("pipeline.kind", "pipeline.batch_size", "pipeline.tokens_per_image",
                           "pipeline.image", "pipeline.anyres")


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
  if len(config.conversation_repeats) not in (0, len(config.conversations)):
    raise UserError(f"data.conversation_repeats={config.conversation_repeats} needs one count per "
                    f"file of data.conversations ({len(config.conversations)})")
  repeats = [1] * len(parts) + list(config.conversation_repeats or [1] * len(config.conversations))
  roots = config.image_roots or None
  parts += [data_sources.ConversationSource(path, roots) for path in config.conversations]
  parts += [GroundingAsConversation(data_sources.GroundingSource(path, roots),
                                    pipeline.grounding_prompt, pipeline.box_format)
            for path in config.grounding]
  repeats += [1] * (len(parts) - len(repeats))
  if not parts:
    raise UserError("no training data: set data.shapes_tasks, data.conversations or data.grounding")
  if len(parts) == 1 and repeats == [1]:
    return parts[0]
  return data_sources.Mixture(parts, repeats=repeats)


def pipeline_config(config: DataSources, model: nnx.Module, hf_dir: str,
                    per_process_batch: int) -> DataConfig:
  """The data layer's config with the fields the run decides filled in (`hf_dir`: the model's
  HF directory, whose preprocessor config sets the image processing; '' for a new model)."""
  text = model.config.text if isinstance(model, LVLM) else model.config
  return dataclasses.replace(config.pipeline.for_model(model, hf_dir), kind="sft",
                             batch_size=per_process_batch,
                             context_length=text.max_position_embeddings)


def training_batches(config: DataSources, tokenizer, data_config: DataConfig):
  """This process's shard of the training batches: a resumable Grain iterator."""
  return iter(make_dataset(training_source(config), tokenizer, data_config))
