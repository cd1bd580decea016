"""Chat templates and masks against transformers' apply_chat_template; image tokens; box text."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import SPECIALS, bpe_tokenizer as make_tokenizer
from lvlm_jax.data import text
from lvlm_jax.errors import UserError

# Written after Qwen2's and Meta-Llama-3's tokenizer_config.json templates, with the
# {% generation %} blocks transformers needs for return_assistant_tokens_mask.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}")
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat is in the image?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Where is the blue square?"},
    {"from": "gpt", "value": " Right of the circle. "},
]


def reference(tokenizer, turns):
  out = tokenizer.apply_chat_template(text.to_messages(turns), tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
  return np.asarray(out["input_ids"]), np.asarray(out["assistant_masks"])


@pytest.mark.parametrize("template,jinja,bos,eos", [
    ("chatml", CHATML_JINJA, None, "<|im_end|>"),
    ("llama3", LLAMA3_JINJA, "<|begin_of_text|>", "<|eot_id|>"),
    ("mistral", MISTRAL_JINJA, "<s>", "</s>"),
])
def test_builtin_templates_match_apply_chat_template(template, jinja, bos, eos):
  tokenizer = make_tokenizer(bos=bos, eos=eos, chat_template=jinja)
  want_ids, want_mask = reference(tokenizer, CONVERSATION)
  for name in (template, "tokenizer"):
    ids, mask = text.tokenize_conversation(CONVERSATION, tokenizer, name)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
  # The targets are exactly the assistant answers with their end-of-turn token.
  decoded = tokenizer.decode(ids[mask == 1])
  assert "A red circle." in decoded and decoded.count(tokenizer.eos_token) == 2
  assert "What is" not in decoded


def test_generation_prompt_matches_apply_chat_template():
  tokenizer = make_tokenizer(bos=None, eos="<|im_end|>", chat_template=CHATML_JINJA)
  prompt = CONVERSATION[:3]
  want = tokenizer.apply_chat_template(text.to_messages(prompt), tokenize=False,
                                       add_generation_prompt=True)
  assert text.render(prompt, tokenizer, "chatml", add_generation_prompt=True).text == want


def test_vicuna_v1_is_llava_conv_vicuna_v1():
  tokenizer = make_tokenizer()
  rendered = text.render(CONVERSATION[:2], tokenizer, "vicuna_v1")
  assert rendered.text == ("<s>" + text.VICUNA_SYSTEM + " USER: <image>\nWhat is in the image? "
                           "ASSISTANT: A red circle.</s>")
  ids, mask = text.tokenize_conversation(CONVERSATION, tokenizer, "vicuna_v1")
  tokens = tokenizer.convert_ids_to_tokens(ids)
  # Two answers, each ending in its </s>; nothing of the prompt, the roles or the image is a target.
  assert [tokens[i] for i in np.flatnonzero(mask) if tokens[i] == "</s>"] == ["</s>", "</s>"]
  assert tokenizer.decode(ids[mask == 1]).replace(" ", "") == "Aredcircle.</s>Rightofthecircle.</s>"
  assert text.render(CONVERSATION[:1], tokenizer, add_generation_prompt=True).text.endswith(
      "the image? ASSISTANT:")


def test_system_prompt_override_and_drop():
  tokenizer = make_tokenizer(bos=None, eos="<|im_end|>")
  assert text.render(CONVERSATION[:2], tokenizer, "chatml", system="Be brief.").text.startswith(
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
  assert text.render(CONVERSATION[:2], tokenizer, "chatml", system="").text.startswith(
      "<|im_start|>user")
  turns = [{"from": "system", "value": "Own."}] + CONVERSATION[:2]
  assert text.render(turns, tokenizer, "vicuna_v1").text.startswith("Own. USER:")


INNER_SYSTEM = CONVERSATION[:2] + [{"from": "system", "value": "Answer in French."}] + CONVERSATION[2:]


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral", "plain"])
def test_a_system_turn_inside_the_conversation_is_refused_where_it_has_no_place(template):
  # Before, vicuna_v1 and mistral rendered it as an assistant answer and trained on it.
  tokenizer = make_tokenizer()
  with pytest.raises(text.BadConversation, match="turn 2 is a system turn inside"):
    text.tokenize_conversation(INNER_SYSTEM, tokenizer, template)


def test_a_system_turn_inside_the_conversation_is_a_system_message_in_chatml():
  tokenizer = make_tokenizer(bos=None, eos="<|im_end|>", chat_template=CHATML_JINJA)
  want_ids, want_mask = reference(tokenizer, INNER_SYSTEM)
  for name in ("chatml", "tokenizer"):
    ids, mask = text.tokenize_conversation(INNER_SYSTEM, tokenizer, name)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
  assert "French" not in tokenizer.decode(ids[mask == 1])


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml", "mistral"])
def test_a_leading_gpt_turn_is_dropped_as_llava_does(template):
  tokenizer = make_tokenizer(bos=None if template == "chatml" else "<s>",
                             eos="<|im_end|>" if template == "chatml" else "</s>")
  turns = [{"from": "gpt", "value": "Hello, ask me."}] + CONVERSATION
  got = text.tokenize_conversation(turns, tokenizer, template)
  want = text.tokenize_conversation(CONVERSATION, tokenizer, template)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  system_first = [{"from": "system", "value": "Be brief."}] + turns
  assert text.render(system_first, tokenizer, template).text == text.render(
      [system_first[0]] + CONVERSATION, tokenizer, template).text


@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "llama3", "chatml", "mistral"])
@pytest.mark.parametrize("system", [None, "", "Be brief."])
def test_exported_chat_template_renders_what_training_renders(template, system):
  bos, eos = {"llama3": ("<|begin_of_text|>", "<|eot_id|>"), "chatml": (None, "<|im_end|>")}.get(
      template, ("<s>", "</s>"))
  tokenizer = make_tokenizer(bos=bos, eos=eos, chat_template=text.chat_template(template, system))
  if template == "plain":
    cases = [(CONVERSATION[:2], False), (CONVERSATION[:1], True)]
  else:
    cases = [(turns, generation) for generation in (False, True) for turns in (
        CONVERSATION, CONVERSATION[:3], [{"from": "system", "value": "Own."}] + CONVERSATION[:2])]
  for turns, generation in cases:
    want = text.render(turns, tokenizer, template, system=system,
                       add_generation_prompt=generation).text
    got = tokenizer.apply_chat_template(text.to_messages(turns), tokenize=False,
                                        add_generation_prompt=generation)
    assert got == want, (turns, generation)
  assert text.chat_template("tokenizer") is None


def test_image_tokens_expand_and_are_never_targets():
  tokenizer = make_tokenizer()
  image_id = text.image_token_id(tokenizer)
  ids1, mask1 = text.tokenize_conversation(CONVERSATION, tokenizer, tokens_per_image=1)
  ids, mask = text.tokenize_conversation(CONVERSATION, tokenizer, tokens_per_image=5)
  assert len(ids) == len(ids1) + 4
  start = int(np.flatnonzero(ids == image_id)[0])
  np.testing.assert_array_equal(ids[start:start + 5], [image_id] * 5)
  assert (ids == image_id).sum() == 5 and mask[ids == image_id].sum() == 0
  assert mask.sum() == mask1.sum()


def test_tokenizer_without_image_token_is_a_user_error():
  tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  with pytest.raises(UserError, match="add_special_tokens"):
    text.image_token_id(PreTrainedTokenizerFast(tokenizer_object=tok))


def test_text_only_tokenizer_needs_no_image_token_until_the_text_has_one():
  tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
  ids, mask = text.tokenize(text.Rendered("a b a", ((2, 5),)), tokenizer, tokens_per_image=3)
  np.testing.assert_array_equal(ids, [0, 1, 0])
  np.testing.assert_array_equal(mask, [0, 1, 1])
  assert ids.dtype == mask.dtype == np.int32
  with pytest.raises(UserError, match="add_special_tokens"):
    text.tokenize(text.Rendered("<image> a", ()), tokenizer)


def test_placeholders_prepended_like_llava():
  turns = [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Q?"}]
  assert text.ensure_image_placeholders(turns, 2)[1]["value"] == "<image>\n<image>\nQ?"
  assert text.ensure_image_placeholders(CONVERSATION, 1) == [dict(t) for t in CONVERSATION]
  with pytest.raises(UserError, match="1 <image> placeholder"):
    text.ensure_image_placeholders(CONVERSATION, 2)


def test_fit_to_length_never_cuts_image_tokens_or_answers():
  ids = np.asarray([1, 9, 9, 9, 5, 6, 7, 3], np.int32)
  mask = np.asarray([0, 0, 0, 0, 0, 1, 1, 0], np.int32)
  cut = text.fit_to_length(ids, mask, 7, image_id=9)  # only untrained text goes
  np.testing.assert_array_equal(cut[0], [1, 9, 9, 9, 5, 6, 7])
  np.testing.assert_array_equal(cut[1], [0, 0, 0, 0, 0, 1, 1])
  assert text.fit_to_length(ids, mask, 3, image_id=9) == "too_long"  # would cut into the image
  assert text.fit_to_length(ids, mask, 6, image_id=9) == "answer_too_long"  # loses the end token
  assert text.fit_to_length(ids, mask, 5, image_id=9) == "answer_too_long"
  assert text.fit_to_length(ids, 0 * mask, 8, image_id=9) == "too_long"  # no target at all
  assert text.fit_to_length(ids, mask, 8, image_id=9)[0] is ids


def test_box_text_round_trip_and_sc_tune_grid():
  fmt = text.BoxFormat()
  assert fmt.to_text([0.1, 0.2, 0.5, 1.0]) == "<box>(99,199),(499,999)</box>"  # int(v * 999)
  box = fmt.parse("It is here: <box>(99,199),(499,999)</box> done")
  np.testing.assert_allclose(box, np.array([99, 199, 499, 999]) / 999, rtol=1e-6)
  assert fmt.to_text(box) == "<box>(99,199),(499,999)</box>"
  custom = text.BoxFormat(grid=100, open="[", close="]")
  assert custom.to_text([0.5, 0.5, 1, 1]) == "[(49,49),(99,99)]"
  np.testing.assert_allclose(custom.parse("[( 49, 49 ),(99,99)]"), [49 / 99, 49 / 99, 1, 1])


def test_qwen2_vl_boxes_on_the_0_to_1000_grid_round_trip():
  fmt = text.QWEN2_VL_BOXES
  assert fmt.to_text([0.1, 0.25, 0.5, 1.0]) == "<|box_start|>(100,250),(500,1000)<|box_end|>"
  answer = "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(12,34),(567,890)<|box_end|>"
  box = fmt.parse(answer)
  np.testing.assert_allclose(box, [0.012, 0.034, 0.567, 0.890], rtol=1e-6)
  assert fmt.to_text(box) == "<|box_start|>(12,34),(567,890)<|box_end|>"
  assert fmt.parse("<|box_start|>(0,0),(1001,5)<|box_end|>") is None  # off the grid
  assert fmt.parse("<box>(1,2),(3,4)</box>") is None  # Qwen-VL's tags are not Qwen2-VL's


def test_qwen25_vl_pixel_json_boxes_round_trip():
  fmt = text.QWEN25_VL_BOXES
  size = (448, 672)  # (height, width) of the image as the model sees it
  assert fmt.to_text([0.25, 0.5, 0.75, 1.0], size) == '{"bbox_2d": [168, 224, 504, 448]}'
  answer = '```json\n[\n\t{"bbox_2d": [135, 114, 616, 420], "label": "the cat"}\n]\n```'
  box = fmt.parse(answer, size)
  np.testing.assert_allclose(box, [135 / 672, 114 / 448, 616 / 672, 420 / 448], rtol=1e-6)
  assert fmt.to_text(box, size) == '{"bbox_2d": [135, 114, 616, 420]}'
  np.testing.assert_allclose(fmt.parse('{"bbox_2d":[1.5, 2, 3, 4.25]}', size),
                             [1.5 / 672, 2 / 448, 3 / 672, 4.25 / 448], rtol=1e-6)
  assert fmt.parse('{"bbox_2d": [0, 0, 673, 10]}', size) is None  # off the image
  assert fmt.parse('{"bbox_2d": [-1, 0, 3, 10]}', size) is None
  assert fmt.parse("<|box_start|>(1,2),(3,4)<|box_end|>", size) is None
  with pytest.raises(ValueError, match="need the image_size"):
    fmt.to_text([0, 0, 1, 1])
  with pytest.raises(UserError, match="box_format.style 'xml' is not one of grid"):
    text.BoxFormat(style="xml")


@pytest.mark.parametrize("garbage", [None, 7, "", "<box>(1,2),(3)</box>", "<box>(1,2),(3,4)",
                                     "<box>(1,2),(3,1000)</box>", "<box>(-1,2),(3,4)</box>",
                                     "<box>(99999999999999,1),(2,3)</box>", b"<box>(1,2),(3,4)</box>"])
def test_box_parser_returns_none_on_garbage(garbage):
  assert text.BoxFormat().parse(garbage) is None


def test_box_iou():
  a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]], np.float32)
  b = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [2, 2, 3, 3]], np.float32)
  np.testing.assert_allclose(text.box_iou(a, b), [1 / 7, 1, 0], rtol=1e-5)
  assert text.box_iou([1, 1, 0, 0], [0, 0, 1, 1]) == 0  # an inverted box has no area
