"""POPE (Li et al. 2023): yes/no object-existence questions on COCO val2014 images.

Files: the annotation files `coco_pope_{random,popular,adversarial}.json` of the POPE repository
(`AoiDragon/POPE`, `output/coco/`; one JSON object a line: question_id, image, text, label),
given one by one or as the folder holding them; images from COCO val2014. The question gets
LLaVA-1.5's short-answer suffix, and an answer is normalised as LLaVA's `eval_pope.py` does: its
first sentence, commas dropped, "no" when the words include "No", "no" or "not", else "yes".
Metrics per split and their mean: accuracy, precision, recall, F1 (of "yes" as the positive
class) and the yes-ratio.
"""

import os

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import files
from lvlm_jax.eval.benchmarks.benchmark import SHORT_ANSWER, Benchmark, Item
from lvlm_jax.input_files import read_jsonl

SPLITS = ("random", "popular", "adversarial")


def annotation_files(data: str) -> dict[str, str]:
  """split -> file: the one file `data` names, or each split's file in the folder `data`."""
  if os.path.isdir(data):
    found = {s: os.path.join(data, f"coco_pope_{s}.json") for s in SPLITS}
    found = {s: p for s, p in found.items() if os.path.exists(p)}
    if not found:
      raise UserError(f"{data}: holds none of coco_pope_{{{','.join(SPLITS)}}}.json")
    return found
  name = os.path.basename(data)
  split = next((s for s in SPLITS if s in name), os.path.splitext(name)[0])
  return {split: files.exists(data, "a POPE annotation file")}


def load(data: str, images: str | None) -> list[Item]:
  items = []
  for split, path in annotation_files(data).items():
    for number, row in read_jsonl(path, "POPE rows: question_id, image, text, label"):
      where = f"{path}:{number}"
      label = files.field(row, "label", where).strip().lower()
      if label not in ("yes", "no"):
        raise UserError(f"{where}: label {label!r} is neither yes nor no")
      qid = files.field(row, "question_id", where, (int, str))
      items.append(Item(f"{split}/{qid}",
                        files.field(row, "text", where) + "\n" + SHORT_ANSWER,
                        (files.field(row, "image", where),), {"split": split, "label": label}))
  return items


def normalize(text: str) -> str:
  """LLaVA's eval_pope.py: 'yes' or 'no'."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if "No" in words or "not" in words or "no" in words else "yes"


def binary_metrics(predicted: list[str], labels: list[str]) -> dict[str, float]:
  """Accuracy, precision, recall, F1 with "yes" positive, and the share of "yes" answers."""
  pairs = list(zip(predicted, labels, strict=True))
  tp = sum(p == "yes" and t == "yes" for p, t in pairs)
  fp = sum(p == "yes" and t == "no" for p, t in pairs)
  tn = sum(p == "no" and t == "no" for p, t in pairs)
  fn = sum(p == "no" and t == "yes" for p, t in pairs)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  return {"accuracy": (tp + tn) / max(len(pairs), 1), "precision": precision, "recall": recall,
          "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
          "yes_ratio": (tp + fp) / max(len(pairs), 1), "questions": len(pairs)}


def score(items: list[Item], answers: dict[str, str]) -> dict:
  splits = {}
  for split in dict.fromkeys(item.truth["split"] for item in items):
    chosen = [item for item in items if item.truth["split"] == split]
    splits[split] = binary_metrics([normalize(answers[item.id]) for item in chosen],
                                   [item.truth["label"] for item in chosen])
  means = {f"mean_{key}": sum(m[key] for m in splits.values()) / max(len(splits), 1)
           for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
  return {**splits, **means}


POPE = Benchmark(load, score, max_new_tokens=16,
                 files="coco_pope_{random,popular,adversarial}.json (file or folder); "
                 "--images COCO val2014")
