"""The shapes world: determinism, exact ground truth, and the record schema."""

import collections
import dataclasses
import itertools
import json
import pickle
import re

import grain
import numpy as np
import pytest

from lvlm_jax.data import shapes
from lvlm_jax.data.text import BoxFormat
from lvlm_jax.errors import UserError

CONFIG = shapes.ShapesConfig(seed=7)
# Every kind the world knows and crowded scenes, so duplicates and position words occur often.
WIDE = shapes.ShapesConfig(seed=1, shapes=shapes.SHAPES, colors=tuple(shapes.COLORS),
                           sizes=("small", "medium"), min_objects=3, max_objects=7, max_differences=3)
N = 150
MARGIN = 0.1  # a superlative ("the leftmost ...") must win by a tenth of the image to be visibly true


def _scenes(config=CONFIG, n=N):
  return [shapes.make_scene(config, i) for i in range(n)]


def _resolve(scene: shapes.Scene, expression: str) -> int | None:
  """The object an expression names, by reading it against the scene; None if it names != 1."""
  words = expression.split()
  assert words[0] == "the"
  direction = words[1] if words[1].endswith("most") else None
  attributes = words[2:] if direction else words[1:]
  shape = attributes[-1]
  size = next((w for w in attributes if w in shapes.SIZES), None)
  color = next((w for w in attributes if w in shapes.COLORS), None)
  assert len(attributes) == 1 + (size is not None) + (color is not None), expression
  group = [i for i, o in enumerate(scene.objects)
           if o.shape == shape and size in (None, o.size) and color in (None, o.color)]
  if direction is None:
    return group[0] if len(group) == 1 else None
  axis, sign = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}[direction]
  keys = sorted(((sign * scene.objects[i].center[axis], i) for i in group), reverse=True)
  # A superlative names an object only when it clearly wins.
  if len(keys) >= 2 and keys[0][0] - keys[1][0] < MARGIN:
    return None
  return keys[0][1]


def test_same_index_same_scene_pixels_and_text():
  for task in shapes.TASKS:
    a, b = shapes.ShapesSource(CONFIG, task, 10)[3], shapes.ShapesSource(CONFIG, task, 10)[3]
    for x, y in zip(a.pop("images"), b.pop("images")):
      np.testing.assert_array_equal(x, y)
    assert a == b
  scenes = _scenes(n=20)
  assert len(set(scenes)) == 20
  assert shapes.make_scene(shapes.ShapesConfig(seed=8), 3) != scenes[3]
  assert shapes.make_pair(CONFIG, 4) == shapes.make_pair(CONFIG, 4)


def test_layout_is_inside_and_occlusion_free():
  counts = collections.Counter()
  for config in (CONFIG, WIDE):
    for scene in _scenes(config):
      assert config.min_objects <= len(scene.objects) <= config.max_objects
      counts[len(scene.objects)] += 1
      for i, a in enumerate(scene.objects):
        x1, y1, x2, y2 = a.box
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        side = shapes.SIZES[a.size]
        assert side * 0.89 <= x2 - x1 <= side * 1.11 and x2 - x1 == y2 - y1
        for b in scene.objects[i + 1:]:
          gap = max(b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])
          assert gap >= config.min_gap - 1e-9
  assert set(counts) == set(range(1, 8))


def test_pixels_have_the_object_colours():
  for scene in _scenes(WIDE, 60):
    image = shapes.render(scene, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    inside = np.zeros((64, 64), bool)
    for obj in scene.objects:
      cx, cy = obj.center
      np.testing.assert_array_equal(image[int(cy * 64), int(cx * 64)], shapes.COLORS[obj.color])
      x1, y1, x2, y2 = (int(np.floor(v * 64)) for v in obj.box)
      inside[y1:y2 + 1, x1:x2 + 1] = True
    np.testing.assert_array_equal(image[~inside], np.broadcast_to(scene.background, image[~inside].shape))


def test_geometry_is_the_same_at_every_resolution():
  area = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}
  for scene in _scenes(WIDE, 20):
    for size, tolerance in ((64, 0.25), (256, 0.06)):
      image = shapes.render(scene, size)
      for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        window = (slice(int(y1 * size), int(np.ceil(y2 * size))), slice(int(x1 * size), int(np.ceil(x2 * size))))
        ys, xs = np.nonzero(np.all(image[window] == shapes.COLORS[obj.color], axis=-1))
        # The drawn extent is the box, to a pixel, at both resolutions.
        assert abs((xs.min() + window[1].start) / size - x1) <= 1 / size
        assert abs((xs.max() + 1 + window[1].start) / size - x2) <= 1 / size
        assert abs((ys.max() + 1 + window[0].start) / size - y2) <= 1 / size
        expected = area[obj.shape] * ((x2 - x1) * size) ** 2
        assert abs(len(xs) / expected - 1) <= tolerance, (obj, size, len(xs), expected)


