"""Beam search and diverse beam search against transformers' `generate` (sequences and scores).

transformers 5 runs diverse (group) beam search from the Hub repo
`transformers-community/group-beam-search`, which tests cannot download. `group_beam_search` below
is a plain re-statement of that algorithm (transformers 4's `_group_beam_search` with
`BeamSearchScorer`), run through transformers 5's `generate(custom_generate=...)` so that its
input preparation and logits processors are transformers' own. It agrees with transformers'
built-in beam search when there is one group (tested below), and it was checked once against
transformers 4.52's own group beam search on these tiny models (equal sequences, scores within 2e-6).
"""

import numpy as np
import pytest
import torch
import transformers
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.sampling.beam import BeamConfig, beam_search

TOL = 1e-4
NEW = 16


class Hypotheses:
  """transformers' BeamHypotheses: the best `size` finished sequences of one group."""

  def __init__(self, size, length_penalty, early_stopping, max_new_tokens):
    self.size, self.length_penalty = size, length_penalty
    self.early_stopping, self.max_new_tokens = early_stopping, max_new_tokens
    self.beams = []  # (score, tokens)

  def add(self, tokens, sum_logprobs, length):
    score = sum_logprobs / length ** self.length_penalty
    if len(self.beams) < self.size or score > min(s for s, _ in self.beams):
      self.beams.append((score, tokens))
      if len(self.beams) > self.size:
        self.beams.remove(min(self.beams, key=lambda b: b[0]))

  def is_done(self, best_sum_logprobs, length):
    if len(self.beams) < self.size:
      return False
    if self.early_stopping is True:
      return True
    if self.early_stopping == "never" and self.length_penalty > 0:
      length = self.max_new_tokens
    return min(s for s, _ in self.beams) >= best_sum_logprobs / length ** self.length_penalty


