"""CHAIR-style object hallucination of free-text descriptions, exact on the shapes world.

Each description is parsed into object mentions (size?, colour?, shape); a mention is hallucinated
when no object of the scene matches it. As in CHAIR (Rohrbach et al. 2018), mentions are counted
once per description. Recall is the share of the scene's objects that some mention matches.
"""

import re
from typing import Iterable, NamedTuple

from lvlm_jax.data.shapes import Scene, ShapeObject, mentioned_objects


class DescriptionCounts(NamedTuple):
  """One description against its scene: distinct object mentions, how many of them match no
  object, the scene's objects, how many of them some mention matches, and the words."""
  mentions: int
  hallucinated: int
  objects: int
  recalled: int
  words: int


def _matches(mention: tuple[str, str, str], obj: ShapeObject) -> bool:
  size, color, shape = mention
  return obj.shape == shape and (not size or obj.size == size) and (not color or obj.color == color)


def description_counts(text: str, scene: Scene) -> DescriptionCounts:
  unique = list(dict.fromkeys(mentioned_objects(text)))
  hallucinated = sum(not any(_matches(m, o) for o in scene.objects) for m in unique)
  recalled = sum(any(_matches(m, o) for m in unique) for o in scene.objects)
  return DescriptionCounts(len(unique), hallucinated, len(scene.objects), recalled,
                           len(re.findall(r"[a-z]+", text.lower())))


def hallucination_metrics(descriptions: Iterable[str], scenes: Iterable[Scene]) -> dict[str, float]:
  """Over paired descriptions and scenes:
  chair_i: hallucinated mentions / mentions; chair_s: share of descriptions with any hallucination;
  recall: matched scene objects / scene objects; mentions_per_description.
  """
  counts = [description_counts(text, scene)
            for text, scene in zip(descriptions, scenes, strict=True)]
  total = lambda field: sum(getattr(c, field) for c in counts)
  return {
      "chair_i": total("hallucinated") / max(total("mentions"), 1),
      "chair_s": sum(c.hallucinated > 0 for c in counts) / max(len(counts), 1),
      "recall": total("recalled") / max(total("objects"), 1),
      "mentions_per_description": total("mentions") / max(len(counts), 1),
  }
