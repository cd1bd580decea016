"""CSR's sentence-level step: k candidate next sentences for each partial response.

CSR (METHODS.md 3.3) grows a tree of responses one sentence at a time: each node's text is
continued by diverse group beam search that stops at a sentence end ('.'), and each child is
scored with transformers' length-normalised `sequences_scores`. Here both the sentence ends and
the model's end-of-response tokens stop a candidate, and each candidate reports which it hit:
CSR's released code stops only at '.', generating past EOS and then checking for it.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.llm import LLM
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.sampling.beam import BeamConfig, beam_search


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
  """The search for next sentences; the defaults are CSR's (METHODS.md 3.3)."""
  num_candidates: int = help_field(5, "Candidate sentences returned per partial response (CSR: 5).")
  num_beams: int = help_field(5, "Beams of the search (CSR: 5).")
  num_beam_groups: int = help_field(5, "Diverse beam search groups (CSR: 5, one beam each).")
  diversity_penalty: float = help_field(3.0, "Hamming diversity penalty between groups (CSR: 3.0).")
  length_penalty: float = help_field(1.0, "Scores are log-prob sums / "
                                     "length ** length_penalty (CSR: 1.0).")
  max_new_tokens: int = help_field(70, "Longest sentence in tokens (CSR: 70).")
  sentence_end_ids: tuple[int, ...] = help_field((), "Tokens that end a sentence (CSR: '.', "
                                                 "29889 for LLaMA-2 / Vicuna).")
  response_end_ids: tuple[int, ...] = help_field((), "Tokens that end the whole response "
                                                 "(the model's EOS).")
  pad_token_id: int = help_field(0, "Token written after a candidate ends.")

  def beam_config(self) -> BeamConfig:
    return BeamConfig(num_beams=self.num_beams, num_beam_groups=self.num_beam_groups,
                      diversity_penalty=self.diversity_penalty if self.num_beam_groups > 1 else 0.0,
                      length_penalty=self.length_penalty,
                      num_return_sequences=self.num_candidates, max_new_tokens=self.max_new_tokens,
                      eos_token_ids=tuple(self.sentence_end_ids) + tuple(self.response_end_ids),
                      pad_token_id=self.pad_token_id)


class Sentences(NamedTuple):
  """Per partial response, k candidates, best first. tokens: int32 [B, k, N]; lengths: int32 [B, k];
  scores: float32 [B, k] (transformers' sequences_scores, CSR's node score increment);
  logprobs: float32 [B, k] (summed model log-probs); ends_response: bool [B, k], the candidate
  ended on a response-end token (a final node in CSR's tree)."""
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  logprobs: jax.Array
  ends_response: jax.Array


def next_sentences(model: LLM | LVLM, input_ids, attention_mask=None, *, config: SentenceConfig,
                   pixel_values=None) -> Sentences:
  """input_ids, attention_mask: int [B, T], prompt plus response so far (padded on either side);
  pixel_values: float32 [B, N, H, W, 3] for a LVLM. Returns `Sentences` with N = max_new_tokens."""
  if not config.sentence_end_ids:
    raise UserError("SentenceConfig.sentence_end_ids is empty: give the token id(s) of '.'")
  beams = beam_search(model, input_ids, attention_mask, config=config.beam_config(),
                      pixel_values=pixel_values)
  last = jnp.take_along_axis(beams.tokens, jnp.maximum(beams.lengths - 1, 0)[..., None],
                             axis=-1)[..., 0]
  ends = jnp.isin(last, jnp.asarray(config.response_end_ids, jnp.int32))
  return Sentences(beams.tokens, beams.lengths, beams.scores, beams.logprobs, ends)


def append_sentences(input_ids: np.ndarray, attention_mask: np.ndarray, tokens: np.ndarray,
                     lengths: np.ndarray, pad_token_id: int = 0,
                     pad_to_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Each partial response extended by each of its candidates, as new left-padded prompts.

  input_ids, attention_mask: [B, T]; tokens: [B, k, N]; lengths: [B, k]. Returns
  (input_ids, attention_mask) int32 [B * k, L], row b * k + j = prompt b + candidate j; L is the
  longest row rounded up to `pad_to_multiple` (fewer distinct shapes, fewer compilations).
  """
  input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  rows = []
  for b in range(tokens.shape[0]):
    prompt = input_ids[b][attention_mask[b] > 0]
    rows.extend(np.concatenate([prompt, tokens[b, j, :lengths[b, j]]])
                for j in range(tokens.shape[1]))
  width = max(len(r) for r in rows)
  width = -(-width // pad_to_multiple) * pad_to_multiple
  ids = np.full((len(rows), width), pad_token_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  return ids, mask