def test_referring_expressions_name_exactly_one_object_with_fewest_words():
  directions = 0
  for scene in _scenes(CONFIG) + _scenes(WIDE):
    expressions = shapes.referring_expressions(scene)
    assert [i for _, _, i in expressions] == list(range(len(scene.objects)))
    for expression, box, i in expressions:
      assert _resolve(scene, expression) == i, (expression, scene)
      assert box == scene.objects[i].box
      directions += expression.split()[1].endswith("most")
      # No shorter expression names the object; at equal length attributes beat position words.
      obj = scene.objects[i]
      length = len(expression.split())
      for attributes in itertools.product(("", obj.size), ("", obj.color)):
        for direction in ("", "leftmost", "rightmost", "topmost", "bottommost"):
          words = ["the", direction, *attributes, obj.shape]
          candidate = " ".join(w for w in words if w)
          shorter = len(candidate.split()) < length or (
              len(candidate.split()) == length and not direction and candidate != expression
              and expression.split()[1].endswith("most"))
          if shorter:
            assert _resolve(scene, candidate) != i, (candidate, expression)
  assert directions > 10


def test_caption_is_exact():
  for scene in _scenes(WIDE, 60):
    text = shapes.caption(scene)
    sentences = re.findall(r"[^.]+\.", text)
    n = len(scene.objects)
    assert sentences[0] == f"There are {shapes._NUMBERS[n]} objects in the image."
    assert shapes.mentioned_objects(" ".join(sentences[1:n + 1])) == [
        (o.size, o.color, o.shape) for o in scene.objects]
    for sentence, obj in zip(sentences[1:n + 1], scene.objects):
      position = re.fullmatch(r" An? \w+ \w+ \w+ is (?:at|in|on) the ([a-z ]+)\.", sentence).group(1)
      row = 0 if "top" in position else 2 if "bottom" in position else 1
      column = 0 if "left" in position else 2 if "right" in position else 1
      assert (row, column) == (min(int(obj.center[1] * 3), 2), min(int(obj.center[0] * 3), 2))
    assert all(shapes.has_object(scene, *m) for m in shapes.mentioned_objects(text))
    relations = sentences[n + 1:]
    assert len(relations) == n - 1
    for sentence in relations:
      first, relation, second = re.fullmatch(r" (.+) is (to the left of|above|below) (.+)\.", sentence).groups()
      a = scene.objects[_resolve(scene, first.lower())]
      b = scene.objects[_resolve(scene, second)]
      if relation == "to the left of":
        assert a.box[2] <= b.box[0]
      else:
        upper, lower = (a, b) if relation == "above" else (b, a)
        assert upper.box[3] <= lower.box[1]
  one = shapes.Scene(_scenes(n=1)[0].objects[:1], CONFIG.shapes, CONFIG.colors, CONFIG.background)
  assert shapes.caption(one).startswith("There is one object in the image. A ")


@pytest.mark.parametrize("mode", shapes.POPE_MODES)
def test_yes_no_questions_are_true_and_balanced(mode):
  rng = np.random.default_rng(0)
  answers = collections.Counter()
  for scene in _scenes():
    questions = shapes.yes_no_questions(scene, rng, mode, count=4)
    assert [a for _, a in questions].count("yes") == 2
    present = {(o.color, o.shape) for o in scene.objects}
    for position, (question, answer) in enumerate(questions):
      color, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question).groups()
      assert ((color, shape) in present) == (answer == "yes")
      answers[answer, position] += 1
      if answer == "no" and mode == "adversarial":
        assert any(color == c or shape == s for c, s in present)
    if mode == "popular":
      rank = lambda k: (CONFIG.colors.index(k[0]) + 1) * (CONFIG.shapes.index(k[1]) + 1)
      asked = [rank(re.findall(r"\w+", q)[3:5]) for q, a in questions if a == "no"]
      absent = [rank((c, s)) for s in CONFIG.shapes for c in CONFIG.colors if (c, s) not in present]
      assert sorted(asked) == sorted(absent)[:2]
  # Yes and no are equally likely at every position of the list.
  for position in range(4):
    assert 0.35 < answers["yes", position] / N < 0.65


