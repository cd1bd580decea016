"""The shapes world: procedural scenes of coloured shapes with exact ground truth.

A scene is a few non-overlapping shapes (circle, square, ...) of fixed colours and two or three size
classes on a plain background. Everything a method needs is derived from the scene, so every metric
on it is exact: a detailed caption, referring expressions with boxes (SC-Tune, grounding), balanced
POPE-style yes/no questions (hallucination), image pairs with controlled differences and a CaD-style
summary (CaD-VI), region descriptions (box -> expression, SC-Tune's describer) and unlabeled images
(STIC). `ShapesSource` serves all of it to Grain.

Everything is a pure function of `(config.seed, index)`: record i is the same on every host, in every
worker and after every restart, with nothing stored on disk.
"""

import dataclasses
import operator
import re
from typing import Any

import numpy as np

from lvlm_jax.data.text import BoxFormat
from lvlm_jax.errors import UserError

# Every kind the world knows; a config picks a subset. RGB values are fixed so that a colour name
# always means the same pixels.
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (250, 130, 20),
    "cyan": (30, 190, 210),
}
# Nominal side of the (square) box, as a fraction of the image side.
SIZES = {"small": 0.15, "medium": 0.22, "large": 0.3}
TASKS = ("caption", "grounding", "yes_no", "region", "pair", "unlabeled")
# The tasks whose records are supervised examples (conversations, or box + expression).
SFT_TASKS = ("caption", "grounding", "yes_no", "region")
POPE_MODES = ("random", "popular", "adversarial")
DIFFERENCE_KINDS = ("added", "removed", "recoloured", "moved")

CAPTION_PROMPTS = (
    "Describe the image in detail.",
    "Provide a detailed description of the image.",
    "What is in this image? Describe every object and where it is.",
    "List the objects in the image and their positions.",
)
YES_NO_PROMPT = "<image>\n{question} Answer yes or no."
# SC-Tune's describer prompt '<ref>This</ref><box>...</box> is' as a chat question: the box is
# the BoxFormat text of the model's grounding answers, the answer a referring expression that the
# grounding prompt takes back.
REGION_PROMPT = "<image>\nWhat is <ref>this</ref>{box}? Answer with a short description."
PAIR_PROMPT = ("Image 1: <image>\nImage 2: <image>\n"
               "Summarize the commonalities and differences of the two images.")

_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
            "cross": "crosses"}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A 3x3 grid of coarse positions by box centre: (name, locative phrase), indexed [row][column].
_CELLS = (
    (("top left", "at the top left"), ("top", "at the top"), ("top right", "at the top right")),
    (("left", "on the left"), ("center", "in the center"), ("right", "on the right")),
    (("bottom left", "at the bottom left"), ("bottom", "at the bottom"),
     ("bottom right", "at the bottom right")),
)
# Superlatives of referring expressions: (axis of the box centre, sign of "more extreme").
_DIRECTIONS = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}
# Descriptors tried in order of length, attributes before position words at equal length, so each
# expression uses the fewest words that single its object out.
_DESCRIPTORS = (
    ("shape",), ("color", "shape"), ("size", "shape"), ("direction", "shape"),
    ("size", "color", "shape"), ("direction", "color", "shape"), ("direction", "size", "shape"),
    ("direction", "size", "color", "shape"),
)
# A superlative must win by this much (normalised centre distance) to be visibly true.
_POSITION_MARGIN = 0.1
# Box corners snap to this grid: multiples of 1/1024 are exact in float32 (TFDS) and in JSON.
_GRID = 1024
_PLACEMENT_TRIES = 50
_SCENE_TRIES = 200

