"""CSR's sentence step: candidates end at a sentence or response end, report which, and chain."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.sampling.logprobs import sequence_logprobs
from lvlm_jax.sampling.sentences import SentenceConfig, append_sentences, next_sentences

TOL = 1e-4
NEW = 12


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
  return hf.load_llm(tiny_llama_dir)


@pytest.fixture(scope="module")
def partial_responses():
  rng = np.random.default_rng(0)
  rows = [rng.integers(3, 120, n).tolist() for n in (9, 5)]
  ids = np.zeros((2, 9), np.int32)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
  return ids, mask


@pytest.fixture(scope="module")
def sentences(model, partial_responses):
  """CSR's search (5 groups of 1 beam, diversity 3.0) with frequent tokens of this random model
  standing in for '.' and EOS, so that candidates end both ways."""
  ids, mask = partial_responses
  config = SentenceConfig(max_new_tokens=NEW, sentence_end_ids=(41, 123), response_end_ids=(16, 2))
  return config, next_sentences(model, ids, mask, config=config)


def test_candidates_end_where_they_say(sentences):
  config, out = sentences
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  ends = np.asarray(out.ends_response)
  assert tokens.shape == (2, 5, NEW) and lengths.shape == ends.shape == (2, 5)
  for b in range(2):
    for j in range(5):
      last = tokens[b, j, lengths[b, j] - 1]
      assert ends[b, j] == (last in config.response_end_ids)
      if lengths[b, j] < NEW:
        assert last in config.sentence_end_ids + config.response_end_ids
      stops = np.isin(tokens[b, j, :lengths[b, j] - 1], config.sentence_end_ids + config.response_end_ids)
      assert not stops.any()  # nothing stops a candidate before its end
  assert ends.any() and (~ends & (lengths < NEW)).any()  # both kinds of ending occur
  scores = np.asarray(out.scores)
  assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_candidate_log_probs_are_teacher_forced_log_probs(model, partial_responses, sentences):
  ids, mask = partial_responses
  _, out = sentences
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  new_ids, new_mask = append_sentences(ids, mask, tokens, lengths)
  prompt_lengths = np.repeat(mask.sum(1), 5)
  positions = np.arange(new_ids.shape[1])
  start = new_ids.shape[1] - (prompt_lengths + lengths.reshape(-1))
  loss = (positions >= (start + prompt_lengths)[:, None]).astype(np.int32)
  _, sums = nnx.jit(sequence_logprobs)(model, {"input_ids": jnp.asarray(new_ids),
                                               "attention_mask": jnp.asarray(new_mask),
                                               "loss_mask": jnp.asarray(loss)})
  np.testing.assert_allclose(np.asarray(sums).reshape(2, 5), np.asarray(out.logprobs),
                             atol=TOL, rtol=0)


def test_append_sentences_builds_left_padded_children():
  ids = np.array([[0, 0, 7, 8], [5, 6, 7, 8]], np.int32)
  mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int32)
  tokens = np.array([[[1, 2, 0], [3, 0, 0]], [[4, 4, 4], [9, 0, 0]]], np.int32)
  lengths = np.array([[2, 1], [3, 1]])
  new_ids, new_mask = append_sentences(ids, mask, tokens, lengths, pad_to_multiple=4)
  assert new_ids.shape == (4, 8)
  np.testing.assert_array_equal(new_ids[0, -4:], [7, 8, 1, 2])
  np.testing.assert_array_equal(new_ids[1, -3:], [7, 8, 3])
  np.testing.assert_array_equal(new_ids[2, -7:], [5, 6, 7, 8, 4, 4, 4])
  np.testing.assert_array_equal(new_ids[3, -5:], [5, 6, 7, 8, 9])
  np.testing.assert_array_equal(new_mask.sum(1), [4, 3, 7, 5])
  assert (new_ids[new_mask == 0] == 0).all()


def test_sentence_end_ids_are_required(model, partial_responses):
  with pytest.raises(UserError):
    next_sentences(model, *partial_responses, config=SentenceConfig())
