"""Shapes-world CaD-VI metrics: how right a model's commonalities-and-differences summary of an
image pair is, and whether it picks the image a statement is true of.

Summaries (cad_summary_*): a summary is cut at 'Differences:' (before: commonalities, the
'Commonalities:' header dropped; after: differences) and each part into statements: its
sentences, list numbers ('1.') dropped, and the list of 'Both images contain a, b and c' split
into one statement per object ('both images contain a'). Statements compare lower-cased, with
spaces and punctuation at the ends normalised; a predicted statement is right when it equals a
statement of the pair's ground truth (`shapes.make_pair`'s summary, cut the same way), each
truth statement matched at most once. Precision = right / predicted, recall = right / true,
summed over all pairs (micro), for commonalities, differences, and both (cad_summary_f1: the F1
of the pooled precision and recall). A difference stated another way than the truth does (a
move told as a removal and an addition) counts as wrong.

Selection (pair_selection_*): 'Image 1: <image>\\nImage 2: <image>\\n{statement} ...' where
the statement, an object sentence of one image's caption that the other lacks
(`caption_pairs.selection_statement`), is true of one image only; the answer is its number,
1 and 2 alternating over the held-out pairs (a constant answer scores 0.5).
pair_selection_accuracy compares the model's log-probabilities of the two answers (forced
choice: chance is 0.5 for any model); pair_selection_exact_match is BISON's scoring, the
greedy answer equal to the right one.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lvlm_jax.data import caption_pairs
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes import Scene, ShapesConfig, ShapesSource, caption
from lvlm_jax.data.text import tokenize_conversation
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.sampling.decode import SamplingConfig
from lvlm_jax.sampling.logprobs import sequence_logprobs
from lvlm_jax.sampling.service import GenerationService, Prompt, pad_id
from lvlm_jax.sharding import batch_shards, make_mesh, place, replicated

_HEADER = re.compile(r"\bdifferences\s*:", re.IGNORECASE)
_CONTAIN = "both images contain "
_PAD_TO = 16


@dataclasses.dataclass(frozen=True)
class CadEvalConfig:
  """Held-out image pairs for the CaD-VI metrics."""
  selection: int = help_field(200, "Pairs asked a selection question; 0 skips the metric.")
  summaries: int = help_field(100, "Pairs summarised and scored; 0 skips the metric.")
  summary_tokens: int = help_field(128, "Most tokens generated for a summary.")
  batch_size: int = help_field(50, "Pairs per evaluation batch.")

  @property
  def enabled(self) -> bool:
    return bool(self.selection or self.summaries)


def _normal(statement: str) -> str:
  return " ".join(re.sub(r"[^\w\s]", " ", statement.lower()).split())


def _split(text: str) -> list[str]:
  parts = [_normal(s) for s in re.split(r"[.;\n]", text)]
  return [p for p in parts if p and not p.isdigit()]


def statements(summary: str) -> tuple[list[str], list[str]]:
  """(commonality statements, difference statements) of a summary, normalised."""
  match = _HEADER.search(summary)
  common = summary[:match.start()] if match else summary
  differences = summary[match.end():] if match else ""
  common = re.sub(r"^\s*commonalities\s*:", "", common, flags=re.IGNORECASE)
  out = []
  for sentence in _split(common):
    if sentence.startswith(_CONTAIN):
      items = re.split(r"\s*,\s*|\s+and\s+", sentence[len(_CONTAIN):])
      out += [_CONTAIN + _normal(item) for item in items if _normal(item)]
    else:
      out.append(sentence)
  return out, _split(differences)


def _matched(predicted: list[str], truth: list[str]) -> int:
  left = list(truth)
  right = 0
  for statement in predicted:
    if statement in left:
      left.remove(statement)
      right += 1
  return right


def score_summary(predicted: str, truth: str) -> dict[str, int]:
  """Counts of one summary against the truth: {common,difference}_{right,predicted,true}."""
  counts = {}
  for name, p, t in zip(("common", "difference"), statements(predicted), statements(truth)):
    counts.update({f"{name}_right": _matched(p, t), f"{name}_predicted": len(p),
                   f"{name}_true": len(t)})
  return counts


def _ratio(a: int, b: int) -> float:
  return a / b if b else 0.0


def summary_metrics(counts: list[dict[str, int]]) -> dict[str, float]:
  """Micro precision and recall of commonalities, differences and both; F1 of both."""
  total = {k: sum(c[k] for c in counts) for k in counts[0]} if counts else {}
  metrics = {}
  for name, key in (("commonality", "common"), ("difference", "difference")):
    metrics[f"cad_{name}_precision"] = _ratio(total.get(f"{key}_right", 0),
                                              total.get(f"{key}_predicted", 0))
    metrics[f"cad_{name}_recall"] = _ratio(total.get(f"{key}_right", 0),
                                           total.get(f"{key}_true", 0))
  right = sum(total.get(f"{k}_right", 0) for k in ("common", "difference"))
  precision = _ratio(right, sum(total.get(f"{k}_predicted", 0) for k in ("common", "difference")))
  recall = _ratio(right, sum(total.get(f"{k}_true", 0) for k in ("common", "difference")))
  metrics.update(cad_summary_precision=precision, cad_summary_recall=recall,
                 cad_summary_f1=_ratio(2 * precision * recall, precision + recall))
  return metrics


def selection_records(world: ShapesConfig, count: int, prompt: str,
                      answers: tuple[str, str]) -> list[dict]:
  """The held-out selection questions: pair i asks about image 1 + i % 2 where its caption
  allows (pairs whose captions differ in no object sentence are left out). Each: "images",
  "question", "answer", "target"."""
  out = []
  pairs = ShapesSource(world, "pair", count)
  for i in range(count):
    record = pairs[i]
    captions = [caption(Scene.from_json(record["scene"][k])) for k in ("scene_a", "scene_b")]
    chosen = caption_pairs.selection_statement(*captions, 1 + i % 2,
                                               np.random.default_rng([world.seed, i]))
    if chosen is not None:
      statement, target = chosen
      out.append({"images": record["images"], "question": prompt.format(statement=statement),
                  "answer": answers[target - 1], "target": target})
  return out


@functools.partial(jax.jit, static_argnums=0)
def _logprobs(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  model.eval()
  return sequence_logprobs(model, batch)[1]


class PairEvaluator:
  """The CaD-VI metrics of models on one fixed set of held-out pairs (built once)."""

  def __init__(self, tokenizer, data: DataConfig, world: ShapesConfig, config: CadEvalConfig,
               *, summary_prompt: str, selection_prompt: str, answers: tuple[str, str],
               mesh: Mesh | None = None):
    self.tokenizer, self.data, self.config = tokenizer, data, config
    self.mesh = mesh if mesh is not None else make_mesh()
    self.summary_prompt, self.answers = summary_prompt, answers
    self.selection = selection_records(world, config.selection, selection_prompt, answers) \
        if config.selection else []
    self.summaries = list(ShapesSource(world, "pair", config.summaries)) \
        if config.summaries else []

  def _service(self, model) -> GenerationService:
    shards = batch_shards(self.mesh)
    return GenerationService(model, self.tokenizer, self.data, self.mesh,
                             -(-self.config.batch_size // shards) * shards)

  def _answer_logprobs(self, graphdef, state, records, answer: str) -> np.ndarray:
    """float32 [len(records)]: log p(answer | question, images) of each record."""
    out = []
    for first in range(0, len(records), self.config.batch_size):
      chunk = records[first:first + self.config.batch_size]
      rows = [tokenize_conversation(
          self.data.place_images([{"from": "human", "value": r["question"]},
                                  {"from": "gpt", "value": answer}], len(r["images"])),
          self.tokenizer, self.data.template, system=self.data.system_prompt,
          image_token=self.data.image_token, tokens_per_image=self.data.image_tokens(r["images"]))
          for r in chunk]
      size = self.config.batch_size
      rows += [rows[0]] * (size - len(rows))
      length = -(-max(len(ids) for ids, _ in rows) // _PAD_TO) * _PAD_TO
      batch = {k: np.zeros((size, length), np.int32)
               for k in ("input_ids", "loss_mask", "attention_mask")}
      batch["input_ids"][:] = pad_id(self.tokenizer)
      for i, (ids, mask) in enumerate(rows):
        batch["input_ids"][i, :len(ids)], batch["loss_mask"][i, :len(ids)] = ids, mask
        batch["attention_mask"][i, :len(ids)] = 1
      images = [r["images"] for r in chunk]
      batch.update(self.data.image_arrays(images + [images[0]] * (size - len(chunk))))
      batch = place(batch, jax.tree.map(lambda _: replicated(self.mesh), batch))
      out.append(np.asarray(_logprobs(graphdef, state, batch))[:len(chunk)])
    return np.concatenate(out)

  def selection_metrics(self, model) -> dict[str, float]:
    model.eval()
    graphdef, state = nnx.split(model)
    with jax.set_mesh(self.mesh):
      first, second = (self._answer_logprobs(graphdef, state, self.selection, a)
                       for a in self.answers)
    picked = np.where(first >= second, 1, 2)
    targets = np.asarray([r["target"] for r in self.selection])
    eos = self.tokenizer.eos_token_id
    sampling = SamplingConfig(max_new_tokens=4, pad_token_id=pad_id(self.tokenizer),
                              eos_token_ids=(eos,) if eos is not None else ())
    answers = self._service(model).texts(
        [Prompt.question(r["question"], tuple(r["images"])) for r in self.selection], sampling)
    exact = [a.strip() == r["answer"] for a, r in zip(answers, self.selection)]
    return {"pair_selection_accuracy": float(np.mean(picked == targets)),
            "pair_selection_exact_match": float(np.mean(exact)),
            "pair_selection_questions": len(self.selection)}

  def summarize(self, model, records) -> list[str]:
    """Greedy summaries of records' image pairs under the summary prompt."""
    eos = self.tokenizer.eos_token_id
    sampling = SamplingConfig(max_new_tokens=self.config.summary_tokens,
                              pad_token_id=pad_id(self.tokenizer),
                              eos_token_ids=(eos,) if eos is not None else ())
    return self._service(model).texts(
        [Prompt.question(self.summary_prompt, tuple(r["images"])) for r in records], sampling)

  def summary_metrics(self, model) -> dict[str, float]:
    model.eval()
    texts = self.summarize(model, self.summaries)
    truths = [r["conversations"][1]["value"] for r in self.summaries]
    return summary_metrics([score_summary(p, t) for p, t in zip(texts, truths)])

  def __call__(self, model) -> dict[str, float]:
    metrics = {}
    if self.selection:
      metrics.update(self.selection_metrics(model))
    if self.summaries:
      metrics.update(self.summary_metrics(model))
    return metrics