_COUNT_ONE = "There is one object in the image."
_COUNT_MANY = "There are {count} objects in the image."
_OBJECT_SENTENCE = "{article} {object} is {position}."
_RELATION_SENTENCE = "{first} is {relation} {second}."
_QUESTION = "Is there {article} {color} {shape} in the image?"
_ADDED = "Image 2 has an extra {object} {position}."
_REMOVED = "The {object} {position} in image 1 is missing from image 2."
_RECOLOURED = "The {size} {shape} {position} is {old} in image 1 and {new} in image 2."
_MOVED = "The {object} moved from the {old} to the {new}."
_COMMON_BACKGROUND = "Both images show colored shapes on a plain background."
_COMMON_COUNT = "Both images have {count}."
_COUNTS_DIFFER = "Image 1 has {count_a} and image 2 has {count_b}."
_COMMON_OBJECTS = "Both images contain {objects}."
_SUMMARY = "Commonalities: {commonalities} Differences: {differences}"
_LEFT_OF, _ABOVE, _BELOW = "to the left of", "above", "below"

# Purposes keep the random streams of one index independent: np.random.default_rng([seed, index, p]).
_SCENE, _PAIR, _CHOICE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
  """What the world looks like. Every field is checked on construction."""
  seed: int = 0  # Base of every random stream; two seeds are two disjoint worlds.
  image_size: int = 64  # Side in pixels of the images ShapesSource renders (render() takes any size).
  min_objects: int = 1  # Fewest objects in a scene (>= 1).
  max_objects: int = 4  # Most objects in a scene (<= 9, the largest number word captions use).
  shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond")  # Subset of SHAPES.
  colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")  # Subset of COLORS.
  sizes: tuple[str, ...] = ("small", "large")  # Subset of SIZES.
  # Kind frequencies: the i-th shape (and colour) is drawn with weight 1 / (i + 1) ** kind_skew, so
  # POPE's "popular" negatives mean something; 0 makes every kind equally likely.
  kind_skew: float = 0.5
  size_jitter: float = 0.1  # Each box side is its size's nominal side times U(1 - j, 1 + j).
  min_gap: float = 0.04  # Smallest gap between two boxes (normalised); layouts are occlusion-free.
  background: tuple[int, int, int] = (230, 230, 230)  # RGB of the plain background.
  max_differences: int = 2  # A pair differs by 1..max_differences edits.
  # Share of region descriptions that are the object's unique referring expression; the rest name
  # its colour and shape only, which is ambiguous when a neighbour shares both.
  region_full_share: float = 0.25

  def __post_init__(self):
    # Configs may arrive with lists (JSON, ConfigDict); tuples keep the config and its scenes hashable.
    for key in ("shapes", "colors", "sizes", "background"):
      object.__setattr__(self, key, tuple(getattr(self, key)))

    def check(ok: bool, key: str, why: str):
      if not ok:
        raise UserError(f"ShapesConfig.{key}={getattr(self, key)!r}: {why}")

    check(self.seed >= 0, "seed", "must be >= 0")
    check(self.image_size >= 8, "image_size", "must be at least 8 pixels")
    check(1 <= self.min_objects <= self.max_objects, "min_objects", "need 1 <= min_objects <= max_objects")
    check(self.max_objects <= 9, "max_objects", "must be at most 9")
    for key, known in (("shapes", SHAPES), ("colors", tuple(COLORS)), ("sizes", tuple(SIZES))):
      names = getattr(self, key)
      check(len(names) > 0 and set(names) <= set(known), key, f"choose a non-empty subset of {known}")
      check(len(set(names)) == len(names), key, "has duplicates")
    # A yes/no "no" question needs a kind that is absent from the scene.
    check(len(self.shapes) * len(self.colors) > self.max_objects, "max_objects",
          "must be smaller than len(shapes) * len(colors)")
    check(self.kind_skew >= 0, "kind_skew", "must be >= 0")
    check(0 <= self.size_jitter < 0.5, "size_jitter", "must be in [0, 0.5)")
    check(0 <= self.min_gap < 0.25, "min_gap", "must be in [0, 0.25)")
    check(len(self.background) == 3 and all(0 <= c <= 255 for c in self.background), "background",
          "must be an RGB triple of ints in 0..255")
    check(self.max_differences >= 1, "max_differences", "must be >= 1")
    check(0 <= self.region_full_share <= 1, "region_full_share", "must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One shape. box: (x1, y1, x2, y2), normalised to [0, 1], the tight box of the drawn shape."""
  shape: str
  color: str
  size: str
  box: tuple[float, float, float, float]

  @property
  def center(self) -> tuple[float, float]:
    return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

  @property
  def description(self) -> str:
    """'small red circle'."""
    return f"{self.size} {self.color} {self.shape}"

  def to_json(self) -> dict[str, Any]:
    return {"shape": self.shape, "color": self.color, "size": self.size, "box": list(self.box)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "ShapeObject":
    return cls(d["shape"], d["color"], d["size"], tuple(float(v) for v in d["box"]))


@dataclasses.dataclass(frozen=True)
class Scene:
  """The ground truth of one image.

  objects: sorted left to right (by x1). shapes, colors: the world's kinds, most frequent first (the
  yes/no negatives are drawn from them). background: RGB.
  """
  objects: tuple[ShapeObject, ...]
  shapes: tuple[str, ...]
  colors: tuple[str, ...]
  background: tuple[int, int, int]

  def to_json(self) -> dict[str, Any]:
    return {"objects": [o.to_json() for o in self.objects], "shapes": list(self.shapes),
            "colors": list(self.colors), "background": list(self.background)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Scene":
    return cls(tuple(ShapeObject.from_json(o) for o in d["objects"]), tuple(d["shapes"]),
               tuple(d["colors"]), tuple(d["background"]))


@dataclasses.dataclass(frozen=True)
class Difference:
  """One edit from scene_a to scene_b. before: the object in scene_a (None if added); after: the
  object in scene_b (None if removed)."""
  kind: str  # One of DIFFERENCE_KINDS.
  before: ShapeObject | None
  after: ShapeObject | None
  text: str

  def to_json(self) -> dict[str, Any]:
    return {"kind": self.kind, "before": self.before and self.before.to_json(),
            "after": self.after and self.after.to_json(), "text": self.text}


@dataclasses.dataclass(frozen=True)
class ScenePair:
  """Two scenes that differ by exactly `differences`; every other object is identical in both."""
  scene_a: Scene
  scene_b: Scene
  differences: tuple[Difference, ...]
  commonalities: str
  summary: str  # "Commonalities: ... Differences: 1. ... 2. ..."


def make_scene(config: ShapesConfig, index: int) -> Scene:
  """Scene `index` of the world; a pure function of (config, index)."""
  return _sample_scene(config, _rng(config, index, _SCENE))


def render(scene: Scene, size: int) -> np.ndarray:
  """Draws the scene: uint8 [size, size, 3].

  A pixel takes an object's colour when its centre lies inside the shape, so geometry is the same
  at every resolution and every pixel is either the background or one object's exact colour.
  """
  image = np.empty((size, size, 3), np.uint8)
  image[...] = scene.background
  centres = (np.arange(size) + 0.5) / size
  for obj in scene.objects:
    x1, y1, x2, y2 = obj.box
    cols = np.nonzero((centres >= x1) & (centres <= x2))[0]
    rows = np.nonzero((centres >= y1) & (centres <= y2))[0]
    if cols.size == 0 or rows.size == 0:
      continue
    u = (centres[cols] - x1) / (x2 - x1) - 0.5  # [W'] in [-0.5, 0.5] across the box
    v = (centres[rows] - y1) / (y2 - y1) - 0.5  # [H']
    mask = _inside(obj.shape, np.abs(u)[None, :], v[:, None])
    region = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    region[mask] = COLORS[obj.color]
  return image


def caption(scene: Scene) -> str:
  """Exact description: the count, every object with size, colour, shape and coarse position, and
  the spatial relation between each pair of neighbours (left to right)."""
  n = len(scene.objects)
  sentences = [_COUNT_ONE if n == 1 else _COUNT_MANY.format(count=_NUMBERS[n])]
  for obj in scene.objects:
    sentences.append(_OBJECT_SENTENCE.format(article=_article(obj.size).capitalize(),
                                             object=obj.description, position=_cell(obj)[1]))
  names = [_referring_expression(scene.objects, i) or f"the {o.description}"
           for i, o in enumerate(scene.objects)]
  for i in range(n - 1):
    a, b = scene.objects[i], scene.objects[i + 1]
    # Objects are sorted by x1; when their x ranges overlap, the layout gap separates them in y.
    if a.box[2] <= b.box[0]:
      relation = _LEFT_OF
    else:
      relation = _ABOVE if a.box[3] <= b.box[1] else _BELOW
    sentences.append(_RELATION_SENTENCE.format(first=names[i].capitalize(), relation=relation,
                                               second=names[i + 1]))
  return " ".join(sentences)


def referring_expressions(scene: Scene) -> list[tuple[str, tuple[float, float, float, float], int]]:
  """(expression, box, object index) for every object, e.g. ('the leftmost red circle', box, 0).

  Each expression picks out exactly one object with the fewest words. Generated scenes are laid out
  so that every object has one; an object of a hand-made scene that has none is left out.
  """
  out = []
  for i, obj in enumerate(scene.objects):
    expression = _referring_expression(scene.objects, i)
    if expression is not None:
      out.append((expression, obj.box, i))
  return out


def region_description(scene: Scene, i: int, full: bool) -> str:
  """What region descriptions say of object i: its unique referring expression when `full`,
  else its colour and shape only ('the red circle'), which may fit a neighbour too."""
  if full:
    return _referring_expression(scene.objects, i)
  obj = scene.objects[i]
  return f"the {obj.color} {obj.shape}"


def shares_kind(scene: Scene, i: int) -> bool:
  """Whether another object of the scene has object i's colour and shape."""
  obj = scene.objects[i]
  return any(o.color == obj.color and o.shape == obj.shape for j, o in enumerate(scene.objects)
             if j != i)


def yes_no_questions(scene: Scene, rng: np.random.Generator, mode: str = "random",
                     count: int = 4) -> list[tuple[str, str]]:
  """POPE-style existence questions about (colour, shape) kinds: [(question, 'yes' | 'no')].

  count - count // 2 ask about present kinds and count // 2 about absent ones, in random order.
  Negatives by `mode`: 'random' any absent kind; 'popular' the absent kinds most frequent in the
  world; 'adversarial' absent kinds sharing a colour or a shape with a present object (most shared
  first; random absent kinds fill in when there are too few).
  """
  if mode not in POPE_MODES:
    raise UserError(f"yes/no mode {mode!r} is unknown; choose one of {POPE_MODES}")
  present = list(dict.fromkeys((o.color, o.shape) for o in scene.objects))
  absent = [(c, s) for s in scene.shapes for c in scene.colors if (c, s) not in present]
  n_no = count // 2
  yes = _draw(rng, present, count - n_no)
  if mode == "random":
    no = _draw(rng, absent, n_no)
  elif mode == "popular":
    # Kind weights are 1 / ((color rank + 1) (shape rank + 1)) ** skew, so this product orders them.
    ranked = sorted(absent, key=lambda k: (scene.colors.index(k[0]) + 1) * (scene.shapes.index(k[1]) + 1))
    no = _draw_ranked(ranked, n_no)
  else:
    shuffled = [absent[i] for i in rng.permutation(len(absent))]  # random order among ties
    ranked = sorted(shuffled, key=lambda k: -sum(c == k[0] or s == k[1] for c, s in present))
    no = _draw_ranked(ranked, n_no)
  questions = ([(_question(k), "yes") for k in yes] + [(_question(k), "no") for k in no])
  return [questions[i] for i in rng.permutation(len(questions))]


def make_pair(config: ShapesConfig, index: int) -> ScenePair:
  """Pair `index`: a scene and a copy with 1..max_differences edits (added, removed, recoloured or
  moved objects), with the commonalities and a CaD-style summary."""
  rng = _rng(config, index, _PAIR)
  for _ in range(_SCENE_TRIES):
    scene_a = _sample_scene(config, rng)
    edited = _edit(config, scene_a, rng)
    if edited is not None:
      return _describe_pair(scene_a, *edited)
  raise UserError(f"could not make an image pair for {config}; lower max_objects or min_gap")


def mentioned_objects(text: str) -> list[tuple[str, str, str]]:
  """(size, colour, shape) of every shape noun in free shapes-world text, in order.

  Size and colour are the words right before the noun ('' when missing); plurals count as one
  mention. 'a small red circle' -> ('small', 'red', 'circle').
  """
  nouns = {**{s: s for s in SHAPES}, **{p: s for s, p in _PLURALS.items()}}
  # Punctuation stays in the list so that 'purple. crosses' is no purple cross.
  words = re.findall(r"[a-z]+|[^a-z\s]", text.lower())
  out = []
  for i, word in enumerate(words):
    if word not in nouns:
      continue
    color = words[i - 1] if i >= 1 and words[i - 1] in COLORS else ""
    j = i - 2 if color else i - 1
    size = words[j] if j >= 0 and words[j] in SIZES else ""
    out.append((size, color, nouns[word]))
  return out


def has_object(scene: Scene, size: str, color: str, shape: str) -> bool:
  """Whether an object matches; '' matches any value (as mentioned_objects returns it)."""
  return any((not size or o.size == size) and (not color or o.color == color) and o.shape == shape
             for o in scene.objects)


def vocabulary() -> list[str]:
  """Every word (lower-case, letters only) any generator of this module can write, sorted."""
  texts = [*SHAPES, *_PLURALS.values(), *COLORS, *SIZES, *_NUMBERS, *_DIRECTIONS, _LEFT_OF, _ABOVE, _BELOW,
           *(part for row in _CELLS for cell in row for part in cell), *CAPTION_PROMPTS,
           YES_NO_PROMPT, REGION_PROMPT, PAIR_PROMPT, _COUNT_ONE, _COUNT_MANY, _OBJECT_SENTENCE,
           _RELATION_SENTENCE, _QUESTION, _ADDED, _REMOVED, _RECOLOURED, _MOVED, _COMMON_BACKGROUND,
           _COMMON_COUNT, _COUNTS_DIFFER, _COMMON_OBJECTS, _SUMMARY, "a an the and object objects"]
  words = set()
  for text in texts:
    text = re.sub(r"\{\w+\}|<[^>]*>", " ", text)
    words.update(re.findall(r"[a-z]+", text.lower()))
  return sorted(words)


class ShapesSource:
  """A Grain random-access source of shapes-world records for one task.

  Record i is a pure function of (config, task, i). Every record has "id", "images" (a list of
  uint8 [image_size, image_size, 3]) and "scene", the JSON ground truth (Scene.to_json(); for pairs
  {"scene_a": ..., "scene_b": ...}). By task, also: caption and yes_no: LLaVA "conversations"
  (human, gpt), yes_no: "answer"; grounding: "box" [x1, y1, x2, y2] and "expression"; region:
  "conversations" (REGION_PROMPT with the box as `box_format` text, then region_description:
  the full expression in a config.region_full_share of the records), "box", "expression" (the
  unique one), "full" (whether the answer is it) and "object" (its index in the scene); pair:
  two images, "conversations" and "differences" (Difference.to_json() each); unlabeled: nothing
  more. yes_no_mode: the POPE negatives of the "yes_no" task; answers alternate yes, no, yes, ...
  """

  def __init__(self, config: ShapesConfig, task: str, num_examples: int, *,
               yes_no_mode: str = "random", box_format: BoxFormat = BoxFormat()):
    if task not in TASKS:
      raise UserError(f"shapes task {task!r} is unknown; choose one of {TASKS}")
    if num_examples < 1:
      raise UserError(f"shapes num_examples={num_examples} must be >= 1")
    if yes_no_mode not in POPE_MODES:
      raise UserError(f"shapes yes_no_mode {yes_no_mode!r} is unknown; choose one of {POPE_MODES}")
    self.config = config
    self.task = task
    self.num_examples = num_examples
    self.yes_no_mode = yes_no_mode
    self.box_format = box_format

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return f"ShapesSource(task={self.task!r}, num_examples={self.num_examples}, config={self.config})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = operator.index(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    record_id = f"shapes-{self.task}-{self.config.seed}-{index}"
    size = self.config.image_size
    if self.task == "pair":
      pair = make_pair(self.config, index)
      return {"id": record_id,
              "images": [render(pair.scene_a, size), render(pair.scene_b, size)],
              "conversations": [{"from": "human", "value": PAIR_PROMPT},
                                {"from": "gpt", "value": pair.summary}],
              "differences": [d.to_json() for d in pair.differences],
              "scene": {"scene_a": pair.scene_a.to_json(), "scene_b": pair.scene_b.to_json()}}
    scene = make_scene(self.config, index)
    record = {"id": record_id, "images": [render(scene, size)], "scene": scene.to_json()}
    rng = _rng(self.config, index, _CHOICE)
    if self.task == "caption":
      prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
      record["conversations"] = [{"from": "human", "value": f"<image>\n{prompt}"},
                                 {"from": "gpt", "value": caption(scene)}]
    elif self.task == "grounding":
      expressions = referring_expressions(scene)
      expression, box, _ = expressions[rng.integers(len(expressions))]
      record["box"] = list(box)
      record["expression"] = expression
    elif self.task == "region":
      expressions = referring_expressions(scene)
      expression, box, i = expressions[rng.integers(len(expressions))]
      full = bool(rng.random() < self.config.region_full_share)
      prompt = REGION_PROMPT.format(box=self.box_format.to_text(box))
      record["conversations"] = [{"from": "human", "value": prompt},
                                 {"from": "gpt", "value": region_description(scene, i, full)}]
      record.update(box=list(box), expression=expression, full=full, object=int(i))
    elif self.task == "yes_no":
      answer = "yes" if index % 2 == 0 else "no"
      question = next(q for q, a in yes_no_questions(scene, rng, self.yes_no_mode, 2) if a == answer)
      record["conversations"] = [{"from": "human", "value": YES_NO_PROMPT.format(question=question)},
                                 {"from": "gpt", "value": answer}]
      record["answer"] = answer
    return record


def _rng(config: ShapesConfig, index: int, purpose: int) -> np.random.Generator:
  if index < 0:
    raise IndexError(f"shapes index {index} must be >= 0")
  return np.random.default_rng([config.seed, index, purpose])


def _inside(shape: str, au: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Shape masks in box coordinates: au = |u| and v, both in [-0.5, 0.5], the box centre at 0."""
  if shape == "circle":
    return au ** 2 + v ** 2 <= 0.25
  if shape == "square":
    return np.broadcast_to(True, np.broadcast_shapes(au.shape, v.shape))
  if shape == "triangle":  # apex at the top centre, base along the bottom edge
    return au <= (v + 0.5) / 2
  if shape == "diamond":
    return au + np.abs(v) <= 0.5
  if shape == "cross":
    return (au <= 1 / 6) | (np.abs(v) <= 1 / 6)
  raise UserError(f"unknown shape {shape!r}; known shapes: {SHAPES}")


def _snap(x: float) -> float:
  return round(x * _GRID) / _GRID


def _kind_weights(kinds: tuple[str, ...], skew: float) -> np.ndarray:
  w = 1.0 / np.arange(1, len(kinds) + 1) ** skew
  return w / w.sum()


def _apart(a, b, gap: float) -> bool:
  return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(config: ShapesConfig, rng: np.random.Generator, side: float, others, *,
           avoid_cell: tuple[int, int] | None = None):
  """A box of the given side at least min_gap away from `others` and the border, or None."""
  border = config.min_gap / 2
  for _ in range(_PLACEMENT_TRIES):
    x1 = _snap(rng.uniform(border, 1 - border - side))
    y1 = _snap(rng.uniform(border, 1 - border - side))
    box = (x1, y1, x1 + side, y1 + side)
    if avoid_cell is not None and _cell_index(box) == avoid_cell:
      continue
    if all(_apart(box, o.box, config.min_gap) for o in others):
      return box
  return None


def _sample_object(config: ShapesConfig, rng: np.random.Generator, others):
  shape = config.shapes[rng.choice(len(config.shapes), p=_kind_weights(config.shapes, config.kind_skew))]
  color = config.colors[rng.choice(len(config.colors), p=_kind_weights(config.colors, config.kind_skew))]
  size = config.sizes[rng.integers(len(config.sizes))]
  side = _snap(SIZES[size] * rng.uniform(1 - config.size_jitter, 1 + config.size_jitter))
  box = _place(config, rng, side, others)
  return None if box is None else ShapeObject(shape, color, size, box)


def _make(config: ShapesConfig, objects) -> Scene | None:
  """The scene of these objects, or None unless every object has a referring expression."""
  objects = tuple(sorted(objects, key=lambda o: (o.box[0], o.box[1])))
  if any(_referring_expression(objects, i) is None for i in range(len(objects))):
    return None
  return Scene(objects, config.shapes, config.colors, config.background)


def _sample_scene(config: ShapesConfig, rng: np.random.Generator) -> Scene:
  for _ in range(_SCENE_TRIES):
    objects = []
    for _ in range(rng.integers(config.min_objects, config.max_objects + 1)):
      obj = _sample_object(config, rng, objects)
      if obj is None:
        break
      objects.append(obj)
    else:
      scene = _make(config, objects)
      if scene is not None:
        return scene
  raise UserError(f"could not lay out a scene for {config}; lower max_objects or min_gap")


def _cell_index(box) -> tuple[int, int]:
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  return min(int(cy * 3), 2), min(int(cx * 3), 2)


def _cell(obj: ShapeObject) -> tuple[str, str]:
  """(name, locative phrase) of the object's coarse position: ('top left', 'at the top left')."""
  row, col = _cell_index(obj.box)
  return _CELLS[row][col]


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _count(n: int) -> str:
  return "one object" if n == 1 else f"{_NUMBERS[n]} objects"


def _referring_expression(objects, i: int) -> str | None:
  target = objects[i]
  for descriptor in _DESCRIPTORS:
    attributes = [a for a in descriptor if a != "direction"]
    group = [o for o in objects if all(getattr(o, a) == getattr(target, a) for a in attributes)]
    words = " ".join(getattr(target, a) for a in attributes)
    if "direction" not in descriptor:
      if len(group) == 1:
        return f"the {words}"
      continue
    for name, (axis, sign) in _DIRECTIONS.items():
      key = sign * target.center[axis]
      if all(key >= sign * o.center[axis] + _POSITION_MARGIN for o in group if o is not target):
        return f"the {name} {words}"
  return None


def _question(kind: tuple[str, str]) -> str:
  color, shape = kind
  return _QUESTION.format(article=_article(color), color=color, shape=shape)


def _draw(rng: np.random.Generator, pool: list, n: int) -> list:
  """n items of pool in random order, without repeats until the pool runs out."""
  order = [pool[i] for i in rng.permutation(len(pool))]
  return [order[i % len(order)] for i in range(n)]


def _draw_ranked(ranked: list, n: int) -> list:
  return [ranked[i % len(ranked)] for i in range(n)]


def _edit(config: ShapesConfig, scene_a: Scene, rng: np.random.Generator):
  """(scene_b, edits) with 1..max_differences edits of distinct objects, or None if one failed."""
  objects = list(scene_a.objects)
  untouched = list(scene_a.objects)  # objects of scene_a that no edit has used yet
  edits = []
  for _ in range(rng.integers(1, config.max_differences + 1)):
    feasible = [k for k, ok in (("added", len(objects) < config.max_objects),
                                ("removed", len(objects) > config.min_objects and untouched),
                                ("recoloured", untouched and len(config.colors) > 1),
                                ("moved", untouched)) if ok]
    if not feasible:
      break
    kind = feasible[rng.integers(len(feasible))]
    if kind == "added":
      new = _sample_object(config, rng, objects)
      if new is None:
        return None
      objects.append(new)
      edits.append((kind, None, new))
      continue
    old = untouched.pop(rng.integers(len(untouched)))
    objects.remove(old)
    if kind == "removed":
      edits.append((kind, old, None))
      continue
    if kind == "recoloured":
      colors = [c for c in config.colors if c != old.color]
      new = dataclasses.replace(old, color=colors[rng.integers(len(colors))])
    else:
      side = old.box[2] - old.box[0]
      box = _place(config, rng, side, objects, avoid_cell=_cell_index(old.box))
      if box is None:
        return None
      new = dataclasses.replace(old, box=box)
    objects.append(new)
    edits.append((kind, old, new))
  scene_b = _make(config, objects)
  # Each edit must be visible as exactly its own change, e.g. no added object equal to a removed one.
  a, b = set(scene_a.objects), set(objects)
  if (scene_b is None or a - b != {old for _, old, _ in edits if old is not None}
      or b - a != {new for _, _, new in edits if new is not None}):
    return None
  return scene_b, edits


def _difference_text(kind: str, old: ShapeObject | None, new: ShapeObject | None) -> str:
  if kind == "added":
    return _ADDED.format(object=new.description, position=_cell(new)[1])
  if kind == "removed":
    return _REMOVED.format(object=old.description, position=_cell(old)[1])
  if kind == "recoloured":
    return _RECOLOURED.format(size=old.size, shape=old.shape, position=_cell(old)[1], old=old.color,
                              new=new.color)
  return _MOVED.format(object=old.description, old=_cell(old)[0], new=_cell(new)[0])


def _join(items: list[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _describe_pair(scene_a: Scene, scene_b: Scene, edits) -> ScenePair:
  differences = tuple(Difference(kind, old, new, _difference_text(kind, old, new))
                      for kind, old, new in edits)
  n_a, n_b = len(scene_a.objects), len(scene_b.objects)
  common = [_COMMON_BACKGROUND]
  if n_a == n_b:
    common.append(_COMMON_COUNT.format(count=_count(n_a)))
  shared = [o for o in scene_a.objects if o in set(scene_b.objects)]
  if shared:
    common.append(_COMMON_OBJECTS.format(objects=_join(
        [f"{_article(o.size)} {o.description} {_cell(o)[1]}" for o in shared])))
  commonalities = " ".join(common)
  listed = [] if n_a == n_b else [_COUNTS_DIFFER.format(count_a=_count(n_a), count_b=_count(n_b))]
  listed += [f"{i}. {d.text}" for i, d in enumerate(differences, 1)]
  summary = _SUMMARY.format(commonalities=commonalities, differences=" ".join(listed))
  return ScenePair(scene_a, scene_b, differences, commonalities, summary)


def held_out_world(world: ShapesConfig) -> ShapesConfig:
  """The same shapes distribution with other scenes: evaluation never sees a training scene."""
  return dataclasses.replace(world, seed=world.seed + 10_000)


def describe_pair(scene_a: Scene, scene_b: Scene, edits) -> ScenePair:
  """The pair as make_pair describes it, for scene_b = scene_a with `edits` ((kind, object
  before or None, object after or None) each, kinds from DIFFERENCE_KINDS)."""
  return _describe_pair(scene_a, scene_b, edits)
