"""Shapes-world metrics of a LVLM, exact because every scene's truth is known.

- yes_no_accuracy: POPE-style existence questions ("Is there a red circle in the image? Answer
  yes or no."), answered by comparing the model's log-probability of the whole answer turn
  "yes" vs "no" (teacher-forced, no generation), so any tokenizer and template work.
- grounding_acc50 (and mean_iou, parsed): the model answers "Where is <expression>?" greedily;
  the first box in its answer (text.BoxFormat) against the true box, success at IoU >= 0.5.
- chair_i, chair_s, recall: CHAIR-style hallucination of greedy captions (eval/hallucination.py).
- self_consistency_acc50: SC-Tune's closed loop. The model describes a true box (REGION_PROMPT,
  greedy), grounds its own description with the grounding prompt (greedy), and succeeds when that
  box has IoU >= 0.5 with the first; self_consistency_shared is the share of those boxes whose
  colour and shape another object of the scene has, where "the red circle" is not enough.

Questions come from a held-out world (another seed of the training world's distribution).
Inputs are replicated over the mesh: evaluation sets are small and every process sees all of it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes import (CAPTION_PROMPTS, REGION_PROMPT, Scene, ShapesConfig, ShapesSource,
                                  shares_kind)
from lvlm_jax.data.text import box_iou, tokenize_conversation
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.eval.hallucination import hallucination_metrics
from lvlm_jax.sampling.decode import SamplingConfig
from lvlm_jax.sampling.service import GenerationService, Prompt
from lvlm_jax.sharding import batch_shards, make_mesh, place, replicated
from lvlm_jax.training.losses import token_logprobs

_PAD_TO = 16  # sequence lengths round up to this, so a handful of shapes compile


@dataclasses.dataclass(frozen=True)
class ShapesEvalConfig:
  """Which shapes-world metrics to compute, on how many held-out examples."""
  yes_no: int = help_field(200, "Yes/no questions (half yes); 0 skips the metric.")
  grounding: int = help_field(100, "Referring expressions to ground; 0 skips the metric.")
  captions: int = help_field(50, "Images to caption for the hallucination metrics; 0 skips them.")
  self_consistency: int = help_field(0, "Boxes for self-consistency Acc@0.5 (box -> the model's "
                                     "description -> the model's box); 0 skips the metric.")
  batch_size: int = help_field(50, "Examples per evaluation batch.")
  yes_no_mode: str = help_field("random", "POPE negatives: random, popular or adversarial.")
  box_tokens: int = help_field(32, "Most tokens generated for a box answer.")
  caption_tokens: int = help_field(160, "Most tokens generated for a caption.")
  description_tokens: int = help_field(16, "Most tokens generated for a region description.")

  @property
  def enabled(self) -> bool:
    """Whether any metric is asked for (an evaluation stage with none has nothing to do)."""
    return bool(self.yes_no or self.grounding or self.captions or self.self_consistency)


def _rows(tokenizer, data: DataConfig, turns_list, images_list):
  """(input_ids, loss_mask) int32 [L] of each conversation with its images, rendered and
  tokenized as in training."""
  return [tokenize_conversation(data.place_images(turns, len(images)), tokenizer, data.template,
                                system=data.system_prompt, image_token=data.image_token,
                                tokens_per_image=data.image_tokens(images))
          for turns, images in zip(turns_list, images_list)]


def _pad(rows, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(input_ids, loss_mask, attention_mask) int32 [B, T], T rounded up to _PAD_TO."""
  length = -(-max(len(ids) for ids, _ in rows) // _PAD_TO) * _PAD_TO
  ids = np.full((len(rows), length), pad_id, np.int32)
  loss = np.zeros((len(rows), length), np.int32)
  attention = np.zeros((len(rows), length), np.int32)
  for i, (row_ids, row_mask) in enumerate(rows):
    span = slice(length - len(row_ids), length) if left else slice(0, len(row_ids))
    ids[i, span], loss[i, span], attention[i, span] = row_ids, row_mask, 1
  return ids, loss, attention


def _batches(items: list, size: int):
  """Chunks of `size`; the last is padded with its first item so every batch has one shape."""
  for start in range(0, len(items), size):
    chunk = items[start:start + size]
    yield chunk + [chunk[0]] * (size - len(chunk)), len(chunk)


@functools.partial(jax.jit, static_argnums=0)
def _answer_logprobs(graphdef, state, batch):
  """Summed log-prob [B] of each row's loss_mask tokens."""
  model = nnx.merge(graphdef, state)
  model.eval()
  return jnp.sum(token_logprobs(model, batch) * batch["loss_mask"], axis=1)


class ShapesEvaluator:
  """Evaluates models on one fixed held-out set (built once, reused at every evaluation)."""

  def __init__(self, tokenizer, data: DataConfig, world: ShapesConfig, config: ShapesEvalConfig,
               mesh: Mesh | None = None):
    self.tokenizer, self.data, self.config, self.mesh = tokenizer, data, config, mesh
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    self.yes_no = list(ShapesSource(world, "yes_no", config.yes_no, yes_no_mode=config.yes_no_mode)
                       ) if config.yes_no else []
    self.grounding = list(ShapesSource(world, "grounding", config.grounding)) if config.grounding else []
    self.captions = list(ShapesSource(world, "caption", config.captions)) if config.captions else []
    # Only their boxes are read: each question is written with the box in its image's size.
    self.regions = list(ShapesSource(world, "region", config.self_consistency)
                        ) if config.self_consistency else []

  def _put(self, tree):
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, tree)
    return place(tree, jax.tree.map(lambda _: replicated(self.mesh), tree))

  def yes_no_accuracy(self, graphdef, state) -> float:
    correct = 0
    for chunk, n in _batches(self.yes_no, self.config.batch_size):
      question = [r["conversations"][0] for r in chunk]
      images = [r["images"][:1] for r in chunk]
      scores = []
      for answer in ("yes", "no"):
        turns = [[q, {"from": "gpt", "value": answer}] for q in question]
        ids, loss, attention = _pad(_rows(self.tokenizer, self.data, turns, images),
                                    self.pad_id, left=False)
        batch = self._put({"input_ids": ids, "loss_mask": loss, "attention_mask": attention,
                           **self.data.image_arrays(images)})
        scores.append(np.asarray(_answer_logprobs(graphdef, state, batch)))
      predicted = np.where(scores[0] > scores[1], "yes", "no")[:n]
      correct += int(np.sum(predicted == np.asarray([r["answer"] for r in chunk[:n]])))
    return correct / len(self.yes_no)

  def _generate(self, graphdef, state, records, questions, max_new_tokens: int,
                answer_start: str) -> list[str]:
    """Greedy answers through the generation service; prompts end where training's context for
    an answer beginning with `answer_start` ends. An answer stops at `max_new_tokens` or at the
    model's context (max_position_embeddings), whichever comes first: a small model's evaluation
    with the default budgets measures what fits, rather than failing or reading past it."""
    mesh = self.mesh if self.mesh is not None else make_mesh()
    # Rows split over the mesh's batch axes: the batch rounds up to a multiple of them.
    size = -(-self.config.batch_size // batch_shards(mesh)) * batch_shards(mesh)
    service = GenerationService(nnx.merge(graphdef, state), self.tokenizer, self.data, mesh,
                                size)
    prompts = [Prompt.question(q, tuple(r["images"]), answer_start)
               for r, q in zip(records, questions)]
    longest = max(-(-len(service.prompt_ids(p)) // service.pad_to) * service.pad_to
                  for p in prompts)
    room = min(max_new_tokens, service.context - longest)
    if room < 1:
      raise UserError(f"an evaluation prompt of {longest} tokens leaves no room for an answer in "
                      f"the model's context of {service.context} (max_position_embeddings)")
    eos = self.tokenizer.eos_token_id
    sampling = SamplingConfig(max_new_tokens=room, pad_token_id=self.pad_id,
                              eos_token_ids=(eos,) if eos is not None else ())
    return service.texts(prompts, sampling)

  def ground(self, graphdef, state, records, expressions) -> tuple[np.ndarray, list]:
    """(IoU [N] of each greedy box answer with its record's box, parsed boxes or None)."""
    questions = [self.data.grounding_prompt.format(expression=e) for e in expressions]
    answers = self._generate(graphdef, state, records, questions, self.config.box_tokens,
                             self.data.box_format.open)
    boxes = [self.data.parse_box(a, r["images"][0]) for a, r in zip(answers, records)]
    ious = np.asarray([0.0 if b is None else float(box_iou(b, np.asarray(r["box"])))
                       for b, r in zip(boxes, records)])
    return ious, boxes

  def grounding_metrics(self, graphdef, state, records=None) -> dict[str, float]:
    """REC: each record's expression -> the model's box, Acc@IoU>=0.5 (records: dicts with
    "images", "box" and "expression"; default the held-out world's)."""
    records = self.grounding if records is None else records
    ious, boxes = self.ground(graphdef, state, records, [r["expression"] for r in records])
    return {"grounding_acc50": float(np.mean(ious >= 0.5)), "grounding_mean_iou": float(ious.mean()),
            "grounding_parsed": float(np.mean([b is not None for b in boxes]))}

  def self_consistency_ious(self, graphdef, state, records, answer_start: str) -> np.ndarray:
    """IoU [N] of box -> the model's description (REGION_PROMPT with the box text) -> the
    model's box, against the first box (records: dicts with "images" and "box")."""
    questions = [REGION_PROMPT.format(box=self.data.box_text(r["box"], r["images"][0]))
                 for r in records]
    descriptions = self._generate(graphdef, state, records, questions,
                                  self.config.description_tokens, answer_start)
    return self.ground(graphdef, state, records, [d.strip() for d in descriptions])[0]

  def self_consistency_metrics(self, graphdef, state, records=None,
                               answer_start: str = "the") -> dict[str, float]:
    """Self-consistency Acc@IoU>=0.5 (`self_consistency_ious`) over records (default the
    held-out world's region records, whose descriptions start with "the" as in training; with
    other records pass answer_start="" unless their model was trained so)."""
    shapes_world = records is None
    records = self.regions if shapes_world else records
    ious = self.self_consistency_ious(graphdef, state, records, answer_start)
    metrics = {"self_consistency_acc50": float(np.mean(ious >= 0.5))}
    if shapes_world:
      metrics["self_consistency_shared"] = float(np.mean(
          [shares_kind(Scene.from_json(r["scene"]), r["object"]) for r in records]))
    return metrics

  def caption_metrics(self, graphdef, state) -> dict[str, float]:
    question = "<image>\n" + CAPTION_PROMPTS[0]
    answers = self._generate(graphdef, state, self.captions, [question] * len(self.captions),
                             self.config.caption_tokens, "There")
    scenes = [Scene.from_json(r["scene"]) for r in self.captions]
    return {f"caption_{k}": v for k, v in hallucination_metrics(answers, scenes).items()}

  def __call__(self, model: nnx.Module) -> dict[str, float]:
    """Every configured metric of `model` (an LVLM, possibly sharded on the mesh; switched to
    eval mode, so LoRA dropout is off)."""
    model.eval()
    graphdef, state = nnx.split(model)
    metrics = {}
    if self.yes_no:
      metrics["yes_no_accuracy"] = self.yes_no_accuracy(graphdef, state)
    if self.grounding:
      metrics.update(self.grounding_metrics(graphdef, state))
    if self.captions:
      metrics.update(self.caption_metrics(graphdef, state))
    if self.regions:
      metrics.update(self.self_consistency_metrics(graphdef, state))
    return metrics
