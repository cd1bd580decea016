"""MME (Fu et al. 2023): yes/no questions, two per image, over 10 perception and 4 cognition
subtasks.

Files: the folder `MME_Benchmark_release_version` (published on the MME project page /
Hugging Face `lmms-lab/MME`): one folder per subtask holding either the images and a
`NAME.txt` per image, or `images/` and `questions_answers_YN/`. Each text file has one
`question<TAB>answer` line per question (answer Yes or No). The question (which already asks
"Please answer yes or no.") gets LLaVA-1.5's short-answer suffix. Scored as MME's
`eval_tool/calculation.py`: an answer is its lower-case text when that is "yes" or "no", else
whichever of them its first four characters contain ("other" otherwise); per subtask accuracy
(%, over questions) and accuracy+ (%, over images with every question right), score = their sum;
perception and cognition are the sums of their subtasks' scores.
"""

import os

from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks.benchmark import SHORT_ANSWER, Benchmark, Item

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
_IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def _pairs(subtask_dir: str) -> list[tuple[str, str]]:
  """(question file, image path relative to the subtask's folder) of every image."""
  split = os.path.isdir(os.path.join(subtask_dir, "questions_answers_YN"))
  text_dir = os.path.join(subtask_dir, "questions_answers_YN") if split else subtask_dir
  image_dir = "images" if split else ""
  pairs = []
  for name in sorted(os.listdir(text_dir)):
    if not name.endswith(".txt"):
      continue
    stem = name[:-4]
    image = next((os.path.join(image_dir, stem + ext) for ext in _IMAGE_EXTENSIONS
                  if os.path.exists(os.path.join(subtask_dir, image_dir, stem + ext))),
                 os.path.join(image_dir, stem + ".jpg"))  # missing: a counted skip later
    pairs.append((os.path.join(text_dir, name), image))
  return pairs


def load(data: str, images: str | None) -> list[Item]:
  if not os.path.isdir(data):
    raise UserError(f"--data {data}: expected the MME_Benchmark_release_version folder")
  subtasks = [s for s in PERCEPTION + COGNITION if os.path.isdir(os.path.join(data, s))]
  if not subtasks:
    raise UserError(f"{data}: holds none of MME's subtask folders ({', '.join(PERCEPTION)}, ...)")
  items = []
  for subtask in subtasks:
    for text_file, image in _pairs(os.path.join(data, subtask)):
      with open(text_file, encoding="utf-8-sig") as f:
        lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]
      for k, (number, line) in enumerate(lines):
        question, tab, truth = line.rpartition("\t")
        if not tab or truth.strip().lower() not in ("yes", "no"):
          raise UserError(f"{text_file}:{number}: expected 'question<TAB>Yes' or "
                          "'question<TAB>No'")
        stem = os.path.splitext(os.path.basename(text_file))[0]
        items.append(Item(f"{subtask}/{stem}/{k}", question.strip() + "\n" + SHORT_ANSWER,
                          (os.path.join(subtask, image),),
                          {"subtask": subtask, "image": stem, "label": truth.strip().lower()}))
  return items


def parse(answer: str) -> str:
  """MME's calculation.py parse_pred_ans: 'yes', 'no' or 'other'."""
  answer = answer.lower()
  if answer in ("yes", "no"):
    return answer
  prefix = answer[:4]
  return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def score(items: list[Item], answers: dict[str, str]) -> dict:
  metrics = {}
  for subtask in PERCEPTION + COGNITION:
    chosen = [item for item in items if item.truth["subtask"] == subtask]
    if not chosen:
      continue
    right = {item.id: parse(answers[item.id]) == item.truth["label"] for item in chosen}
    images = {}
    for item in chosen:
      images.setdefault(item.truth["image"], []).append(right[item.id])
    acc = 100 * sum(right.values()) / len(right)
    acc_plus = 100 * sum(all(v) for v in images.values()) / len(images)
    metrics[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
  metrics["perception"] = sum(metrics[s]["score"] for s in PERCEPTION if s in metrics)
  metrics["cognition"] = sum(metrics[s]["score"] for s in COGNITION if s in metrics)
  return metrics


MME = Benchmark(load, score, max_new_tokens=16,
                files="the MME_Benchmark_release_version folder (images inside it)")
