"""CaD-VI's two-image sets (CaD-VI's eval_json_files layout): exact-match, per-category and
paired scoring by hand and on a tiny model; CaD-QA rated by a tiny local judge LLM."""

import json

import pytest

from lvlm_jax import evaluate
from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks import cadvi
from lvlm_jax.eval.benchmarks.benchmark import Item

from bench_helpers import answered, bench_service, save_image  # noqa: F401 (a fixture)

SELECT = ("Image 1: <image>\nImage 2: <image>\nWhich image suits the caption \"{}\" better?\n"
          "A. Image 1\nB. Image 2\nAnswer with the option's letter from the given choices "
          "directly.")


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.fixture
def eqben(tmp_path):
  """Two caption pairs (ids N_0 / N_1) over two sources' folders; one image missing."""
  rows = []
  for n, (folder, captions) in enumerate((("eqbensd/844", ("a dove", "an eagle")),
                                          ("eqbenkubric_cnt/12", ("1 towel", "3 towels")))):
    images = [f"{folder}/image0.png", f"{folder}/image1.png"]
    for k, caption in enumerate(captions):
      rows.append({"image": images, "text": SELECT.format(caption), "answer": "AB"[k],
                   "question_id": f"{n}_{k}"})
    for image in images:
      save_image(tmp_path / "images" / image, 40 * n + 5)
  (tmp_path / "images" / "eqbenkubric_cnt/12/image1.png").unlink()
  return _write(tmp_path / "EQBEN.jsonl", rows)


def test_rows_are_read_with_their_images_and_categories(eqben):
  items = cadvi.load(str(eqben), None)
  assert [i.id for i in items] == ["0_0", "0_1", "1_0", "1_1"]
  assert items[0].images == ("eqbensd/844/image0.png", "eqbensd/844/image1.png")
  assert items[0].question == SELECT.format("a dove")  # the prompt as the file has it
  assert [i.truth["category"] for i in items] == ["eqbensd"] * 2 + ["eqbenkubric_cnt"] * 2


def test_exact_match_per_category_and_paired_by_hand():
  items = [Item(f"{n}_{k}", "", (), {"answer": "AB"[k], "category": c})
           for n, c in enumerate(("sd", "sd", "kubric")) for k in range(2)]
  answers = {"0_0": "A", "0_1": "B", "1_0": "A", "1_1": "A", "2_0": " A", "2_1": "B."}
  metrics = cadvi.score(items, answers)
  # Right: 0_0, 0_1, 1_0, 2_0 ("B." is not "B": CaD-VI matches exactly, after a strip).
  assert metrics["accuracy"] == pytest.approx(4 / 6)
  assert metrics["by_category"] == {"kubric": 0.5, "sd": 0.75}
  assert metrics["paired_accuracy"] == pytest.approx(1 / 3) and metrics["pairs"] == 3


def test_unpaired_ids_have_no_paired_accuracy():
  items = [Item(str(n), "", (), {"answer": "True", "category": ""}) for n in range(3)]
  metrics = cadvi.score(items, {"0": "True", "1": "False", "2": "True"})
  assert metrics == {"accuracy": pytest.approx(2 / 3)}


def test_eqben_on_a_tiny_model(eqben, bench_service, tmp_path):
  items, answers, metrics = answered(cadvi.EQBEN, eqben, eqben.parent / "images", bench_service,
                                     tmp_path / "out")
  assert set(answers) == {"0_0", "0_1"}  # pair 1 lost an image: both its questions skipped
  right = [answers[i].strip() == a for i, a in (("0_0", "A"), ("0_1", "B"))]
  assert metrics["accuracy"] == pytest.approx(sum(right) / 2)
  assert metrics["paired_accuracy"] == float(all(right))


def test_a_placeholder_count_that_differs_names_the_line(tmp_path):
  path = _write(tmp_path / "NLVR2.jsonl", [
      {"image": ["a.png", "b.png"], "text": "Left image: <image>\nIs it True or False?",
       "answer": "True", "question_id": 0}])
  with pytest.raises(UserError, match=r"NLVR2.jsonl:1: the text has 1 <image> placeholders "
                     "for 2 images"):
    cadvi.load(str(path), None)


