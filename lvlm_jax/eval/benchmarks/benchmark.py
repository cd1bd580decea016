"""What a public benchmark is to the runner: items to answer, and a scorer of the answers.

An `Item` is one prompt: a user turn (with one `<image>` per image, or none: the service then
puts them in front, LLaVA's rule), its images, and what the scorer needs to know about it. A
`Benchmark` loads its items from the files the benchmark publishes, in their own layout, and
scores the answers the model gave (items whose image could not be read are left out and counted
by the runner, never scored as wrong).
"""

import dataclasses
from typing import Callable, Iterable

# LLaVA-1.5's prompt suffixes (its eval scripts' --single-pred-prompt and model_vqa_loader).
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Item:
  """id: unique within the benchmark (predictions are keyed by it). question: the user turn.
  images: each a path under the image folder, or the encoded bytes of an image (MMBench's TSV
  carries its images). truth: JSON-able facts the scorer reads (answer, category, ...)."""
  id: str
  question: str
  images: tuple = ()
  truth: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """load(data, images) -> items: `data` the benchmark's file (or folder), `images` the folder
  its image paths are relative to (None: the data's own folder). score(items, answers) ->
  metrics, answers by item id for the items that were answered. max_new_tokens: the answer
  budget LLaVA's scripts give it. files: what the benchmark reads, for --help and errors.
  default_limit: how many of the items (in load's order) are asked without --limit; 0: all.
  judge(items, answers) -> items: when set, the prompts (same ids, text only) a judge LLM
  answers about the model's answers; score then receives the judge's answers."""
  load: Callable[[str, str | None], list[Item]]
  score: Callable[[list[Item], dict[str, str]], dict]
  max_new_tokens: int
  files: str
  default_limit: int = 0
  judge: Callable[[list[Item], dict[str, str]], list[Item]] | None = None


@dataclasses.dataclass(frozen=True)
class GroundingBenchmark:
  """A benchmark of boxes, scored by the grounding-file evaluator rather than by answers:
  records(data, images, limit) -> (grounding records: "id" (unique; the row's line number in
  data), "image" (the path of an image that exists), "box" normalised, "expression"; the
  reasons of the records skipped)."""
  records: Callable[[str, str | None, int], tuple[list[dict], list[str]]]
  files: str
  default_limit: int = 0


def mean_by(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
  """The mean value of each key of (key, value) pairs, by sorted key (accuracy per category)."""
  groups = {}
  for key, value in pairs:
    groups.setdefault(key, []).append(value)
  return {key: sum(values) / len(values) for key, values in sorted(groups.items())}
