"""Masked next-token cross-entropy and token log-probs, against numpy on the model's logits."""

import jax
import numpy as np
import pytest
from flax import nnx

from training_fixtures import batch, logits_of, tiny_lvlm
from lvlm_jax.training.losses import sft_loss_sums, token_logprobs


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
