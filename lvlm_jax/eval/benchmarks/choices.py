"""Multiple-choice benchmarks answered with a letter: ScienceQA-IMG, MMBench-dev, SEED-Bench.

ScienceQA-IMG files: LLaVA's `llava_test_CQM-A.json` (`playground/data/eval/scienceqa`; a JSON
list of {id, image, conversations}: the question with its context and options, then "The answer
is X." or "X"); --images ScienceQA's `images/test`. Only the questions with an image are asked
(the IMG subset). The answer is read as LLaVA's eval_science_qa.py does: the text itself when a
letter, its first character when followed by ". ", else the one "The answer is X." in it.

MMBench-dev files: `mmbench_dev_20230712.tsv` (OpenCompass' MMBench release: index, question,
hint, A-D, answer, category, image as base64). Circular evaluation: a question with n options is
asked n times, the options rotated by one each time; it is right when every pass is.
round0_accuracy is the single pass with the options as published.

SEED-Bench files: `SEED-Bench.json` ({"questions": [...], "question_type": {name: id}}); the
image questions (data_type "image") are asked; --images the `SEED-Bench-image/` folder
(`data_id`, or `data_id.jpg` when it has no extension). Accuracy overall and per question type.

Every question gets LLaVA-1.5's letter suffix.
"""

import base64
import binascii
import csv
import os
import re
import sys

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import files
from lvlm_jax.eval.benchmarks.benchmark import LETTER_ANSWER, Benchmark, Item, mean_by

LETTERS = "ABCDEFGHIJ"
_SQA_OPTIONS = "ABCDE"
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def letter(text: str, options: dict[str, str]) -> str | None:
  """The option letter an answer picks: the letter itself, or one before '.', ')' or ':', a
  '(X)', or an option's exact text; None when it picks none of `options` (letter -> text)."""
  text = text.strip()
  match = re.match(r"^\(?([A-J])(?:[.):\s]|$)", text)
  if match and match.group(1) in options:
    return match.group(1)
  by_text = {v.strip().lower(): k for k, v in options.items()}
  return by_text.get(text.rstrip(".").lower())


def sqa_letter(text: str) -> str:
  """LLaVA's eval_science_qa.py: the predicted letter, or 'FAILED'."""
  if text in _SQA_OPTIONS:
    return text
  if len(text) >= 3 and text[0] in _SQA_OPTIONS and text[1:3] == ". ":
    return text[0]
  found = _THE_ANSWER_IS.findall(text)
  return found[0] if len(found) == 1 else "FAILED"


def load_scienceqa(data: str, images: str | None) -> list[Item]:
  rows = files.read_json(data, "LLaVA's llava_test_CQM-A.json")
  if not isinstance(rows, list):
    raise UserError(f"{data}: expected a JSON list of questions (LLaVA's llava_test_CQM-A.json)")
  items = []
  for index, row in enumerate(rows):
    where = f"{data}: question {index}"
    if not isinstance(row, dict):
      raise UserError(f"{where}: expected an object")
    if not row.get("image"):
      continue
    turns = files.field(row, "conversations", where, list)
    if len(turns) < 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                 for t in turns[:2]):
      raise UserError(f"{where}: 'conversations' must hold the question and the answer turns")
    truth = sqa_letter(turns[1]["value"].strip())
    if truth == "FAILED":
      raise UserError(f"{where}: its answer {turns[1]['value']!r} names no option letter")
    question = turns[0]["value"].replace("<image>", "").strip()
    if not question.endswith(LETTER_ANSWER):
      question += "\n" + LETTER_ANSWER
    items.append(Item(str(files.field(row, "id", where, (int, str))), question,
                      (files.field(row, "image", where),), {"answer": truth}))
  if not items:
    raise UserError(f"{data}: none of its questions has an image")
  return items


def score_scienceqa(items: list[Item], answers: dict[str, str]) -> dict:
  right = [sqa_letter(answers[item.id].strip()) == item.truth["answer"] for item in items]
  return {"img_accuracy": sum(right) / max(len(right), 1)}


def _present(value) -> bool:
  return value is not None and value.strip() not in ("", "nan", "NaN", "none", "None")