def test_kinds_follow_the_skewed_world_frequency():
  objects = [o for s in _scenes(n=400) for o in s.objects]
  for key, kinds in (("color", CONFIG.colors), ("shape", CONFIG.shapes)):
    weights = 1 / np.arange(1, len(kinds) + 1) ** CONFIG.kind_skew
    counts = collections.Counter(getattr(o, key) for o in objects)
    observed = np.array([counts[k] for k in kinds]) / len(objects)
    np.testing.assert_allclose(observed, weights / weights.sum(), atol=0.03)


def test_source_yes_no_alternates_and_is_true():
  source = shapes.ShapesSource(CONFIG, "yes_no", 40, yes_no_mode="adversarial")
  for i in range(40):
    record = source[i]
    assert record["answer"] == ("yes" if i % 2 == 0 else "no") == record["conversations"][1]["value"]
    human = record["conversations"][0]["value"]
    assert human.startswith("<image>\nIs there ") and human.endswith("? Answer yes or no.")
    (mention,) = shapes.mentioned_objects(human)
    scene = shapes.Scene.from_json(record["scene"])
    assert shapes.has_object(scene, *mention) == (record["answer"] == "yes")


def test_pair_differences_are_real_and_complete():
  kinds = collections.Counter()
  for config in (CONFIG, WIDE):
    for index in range(N):
      pair = shapes.make_pair(config, index)
      a, b = set(pair.scene_a.objects), set(pair.scene_b.objects)
      before = [d.before for d in pair.differences if d.before is not None]
      after = [d.after for d in pair.differences if d.after is not None]
      # Exactly the edited objects change; nothing unchanged is listed; no object is edited twice.
      assert set(before) == a - b and len(before) == len(a - b)
      assert set(after) == b - a and len(after) == len(b - a)
      assert 1 <= len(pair.differences) <= config.max_differences
      for d in pair.differences:
        kinds[d.kind] += 1
        assert (d.before is None) == (d.kind == "added") and (d.after is None) == (d.kind == "removed")
        if d.kind == "recoloured":
          assert d.before.color != d.after.color and d.before.box == d.after.box
          assert (d.before.shape, d.before.size) == (d.after.shape, d.after.size)
        if d.kind == "moved":
          assert shapes._cell(d.before) != shapes._cell(d.after)
          assert _same_but_box(d.before, d.after)
        assert f". {d.text}" in pair.summary
      assert pair.summary.startswith(f"Commonalities: {pair.commonalities} Differences: ")
      for obj in a & b:
        assert obj.description in pair.commonalities
      for d in pair.differences:
        if d.before is not None:
          assert f"{d.before.description} {shapes._cell(d.before)[1]}" not in pair.commonalities
  assert set(kinds) == set(shapes.DIFFERENCE_KINDS)


def _same_but_box(x: shapes.ShapeObject, y: shapes.ShapeObject) -> bool:
  return (x.shape, x.color, x.size) == (y.shape, y.color, y.size) and x.box != y.box


def test_mentioned_objects():
  text = "Two small red circles, a blue square and a triangle; the large diamond is purple. crosses"
  assert shapes.mentioned_objects(text) == [
      ("small", "red", "circle"), ("", "blue", "square"), ("", "", "triangle"), ("large", "", "diamond"),
      ("", "", "cross")]
  scene = shapes.Scene((shapes.ShapeObject("circle", "red", "small", (0.1, 0.1, 0.2, 0.2)),),
                       CONFIG.shapes, CONFIG.colors, CONFIG.background)
  found = [shapes.has_object(scene, *m) for m in shapes.mentioned_objects(text)]
  assert found == [True, False, False, False, False]


