"""Shapes-world metrics: they run on an untrained model, score only the answer, and give the
exact numbers for known answers (perfect, wrong, unparseable)."""

import dataclasses
import re

import numpy as np
import pytest
from flax import nnx

from lvlm_jax.data.images import ImageProcessing
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes import ShapesConfig, caption, referring_expressions, Scene
from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer
from lvlm_jax.data.text import image_token_id
from lvlm_jax.eval import shapes as shapes_eval
from lvlm_jax.models.llm import LLMConfig
from lvlm_jax.models.lvlm import LVLM, LVLMConfig
from lvlm_jax.models.vision import CLIPVisionConfig
from lvlm_jax.sampling.service import Prompt, prompt_ids

DATA = DataConfig(system_prompt="", tokens_per_image=4, image=ImageProcessing(size=16))


@pytest.fixture(scope="module")
def tokenizer():
  return shapes_tokenizer(extra_texts=(DATA.grounding_prompt,))


@pytest.fixture(scope="module")
def evaluator(tokenizer):
  config = shapes_eval.ShapesEvalConfig(yes_no=8, grounding=4, captions=4, self_consistency=4,
                                        batch_size=4, box_tokens=8, caption_tokens=8,
                                        description_tokens=4)
  return shapes_eval.ShapesEvaluator(tokenizer, DATA, ShapesConfig(seed=5, max_objects=2), config)


def test_untrained_model_gives_metrics_in_range(tokenizer, evaluator):
  config = LVLMConfig(
      vision=CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                              image_size=16, patch_size=8),
      text=LLMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                     num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8),
      image_token_id=image_token_id(tokenizer), vision_feature_layer=-1)
  metrics = evaluator(LVLM(config, rngs=nnx.Rngs(0)))
  assert set(metrics) == {"yes_no_accuracy", "grounding_acc50", "grounding_mean_iou",
                          "grounding_parsed", "caption_chair_i", "caption_chair_s",
                          "caption_recall", "caption_mentions_per_description",
                          "self_consistency_acc50", "self_consistency_shared"}
  assert all(0 <= v <= 1 for k, v in metrics.items() if k != "caption_mentions_per_description")


def test_yes_no_scores_only_the_answer_turn(tokenizer):
  turns = [[{"from": "human", "value": "<image>\nIs there a red circle in the image? Answer yes "
             "or no."}, {"from": "gpt", "value": answer}] for answer in ("yes", "no")]
  images = [[np.zeros((8, 8, 3), np.uint8)]] * 2
  ids, loss, attention = shapes_eval._pad(shapes_eval._rows(tokenizer, DATA, turns, images),
                                          tokenizer.pad_token_id, left=False)
  assert ids.shape[1] % 16 == 0 and ids.shape == loss.shape == attention.shape
  assert [tokenizer.decode(row[mask > 0]) for row, mask in zip(ids, loss)] == [" yes</s>", " no</s>"]


@pytest.mark.parametrize("prefers, expected", [("truth", 1.0), ("yes", 0.5), ("no", 0.5)])
def test_yes_no_accuracy_counts_right_answers(evaluator, tokenizer, monkeypatch, prefers, expected):
  yes = tokenizer.convert_tokens_to_ids("▁yes")
  # yes_no_accuracy scores each chunk twice: every row answered "yes", then "no".
  answers = iter([[r["answer"] for r in chunk] for chunk, _ in
                  shapes_eval._batches(evaluator.yes_no, evaluator.config.batch_size)
                  for _ in range(2)])

  def score(graphdef, state, batch):
    """A fake model: log-prob 0 for the answer it prefers, -1 for the other."""
    is_yes = np.any((np.asarray(batch["input_ids"]) == yes) & (np.asarray(batch["loss_mask"]) > 0), 1)
    if prefers == "truth":
      wanted = np.asarray([a == "yes" for a in next(answers)])
    else:
      wanted = np.full(len(is_yes), prefers == "yes")
    return np.where(is_yes == wanted, 0.0, -1.0)

  monkeypatch.setattr(shapes_eval, "_answer_logprobs", score)
  assert [r["answer"] for r in evaluator.yes_no].count("yes") == 4
  assert evaluator.yes_no_accuracy(None, None) == expected


