"""The shapes-world tokenizer: full coverage, exact round trips, stable ids, the vicuna template."""

import numpy as np
import pytest
import transformers

from lvlm_jax.data import shapes
from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer

WIDE = shapes.ShapesConfig(seed=2, shapes=shapes.SHAPES, colors=tuple(shapes.COLORS),
                           sizes=tuple(shapes.SIZES), min_objects=1, max_objects=6, max_differences=3)


@pytest.fixture(scope="module")
def tokenizer():
  return shapes_tokenizer()


def _texts(n=200):
  """Every kind of text the world writes, over n scenes of each task, with boxes as grounding text."""
  texts = list(shapes.CAPTION_PROMPTS) + [shapes.PAIR_PROMPT, shapes.REGION_PROMPT.format(box="")]
  rng = np.random.default_rng(0)
  for i in range(n):
    scene = shapes.make_scene(WIDE, i)
    texts.append(shapes.caption(scene))
    for expression, box, _ in shapes.referring_expressions(scene):
      x1, y1, x2, y2 = (int(v * 999) for v in box)
      texts.append(f"{expression} <box>({x1},{y1}),({x2},{y2})</box>")
    for mode in shapes.POPE_MODES:
      texts += [shapes.YES_NO_PROMPT.format(question=q) for q, _ in shapes.yes_no_questions(scene, rng, mode)]
    texts.append(shapes.make_pair(WIDE, i).summary)
  return texts


def test_ids_are_fixed_and_sorted(tokenizer):
  vocab = tokenizer.get_vocab()
  assert [vocab[t] for t in ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<box>", "</box>", "<ref>",
                             "</ref>")] == list(range(9))
  special = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
  assert special == (0, 1, 2, 3)
  rest = sorted(vocab, key=vocab.get)[9:]
  assert rest == sorted(rest)
  assert shapes_tokenizer().get_vocab() == vocab
  assert {"▁circle", "circle", "▁", "\n", "7", "42", "999", "007", "("} <= set(vocab)
  assert "▁unicorn" in shapes_tokenizer(extra_texts=["A unicorn."]).get_vocab()


def test_every_generated_text_round_trips_without_unk(tokenizer):
  texts = _texts()
  assert len(texts) > 2000 and any("<box>" in t for t in texts)
  for text in texts:
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids, text
    assert tokenizer.decode(ids[1:]) == text.lower()
  # A coordinate of the 0..999 grid is one token, so a box is 10 tokens.
  assert tokenizer.tokenize("<ref>this</ref><box>(123,4),(56,999)</box>") == [
      "<ref>", "this", "</ref>", "<box>", "(", "123", ",", "4", ")", ",", "(", "56", ",", "999",
      ")", "</box>"]
  assert tokenizer.tokenize("a purple unicorn") == ["a", "▁purple", "<unk>"]


def test_every_number_is_one_token_and_digit_runs_round_trip(tokenizer):
  vocab = tokenizer.get_vocab()
  ids = [vocab[str(n)] for n in range(1000)]
  assert len(set(ids)) == 1000
  for n in range(1000):
    assert tokenizer.tokenize(f"({n},") == ["(", str(n), ","]
  # Longer runs (and leading zeros) split three digits at a time, and still round-trip.
  assert tokenizer.tokenize("1234567 0042") == ["123", "456", "7", "▁", "004", "2"]
  for text in ("1234567 0042", "<box>(0,0),(999,1000)</box>", "a 12 007 9"):
    assert tokenizer.decode(tokenizer(text).input_ids[1:]) == text


def test_records_of_every_task_have_no_unk(tokenizer):
  for task in ("caption", "yes_no", "pair", "grounding", "region"):
    source = shapes.ShapesSource(WIDE, task, 40)
    for i in range(len(source)):
      record = source[i]
      texts = [t["value"] for t in record.get("conversations", [])] + [record.get("expression", "")]
      texts += [d["text"] for d in record.get("differences", [])]
      for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text).input_ids, text


def test_chat_template_is_vicuna(tokenizer):
  messages = [{"role": "user", "content": "<image>\nDescribe the image in detail."},
              {"role": "assistant", "content": "There is one object in the image."},
              {"role": "user", "content": "Is there a red circle in the image?"}]
  assert tokenizer.apply_chat_template(messages[:2], tokenize=False) == (
      "<s>A chat between a user and an assistant. USER: <image>\nDescribe the image in detail. "
      "ASSISTANT: There is one object in the image.</s>")
  assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
      "<s>A chat between a user and an assistant. USER: <image>\nDescribe the image in detail. "
      "ASSISTANT: There is one object in the image.</s>USER: Is there a red circle in the image? ASSISTANT:")
  system = [{"role": "system", "content": "Answer yes or no."}, messages[2]]
  assert tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
      "<s>Answer yes or no. USER: Is there a red circle in the image? ASSISTANT:")
  ids = tokenizer.apply_chat_template(messages[:2], tokenize=True)["input_ids"]
  assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
  assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
  assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1


def test_save_and_reload_offline(tokenizer, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  tokenizer.save_pretrained(tmp_path)
  reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert reloaded.get_vocab() == tokenizer.get_vocab()
  special = (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token, reloaded.unk_token)
  assert special == ("<pad>", "<s>", "</s>", "<unk>")
  messages = [{"role": "user", "content": "<image>\nDescribe the image."}]
  assert (reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
          == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
  for text in _texts(10):
    ids = tokenizer(text).input_ids
    assert reloaded(text).input_ids == ids
    assert reloaded.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