def group_beam_search(model, input_ids, logits_processor, stopping_criteria, generation_config,
                      synced_gpus=False, **model_kwargs):
  """Diverse beam search, one full forward per step (no cache), Python loops over rows and ranks."""
  del stopping_criteria, synced_gpus  # max_length is the only criterion besides the stop tokens
  cfg = generation_config
  k, groups = cfg.num_beams, cfg.num_beam_groups
  size = k // groups
  eos = set(cfg._eos_token_tensor.tolist())
  pad = int(cfg._pad_token_tensor)
  batch, prompt = input_ids.shape[0] // k, input_ids.shape[1]
  prompt_mask = model_kwargs["attention_mask"]
  hyps = [[Hypotheses(size, cfg.length_penalty, cfg.early_stopping, cfg.max_length - prompt)
           for _ in range(groups)] for _ in range(batch)]
  done = [[False] * groups for _ in range(batch)]
  scores = torch.full((batch, k), -1e9)
  scores[:, ::size] = 0  # only each group's first beam is live at the start
  scores = scores.view(-1)
  num = max(2, 1 + len(eos)) * size
  while True:
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch * k, input_ids.shape[1] - prompt)], 1)
    with torch.no_grad():
      logits = model(input_ids=input_ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    vocab = logits.shape[-1]
    new_ids, new_scores = input_ids.clone(), torch.zeros(batch * k)
    current = torch.zeros(batch * k, dtype=torch.long)
    length = input_ids.shape[1] + 1 - prompt
    for g in range(groups):
      rows = [b * k + g * size + i for b in range(batch) for i in range(size)]
      logp = logits_processor(input_ids[rows], torch.log_softmax(logits[rows].float(), -1))
      for b in range(batch):  # Hamming diversity against the earlier groups' tokens of this step
        earlier = current[b * k: b * k + g * size]
        logp[b * size:(b + 1) * size] -= cfg.diversity_penalty * torch.bincount(earlier, minlength=vocab)
      top, index = torch.topk((logp + scores[rows, None]).view(batch, size * vocab), num)
      for b in range(batch):
        if done[b][g]:
          current[b * k + g * size: b * k + (g + 1) * size] = pad
          continue
        chosen = 0
        for rank in range(num):
          beam, token = divmod(int(index[b, rank]), vocab)
          source = b * k + g * size + beam
          if token in eos:
            if rank < size:
              hyps[b][g].add(input_ids[source, prompt:].tolist() + [token], float(top[b, rank]), length)
          else:
            slot = b * k + g * size + chosen
            new_ids[slot], current[slot], new_scores[slot] = input_ids[source], token, top[b, rank]
            chosen += 1
          if chosen == size:
            break
        done[b][g] = done[b][g] or hyps[b][g].is_done(float(top[b].max()), length)
    input_ids, scores = torch.cat([new_ids, current[:, None]], 1), new_scores
    if all(all(d) for d in done) or input_ids.shape[1] >= cfg.max_length:
      break
  sequences, best_scores = [], []
  for b in range(batch):
    for g in range(groups):
      if not done[b][g]:
        for i in range(size):
          row = b * k + g * size + i
          hyps[b][g].add(input_ids[row, prompt:].tolist(), float(scores[row]),
                         input_ids.shape[1] - prompt)
    pooled = sorted((h for g in range(groups) for h in hyps[b][g].beams), key=lambda h: h[0])
    for _ in range(cfg.num_return_sequences):
      score, tokens = pooled.pop()
      sequences.append(tokens)
      best_scores.append(score)
  out = torch.full((len(sequences), prompt + max(map(len, sequences))), pad)
  for i, tokens in enumerate(sequences):
    out[i, prompt:prompt + len(tokens)] = torch.tensor(tokens)
  return GenerateBeamDecoderOnlyOutput(sequences=out, sequences_scores=torch.tensor(best_scores))


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
  return hf.load_llm(tiny_llama_dir), transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def prompts(llama):
  """Three left-padded prompts, and the two tokens greedy decoding produces most (stop tokens that
  beams really meet)."""
  rng = np.random.default_rng(0)
  rows = [rng.integers(3, 120, n).tolist() for n in (10, 6, 8)]
  ids = np.zeros((3, 10), np.int32)
  mask = np.zeros((3, 10), np.int32)
  for i, row in enumerate(rows):
    ids[i, 10 - len(row):], mask[i, 10 - len(row):] = row, 1
  with torch.no_grad():
    greedy = llama[1].generate(input_ids=torch.tensor(ids, dtype=torch.long),
                               attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                               do_sample=False, pad_token_id=0)[:, 10:].numpy()
  frequent = np.bincount(greedy.reshape(-1)).argsort()[::-1][:2]
  return ids, mask, tuple(int(t) for t in frequent)


def hf_beams(model, ids, mask, config: BeamConfig, custom=None):
  """transformers' generate with the same settings -> (new tokens [B*R, *], scores [B*R])."""
  extra = {}
  if config.num_beam_groups > 1 or custom is not None:
    extra = dict(num_beam_groups=config.num_beam_groups, diversity_penalty=config.diversity_penalty,
                 custom_generate=custom or group_beam_search)
  with torch.no_grad():
    out = model.generate(
        input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
        do_sample=False, num_beams=config.num_beams, length_penalty=config.length_penalty,
        early_stopping=config.early_stopping, num_return_sequences=config.num_return_sequences,
        max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
        eos_token_id=list(config.eos_token_ids), pad_token_id=config.pad_token_id,
        output_scores=True, return_dict_in_generate=True, **extra)
  return out.sequences[:, ids.shape[1]:].numpy(), out.sequences_scores.numpy()


def assert_same_beams(ours, expected_tokens, expected_scores, config):
  """Equal up to each sequence's end (transformers may fill after it with eos instead of pad)."""
  tokens = np.asarray(ours.tokens).reshape(-1, config.max_new_tokens)
  lengths = np.asarray(ours.lengths).reshape(-1)
  for row, length in enumerate(lengths):
    np.testing.assert_array_equal(tokens[row, :length], expected_tokens[row, :length])
    if length < expected_tokens.shape[1]:
      assert expected_tokens[row, length - 1] in config.eos_token_ids
    assert (tokens[row, length:] == config.pad_token_id).all()
  np.testing.assert_allclose(np.asarray(ours.scores).reshape(-1), expected_scores, atol=TOL, rtol=0)


BEAM_CASES = {
    "heuristic": dict(length_penalty=1.0, early_stopping=False, num_return_sequences=4),
    "early_two_eos": dict(length_penalty=0.5, early_stopping=True, num_return_sequences=2,
                          min_new_tokens=3, two_eos=True),
}


@pytest.mark.parametrize("case", BEAM_CASES)
def test_beam_search_matches_transformers(llama, prompts, case):
  ids, mask, frequent = prompts
  settings = dict(BEAM_CASES[case])
  eos = frequent if settings.pop("two_eos", False) else frequent[:1]
  config = BeamConfig(num_beams=4, max_new_tokens=NEW, eos_token_ids=eos, **settings)
  ours = beam_search(llama[0], ids, mask, config=config)
  assert_same_beams(ours, *hf_beams(llama[1], ids, mask, config), config)
  assert (np.asarray(ours.lengths) < NEW).any()  # some hypotheses finished on a stop token
  # A sequence's log-prob is the sum of its tokens' model log-probs: with no min_new_tokens
  # and one group it times length ** -length_penalty is the score.
  if not config.min_new_tokens:
    np.testing.assert_allclose(
        np.asarray(ours.logprobs) / np.asarray(ours.lengths) ** config.length_penalty,
        np.asarray(ours.scores), atol=TOL, rtol=0)


def test_reference_equals_transformers_beam_search_for_one_group(llama, prompts):
  ids, mask, frequent = prompts
  for settings in BEAM_CASES.values():
    settings = dict(settings)
    eos = frequent if settings.pop("two_eos", False) else frequent[:1]
    config = BeamConfig(num_beams=4, max_new_tokens=NEW, eos_token_ids=eos, **settings)
    tokens, scores = hf_beams(llama[1], ids, mask, config)
    ref_tokens, ref_scores = hf_beams(llama[1], ids, mask, config, custom=group_beam_search)
    np.testing.assert_allclose(ref_scores, scores, rtol=1e-6, atol=1e-6 * np.abs(scores).max())
    for row in range(len(tokens)):
      ends = [i + 1 for i, t in enumerate(ref_tokens[row]) if t in eos]
      n = ends[0] if ends else NEW
      np.testing.assert_array_equal(ref_tokens[row, :n], tokens[row, :n])


GROUP_CASES = {
    "2x2": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=4),
    "csr_5x1": dict(num_beams=5, num_beam_groups=5, diversity_penalty=3.0, num_return_sequences=5,
                    length_penalty=0.8, early_stopping="never", min_new_tokens=2, two_eos=True),
}


@pytest.mark.parametrize("case", GROUP_CASES)
def test_diverse_beam_search_matches_transformers(llama, prompts, case):
  ids, mask, frequent = prompts
  settings = dict(GROUP_CASES[case])
  eos = frequent if settings.pop("two_eos", False) else frequent[:1]
  config = BeamConfig(max_new_tokens=NEW, eos_token_ids=eos, **settings)
  ours = beam_search(llama[0], ids, mask, config=config)
  assert_same_beams(ours, *hf_beams(llama[1], ids, mask, config), config)
  tokens = np.asarray(ours.tokens)
  assert len({tuple(t) for t in tokens[0]}) == config.num_return_sequences  # all different


def test_bad_beam_settings_are_user_errors():
  for bad in (dict(num_beams=1), dict(num_beams=4, num_beam_groups=3, diversity_penalty=1.0),
              dict(num_beams=4, num_beam_groups=2), dict(num_beams=4, diversity_penalty=1.0),
              dict(num_beams=4, num_return_sequences=5), dict(num_beams=4, early_stopping="soon"),
              dict(num_beams=4, max_new_tokens=4, min_new_tokens=5)):
    with pytest.raises(UserError):
      BeamConfig(**bad)
