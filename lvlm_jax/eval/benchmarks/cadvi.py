"""CaD-VI's two-image evaluation sets (Lin et al. 2024): BISON, SVO-Probes, NLVR2, EQBEN, COLA,
and CaD-QA with a local LLM judge.

Files: the set's JSONL from CaD-VI's `eval_json_files/` (BISON.jsonl, SVO_Probes.jsonl,
NLVR2.jsonl, EQBEN.jsonl, COLA.jsonl, CaD_QA_eval.jsonl): one object a line with `image` (a
list of paths), `text` (the whole prompt, one `<image>` per image and the answer instruction
included), `answer`, `question_id`, optional `category`; --images the set's image folder (COCO
val2014 for BISON, Visual Genome for CaD-QA, the SparklesChat / EqBen / SVO releases).

The selection sets are scored as CaD-VI's `utils/compute_eval_acc`: an answer is right when its
text equals the reference exactly. accuracy over all questions; by_category by `category`, else
by the first image's top folder, when the paths have one; where every id is `N_k` (EQBEN, COLA:
a caption pair asked as two questions), paired_accuracy counts a pair right only when all its
questions are (compute_binaryimgselect_two_rounds.py).

CaD-QA: the model's open answers are rated 0-5 by a judge, any local HF causal LM (--judge DIR)
answering through the generation service with the prompt in `data/cadqa_judge.txt`; its first
digit 0-5 is the rating. The paper's judge (unreleased) was an API LLM; ratings from another
judge compare models only with each other.
"""

import functools
import importlib.resources
import re

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import files
from lvlm_jax.eval.benchmarks.benchmark import Benchmark, Item
from lvlm_jax.input_files import read_jsonl

_PAIRED = re.compile(r"^(.+)_(\d+)$")
_PLACEHOLDER_LINE = re.compile(r"^[^\n]*<image>[^\n]*\n?", re.MULTILINE)
_RATING = re.compile(r"(?<!\d)([0-5])(?!\d)")


def load(data: str, images: str | None) -> list[Item]:
  items = []
  for number, row in read_jsonl(data, "CaD-VI rows: image (a list), text, answer, "
                                      "question_id"):
    where = f"{data}:{number}"
    paths = files.field(row, "image", where, list)
    if not paths or not all(isinstance(p, str) for p in paths):
      raise UserError(f"{where}: 'image' must be a list of image paths")
    text = files.field(row, "text", where)
    if text.count("<image>") != len(paths):
      raise UserError(f"{where}: the text has {text.count('<image>')} <image> placeholders for "
                      f"{len(paths)} images")
    category = row.get("category") or (paths[0].split("/")[0] if "/" in paths[0] else "")
    items.append(Item(str(files.field(row, "question_id", where, (int, str))), text,
                      tuple(paths), {"answer": files.field(row, "answer", where),
                                     "category": category}))
  return items


def score(items: list[Item], answers: dict[str, str]) -> dict:
  right = {item.id: answers[item.id].strip() == item.truth["answer"].strip() for item in items}
  metrics = {"accuracy": sum(right.values()) / max(len(right), 1)}
  categories = {}
  for item in items:
    if item.truth["category"]:
      categories.setdefault(item.truth["category"], []).append(right[item.id])
  if categories:
    metrics["by_category"] = {k: sum(v) / len(v) for k, v in sorted(categories.items())}
  pairs = {}
  if items and all(_PAIRED.match(item.id) for item in items):
    for item in items:
      pairs.setdefault(_PAIRED.match(item.id).group(1), []).append(right[item.id])
    metrics["paired_accuracy"] = sum(all(v) for v in pairs.values()) / len(pairs)
    metrics["pairs"] = len(pairs)
  return metrics


@functools.cache
def judge_prompt() -> str:
  path = importlib.resources.files("lvlm_jax.eval.benchmarks") / "data" / "cadqa_judge.txt"
  return path.read_text(encoding="utf-8").strip()


def judge_items(items: list[Item], answers: dict[str, str]) -> list[Item]:
  """One text-only judge prompt per answered item (same ids): question (without the image
  lines), reference answer and the model's answer."""
  return [Item(item.id, judge_prompt().format(
      question=_PLACEHOLDER_LINE.sub("", item.question).strip(),
      reference=item.truth["answer"], answer=answers[item.id]))
          for item in items if item.id in answers]


def rating(text: str) -> int | None:
  """The judge's rating: the first digit 0-5 standing alone in its reply, else None."""
  match = _RATING.search(text)
  return int(match.group(1)) if match else None


def score_judged(items: list[Item], judgements: dict[str, str]) -> dict:
  """Mean 0-5 rating over the answers the judge rated; `unrated` replies held no rating."""
  ratings = [rating(judgements[item.id]) for item in items]
  rated = [r for r in ratings if r is not None]
  return {"mean_rating": sum(rated) / max(len(rated), 1), "rated": len(rated),
          "unrated": len(ratings) - len(rated),
          "rating_counts": {str(k): rated.count(k) for k in range(6)}}


def _selection(name: str) -> Benchmark:
  return Benchmark(load, score, max_new_tokens=16,
                   files=f"CaD-VI's eval_json_files/{name}; --images its image folder")


BISON = _selection("BISON.jsonl")
SVO_PROBES = _selection("SVO_Probes.jsonl")
NLVR2 = _selection("NLVR2.jsonl")
EQBEN = _selection("EQBEN.jsonl")
COLA = _selection("COLA.jsonl")
CADQA = Benchmark(load, score_judged, max_new_tokens=256, judge=judge_items,
                  files="CaD-VI's eval_json_files/CaD_QA_eval.jsonl; --images Visual Genome "
                  "(VG_100K, VG_100K_2); --judge an HF causal LM")