def test_grounding_and_caption_metrics_on_known_answers(evaluator, monkeypatch):
  box_format = evaluator.data.box_format
  truth = {id(r): box_format.to_text(r["box"]) for r in evaluator.grounding}
  truth.update({id(r): caption(Scene.from_json(r["scene"])) for r in evaluator.captions})
  monkeypatch.setattr(evaluator, "_generate", lambda g, s, records, q, n, start: [truth[id(r)] for r in records])
  perfect = {**evaluator.grounding_metrics(None, None), **evaluator.caption_metrics(None, None)}
  assert perfect["grounding_acc50"] == perfect["grounding_parsed"] == 1.0
  assert perfect["grounding_mean_iou"] > 0.99
  assert perfect["caption_chair_i"] == 0.0 and perfect["caption_recall"] == 1.0
  monkeypatch.setattr(evaluator, "_generate", lambda g, s, records, q, n, start: [
      "<box>(0,0),(10,10)</box> a purple cross." if i % 2 else "no box here"
      for i, _ in enumerate(records)])
  wrong = {**evaluator.grounding_metrics(None, None), **evaluator.caption_metrics(None, None)}
  assert wrong["grounding_acc50"] == 0.0 and wrong["grounding_parsed"] == 0.5
  assert wrong["caption_chair_s"] == 0.5 and wrong["caption_recall"] == 0.0


def test_generation_prompt_is_the_training_context_of_the_answer(tokenizer):
  """The shapes tokenizer splits the space before <box> into a token of its own, which is the
  answer's first target (as in LLaVA's preprocess_v1); the generation service's grounding prompt
  ends where the training targets start."""
  question = DATA.grounding_prompt.format(expression="the red circle")
  image = np.zeros((8, 8, 3), np.uint8)
  full = shapes_eval._rows(tokenizer, DATA, [[{"from": "human", "value": question},
                                             {"from": "gpt", "value": "<box>(1,2),(3,4)</box>"}]],
                           [[image]])
  ids, mask = full[0]
  prompt = prompt_ids(Prompt.question(question, (image,), DATA.box_format.open), tokenizer, DATA)
  start = int(np.argmax(mask > 0))
  np.testing.assert_array_equal(prompt, ids[:start])
  assert tokenizer.convert_ids_to_tokens(ids[start:start + 2].tolist()) == ["▁", "<box>"]

def test_self_consistency_grounds_the_models_own_description(tokenizer, monkeypatch):
  """A fake model whose locator reads a description against the scene: a unique expression finds
  its object, 'the red circle' the first red circle; the loop succeeds only when that is the box
  it described."""
  # Few kinds and crowded scenes, so that neighbours often share colour and shape.
  world = ShapesConfig(seed=3, shapes=("circle", "square"), colors=("red", "blue"), min_objects=2,
                       max_objects=3)
  evaluator = shapes_eval.ShapesEvaluator(
      tokenizer, DATA, world, shapes_eval.ShapesEvalConfig(yes_no=0, grounding=0, captions=0,
                                                           self_consistency=24, batch_size=8))
  box_format = DATA.box_format
  question = re.compile(re.escape(DATA.grounding_prompt).replace(re.escape("{expression}"), "(.*)"))
  described = {}

  def generate(graphdef, state, records, questions, max_new_tokens, start):
    if start == "the":  # the describer: one answer per region prompt
      assert questions == [r["conversations"][0]["value"] for r in records]
      return [" " + described[id(r)] for r in records]
    assert start == box_format.open
    answers = []
    for record, q in zip(records, questions):
      expression = question.fullmatch(q).group(1)
      objects = record["scene"]["objects"]
      named = {e: box for e, box, _ in referring_expressions(Scene.from_json(record["scene"]))}
      named.update({f"the {o['color']} {o['shape']}": o["box"] for o in reversed(objects)})
      answers.append(box_format.to_text(named[expression]) if expression in named else "no box")
    return answers

  monkeypatch.setattr(evaluator, "_generate", generate)
  records = evaluator.regions
  # Colour and shape shared with another object of the scene, counted from the scene itself.
  kinds = [[(o["color"], o["shape"]) for o in r["scene"]["objects"]] for r in records]
  shared = [k.count(k[r["object"]]) > 1 for k, r in zip(kinds, records)]
  first_of_kind = [k.index(k[r["object"]]) == r["object"] for k, r in zip(kinds, records)]

  described.update({id(r): r["expression"] for r in records})  # unique expressions: all found
  assert evaluator.self_consistency_metrics(None, None) == {
      "self_consistency_acc50": 1.0, "self_consistency_shared": np.mean(shared)}
  described.update({id(r): r["conversations"][1]["value"] for r in records})  # as trained
  expected = np.mean([r["full"] or first for r, first in zip(records, first_of_kind)])
  assert 0 < expected < 1 and 0 < np.mean(shared) < 1
  assert evaluator.self_consistency_metrics(None, None)["self_consistency_acc50"] == expected
  described.update({id(r): "the purple cross" for r in records})  # no such object: no box
  assert evaluator.self_consistency_metrics(None, None)["self_consistency_acc50"] == 0.0
