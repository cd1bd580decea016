"""CHAIR-style object hallucination of free-text descriptions, exact on the shapes world.

Each description is parsed into object mentions (size?, colour?, shape); a mention is hallucinated
when no object of the scene matches it. As in CHAIR (Rohrbach et al. 2018), mentions are counted
once per description. Recall is the share of the scene's objects that some mention matches.
"""

from typing import Iterable

from lvlm_jax.data.shapes import Scene, ShapeObject, mentioned_objects


def _matches(mention: tuple[str, str, str], obj: ShapeObject) -> bool:
  size, color, shape = mention
  return obj.shape == shape and (not size or obj.size == size) and (not color or obj.color == color)


def hallucination_metrics(descriptions: Iterable[str], scenes: Iterable[Scene]) -> dict[str, float]:
  """Over paired descriptions and scenes:
  chair_i: hallucinated mentions / mentions; chair_s: share of descriptions with any hallucination;
  recall: matched scene objects / scene objects; mentions_per_description.
  """
  mentions = hallucinated = described = with_hallucination = objects = recalled = 0
  for text, scene in zip(descriptions, scenes, strict=True):
    unique = list(dict.fromkeys(mentioned_objects(text)))
    false = [m for m in unique if not any(_matches(m, o) for o in scene.objects)]
    mentions += len(unique)
    hallucinated += len(false)
    described += 1
    with_hallucination += bool(false)
    objects += len(scene.objects)
    recalled += sum(any(_matches(m, o) for m in unique) for o in scene.objects)
  return {
      "chair_i": hallucinated / max(mentions, 1),
      "chair_s": with_hallucination / max(described, 1),
      "recall": recalled / max(objects, 1),
      "mentions_per_description": mentions / max(described, 1),
  }
