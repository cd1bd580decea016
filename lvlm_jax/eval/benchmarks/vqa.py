"""Open-ended VQA: GQA testdev-balanced and TextVQA val.

GQA files: `testdev_balanced_questions.json` (GQA's questions release: an object of question id
-> {imageId, question, answer, types}); --images the GQA `images/` folder (`{imageId}.jpg`).
Scored as LLaVA's convert_gqa_for_eval + GQA's eval.py: the answer lower-cased with trailing
periods stripped must equal the reference (accuracy, and by structural type);
accuracy_normalized compares both after the VQA normalisation.

TextVQA files: `TextVQA_0.5.1_val.json` ({"data": [{question_id, image_id, question, answers
(ten)}]}); --images the `train_images/` folder (val images are in it, `{image_id}.jpg`).
Scored with VQA accuracy (`vqa_answers`), as LLaVA's m4c evaluator does. The prompt is the
question with LLaVA-1.5's short-answer suffix; when LLaVA's `llava_textvqa_val_v051_ocr.jsonl`
(LLaVA's `playground/data/eval/textvqa`) lies beside the file, its prompts are used instead
(the question, "Reference OCR token: ..." and the suffix), as LLaVA-1.5's reported number does.

GQA questions get the short-answer suffix.
"""

import os

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import files, vqa_answers
from lvlm_jax.eval.benchmarks.benchmark import SHORT_ANSWER, Benchmark, Item, mean_by
from lvlm_jax.input_files import read_jsonl


def load_gqa(data: str, images: str | None) -> list[Item]:
  questions = files.read_json(data, "GQA's testdev_balanced_questions.json")
  if not isinstance(questions, dict):
    raise UserError(f"{data}: expected an object of question id -> question (GQA's layout)")
  items = []
  for qid, row in questions.items():
    where = f"{data}: question {qid!r}"
    if not isinstance(row, dict):
      raise UserError(f"{where}: expected an object")
    types = row.get("types") if isinstance(row.get("types"), dict) else {}
    items.append(Item(str(qid), files.field(row, "question", where) + "\n" + SHORT_ANSWER,
                      (files.field(row, "imageId", where) + ".jpg",),
                      {"answer": files.field(row, "answer", where),
                       "structural": types.get("structural", "")}))
  return items


def gqa_answer(text: str) -> str:
  """LLaVA's convert_gqa_for_eval."""
  return text.rstrip(".").lower()


def score_gqa(items: list[Item], answers: dict[str, str]) -> dict:
  exact = {item.id: gqa_answer(answers[item.id]) == item.truth["answer"] for item in items}
  normalized = [vqa_answers.normalize(answers[item.id]) ==
                vqa_answers.normalize(item.truth["answer"]) for item in items]
  return {"accuracy": sum(exact.values()) / max(len(items), 1),
          "accuracy_normalized": sum(normalized) / max(len(items), 1),
          "by_structural_type": mean_by((item.truth["structural"], exact[item.id])
                                        for item in items if item.truth["structural"])}


LLAVA_OCR_PROMPTS = "llava_textvqa_val_v051_ocr.jsonl"


def _ocr_prompts(data: str) -> dict[str, str]:
  """question id -> LLaVA's prompt with OCR tokens, from the file beside `data` (or none)."""
  path = os.path.join(os.path.dirname(os.path.abspath(data)), LLAVA_OCR_PROMPTS)
  if not os.path.exists(path):
    return {}
  return {str(files.field(row, "question_id", f"{path}:{n}", (int, str))):
          files.field(row, "text", f"{path}:{n}")
          for n, row in read_jsonl(path, "LLaVA's TextVQA prompts")}


def load_textvqa(data: str, images: str | None) -> list[Item]:
  raw = files.read_json(data, "TextVQA's TextVQA_0.5.1_val.json")
  ocr = _ocr_prompts(data)
  rows = raw.get("data") if isinstance(raw, dict) else None
  if not isinstance(rows, list):
    raise UserError(f"{data}: expected an object with a 'data' list (TextVQA's layout)")
  items = []
  for index, row in enumerate(rows):
    where = f"{data}: data[{index}]"
    if not isinstance(row, dict):
      raise UserError(f"{where}: expected an object")
    references = files.field(row, "answers", where, list)
    if not references or not all(isinstance(a, str) for a in references):
      raise UserError(f"{where}: 'answers' must be a non-empty list of strings")
    qid = str(files.field(row, "question_id", where, (int, str)))
    question = ocr.get(qid, files.field(row, "question", where) + "\n" + SHORT_ANSWER)
    items.append(Item(qid, question, (files.field(row, "image_id", where) + ".jpg",),
                      {"answers": references}))
  return items


def score_textvqa(items: list[Item], answers: dict[str, str]) -> dict:
  scores = [vqa_answers.accuracy(answers[item.id], item.truth["answers"]) for item in items]
  return {"vqa_accuracy": sum(scores) / max(len(scores), 1)}


GQA = Benchmark(load_gqa, score_gqa, max_new_tokens=16,
                files="testdev_balanced_questions.json; --images GQA images/")
TEXTVQA = Benchmark(load_textvqa, score_textvqa, max_new_tokens=16,
                    files="TextVQA_0.5.1_val.json; --images TextVQA train_images/")
