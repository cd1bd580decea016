"""Teacher-forced token log-probs and the masked next-token cross-entropy, as pure functions.

Losses are returned as sums with their token counts, not means: a step that accumulates
micro-batches (or a sharded batch) divides once by the total, so k micro-batches give exactly the
gradient of one k-times-larger batch, and every token weighs the same whatever row it is in.
"""

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lvlm_jax.models.llava_next import batch_images
from lvlm_jax.models.llm import LLM, default_positions
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.sharding import constrain


def hidden_states(model: LLM | LVLM, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Final-normed hidden states [B, T, D] of `input_ids` (with the batch's images for a LVLM)."""
  input_ids = batch["input_ids"]
  positions = default_positions(input_ids, batch.get("positions"), batch.get("attention_mask"))
  rope = None
  if isinstance(model, LVLM):
    images = batch_images(batch)
    embeds, llm = model.embed(input_ids, images), model.llm
    rope, _ = model.rope_positions(input_ids, batch.get("attention_mask"), images)
  else:
    embeds, llm = model.embed(input_ids), model
  hidden, _ = llm.hidden(constrain(embeds, ("batch", "length", "embed")), positions,
                         rope_positions=rope)
  return hidden


def _picked_logprobs(llm: LLM, hidden: jax.Array, targets: jax.Array) -> jax.Array:
  """hidden [B, L, D], targets int [B, L] -> float32 [B, L]: log p(target) under the LM head."""
  logits = llm.logits(hidden)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def _head_logprobs(llm: LLM, hidden: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
  """hidden [B, L, D], targets int [B, L] -> float32 [B, L] log p(target); chunk > 0 runs the LM
  head `chunk` positions at a time, recomputed in the backward pass."""
  b, length, d = hidden.shape
  if not chunk or length <= chunk:
    return _picked_logprobs(llm, hidden, targets)
  pad = -length % chunk
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = (length + pad) // chunk
  hidden = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, chunk, D]
  targets = targets.reshape(b, n, chunk).swapaxes(0, 1)
  piece = jax.checkpoint(lambda h, t: _picked_logprobs(llm, h, t))
  _, logp = jax.lax.scan(lambda carry, x: (carry, piece(*x)), None, (hidden, targets))
  return logp.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]


def token_logprobs(model: LLM | LVLM, batch: Mapping[str, jax.Array], chunk: int = 0) -> jax.Array:
  """float32 [B, T]: log p(input_ids[:, t] | input_ids[:, :t]); 0 at t = 0 (nothing predicts it).

  chunk > 0 computes the vocabulary projection `chunk` positions at a time, recomputed in the
  backward pass, so the float32 logits [B, T, V] never exist at once (they dominate the memory
  of a 7B model at T = 2048). The result is the same as chunk = 0.
  """
  llm = model.llm if isinstance(model, LVLM) else model
  hidden = hidden_states(model, batch)[:, :-1]  # position t predicts token t + 1
  logp = _head_logprobs(llm, hidden, batch["input_ids"][:, 1:], chunk)
  return jnp.pad(logp, ((0, 0), (1, 0)))


# The share of a row's positions the compacted LM head has room for. A LLaVA-1.5 sequence spends
# 576 positions on an image and most of the rest on the prompt, so its responses take well under
# half of it; a batch with a longer response takes the whole-row path, at today's cost.
SUPERVISED_SHARE = 0.5


def supervised_capacity(positions: int, share: float = SUPERVISED_SHARE) -> int:
  """Static room per row [] of the compacted LM head for rows of `positions` predictions:
  `share` of them rounded up to a multiple of 8 (vector-friendly), at most all of them."""
  return min(positions, -(-math.ceil(positions * share) // 8) * 8)


def masked_token_logprobs(model: LLM | LVLM, batch: Mapping[str, jax.Array], mask: jax.Array,
                          chunk: int = 0, capacity: int | None = None) -> jax.Array:
  """float32 [B, T]: `token_logprobs` where `mask` [B, T] (the predicted tokens) is set, 0
  elsewhere, with the LM head run only at the positions that predict a masked token.

  Each row's predicting positions are moved to its front by a stable sort (shapes stay static;
  the rows, and so their batch sharding, stay apart) and the first `capacity` of them
  (`supervised_capacity` by default) go through the head. When some row has more masked tokens
  than that, the whole rows go through it instead (a `lax.cond`: one branch runs), so the result
  never depends on the capacity. The vision tower and decoder run on every position either way.
  """
  llm = model.llm if isinstance(model, LVLM) else model
  hidden = hidden_states(model, batch)[:, :-1]  # position t predicts token t + 1
  targets = batch["input_ids"][:, 1:]
  wanted = mask[:, 1:] > 0
  b, length = targets.shape
  capacity = supervised_capacity(length) if capacity is None else min(capacity, length)

  def whole(hidden):
    return jnp.where(wanted, _head_logprobs(llm, hidden, targets, chunk), 0.0)

  def compacted(hidden):
    order = jnp.argsort(~wanted, axis=1, stable=True)[:, :capacity]  # masked positions first
    picked = _head_logprobs(llm, jnp.take_along_axis(hidden, order[..., None], axis=1),
                            jnp.take_along_axis(targets, order, axis=1), chunk)
    picked = jnp.where(jnp.take_along_axis(wanted, order, axis=1), picked, 0.0)
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, length), jnp.float32).at[rows, order].set(picked, unique_indices=True)

  if capacity == length:
    logp = whole(hidden)
  else:
    fits = jnp.max(jnp.sum(wanted, axis=1)) <= capacity
    logp = jax.lax.cond(fits, compacted, whole, hidden)
  return jnp.pad(logp, ((0, 0), (1, 0)))


def masked_nll(logp: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logp, mask [B, T] -> (summed negative log-likelihood over the mask [], mask tokens [])."""
  mask = mask.astype(jnp.float32)
  return -jnp.sum(logp * mask), jnp.sum(mask)


def sft_loss_sums(model: LLM | LVLM, batch: Mapping[str, jax.Array],
                  chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy on the `loss_mask` tokens of a batch: (summed loss [], loss tokens [])."""
  mask = batch["loss_mask"]
  return masked_nll(masked_token_logprobs(model, batch, mask, chunk), mask)
