"""Masked next-token cross-entropy and token log-probs, against numpy on the model's logits."""

import jax
import numpy as np
import pytest
from flax import nnx

from training_fixtures import batch, logits_of, tiny_lvlm
from lvlm_jax.training.losses import (masked_token_logprobs, sft_loss_sums, supervised_capacity,
                                     token_logprobs)


@pytest.fixture(scope="module")
def model_and_batch():
  return tiny_lvlm(), batch(seed=1)


@nnx.jit(static_argnums=2)
def loss_sums(model, batch, chunk):
  return sft_loss_sums(model, batch, chunk)


def test_masked_cross_entropy_matches_numpy(model_and_batch):
  model, b = model_and_batch
  logits = np.asarray(logits_of(model, b), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  # Position t predicts token t + 1; the loss mask marks the predicted (target) tokens.
  picked = np.take_along_axis(logp[:, :-1], b["input_ids"][:, 1:, None], axis=-1)[..., 0]
  expected = -(picked * b["loss_mask"][:, 1:]).sum()
  loss_sum, tokens = loss_sums(model, b, 0)
  assert float(tokens) == b["loss_mask"][:, 1:].sum()
  np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)


def test_chunked_head_equals_whole(model_and_batch):
  """T - 1 = 31 positions in chunks of 8: the padded last chunk must not change anything."""
  model, b = model_and_batch
  whole, _ = loss_sums(model, b, 0)
  chunked, _ = loss_sums(model, b, 8)
  np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-6)
  per_token = nnx.jit(lambda m, x: token_logprobs(m, x, 8))(model, b)
  assert per_token.shape == b["input_ids"].shape and np.all(np.asarray(per_token)[:, 0] == 0)


def test_chunked_gradients_equal(model_and_batch):
  model, b = model_and_batch
  graphdef, params = nnx.split(model)

  @jax.jit
  def grads(params, chunk_batch):
    fn = lambda p, c: sft_loss_sums(nnx.merge(graphdef, p), chunk_batch, c)[0]
    return jax.grad(fn)(params, 0), jax.grad(fn)(params, 8)

  whole, chunked = grads(params, b)
  # float32 sums in another order: rounding scales with the largest gradient of the model.
  atol = 1e-6 * max(np.abs(np.asarray(a)).max() for a in jax.tree.leaves(whole))
  for a, c in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def sparse_batch():
  """The fixture batch with row 0 supervising nothing and row 1 a single token: rows of 0 to 16
  masked tokens out of 31 predictions."""
  b = batch(seed=2)
  b["loss_mask"][0] = 0
  b["loss_mask"][1] = 0
  b["loss_mask"][1, 20] = 1
  return b


@pytest.mark.parametrize("capacity,chunk", [(16, 0), (24, 8), (8, 0)])
def test_supervised_head_equals_whole_head(model_and_batch, sparse_batch, capacity, chunk):
  """capacity 16 and 24 hold every row's masked tokens (compacted head, also chunked); 8 holds
  fewer than the longest row's 16, so the whole-row branch must give the same."""
  model, _ = model_and_batch
  graphdef, params = nnx.split(model)
  mask = sparse_batch["loss_mask"]
  assert mask[:, 1:].sum(1).max() == 16 and mask[0].sum() == 0

  @jax.jit
  def sums_and_grads(params, b):
    def whole(p):
      logp = token_logprobs(nnx.merge(graphdef, p), b, chunk)
      return -(logp * b["loss_mask"]).sum(), logp * b["loss_mask"]

    def supervised(p):
      logp = masked_token_logprobs(nnx.merge(graphdef, p), b, b["loss_mask"], chunk, capacity)
      return -(logp * b["loss_mask"]).sum(), logp

    return (jax.value_and_grad(whole, has_aux=True)(params),
            jax.value_and_grad(supervised, has_aux=True)(params))

  ((want, want_logp), want_grads), ((got, got_logp), got_grads) = sums_and_grads(params,
                                                                                 sparse_batch)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  got_logp = np.asarray(got_logp)
  assert np.all(got_logp[mask == 0] == 0)  # nothing written off the mask
  np.testing.assert_allclose(got_logp, np.asarray(want_logp), rtol=1e-5, atol=1e-6)
  atol = 1e-6 * max(np.abs(np.asarray(a)).max() for a in jax.tree.leaves(want_grads))
  for a, c in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=atol)


def test_supervised_capacity():
  assert supervised_capacity(31) == 16 and supervised_capacity(2047) == 1024
  assert supervised_capacity(5) == 5 and supervised_capacity(100, share=1.0) == 100
