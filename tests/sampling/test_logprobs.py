"""Teacher-forced log-probs against transformers, and against what decoding reported."""

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from lvlm_jax.models import hf
from lvlm_jax.sampling.decode import SamplingConfig, generate
from lvlm_jax.sampling.logprobs import sequence_logprobs

TOL = 1e-4
IMAGE_ID = 127

logprobs_jit = nnx.jit(sequence_logprobs)


def torch_token_logprobs(model, ids, mask, **kwargs):
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                   **kwargs).logits.float()
  logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:, None],
                                                                       dtype=torch.long))[..., 0]
  return np.pad(logp.numpy(), ((0, 0), (1, 0)))


def padded_batch(rows, prompt_lengths):
  """Left-padded ids/mask and a loss mask on everything after each row's prompt."""
  width = max(len(r) for r in rows)
  ids = np.zeros((len(rows), width), np.int32)
  mask, loss = np.zeros_like(ids), np.zeros_like(ids)
  for i, (row, prompt) in enumerate(zip(rows, prompt_lengths)):
    ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    loss[i, width - len(row) + prompt:] = 1
  return ids, mask, loss


def test_llama_matches_transformers_on_a_padded_batch(tiny_llama_dir):
  model = hf.load_llm(tiny_llama_dir)
  reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
  rng = np.random.default_rng(0)
  rows = [rng.integers(3, 127, n).tolist() for n in (12, 7, 9)]
  ids, mask, loss = padded_batch(rows, (5, 3, 4))
  per_token, sums = logprobs_jit(model, {"input_ids": jnp.asarray(ids), "attention_mask":
                                         jnp.asarray(mask), "loss_mask": jnp.asarray(loss)})
  expected = torch_token_logprobs(reference, ids, mask) * loss
  np.testing.assert_allclose(np.asarray(per_token), expected, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(sums), expected.sum(-1), atol=TOL, rtol=0)
  assert (np.asarray(per_token)[loss == 0] == 0).all()


def test_llava_with_two_images_matches_transformers(tiny_llava_dir):
  model = hf.load_lvlm(tiny_llava_dir)
  reference = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
  rng = np.random.default_rng(1)
  rows, prompts = [], []
  for n in (4, 2):
    prompt = [5] + [IMAGE_ID] * 16 + [6] + [IMAGE_ID] * 16 + rng.integers(3, 120, n).tolist()
    rows.append(prompt + rng.integers(3, 120, 6).tolist())
    prompts.append(len(prompt))
  ids, mask, loss = padded_batch(rows, prompts)
  pixels = rng.normal(size=(2, 2, 28, 28, 3)).astype(np.float32)
  per_token, _ = logprobs_jit(model, {"input_ids": jnp.asarray(ids), "attention_mask":
                                      jnp.asarray(mask), "loss_mask": jnp.asarray(loss),
                                      "pixel_values": jnp.asarray(pixels)})
  expected = torch_token_logprobs(
      reference, ids, mask, pixel_values=torch.tensor(pixels.reshape(4, 28, 28, 3).transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(np.asarray(per_token), expected * loss, atol=TOL, rtol=0)


def test_equal_the_log_probs_decoding_reported(tiny_llama_dir):
  """Scoring what `generate` sampled gives back its per-token log-probs (of the model itself,
  not of the warped distribution), up to each row's end."""
  import jax
  model = hf.load_llm(tiny_llama_dir)
  rng = np.random.default_rng(2)
  ids, mask, _ = padded_batch([rng.integers(3, 120, n).tolist() for n in (8, 5)], (8, 5))
  config = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20,
                          eos_token_ids=(2,))
  out = generate(model, ids, mask, config=config, rng=jax.random.key(3))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  new_mask = (np.arange(tokens.shape[1]) < lengths[:, None]).astype(np.int32)
  batch = {"input_ids": jnp.asarray(np.concatenate([ids, tokens], 1)),
           "attention_mask": jnp.asarray(np.concatenate([mask, new_mask], 1)),
           "loss_mask": jnp.asarray(np.concatenate([np.zeros_like(ids), new_mask], 1))}
  per_token, sums = logprobs_jit(model, batch)
  np.testing.assert_allclose(np.asarray(per_token)[:, ids.shape[1]:], np.asarray(out.logprobs),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(sums), np.asarray(out.logprobs).sum(-1), atol=TOL, rtol=0)
