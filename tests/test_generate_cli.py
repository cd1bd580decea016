"""`python -m lvlm_jax.generate`: prompts in, text out; batch JSONL mode; one-line errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lvlm_jax import generate as cli
from lvlm_jax.data import text
from lvlm_jax.data.images import ImageProcessing, load_image
from lvlm_jax.models import hf
from lvlm_jax.sampling.decode import SamplingConfig, generate

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()\n/"
PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_center_crop": True,
                "crop_size": {"height": 28, "width": 28}, "size": {"shortest_edge": 28},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}


def save_char_tokenizer(directory):
  """A character-level fast tokenizer for the tiny models: <pad> <s> </s> <unk>, characters,
  fillers, and <image> at 127 (the tiny LLaVA's image token id)."""
  from tokenizers import Tokenizer, decoders, models
  from transformers import PreTrainedTokenizerFast
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
  vocab.update({c: 4 + i for i, c in enumerate(CHARS)})
  vocab.update({f"<extra_{i}>": i for i in range(len(vocab), 127)})
  vocab["<image>"] = 127
  backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  backend.decoder = decoders.Fuse()
  PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                          pad_token="<pad>", unk_token="<unk>",
                          additional_special_tokens=["<image>"]).save_pretrained(str(directory))


@pytest.fixture(scope="module")
def llava_dir(tiny_llava_dir, tmp_path_factory):
  directory = tmp_path_factory.mktemp("llava_cli") / "model"
  shutil.copytree(tiny_llava_dir, directory)
  save_char_tokenizer(directory)
  (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
  return str(directory)


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
  directory = tmp_path_factory.mktemp("llama_cli") / "model"
  shutil.copytree(tiny_llama_dir, directory)
  save_char_tokenizer(directory)
  return str(directory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Two small photos-to-be of different aspect ratios."""
  directory = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for name, shape in (("wide.png", (20, 36, 3)), ("tall.png", (40, 24, 3))):
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(directory / name)
  return directory


def run(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  captured = capsys.readouterr()
  return exit_info.value.code, captured.out, captured.err


def test_help_describes_every_flag():
  result = subprocess.run([sys.executable, "-m", "lvlm_jax.generate", "--help"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0
  actions = [a for a in cli.build_parser()._actions if "--help" not in a.option_strings]
  assert len(actions) > 20
  for action in actions:
    assert action.help, action.option_strings
    assert action.option_strings[0] in result.stdout


def test_prompt_with_two_images_prints_the_greedy_answer(llava_dir, images, capsys):
  paths = [str(images / "wide.png"), str(images / "tall.png")]
  # --system: vicuna_v1's own system prompt would not fit the tiny model's 128-token context.
  code, out, err = run(["--model", llava_dir, "--prompt", "Compare the images.", "--image", *paths,
                        "--max_new_tokens", "8", "--min_new_tokens", "8", "--system", "A chat."],
                       capsys)
  assert code == 0, err
  # The same answer from the library: vicuna_v1 (the tokenizer has no chat template), one
  # "<image>\n" per image in front, pad-to-square preprocessing.
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(llava_dir)
  turns = text.ensure_image_placeholders([{"from": "human", "value": "Compare the images."}], 2)
  rendered = text.render(turns, tokenizer, "vicuna_v1", system="A chat.",
                         add_generation_prompt=True)
  assert rendered.text.startswith("<s>A chat. USER: <image>")
  ids, _ = text.tokenize(rendered, tokenizer, tokens_per_image=16)
  processing = ImageProcessing.from_hf_preprocessor_config(llava_dir)
  pixels = np.stack([processing(load_image(p)) for p in paths])[None]
  pad = -len(ids) % 32
  ids = np.concatenate([np.zeros(pad, np.int32), ids])[None]
  mask = (np.arange(ids.shape[1]) >= pad).astype(np.int32)[None]
  expected = generate(hf.load_lvlm(llava_dir), ids, mask, pixel_values=pixels,
                      config=SamplingConfig(max_new_tokens=8, min_new_tokens=8, eos_token_ids=(2,)))
  answer = tokenizer.decode(np.asarray(expected.tokens)[0], skip_special_tokens=True)
  assert out == answer + "\n"


def test_jsonl_batch_mode(llava_dir, images, tmp_path, capsys):
  """Records with 2, 1 and 1 images in batches of 2: the two identical one-image records land in
  batches of different shapes (2 image slots vs 1) and must get the same answer."""
  records = [{"id": "a", "prompt": "Image 1: <image>\nImage 2: <image>\nWhat differs?",
              "images": ["wide.png", "tall.png"]},
             {"id": "b", "prompt": "What is shown?", "image": "wide.png"},
             {"id": "c", "prompt": "What is shown?", "image": "wide.png"}]
  source = images / "in.jsonl"
  source.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  target = tmp_path / "out.jsonl"
  code, _, err = run(["--model", llava_dir, "--input_jsonl", str(source), "--output_jsonl",
                      str(target), "--batch_size", "2", "--max_new_tokens", "6",
                      "--system", "A chat."], capsys)
  assert code == 0, err
  assert "generating" in err  # the progress bar
  lines = [json.loads(line) for line in target.read_text().splitlines()]
  assert [r["id"] for r in lines] == ["a", "b", "c"]
  assert all(isinstance(r["response"], str) for r in lines)
  assert lines[0]["images"] == ["wide.png", "tall.png"]
  assert lines[1]["response"] == lines[2]["response"]
  assert not (tmp_path / "out.jsonl.partial").exists()


def test_beam_search_returns_ranked_answers(llama_dir, tmp_path, capsys):
  source = tmp_path / "in.jsonl"
  source.write_text(json.dumps({"prompt": "Say something."}) + "\n")
  target = tmp_path / "out.jsonl"
  code, _, err = run(["--model", llama_dir, "--input_jsonl", str(source), "--output_jsonl",
                      str(target), "--num_beams", "4", "--num_return_sequences", "2",
                      "--max_new_tokens", "6", "--template", "none"], capsys)
  assert code == 0, err
  record = json.loads(target.read_text())
  assert len(record["responses"]) == 2 and record["response"] == record["responses"][0]
  assert record["scores"][0] >= record["scores"][1]


def test_sampling_several_answers_per_prompt(llama_dir, tmp_path, capsys):
  """Each prompt's samples come from one prefill and land on that prompt's record."""
  source = tmp_path / "in.jsonl"
  source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                            for i, p in enumerate(["Say something.", "Count to three."])))
  target = tmp_path / "out.jsonl"
  code, _, err = run(["--model", llama_dir, "--input_jsonl", str(source), "--output_jsonl",
                      str(target), "--do_sample", "--temperature", "1.5",
                      "--num_return_sequences", "3", "--max_new_tokens", "6", "--template", "none",
                      "--batch_size", "4"], capsys)
  assert code == 0, err
  records = [json.loads(line) for line in target.read_text().splitlines()]
  assert [r["id"] for r in records] == [0, 1]
  for record in records:
    assert len(record["responses"]) == 3 and record["response"] == record["responses"][0]
  assert len({r for record in records for r in record["responses"]}) > 2


def test_system_prompt_of_the_flag_and_of_a_record(llava_dir):
  model = hf.load_lvlm(llava_dir)
  service = cli.generation_service(llava_dir, model, "vicuna_v1", system="A chat.")
  decode = lambda record: service.tokenizer.decode(
      service.check_room(cli.make_prompt(record, [], "vicuna_v1"), 8))
  assert decode({"prompt": "Hi."}) == "<s>A chat. USER: Hi. ASSISTANT:"
  assert decode({"prompt": "Hi.", "system": "Be brief."}) == "<s>Be brief. USER: Hi. ASSISTANT:"


@pytest.mark.parametrize("case", ["missing_image", "escaping_image", "bad_json", "no_model",
                                  "images_for_text_model", "beams_with_stop", "past_the_context"])
def test_user_errors_are_one_line_with_exit_2(case, llava_dir, llama_dir, images, tmp_path, capsys):
  source = tmp_path / "in.jsonl"
  argv = {
      "missing_image": ["--model", llava_dir, "--prompt", "hi", "--image", str(tmp_path / "no.png")],
      "escaping_image": ["--model", llava_dir, "--input_jsonl", str(source), "--output_jsonl",
                         str(tmp_path / "out.jsonl")],
      "bad_json": ["--model", llava_dir, "--input_jsonl", str(source), "--output_jsonl",
                   str(tmp_path / "out.jsonl")],
      "no_model": ["--model", str(tmp_path / "nothing"), "--prompt", "hi"],
      "images_for_text_model": ["--model", llama_dir, "--prompt", "hi", "--image",
                                str(images / "wide.png")],
      "beams_with_stop": ["--model", llama_dir, "--prompt", "hi", "--num_beams", "2",
                          "--stop", "."],
      # 3 prompt tokens + 126 new ones: one past the tiny model's 128 positions
      "past_the_context": ["--model", llama_dir, "--prompt", "a b", "--template", "none",
                           "--max_new_tokens", "126"],
  }[case]
  if case == "escaping_image":
    source.write_text(json.dumps({"prompt": "hi", "image": "../../etc/passwd"}) + "\n")
  if case == "bad_json":
    source.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
  code, out, err = run(argv, capsys)
  assert code == 2
  # Besides the error, stderr holds only the line naming the devices (printed before the model
  # loads, so after the input checks of bad_json).
  errors = [line for line in err.splitlines() if not line.startswith("lvlm_jax.generate: JAX ")]
  assert len(errors) == 1 and errors[0].startswith("error: "), err
  if case == "bad_json":
    assert "in.jsonl:2" in err
  if case == "past_the_context":
    assert "its 3 tokens plus 126 new ones exceed the model's context of 128" in err


def test_batch_mode_writes_as_it_goes_skips_bad_images_and_resumes(llava_dir, images, tmp_path,
                                                                  capsys):
  """Five records in batches of 2, the 4th with an undecodable image: it is skipped and counted
  (its line says why, naming file and line); with no tolerance the run stops after keeping the
  first batch's answers in the .partial file; a rerun resumes after the last complete batch
  (the kept answers are not regenerated) and ends with the file a straight run writes."""
  (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  records = [{"id": i, "prompt": "What is shown?", "image": "wide.png"} for i in range(5)]
  records[3]["image"] = "corrupt.png"
  source = images / "skip.jsonl"
  source.write_text("".join(json.dumps(r) + "\n" for r in records))
  argv = ["--model", llava_dir, "--input_jsonl", str(source), "--batch_size", "2",
          "--max_new_tokens", "4", "--system", "A chat."]
  straight = tmp_path / "straight.jsonl"
  code, _, err = run(argv + ["--output_jsonl", str(straight), "--max_skip_fraction", "0.2"], capsys)
  assert code == 0, err
  lines = [json.loads(line) for line in straight.read_text().splitlines()]
  assert [r["id"] for r in lines] == [0, 1, 2, 3, 4]
  assert "response" not in lines[3] and "skip.jsonl:4: image" in lines[3]["error"]
  assert all(isinstance(lines[i]["response"], str) for i in (0, 1, 2, 4))
  assert "1 skipped (first: " in err

  target = tmp_path / "out.jsonl"
  code, _, err = run(argv + ["--output_jsonl", str(target), "--max_skip_fraction", "0"], capsys)
  assert code == 2 and "skip.jsonl:4: image" in err and "out.jsonl.partial" in err
  partial = tmp_path / "out.jsonl.partial"
  kept = [json.loads(line) for line in partial.read_text().splitlines()]
  assert kept == lines[:2] and not target.exists()
  # The first batch as a marked answer, then a torn line as a kill mid-write leaves.
  kept[0]["response"] = "KEPT"
  partial.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": 2, "pro')
  code, _, err = run(argv + ["--output_jsonl", str(target), "--max_skip_fraction", "0.2"], capsys)
  assert code == 0, err
  assert "resuming" in err and "2 of 5 records already answered" in err
  resumed = [json.loads(line) for line in target.read_text().splitlines()]
  assert resumed[0]["response"] == "KEPT" and resumed[1:] == lines[1:]
  assert not partial.exists()


def test_unusable_output_is_refused_before_loading(tmp_path, capsys):
  """The output path is checked first: --model does not even exist here, and the error is
  about the output."""
  source = tmp_path / "in.jsonl"
  source.write_text(json.dumps({"prompt": "hi"}) + "\n")
  (tmp_path / "file").write_text("")
  for output, words in ((tmp_path / "file" / "out.jsonl", "exists and is not a directory"),
                        (tmp_path / "file" / "sub" / "out.jsonl", "cannot write there"),
                        (tmp_path, "is a directory")):
    code, _, err = run(["--model", str(tmp_path / "nothing"), "--input_jsonl", str(source),
                        "--output_jsonl", str(output)], capsys)
    assert code == 2 and err.startswith("error: --output_jsonl") and words in err, err


def test_answer_start_reproduces_the_evaluators_grounding_answers(tiny_shapes_export, tmp_path,
                                                                  capsys):
  """The CLI and the shapes evaluator build prompts with the one prompt builder: the same
  grounding questions give the same greedy answers, token for token."""
  from flax import nnx
  from lvlm_jax.data.pipeline import DataConfig
  from lvlm_jax.data.shapes import ShapesConfig, ShapesSource
  from lvlm_jax.data.training_sources import DataSources, pipeline_config
  from lvlm_jax.eval.shapes import ShapesEvalConfig, ShapesEvaluator
  records = list(ShapesSource(ShapesConfig(seed=3, max_objects=2), "grounding", 3))
  data = pipeline_config(DataSources(pipeline=DataConfig(system_prompt="")),
                         hf.load_model(tiny_shapes_export), tiny_shapes_export, 4)
  lines = []
  for i, record in enumerate(records):
    Image.fromarray(record["images"][0]).save(tmp_path / f"{i}.png")
    lines.append(json.dumps({"prompt": data.grounding_prompt.format(
        expression=record["expression"]), "image": f"{i}.png"}) + "\n")
  (tmp_path / "in.jsonl").write_text("".join(lines))
  code, _, err = run(["--model", tiny_shapes_export, "--input_jsonl", str(tmp_path / "in.jsonl"),
                      "--output_jsonl", str(tmp_path / "out.jsonl"), "--template", "vicuna_v1",
                      "--system", "", "--answer_start", "<box>", "--max_new_tokens", "16",
                      "--batch_size", "4"], capsys)
  assert code == 0, err
  responses = [json.loads(l)["response"] for l in (tmp_path / "out.jsonl").read_text().splitlines()]

  model = hf.load_model(tiny_shapes_export)
  tokenizer = cli.generation_service(tiny_shapes_export, model).tokenizer
  evaluator = ShapesEvaluator(tokenizer, data, ShapesConfig(seed=3), ShapesEvalConfig(
      yes_no=0, grounding=0, captions=0, self_consistency=0, batch_size=4))
  graphdef, state = nnx.split(model)
  questions = [data.grounding_prompt.format(expression=r["expression"]) for r in records]
  want = evaluator._generate(graphdef, state, records, questions, 16, data.box_format.open)
  assert responses == want and any(responses)
