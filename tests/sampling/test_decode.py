"""Jitted decoding against transformers' `generate`, the cache path, sampling filters and stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conftest import forward, TINY_LLAMA, save_tiny
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.llm import default_positions
from lvlm_jax.sampling.decode import (SamplingConfig, decode_step, generate, prefill, top_k_filter,
                                      top_p_filter, warp)
from lvlm_jax.sampling.stop_strings import build_stop_strings

TOL = 1e-4
NEW = 32
IMAGE_ID = 127


def left_padded(rows, pad=0):
  """Lists of token ids -> left-padded (ids, mask) int32 [B, T]."""
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
  return ids, mask


def text_prompts(seed=0):
  rng = np.random.default_rng(seed)
  return left_padded([rng.integers(3, 120, n).tolist() for n in (10, 6, 8)])


def image_prompts(images, seed=0, tail=2):
  """Two rows of different lengths, each image a run of 16 image tokens followed by `tail` text
  tokens, and their pixels."""
  rng = np.random.default_rng(seed)
  rows = []
  for length in (5, 3):
    row = rng.integers(3, 120, length).tolist()
    for _ in range(images):
      row += [IMAGE_ID] * 16 + rng.integers(3, 120, tail).tolist()
    rows.append(row)
  pixels = rng.normal(size=(2, images, 28, 28, 3)).astype(np.float32)
  return (*left_padded(rows), pixels)


def hf_generate(model, ids, mask, pixels=None, **kwargs):
  """transformers' generate -> (new tokens [B, N], raw logits [B, N, V])."""
  extra = {}
  if pixels is not None:
    extra["pixel_values"] = torch.tensor(pixels.reshape(-1, *pixels.shape[2:]).transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask), do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True, **extra, **kwargs)
  return out.sequences[:, ids.shape[1]:].numpy(), torch.stack(out.logits, 1).float().numpy()


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
  return hf.load_llm(tiny_llama_dir), transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
  return (hf.load_lvlm(tiny_llava_dir),
          transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir))


GREEDY = SamplingConfig(max_new_tokens=NEW, min_new_tokens=NEW, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def llama_greedy(llama):
  ids, mask = text_prompts()
  return ids, mask, generate(llama[0], ids, mask, config=GREEDY)


def test_greedy_llama_matches_transformers(llama, llama_greedy):
  ids, mask, out = llama_greedy
  expected, logits = hf_generate(llama[1], ids, mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                 eos_token_id=2)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)
  np.testing.assert_array_equal(np.asarray(out.lengths), NEW)
  assert not np.asarray(out.stopped).any()
  # Our log-probs are of the unmodified model distribution: transformers' raw logits.
  logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  expected_logp = np.take_along_axis(np.asarray(logp), expected[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs), expected_logp, atol=TOL, rtol=0)


@pytest.mark.parametrize("images", [1, 2])
def test_greedy_llava_matches_transformers(llava, images):
  ids, mask, pixels = image_prompts(images)
  out = generate(llava[0], ids, mask, config=GREEDY, pixel_values=pixels)
  expected, _ = hf_generate(llava[1], ids, mask, pixels, max_new_tokens=NEW, min_new_tokens=NEW,
                            eos_token_id=2)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_greedy_sliding_window_mistral_matches_transformers(tmp_path):
  """Window 8, prompts of 10/6/8 tokens and 32 new ones: decoding runs far past the window, where
  transformers' generate (its sliding cache) and ours (a full cache, masked) must agree."""
  torch.manual_seed(11)
  config = transformers.MistralConfig(**{**TINY_LLAMA, "sliding_window": 8})
  directory = save_tiny(transformers.MistralForCausalLM(config), tmp_path)
  ours, ref = hf.load_llm(directory), transformers.AutoModelForCausalLM.from_pretrained(directory)
  ids, mask = text_prompts(seed=2)
  out = generate(ours, ids, mask, config=GREEDY)
  expected, logits = hf_generate(ref, ids, mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                 eos_token_id=2)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)
  logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  expected_logp = np.take_along_axis(np.asarray(logp), expected[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs), expected_logp, atol=TOL, rtol=0)


