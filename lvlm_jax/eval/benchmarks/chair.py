"""CHAIR (Rohrbach et al. 2018): objects a model's image descriptions mention that the image
does not hold, on COCO val2014.

Files: --data COCO's `annotations/` folder (instances_val2014.json and captions_val2014.json,
from cocodataset.org's 2014 Train/Val annotations); --images the val2014 folder. The images are
asked in a fixed seeded order (seed 0 over the image ids); the first 500 are the default set
(--limit N for another size), as LURE and CSR describe 500 random val2014 images.
Prompt: "Please describe this image in detail." (LLaVA's detailed description).

Matching follows CHAIR's chair.py: a text is lower-cased, split into words, each singularised,
adjacent pairs that name an object joined ("hot dog", "teddy bear"; "baby X" / "adult X" of an
animal and "passenger jet/train" are the animal or vehicle; "toilet seat" a toilet, "home plate",
"train track" and "motor bike" nothing), a "seat" beside a "toilet" dropped, and the words that
name a COCO object (`data/coco_synonyms.txt`, chair.py's own table) mapped to its category. An image's truth is the categories of
its instance annotations and those its reference captions mention. CHAIR_i: hallucinated
mentions / mentions (every occurrence counts, as in chair.py); CHAIR_s: the share of descriptions
with a hallucinated mention; recall: truth objects some mention names / truth objects. Words are
split on non-letters rather than by NLTK's tokenizer, and singularised by rule (below), where
chair.py uses the `pattern` library: counts can differ from chair.py's on rare words.
"""

import functools
import importlib.resources
import os
import random
import re

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import files
from lvlm_jax.eval.benchmarks.benchmark import Benchmark, Item

PROMPT = "Please describe this image in detail."
IMAGES = 500
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
            "animal", "cub")
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "mice": "mouse",
              "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife",
              "wolves": "wolf", "leaves": "leaf", "shelves": "shelf", "loaves": "loaf",
              "halves": "half", "oxen": "ox", "buses": "bus", "people": "people",
              "scissors": "scissors", "skis": "ski", "series": "series", "species": "species"}


def singular(word: str) -> str:
  """A rule-based singular: irregular plurals, -ies, -(ch|sh|ss|x|z)es, -s (not -ss/-us/-is)."""
  if word in _IRREGULAR:
    return _IRREGULAR[word]
  if len(word) <= 3:
    return word
  if word.endswith("ies") and len(word) > 4:
    return word[:-3] + "y"
  if word.endswith(("ches", "shes", "sses", "xes", "zes")):
    return word[:-2]
  if word.endswith("s") and not word.endswith(("ss", "us", "is")):
    return word[:-1]
  return word


def _phrase(text: str) -> str:
  return " ".join(singular(w) for w in text.split())


@functools.cache
def tables() -> tuple[dict[str, str], dict[str, str]]:
  """(word -> COCO category, word pair -> what it becomes), both over singularised words."""
  path = importlib.resources.files("lvlm_jax.eval.benchmarks") / "data" / "coco_synonyms.txt"
  category_of = {}
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.strip() and not line.startswith("#"):
      names = [n.strip() for n in line.split(",") if n.strip()]
      for name in names:
        category_of[_phrase(name)] = names[0]
  pairs = {w: w for w in category_of if len(w.split()) == 2}
  pairs.update({f"{age} {a}": a for a in _ANIMALS for age in ("baby", "adult")})
  pairs.update({"passenger jet": "jet", "passenger train": "train", "bow tie": "tie",
                "toilet seat": "toilet", "home plate": "home plate", "train track": "train track",
                # chair.py joins "motor bike" but its table's entry has a leading space: nothing
                "motor bike": "motor bike"})
  return category_of, pairs


def mentions(text: str) -> list[str]:
  """The COCO categories `text` names, one per mention, in order."""
  category_of, pairs = tables()
  words = [singular(w) for w in re.findall(r"[a-z]+", text.lower())]
  joined, i = [], 0
  while i < len(words):
    pair = " ".join(words[i:i + 2])
    if pair in pairs:
      joined.append(pairs[pair])
      i += 2
    else:
      joined.append(words[i])
      i += 1
  if "toilet" in joined and "seat" in joined:
    joined = [w for w in joined if w != "seat"]
  return [category_of[w] for w in joined if w in category_of]


def load(data: str, images: str | None) -> list[Item]:
  folder = data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))
  instances = files.read_json(os.path.join(folder, "instances_val2014.json"),
                              "COCO's instances_val2014.json")
  captions = files.read_json(os.path.join(folder, "captions_val2014.json"),
                             "COCO's captions_val2014.json")
  for name, raw, keys in (("instances_val2014.json", instances, ("images", "annotations",
                                                                   "categories")),
                          ("captions_val2014.json", captions, ("annotations",))):
    if not isinstance(raw, dict) or any(not isinstance(raw.get(k), list) for k in keys):
      raise UserError(f"{os.path.join(folder, name)}: expected COCO's layout (an object with "
                      f"{', '.join(keys)} lists)")
  category_of, _ = tables()
  try:
    names = {c["id"]: c["name"] for c in instances["categories"]}
    truth = {image["id"]: set() for image in instances["images"]}
    file_names = {image["id"]: image["file_name"] for image in instances["images"]}
    for annotation in instances["annotations"]:
      truth[annotation["image_id"]].add(category_of.get(_phrase(names[annotation["category_id"]]),
                                                        names[annotation["category_id"]]))
    for annotation in captions["annotations"]:
      if annotation["image_id"] in truth:
        truth[annotation["image_id"]].update(mentions(annotation["caption"]))
  except (KeyError, TypeError) as e:
    raise UserError(f"{folder}: a COCO annotation lacks {e} (or names an unknown id); are "
                    "these COCO's val2014 annotation files?") from None
  order = sorted(truth)
  random.Random(0).shuffle(order)
  return [Item(str(i), PROMPT, (file_names[i],), {"objects": sorted(truth[i])}) for i in order]


def score(items: list[Item], answers: dict[str, str]) -> dict:
  said = {item.id: mentions(answers[item.id]) for item in items}
  total = sum(len(m) for m in said.values())
  wrong = {item.id: [m for m in said[item.id] if m not in item.truth["objects"]]
           for item in items}
  objects = sum(len(item.truth["objects"]) for item in items)
  recalled = sum(len(set(said[item.id]) & set(item.truth["objects"])) for item in items)
  return {"chair_s": sum(bool(w) for w in wrong.values()) / max(len(items), 1),
          "chair_i": sum(len(w) for w in wrong.values()) / max(total, 1),
          "recall": recalled / max(objects, 1),
          "mentions_per_description": total / max(len(items), 1),
          "words_per_description": sum(len(answers[i.id].split()) for i in items)
          / max(len(items), 1)}


CHAIR = Benchmark(load, score, max_new_tokens=512, default_limit=IMAGES,
                  files="COCO annotations/ (instances_val2014.json, captions_val2014.json); "
                  "--images COCO val2014")