def load_mmbench(data: str, images: str | None) -> list[Item]:
  files.exists(data, "MMBench's mmbench_dev_20230712.tsv")
  csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
  items = []
  with open(data, encoding="utf-8-sig", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t")
    missing = {"index", "question", "A", "B", "answer", "image"} - set(reader.fieldnames or ())
    if missing:
      raise UserError(f"{data}:1: the header lacks {sorted(missing)} (MMBench's TSV layout)")
    for number, row in enumerate(reader, 2):
      where = f"{data}:{number}"
      options = [row[k].strip() for k in "ABCD" if _present(row.get(k))]
      answer = (row.get("answer") or "").strip()
      if answer not in "ABCD"[:len(options)] or not answer:
        raise UserError(f"{where}: answer {answer!r} is none of its {len(options)} options")
      try:
        image = base64.b64decode(row["image"], validate=True)
      except (binascii.Error, ValueError, TypeError):
        raise UserError(f"{where}: the image column is not base64") from None
      question = row["question"].strip()
      if _present(row.get("hint")):
        question = row["hint"].strip() + "\n" + question
      correct = options["ABCD".index(answer)]
      for shift in range(len(options)):
        rotated = options[shift:] + options[:shift]
        text = question + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(rotated))
        items.append(Item(f"{row['index']}/{shift}", text + "\n" + LETTER_ANSWER, (image,), {
            "index": row["index"], "round": shift, "answer": LETTERS[rotated.index(correct)],
            "options": dict(zip(LETTERS, rotated)), "category": row.get("category") or ""}))
  if not items:
    raise UserError(f"{data}: holds no questions")
  return items


def score_mmbench(items: list[Item], answers: dict[str, str]) -> dict:
  passes, categories = {}, {}
  for item in items:
    right = letter(answers[item.id], item.truth["options"]) == item.truth["answer"]
    passes.setdefault(item.truth["index"], {})[item.truth["round"]] = right
    categories[item.truth["index"]] = item.truth["category"]
  circular = {index: all(rounds.values()) for index, rounds in passes.items()}
  first = [rounds[0] for rounds in passes.values() if 0 in rounds]
  return {"circular_accuracy": sum(circular.values()) / max(len(circular), 1),
          "round0_accuracy": sum(first) / max(len(first), 1), "questions": len(circular),
          "by_category": mean_by((categories[index], right) for index, right in circular.items()
                                 if categories[index])}


def load_seed(data: str, images: str | None) -> list[Item]:
  raw = files.read_json(data, "SEED-Bench.json")
  rows = raw.get("questions") if isinstance(raw, dict) else None
  if not isinstance(rows, list):
    raise UserError(f"{data}: expected an object with a 'questions' list (SEED-Bench's layout)")
  names = {v: k for k, v in raw.get("question_type", {}).items()}
  items = []
  for index, row in enumerate(rows):
    where = f"{data}: questions[{index}]"
    if not isinstance(row, dict):
      raise UserError(f"{where}: expected an object")
    if row.get("data_type", "image") != "image":
      continue
    options = {k: files.field(row, f"choice_{k.lower()}", where) for k in "ABCD"}
    answer = files.field(row, "answer", where)
    if answer not in options:
      raise UserError(f"{where}: answer {answer!r} is not one of A-D")
    image = files.field(row, "data_id", where)
    if not os.path.splitext(image)[1]:
      image += ".jpg"
    text = files.field(row, "question", where) + "".join(
        f"\n{k}. {v}" for k, v in options.items())
    kind = row.get("question_type_id", "")
    items.append(Item(str(files.field(row, "question_id", where, (int, str))),
                      text + "\n" + LETTER_ANSWER, (image,),
                      {"answer": answer, "options": options, "type": names.get(kind, str(kind))}))
  if not items:
    raise UserError(f"{data}: holds no image questions")
  return items


def score_seed(items: list[Item], answers: dict[str, str]) -> dict:
  right = {item.id: letter(answers[item.id], item.truth["options"]) == item.truth["answer"]
           for item in items}
  return {"accuracy": sum(right.values()) / max(len(right), 1),
          "by_question_type": mean_by((item.truth["type"], right[item.id]) for item in items)}


SCIENCEQA = Benchmark(load_scienceqa, score_scienceqa, max_new_tokens=16,
                      files="LLaVA's llava_test_CQM-A.json; --images ScienceQA images/test")
MMBENCH = Benchmark(load_mmbench, score_mmbench, max_new_tokens=16,
                    files="mmbench_dev_20230712.tsv (images inside it)")
SEED = Benchmark(load_seed, score_seed, max_new_tokens=16,
                 files="SEED-Bench.json; --images SEED-Bench-image/")