def test_stop_tokens_end_each_row_like_transformers(llama, llama_greedy):
  """Two stop tokens, taken from what the rows generate, so rows stop at different steps."""
  ids, mask, greedy = llama_greedy
  tokens = np.asarray(greedy.tokens)
  eos = (int(tokens[0, 6]), int(tokens[1, 3]))
  config = SamplingConfig(max_new_tokens=NEW, min_new_tokens=2, eos_token_ids=eos, pad_token_id=0)
  out = generate(llama[0], ids, mask, config=config)
  expected, _ = hf_generate(llama[1], ids, mask, max_new_tokens=NEW, min_new_tokens=2,
                            eos_token_id=list(eos))
  lengths = np.asarray(out.lengths)
  for row, length in enumerate(lengths):
    np.testing.assert_array_equal(np.asarray(out.tokens)[row, :length], expected[row, :length])
    assert (np.asarray(out.tokens)[row, length:] == 0).all()
    assert (np.asarray(out.logprobs)[row, length:] == 0).all()
    if length < NEW:
      assert expected[row, length - 1] in eos and np.asarray(out.stopped)[row]
  assert lengths.min() < NEW


@pytest.mark.parametrize("which", ["llama", "llava"])
def test_cached_decode_steps_equal_full_forward(request, which):
  """Prefill a prefix, then feed the rest one token at a time through `decode_step`."""
  model = request.getfixturevalue(which)[0]
  if which == "llama":
    ids, mask = text_prompts(seed=3)
    pixels = None
  else:
    ids, mask, pixels = image_prompts(1, seed=3, tail=6)
  full, _ = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                    **({} if pixels is None else {"pixel_values": jnp.asarray(pixels)}))
  split = ids.shape[1] - 5
  graphdef, state = nnx.split(model)

  @jax.jit
  def run_prefill(state, ids, mask, pixels):
    return prefill(nnx.merge(graphdef, state), ids, mask, ids.shape[1] + 5, pixels)

  @jax.jit
  def run_step(state, tokens, positions, cache):
    return decode_step(nnx.merge(graphdef, state), tokens, positions, cache)

  logits, cache, next_position = run_prefill(state, ids[:, :split], mask[:, :split], pixels)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[:, split - 1], atol=TOL, rtol=0)
  positions = np.asarray(default_positions(jnp.asarray(ids), None, jnp.asarray(mask)))
  np.testing.assert_array_equal(np.asarray(next_position), positions[:, split])
  for t in range(split, ids.shape[1]):
    logits, cache = run_step(state, ids[:, t], positions[:, t], cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[:, t], atol=TOL, rtol=0)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama, llama_greedy):
  ids, mask, greedy = llama_greedy
  config = SamplingConfig(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_k=1,
                          eos_token_ids=(2,))
  out = generate(llama[0], ids, mask, config=config, rng=jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))


def known_logits(vocab=16):
  """One row of logits with probabilities proportional to 0.6^i, shuffled."""
  probs = 0.6 ** np.random.default_rng(0).permutation(vocab)
  return np.log(probs / probs.sum()).astype(np.float32)[None]