def test_judge_prompts_and_ratings():
  item = Item("7_9", "Image 1: <image>\nImage 2: <image>\nWhat colors dominate each image?",
              ("a.jpg", "b.jpg"), {"answer": "Image 1 is white, Image 2 is green.",
                                   "category": ""})
  [prompt] = cadvi.judge_items([item], {"7_9": "Both are blue."})
  assert prompt.id == "7_9" and not prompt.images
  assert "Question: What colors dominate each image?\n" in prompt.question
  assert "Reference answer: Image 1 is white, Image 2 is green.\n" in prompt.question
  assert "Answer to grade: Both are blue.\n" in prompt.question and "<image>" not in prompt.question
  assert cadvi.rating("4") == 4 and cadvi.rating("Rating: 2/5") == 2
  assert cadvi.rating("10 out of 10") is None and cadvi.rating("none") is None
  items = [Item(str(n), "", (), {}) for n in range(4)]
  metrics = cadvi.score_judged(items, {"0": "5", "1": "3", "2": "I cannot tell", "3": "1."})
  assert metrics["mean_rating"] == pytest.approx(3.0) and metrics["unrated"] == 1
  assert metrics["rating_counts"] == {"0": 0, "1": 1, "2": 0, "3": 1, "4": 0, "5": 1}


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
  """A tiny random Llama with a byte-level BPE tokenizer and a chat template: a text-only
  judge whose context holds the judge prompt."""
  import torch
  import transformers
  from conftest import TINY_LLAMA, bpe_tokenizer, save_tiny
  tokenizer = bpe_tokenizer(chat_template="{% for m in messages %}{{ m['role'] }}: "
                            "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
                            "assistant:{% endif %}")
  torch.manual_seed(3)
  config = transformers.LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer),
                                       "max_position_embeddings": 2048})
  directory = tmp_path_factory.mktemp("judge")
  save_tiny(transformers.LlamaForCausalLM(config), directory)
  tokenizer.save_pretrained(str(directory))
  return str(directory)


def test_cadqa_is_rated_by_the_judge(tiny_shapes_export, judge_dir, tmp_path, capsys):
  rows = [{"image": [f"VG_100K/{n}.jpg", f"VG_100K_2/{n + 10}.jpg"],
           "text": "Image 1: <image>\nImage 2: <image>\nWhat differs between the images?",
           "answer": "Image 1 is dark, Image 2 is bright.", "question_id": f"{n}_{n + 10}"}
          for n in range(3)]
  for n in range(3):
    save_image(tmp_path / "vg" / "VG_100K" / f"{n}.jpg", 20 + n)
    save_image(tmp_path / "vg" / "VG_100K_2" / f"{n + 10}.jpg", 200 - n)
  data = _write(tmp_path / "CaD_QA_eval.jsonl", rows)
  out = tmp_path / "out"
  argv = ["--model", tiny_shapes_export, "--benchmark", "cadqa", "--data", str(data),
          "--images", str(tmp_path / "vg"), "--judge", judge_dir, "--output_dir", str(out),
          "--max_new_tokens", "6", "--batch_size", "2"]
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(argv)
  assert exit_info.value.code == 0, capsys.readouterr().err
  metrics = json.loads((out / "metrics.json").read_text())
  judgements = [json.loads(line) for line in open(out / "judgements.jsonl")]
  assert [j["id"] for j in judgements] == [r["question_id"] for r in rows]
  ratings = [cadvi.rating(j["answer"]) for j in judgements]
  rated = [r for r in ratings if r is not None]
  assert metrics["answered"] == 3 and metrics["rated"] == len(rated)
  assert metrics["mean_rating"] == pytest.approx(sum(rated) / max(len(rated), 1))


def test_cadqa_without_a_judge_is_refused_before_loading(tmp_path, capsys):
  data = _write(tmp_path / "CaD_QA_eval.jsonl", [{"image": ["a.jpg"], "text": "<image>\nq?",
                                                  "answer": "a", "question_id": "1"}])
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--model", str(tmp_path), "--benchmark", "cadqa", "--data", str(data),
                   "--output_dir", str(tmp_path / "o")])
  assert exit_info.value.code == 2
  assert "give --judge DIR" in capsys.readouterr().err