def test_records_follow_the_schema():
  for task in shapes.TASKS:
    source = shapes.ShapesSource(CONFIG, task, 5)
    assert len(source) == 5
    record = pickle.loads(pickle.dumps(source))[2]
    assert record["id"] == f"shapes-{task}-7-2"
    assert json.loads(json.dumps(record["scene"])) == record["scene"]
    n_images = 2 if task == "pair" else 1
    assert len(record["images"]) == n_images
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in record["images"])
    extra = {"caption": {"conversations"}, "grounding": {"box", "expression"},
             "yes_no": {"conversations", "answer"}, "pair": {"conversations", "differences"},
             "region": {"conversations", "box", "expression", "full", "object"}, "unlabeled": set()}
    assert set(record) == {"id", "images", "scene"} | extra[task]
    if "conversations" in record:
      assert [t["from"] for t in record["conversations"]] == ["human", "gpt"]
      assert record["conversations"][0]["value"].count("<image>") == n_images
  caption = shapes.ShapesSource(CONFIG, "caption", 30)
  prompts = {caption[i]["conversations"][0]["value"] for i in range(30)}
  assert prompts == {f"<image>\n{p}" for p in shapes.CAPTION_PROMPTS}
  record = caption[4]
  assert record["conversations"][1]["value"] == shapes.caption(shapes.make_scene(CONFIG, 4))
  np.testing.assert_array_equal(record["images"][0], shapes.render(shapes.make_scene(CONFIG, 4), 64))

  grounding = shapes.ShapesSource(CONFIG, "grounding", 20)
  for i in range(20):
    record = grounding[i]
    scene = shapes.Scene.from_json(record["scene"])
    assert scene == shapes.make_scene(CONFIG, i)
    assert record["box"] == list(scene.objects[_resolve(scene, record["expression"])].box)

  record = shapes.ShapesSource(CONFIG, "pair", 3)[1]
  pair = shapes.make_pair(CONFIG, 1)
  assert record["conversations"][1]["value"] == pair.summary
  assert record["differences"] == [d.to_json() for d in pair.differences]
  assert shapes.Scene.from_json(record["scene"]["scene_b"]) == pair.scene_b
  with pytest.raises(IndexError):
    shapes.ShapesSource(CONFIG, "pair", 3)[3]


def test_region_records_describe_their_box_often_ambiguously():
  box_format = BoxFormat(grid=100)
  source = shapes.ShapesSource(WIDE, "region", 200, box_format=box_format)
  full = ambiguous = 0
  for i in range(len(source)):
    record = source[i]
    scene = shapes.Scene.from_json(record["scene"])
    obj = scene.objects[record["object"]]
    assert record["box"] == list(obj.box)
    assert record["expression"] == shapes.referring_expressions(scene)[record["object"]][0]
    question, answer = (t["value"] for t in record["conversations"])
    assert question == shapes.REGION_PROMPT.format(box=box_format.to_text(obj.box))
    assert question.startswith("<image>\nWhat is <ref>this</ref><box>(")
    np.testing.assert_allclose(box_format.parse(question), obj.box, atol=1 / 99)  # int() truncates
    if record["full"]:
      full += 1
      assert answer == record["expression"]
    else:
      assert answer == f"the {obj.color} {obj.shape}"
    # The answer names the object alone exactly when no neighbour shares its colour and shape.
    sharing = [o for o in scene.objects if (o.color, o.shape) == (obj.color, obj.shape)]
    assert shapes.shares_kind(scene, record["object"]) == (len(sharing) > 1)
    names_it = _resolve(scene, answer) == record["object"]
    assert names_it == (record["full"] or len(sharing) == 1)
    ambiguous += not names_it
  assert 0.15 < full / len(source) < 0.35 and ambiguous >= 10
  # The share is a knob of the world: all full, or none.
  for share in (0.0, 1.0):
    world = dataclasses.replace(WIDE, region_full_share=share)
    records = [shapes.ShapesSource(world, "region", 30)[i] for i in range(30)]
    assert all(r["full"] == bool(share) for r in records)


def test_grain_reads_the_source():
  source = shapes.ShapesSource(CONFIG, "caption", 8)
  dataset = grain.MapDataset.source(source).shuffle(seed=0)
  ids = sorted(dataset[i]["id"] for i in range(len(dataset)))
  assert ids == sorted(source[i]["id"] for i in range(8))


def test_bad_config_is_a_user_error():
  with pytest.raises(UserError, match="shapes"):
    shapes.ShapesConfig(shapes=("circle", "hexagon"))
  with pytest.raises(UserError, match="min_objects"):
    shapes.ShapesConfig(min_objects=3, max_objects=2)
  with pytest.raises(UserError, match="max_objects"):
    shapes.ShapesConfig(shapes=("circle",), colors=("red", "blue"), max_objects=2)
  with pytest.raises(UserError, match="task"):
    shapes.ShapesSource(CONFIG, "vqa", 3)
  with pytest.raises(UserError, match="region_full_share"):
    shapes.ShapesConfig(region_full_share=1.5)
  with pytest.raises(UserError, match="mode"):
    shapes.yes_no_questions(_scenes(n=1)[0], np.random.default_rng(0), "frequent")
  with pytest.raises(UserError, match="lay out"):
    shapes.make_scene(shapes.ShapesConfig(sizes=("large",), min_objects=9, max_objects=9), 0)