def hf_support(logits, top_k=0, top_p=1.0, temperature=1.0):
  from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                      TopPLogitsWarper)
  scores = torch.tensor(np.asarray(logits))
  warpers = [TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(TopKLogitsWarper(top_k))
  if top_p < 1:
    warpers.append(TopPLogitsWarper(top_p))
  for w in warpers:
    scores = w(None, scores)
  return np.isfinite(scores.numpy())


@pytest.mark.parametrize("top_k,top_p,temperature", [(3, 1.0, 1.0), (0, 0.8, 1.0), (0, 0.7, 0.5),
                                                     (10, 0.9, 2.0), (0, 0.001, 1.0)])
def test_filters_keep_exactly_transformers_support_and_renormalise(top_k, top_p, temperature):
  logits = known_logits()
  config = SamplingConfig(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature)
  warped = np.asarray(warp(jnp.asarray(logits), config))
  support = np.isfinite(warped)
  np.testing.assert_array_equal(support, hf_support(logits, top_k, top_p, temperature))
  draws = np.asarray(jax.random.categorical(jax.random.key(0), jnp.asarray(warped)[0], shape=(20000,)))
  assert support[0, draws].all()
  expected = np.exp(logits[0] / temperature) * support[0]
  expected /= expected.sum()
  frequencies = np.bincount(draws, minlength=logits.shape[1]) / len(draws)
  np.testing.assert_allclose(frequencies, expected, atol=0.015)


def test_top_k_ties_are_kept_and_top_p_keeps_one():
  logits = jnp.asarray([[1.0, 3.0, 3.0, 3.0, 0.0]])
  assert np.isfinite(np.asarray(top_k_filter(logits, 2))).sum() == 3
  assert np.isfinite(np.asarray(top_p_filter(logits, 1e-6))).sum() == 3  # the top ties survive
  assert np.isfinite(np.asarray(top_p_filter(jnp.asarray([[5.0, 1.0, 0.0]]), 1e-6))).sum() == 1


@pytest.fixture(scope="module")
def llama_sampled(llama):
  """64 sampled rows of 32 tokens with top-k and top-p both active."""
  ids, mask = left_padded([np.random.default_rng(7).integers(3, 120, 6).tolist()] * 64)
  config = SamplingConfig(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_k=8,
                          top_p=0.6, temperature=1.3, eos_token_ids=(2,))
  first = generate(llama[0], ids, mask, config=config, rng=jax.random.key(11))
  return ids, mask, config, first


def test_sampling_without_a_key_is_refused(llama, llama_greedy):
  # A default key would make every call return the same "samples"; greedy decoding (the
  # llama_greedy fixture) needs no key.
  ids, mask, _ = llama_greedy
  config = SamplingConfig(max_new_tokens=NEW, do_sample=True, eos_token_ids=(2,))
  with pytest.raises(UserError, match="needs a key"):
    generate(llama[0], ids, mask, config=config)


def test_sampling_with_a_seed_is_reproducible(llama, llama_sampled):
  ids, mask, config, first = llama_sampled
  again = generate(llama[0], ids, mask, config=config, rng=jax.random.key(11))
  other = generate(llama[0], ids, mask, config=config, rng=jax.random.key(12))
  np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
  assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()
  assert len({tuple(r) for r in np.asarray(first.tokens)}) > 1  # rows sample independently


def test_sampled_tokens_stay_in_the_top_k_top_p_support(llama, llama_sampled):
  """2048 draws: each token lies in the support transformers' processors and warpers leave."""
  ids, mask, config, out = llama_sampled
  full_ids = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
  logits, _ = forward(llama[0], jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask))
  step_logits = np.asarray(logits)[:, ids.shape[1] - 1:-1]  # [B, N, V], predicting each new token
  flat = step_logits.reshape(-1, step_logits.shape[-1]).copy()
  flat[:, config.eos_token_ids] = -np.inf  # min_new_tokens, applied before the warpers
  support = hf_support(flat, config.top_k, config.top_p, config.temperature)
  chosen = np.asarray(out.tokens).reshape(-1)
  assert support[np.arange(len(chosen)), chosen].all()
  assert (support.sum(-1) > 1).mean() > 0.5  # the filters left real choices


def test_stop_string_ends_its_row_exactly_while_others_go_on(llama, llama_greedy):
  """Token i reads "<i>"; the stop string spans the seam of two tokens that row 0 generates."""
  ids, mask, greedy = llama_greedy
  tokens = np.asarray(greedy.tokens)
  texts = [f"<{i}>" for i in range(128)]
  stop_string = f"{tokens[0, 4]}><{tokens[0, 5]}"
  stop = build_stop_strings(texts, [stop_string])
  out = generate(llama[0], ids, mask, config=GREEDY, stop=stop)
  for row in range(tokens.shape[0]):
    text = [texts[t] for t in tokens[row]]
    ends = [t for t in range(NEW) if stop_string in "".join(text[:t + 1])]
    length = ends[0] + 1 if ends else NEW
    assert out.lengths[row] == length and bool(out.stopped[row]) == bool(ends)
    np.testing.assert_array_equal(np.asarray(out.tokens)[row, :length], tokens[row, :length])
    assert (np.asarray(out.tokens)[row, length:] == GREEDY.pad_token_id).all()
  assert out.lengths[0] <= 6 and out.lengths.max() == NEW


