"""What two shapes-world captions say about their image pair: CaD-VI's phase-1 writer for the
shapes world, and the image-selection statements it builds.

CaD-VI's phase 1 gives an LLM the captions of two images and asks it to summarise their
commonalities and differences (METHODS.md 4.1). No capable LLM runs on a CPU, so on the shapes
world this module stands in for it. It reads only the two captions (`shapes.caption`'s text: a
count sentence, one sentence per object with its size, colour, shape and coarse place, then
relation sentences), never the scenes, and writes the summary in the world's CaD format
(`shapes.describe_pair`). Like the LLM it can only guess which edits turned one caption into
the other:
  - an object of one caption equal to an object of the other (size, colour, shape, place) is
    common to both;
  - of the rest, an object of the same size, colour and shape in another place has 'moved';
  - then one of the same size and shape in the same place with another colour is 'recoloured';
  - what is left is 'missing from image 2' (caption 1 only) or 'an extra' object (caption 2 only).
Where the true edits were others (a removed and an added object that read as a move), its
summary is wrong, as an LLM's can be.

Binary image selection (CaD-VI's "w_binary_image_select" instructions): an object sentence of
one caption that the other caption lacks is true of that image only; the instruction asks which
image it describes, the answer is the image's number.
"""

import re
from collections import Counter

import numpy as np

from lvlm_jax.data import shapes

_OBJECT = re.compile(r"^an? (\w+) (\w+) (\w+) is ([a-z ]+)\.$")


def _cell_centres() -> dict[str, tuple[float, float]]:
  """Locative phrase of each coarse place ('at the top left') -> a box centre there, read off
  `shapes.caption` itself so that the two never disagree."""
  out = {}
  for row in range(3):
    for col in range(3):
      centre = ((col + 0.5) / 3, (row + 0.5) / 3)
      probe = shapes.ShapeObject("circle", "red", "small",
                                 (centre[0] - 0.05, centre[1] - 0.05, centre[0] + 0.05,
                                  centre[1] + 0.05))
      scene = shapes.Scene((probe,), (), (), (0, 0, 0))
      sentence = sentences(shapes.caption(scene))[1]
      out[_OBJECT.match(sentence.lower()).group(4)] = centre
  return out


def sentences(caption: str) -> list[str]:
  """The caption's sentences, each with its full stop."""
  return [s.strip() for s in re.findall(r"[^.]+\.", caption)]


def object_sentences(caption: str) -> list[str]:
  """The sentences that state one object: 'A small red circle is at the top left.'"""
  return [s for s in sentences(caption) if _OBJECT.match(s.lower())]


def _objects(caption: str) -> list[shapes.ShapeObject]:
  """The objects a caption states, each boxed at its place's centre at its size's nominal side
  (what a caption says of it): the same statement in two captions gives equal objects."""
  out = []
  for sentence in object_sentences(caption):
    size, color, shape, place = _OBJECT.match(sentence.lower()).groups()
    if size not in shapes.SIZES or place not in _CENTRES:
      continue
    (cx, cy), half = _CENTRES[place], shapes.SIZES[size] / 2
    out.append(shapes.ShapeObject(shape, color, size, (cx - half, cy - half, cx + half, cy + half)))
  return out


def _take(pool: list, match) -> object | None:
  for i, item in enumerate(pool):
    if match(item):
      return pool.pop(i)
  return None


def summarize(caption_a: str, caption_b: str) -> str:
  """The CaD summary ('Commonalities: ... Differences: 1. ...') of the pair the two captions
  describe, from the captions alone (module docstring)."""
  objects_a, objects_b = _objects(caption_a), _objects(caption_b)
  only_b = list(objects_b)
  only_a = [o for o in objects_a if _take(only_b, lambda b, o=o: b == o) is None]
  edits = []
  for kind, same in (("moved", lambda a, b: (a.size, a.color, a.shape) == (b.size, b.color,
                                                                           b.shape)),
                     ("recoloured", lambda a, b: (a.size, a.shape, a.box) == (b.size, b.shape,
                                                                             b.box))):
    for a in list(only_a):
      b = _take(only_b, lambda b, a=a: same(a, b))
      if b is not None:
        only_a.remove(a)
        edits.append((kind, a, b))
  edits += [("removed", a, None) for a in only_a] + [("added", None, b) for b in only_b]
  scene = lambda objects: shapes.Scene(tuple(objects), (), (), (0, 0, 0))  # noqa: E731
  return shapes.describe_pair(scene(objects_a), scene(objects_b), edits).summary


def distinguishing_sentences(caption_a: str, caption_b: str) -> list[str]:
  """The object sentences of caption_a that caption_b lacks (counted: a sentence twice in a and
  once in b is in the result once), in caption_a's order."""
  left = Counter(s.lower() for s in object_sentences(caption_b))
  out = []
  for sentence in object_sentences(caption_a):
    if left[sentence.lower()]:
      left[sentence.lower()] -= 1
    else:
      out.append(sentence)
  return out


def selection_statement(caption_a: str, caption_b: str, target: int,
                        rng: np.random.Generator) -> tuple[str, int] | None:
  """(a statement true of image `target` (1 or 2) only, target), or of the other image when
  `target`'s caption has none; None when neither has one. rng picks among them."""
  captions = (caption_a, caption_b)
  for image in (target, 3 - target):
    options = distinguishing_sentences(captions[image - 1], captions[2 - image])
    if options:
      return options[rng.integers(len(options))], image
  return None


_CENTRES = _cell_centres()
