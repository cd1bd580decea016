"""VQA answer normalisation and accuracy (the VQA v2 evaluation, as EvalAI's answer processor
and TextVQA's evaluator apply them). The tables are data: `data/vqa_normalization.json`.

normalize: lower-case; newlines and tabs to spaces; "," and "?" dropped and "'s" split off
(EvalAI's word_tokenize); each punctuation mark removed when it touches a space or the text has
a digit-comma-digit, else made a space; periods not followed by a digit removed; number words
to digits, articles dropped, contractions restored. accuracy: an answer's score is the mean,
over the ten leave-one-out subsets of the reference answers, of min(1, matches / 3).
"""

import functools
import importlib.resources
import json
import re

_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # VQA's own pattern: (?!<=\d) is no lookbehind
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


@functools.cache
def tables() -> dict:
  path = importlib.resources.files("lvlm_jax.eval.benchmarks") / "data" / "vqa_normalization.json"
  return json.loads(path.read_text(encoding="utf-8"))


def normalize(answer: str) -> str:
  table = tables()
  text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  out = text
  for mark in table["punctuation"]:
    if mark + " " in text or " " + mark in text or _COMMA_BETWEEN_DIGITS.search(text):
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  out = _PERIOD.sub("", out)
  words = [table["number_words"].get(w, w) for w in out.lower().split()]
  words = [table["contractions"].get(w, w) for w in words if w not in table["articles"]]
  return " ".join(words)


def accuracy(prediction: str, references: list[str]) -> float:
  """VQA accuracy of one prediction against its (usually ten) reference answers."""
  predicted = normalize(prediction)
  answers = [normalize(r) for r in references]
  scores = [min(1.0, sum(a == predicted for j, a in enumerate(answers) if j != i) / 3)
            for i in range(len(answers))]
  return sum(scores) / len(scores)