def test_smollm2_chat_greedy_matches_transformers(smollm2_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
  messages = [{"role": "user", "content": "Write two sentences about why the sky is blue."}]
  ids = np.asarray(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"], np.int32)[None]
  eos = reference.generation_config.eos_token_id
  out = generate(hf.load_llm(smollm2_dir), ids,
                 config=SamplingConfig(max_new_tokens=NEW, eos_token_ids=(eos,), pad_token_id=eos))
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # torch's first generate on 2 busy threads takes 10-40 s here, on 1 ~4 s
  try:
    with torch.no_grad():
      expected = reference.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=NEW,
                                    do_sample=False, eos_token_id=eos, pad_token_id=eos)
  finally:
    torch.set_num_threads(threads)
  expected = expected[0, ids.shape[1]:].numpy()
  length = int(out.lengths[0])
  assert length == len(expected) and length >= 16
  np.testing.assert_array_equal(np.asarray(out.tokens)[0, :length], expected)
  assert "blue" in tokenizer.decode(expected) or "sky" in tokenizer.decode(expected)


def test_bad_settings_are_user_errors(llama):
  for bad in (dict(max_new_tokens=0), dict(min_new_tokens=5, max_new_tokens=4),
              dict(do_sample=True, temperature=0.0), dict(top_k=-1), dict(top_p=0.0)):
    with pytest.raises(UserError):
      SamplingConfig(**bad)
  with pytest.raises(UserError):
    generate(llama[0], np.ones((1, 4), np.int32), config=GREEDY,
             pixel_values=np.zeros((1, 1, 28, 28, 3), np.float32))


def test_filters_keep_transformers_support_on_wide_rows_with_ties():
  """The bisection filters against transformers' sorting warpers: 64 rows of 500, some with more
  tied top logits than k, top-k and top-p alone and together. Where top-p cuts through a tie,
  transformers keeps whichever tied tokens its sort put last; we keep the whole tie."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 500)).astype(np.float32) * 3
  logits[:8, :40] = 12.0  # 40 ties at the top: more than k of them
  logits[8:16, 100:] = -np.inf  # rows already filtered
  for k, p in ((10, 0.9), (50, 0.5), (50, 0.999), (40, 0.99), (0, 0.3), (7, 1.0), (0, 0.999)):
    config = SamplingConfig(do_sample=True, top_k=k, top_p=p)
    ours = np.isfinite(np.asarray(jax.jit(lambda x: warp(x, config))(jnp.asarray(logits))))
    theirs = hf_support(logits, k, p, 1.0)
    np.testing.assert_array_equal(ours[8:], theirs[8:], err_msg=f"k={k} p={p}")
    extra = ours[:8] & ~theirs[:8]
    assert not (theirs[:8] & ~ours[:8]).any() and not extra[:, 40:].any()  # only tied tokens added
    assert not extra.any() or ours[:8, :40].all()  # and then the whole tie


def test_first_argmax_is_jnp_argmax_with_ties_and_filtered_rows():
  from lvlm_jax.sampling.decode import first_argmax
  x = np.random.default_rng(1).normal(size=(6, 300)).astype(np.float32)
  x[1, [5, 7, 250]] = 9.0  # ties: the first wins
  x[2] = -np.inf
  x[3, :290] = -np.inf
  x[4, [30, 60]] = np.nan  # a broken row: the first NaN, as jnp.argmax
  np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_num_return_sequences_prefills_once_and_matches_repeated_prompts(llama):
  """k samples per prompt from one prefill are the rows `generate` makes from the prompts repeated
  k times (row i * k + j, same key), and the k samples of a prompt differ."""
  import dataclasses
  ids, mask = left_padded([[5, 9, 14, 3], [7, 22]])
  config = SamplingConfig(max_new_tokens=8, min_new_tokens=8, do_sample=True, temperature=1.5,
                          eos_token_ids=(2,))
  k = 3
  shared = generate(llama[0], ids, mask, rng=jax.random.key(4),
                    config=dataclasses.replace(config, num_return_sequences=k))
  repeated = generate(llama[0], np.repeat(ids, k, 0), np.repeat(mask, k, 0), config=config,
                      rng=jax.random.key(4))
  assert shared.tokens.shape == (2 * k, 8)
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
  np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(repeated.logprobs), atol=1e-5)
  assert len({tuple(r) for r in np.asarray(shared.tokens)[:k]}) > 1
  with pytest.raises(UserError, match="do_sample"):
    SamplingConfig(num_return_sequences=2)
