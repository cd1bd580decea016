"""The stop-string automaton: transformers' StopStringCriteria semantics, folded into token tables."""

import numpy as np
import pytest

from lvlm_jax.errors import UserError
from lvlm_jax.sampling.stop_strings import build_stop_strings, stop_strings_for_tokenizer


def first_stop(stop, tokens):
  """Index of the token after which the automaton stops, or None."""
  state = 0
  for i, token in enumerate(tokens):
    if stop.hits[state, token]:
      return i
    state = stop.transitions[state, token]
  return None


def encode(vocab, pieces):
  return [vocab.index(p) for p in pieces]


# transformers' StopStringCriteria docstring: these end on "stop" at their last token...
MATCHES = [["st", "op"], ["stop"], ["st", "opera"], ["sto", "pper"], ["las", "topper"],
           ["s", "to", "pped"], ["xx", "s", "to", "p"]]
# ...and these contain it but must have stopped earlier, at the token completing it.
EARLIER = [(["stop", "at"], 0), (["st", "op", "at"], 1), (["st", "opera", "tion"], 1)]


def test_matches_where_transformers_does():
  vocab = sorted({p for case in MATCHES + [c for c, _ in EARLIER] for p in case} | {"so", "p"})
  stop = build_stop_strings(vocab, ["stop"])
  for pieces in MATCHES:
    assert first_stop(stop, encode(vocab, pieces)) == len(pieces) - 1, pieces
  for pieces, where in EARLIER:
    assert first_stop(stop, encode(vocab, pieces)) == where, pieces
  for pieces in (["so", "p"], ["st", "xx", "op"], ["p", "s", "to"]):
    assert first_stop(stop, encode(vocab, pieces)) is None, pieces


def test_several_strings_overlaps_and_unicode():
  vocab = ["a", "b", "ab", "ba", ".", ".\n", "é", "x", ""]
  stop = build_stop_strings(vocab, ["aab", ".\n", "éé"], vocab_size=12)
  assert stop.transitions.shape == stop.hits.shape == (stop.transitions.shape[0], 12)
  assert first_stop(stop, encode(vocab, ["a", "a", "ab"])) == 2  # "aaab" ends with "aab"
  assert first_stop(stop, encode(vocab, ["b", "a", "", "ab"])) == 3  # empty tokens change nothing
  assert first_stop(stop, encode(vocab, ["x", ".", "x", ".\n"])) == 3
  assert first_stop(stop, encode(vocab, ["é", "x", "é", "é"])) == 3
  assert first_stop(stop, [0, 10, 1]) is None  # ids past the tokenizer add no text
  assert first_stop(stop, [0, 10, 0, 1]) == 3


def test_byte_tokens_complete_a_character():
  """Byte-level vocabularies hold tokens that are half a UTF-8 character."""
  e_acute = "é".encode()
  vocab = [e_acute[:1], e_acute[1:], b"x"]
  stop = build_stop_strings(vocab, ["xé"])
  assert first_stop(stop, [2, 0, 1]) == 2
  assert first_stop(stop, [2, 0, 2]) is None


def test_empty_stop_string_is_a_user_error():
  with pytest.raises(UserError):
    build_stop_strings(["a"], [""])


def test_agrees_with_transformers_on_a_real_tokenizer(smollm2_dir):
  """Random token streams over SmolLM2's byte-level BPE: we stop exactly where
  transformers' StopStringCriteria first fires."""
  import torch
  import transformers
  from transformers.generation.stopping_criteria import StopStringCriteria
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  strings = [".", "Paris", " the end", "é!"]
  criteria = StopStringCriteria(tokenizer, strings)
  stop = stop_strings_for_tokenizer(tokenizer, strings, vocab_size=len(tokenizer))
  text = ("The capital is Paris. It is the end of Parisian café! Tokens split words: P aris, "
          "the endless end, é!")
  ids = tokenizer(text, add_special_tokens=False).input_ids
  rng = np.random.default_rng(0)
  streams = [ids] + [list(rng.permutation(ids)) for _ in range(30)]
  for stream in streams:
    expected = None
    for t in range(len(stream)):
      if criteria(torch.tensor([stream[:t + 1]]), None)[0]:
        expected = t
        break
    assert first_stop(stop, stream) == expected
