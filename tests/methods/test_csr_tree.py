"""CSR's search tree: the batched, prefix-sharing expansion against the plain one (each node
alone, prompt fed afresh) on a tiny model; both reward modes against hand-computed path scores
on a hand-made tree; the text hygiene filters."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
from training_fixtures import CACHE_DIR  # noqa: E402,F401  (turns the compile cache on)

from lvlm_jax.data.pipeline import DataConfig  # noqa: E402
from lvlm_jax.data.shapes import ShapesConfig, make_scene, render  # noqa: E402
from lvlm_jax.data.tokenizer import load_tokenizer  # noqa: E402
from lvlm_jax.methods import csr_tree  # noqa: E402
from lvlm_jax.models import building, hf  # noqa: E402
from lvlm_jax.sampling.sentences import SentenceConfig  # noqa: E402
from lvlm_jax.sampling.service import GenerationService, Prompt  # noqa: E402
from lvlm_jax.sharding import make_mesh  # noqa: E402


def _node(i, parent, lm, clip, logprob, final, text=None):
  return {"id": i, "parent": parent, "depth": 0, "lm_score": lm, "clip": clip,
          "logprob": logprob, "final": final, "text": text or f"t{i}"}


def _hand_tree():
  """root -> a, b, c; a -> d (final), e (final); b -> f (final); c is final."""
  return [_node(0, -1, 0.0, 0.0, 0.0, False),
           _node(1, 0, -1.0, 20.0, -3.0, False), _node(2, 0, -2.0, 30.0, -5.0, False),
           _node(3, 0, -0.5, 10.0, -1.0, True),
           _node(4, 1, -1.5, 25.0, -2.0, True), _node(5, 1, -3.0, 5.0, -4.0, True),
           _node(6, 2, -2.5, 0.0, -1.0, True)]


def test_paper_mode_path_scores_are_summed_calibrated_rewards():
  config = csr_tree.TreeConfig(reward="paper", lam=0.9)
  scores = csr_tree.path_scores(_hand_tree(), config)
  r = lambda clip, logp: 0.9 * clip + 0.1 * logp
  expected = {3: r(10, -1), 4: r(20, -3) + r(25, -2), 5: r(20, -3) + r(5, -4),
              6: r(30, -5) + r(0, -1)}
  assert scores.keys() == expected.keys()
  for leaf, value in expected.items():
    assert scores[leaf] == pytest.approx(value, rel=1e-12)
  assert csr_tree.choose(_hand_tree(), config) == (4, 3)  # 40.0 best, 8.9 worst
  mean = csr_tree.path_scores(_hand_tree(), csr_tree.TreeConfig(path_score="mean"))
  for leaf, value in expected.items():
    assert mean[leaf] == pytest.approx(value / (1 if leaf == 3 else 2), rel=1e-12)
  no_clip = csr_tree.TreeConfig(reward="paper", lam=0.0)
  assert csr_tree.choose(_hand_tree(), no_clip) == (3, 5)  # log-probs -1 vs -7


def test_repo_mode_path_scores_are_mean_sibling_ranks():
  config = csr_tree.TreeConfig(reward="repo", alpha=0.9)
  scores = csr_tree.path_scores(_hand_tree(), config)
  # Root's children (a, b, c): LM ranks c 1/3, a 2/3, b 1; CLIP ranks b 1/3, a 2/3, c 1.
  # a's children (d, e): LM d 1/2, e 1; CLIP d 1/2, e 1. b's only child f: 1, 1.
  v = lambda rank, clip_rank: 0.1 * rank + 0.9 * clip_rank
  a, b, c = v(2 / 3, 2 / 3), v(1, 1 / 3), v(1 / 3, 1)
  expected = {3: c / 2, 4: (a + v(0.5, 0.5)) / 3, 5: (a + v(1, 1)) / 3, 6: (b + v(1, 1)) / 3}
  for leaf, value in expected.items():
    assert -scores[leaf] == pytest.approx(value, rel=1e-12)
  assert csr_tree.choose(_hand_tree(), config) == (4, 5)  # lowest 0.389, highest 0.556


def test_hygiene_filters():
  assert csr_tree.clean("A red circle is on the left.", "A red circle is on the left.", False)
  assert not csr_tree.clean("Привет мир.", "Привет мир.", False)
  assert not csr_tree.clean("こんにちは.", "x", False)
  assert not csr_tree.clean("Nice 😀 picture.", "x", False)
  assert not csr_tree.clean("tttttttttttt.", "tttttttttttt.", False)
  assert not csr_tree.clean("blue.", "blue blue blue blue blue blue.", False)
  assert csr_tree.clean("blue.", "blue blue blue blue blue.", False)
  assert not csr_tree.clean("a b.", "a\n\n\n\n\n\nb.", False)
  assert not csr_tree.clean("It.", "It.", False)
  assert csr_tree.clean("", "A red circle.", True)  # the end token alone ends a response


def test_pruning_keeps_the_top_one_and_the_bottom_two():
  children = [{"lm_score": s, "reward": -s, "final": f} for s, f in
              [(-1, False), (-2, False), (-0.5, True), (-3, False), (-4, False), (-1.5, False)]]
  kept = csr_tree._prune(children, csr_tree.TreeConfig(prune_by="lm"))  # noqa: SLF001
  assert [c["lm_score"] for c in kept] == [-1, -3, -4]
  kept = csr_tree._prune(children, csr_tree.TreeConfig(prune_by="reward"))  # noqa: SLF001
  assert [c["lm_score"] for c in kept] == [-4, -1.5, -1]


@pytest.fixture(scope="module")
def setup(tiny_shapes_export):
  model_config = building.ModelConfig(hf_dir=tiny_shapes_export, tokenizer="")
  tokenizer = load_tokenizer(model_config)
  model = hf.load_model(tiny_shapes_export)
  data = DataConfig(system_prompt="").for_model(model, tiny_shapes_export)
  return model, tokenizer, data


def test_batched_search_equals_one_node_at_a_time(setup):
  model, tokenizer, data = setup
  world = ShapesConfig(max_objects=2, image_size=32)
  images = [render(make_scene(world, i), 32) for i in range(3)]
  prompts = [Prompt.question("<image>\nDescribe the image.", (im,)) for im in images]
  dot = tokenizer.convert_tokens_to_ids(".")
  sentences = SentenceConfig(max_new_tokens=4, sentence_end_ids=(dot,),
                             response_end_ids=(tokenizer.eos_token_id,),
                             pad_token_id=tokenizer.pad_token_id)
  config = csr_tree.TreeConfig(sentences=sentences, max_response_tokens=12, max_sentences=3,
                               prune_by="lm")
  clip = lambda prompts, texts: np.asarray([len(t) % 7 + 3.0 * p for p, t in zip(prompts, texts)])
  decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()
  # 3 prompts, 2 per batch: 6 node rows per beam search, the second batch padded.
  service = GenerationService(model, tokenizer, data, make_mesh(), batch_size=2)
  batched = []
  for first in (0, 2):
    chunk = prompts[first:first + 2]
    shift = lambda ps, texts, f=first: clip([p + f for p in ps], texts)
    batched += csr_tree.search(len(chunk), csr_tree.batched_expand(service, chunk, sentences,
                                                                    config),
                               shift, decode, config)
  ids = [service.prompt_ids(p) for p in prompts]
  pixels = [data.image_arrays([[im]])["pixel_values"] for im in images]
  reference = csr_tree.search(3, csr_tree.reference_expand(model, ids, pixels, sentences), clip,
                              decode, config)
  assert len(batched) == len(reference) == 3
  depths = set()
  for ours, theirs in zip(batched, reference):
    assert [n["tokens"] for n in ours] == [n["tokens"] for n in theirs]
    assert [n["final"] for n in ours] == [n["final"] for n in theirs]
    for key in ("lm_score", "logprob", "reward"):
      a, b = np.asarray([n[key] for n in ours]), np.asarray([n[key] for n in theirs])
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))
    depths |= {n["depth"] for n in ours}
    assert len(ours) > 6
  assert depths == {0, 1, 2, 3}
