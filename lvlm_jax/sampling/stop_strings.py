"""Stop strings as a token-level automaton, so a jitted decode loop can stop on text.

A stop string may span several tokens and may start or end inside a token ("." inside ".\\n").
We build an Aho-Corasick automaton over the UTF-8 bytes of the stop strings and fold every
vocabulary token through it once, on the host: `transitions[s, t]` is the state after reading
token t's bytes from state s, and `hits[s, t]` says whether a stop string ended inside them. In the
loop a row then needs two gathers per token. This matches transformers' `StopStringCriteria`: a row
stops right after the token that completes a stop string; only generated text is matched.
"""

import collections
from typing import NamedTuple, Sequence

import numpy as np

from lvlm_jax.errors import UserError


class StopStrings(NamedTuple):
  """transitions: int32 [S, V], the automaton state after each token; hits: bool [S, V], whether a
  stop string completes inside that token. State 0 is the start (nothing matched yet)."""
  transitions: np.ndarray
  hits: np.ndarray


def _byte_automaton(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """Aho-Corasick over bytes -> (delta int32 [S, 256], accepting bool [S])."""
  children: list[dict[int, int]] = [{}]
  accepting = [False]
  for pattern in patterns:
    state = 0
    for byte in pattern:
      if byte not in children[state]:
        children.append({})
        accepting.append(False)
        children[state][byte] = len(children) - 1
      state = children[state][byte]
    accepting[state] = True
  delta = np.zeros((len(children), 256), np.int32)
  fail = [0] * len(children)
  queue = collections.deque()
  for byte, child in children[0].items():
    delta[0, byte] = child
    queue.append(child)
  while queue:  # breadth first, so a state's failure link is complete before its children use it
    state = queue.popleft()
    accepting[state] = accepting[state] or accepting[fail[state]]
    delta[state] = delta[fail[state]]
    for byte, child in children[state].items():
      fail[child] = delta[fail[state], byte]
      delta[state, byte] = child
      queue.append(child)
  return delta, np.asarray(accepting)


def build_stop_strings(token_texts: Sequence[str | bytes | None], stop_strings: Sequence[str],
                       vocab_size: int | None = None) -> StopStrings:
  """Folds each token's text through the automaton of `stop_strings`.

  token_texts[i]: the text token i adds to the output (bytes for byte-level vocabularies; None or
  empty for tokens that add none). vocab_size: the model's vocabulary, which may be larger than
  the tokenizer's; extra ids add no text.
  """
  if not stop_strings or any(not s for s in stop_strings):
    raise UserError(f"stop strings must be non-empty, got {list(stop_strings)!r}")
  patterns = [s.encode("utf-8") for s in stop_strings]
  delta, accepting = _byte_automaton(patterns)
  alphabet = set(b"".join(patterns))
  num_states = delta.shape[0]
  vocab_size = vocab_size or len(token_texts)
  if len(token_texts) > vocab_size:
    raise ValueError(f"{len(token_texts)} token texts for a vocabulary of {vocab_size}")
  states = np.arange(num_states, dtype=np.int32)
  transitions = np.zeros((num_states, vocab_size), np.int32)
  transitions[:, len(token_texts):] = states[:, None]
  hits = np.zeros((num_states, vocab_size), bool)
  for token, text in enumerate(token_texts):
    data = text.encode("utf-8") if isinstance(text, str) else (text or b"")
    if not data:
      transitions[:, token] = states
    elif alphabet.intersection(data):
      state, hit = states, np.zeros(num_states, bool)
      for byte in data:
        state = delta[state, byte]
        hit = hit | accepting[state]
      transitions[:, token], hits[:, token] = state, hit
    # else: no byte of any stop string, so every state falls back to 0 without a hit
  return StopStrings(transitions, hits)


def token_texts(tokenizer) -> list[str | bytes]:
  """The text each token id of an HF tokenizer adds, as transformers' `StopStringCriteria` sees it
  (bytes for byte-level BPE, so tokens holding part of a UTF-8 character still match)."""
  from transformers.generation.stopping_criteria import StopStringCriteria
  mode = StopStringCriteria._get_stop_string_matching_mode(tokenizer)
  texts, ids = StopStringCriteria.clean_tokenizer_vocab(tokenizer, stop_string_matching_mode=mode)
  table: list[str | bytes] = [b""] * (max(ids) + 1)
  for text, token in zip(texts, ids):
    table[token] = text
  return table


def stop_strings_for_tokenizer(tokenizer, stop_strings: Sequence[str],
                               vocab_size: int | None = None) -> StopStrings:
  """`build_stop_strings` over an HF tokenizer's vocabulary."""
  return build_stop_strings(token_texts(tokenizer), stop_strings, vocab_size)
