"""Teacher-forced log-probabilities of given continuations: per token and summed over a mask.

DPO, PPO and CSR's sentence scores all need log p(continuation | prompt) under some model. This is
a pure function of an NNX model (call it on `nnx.merge(graphdef, state)` inside a jitted step).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lvlm_jax.models.llm import LLM
from lvlm_jax.models.lvlm import LVLM


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
  """logits float [B, T, V] (position t predicts token t + 1), input_ids int [B, T] ->
  float32 [B, T]: log p(input_ids[:, t] | input_ids[:, :t]), 0 at t = 0 (nothing predicts it)."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logp = picked - jax.nn.logsumexp(logits, axis=-1)
  return jnp.pad(logp, ((0, 0), (1, 0)))


def sequence_logprobs(model: LLM | LVLM,
                      batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Log-probs of the `loss_mask` tokens of each row, teacher-forced.

  batch: `input_ids` int [B, T]; `attention_mask` [B, T]; `loss_mask` [B, T], 1 on the tokens whose
  log-prob is wanted (a token is scored given everything before it); optional `positions` [B, T];
  `pixel_values` float32 [B, N, H, W, 3] for a LVLM.
  Returns (per-token log-probs float32 [B, T], 0 off the mask; their sums float32 [B]).
  """
  input_ids = batch["input_ids"]
  kwargs = dict(positions=batch.get("positions"), attention_mask=batch.get("attention_mask"))
  if isinstance(model, LVLM):
    kwargs["pixel_values"] = batch.get("pixel_values")
  logits, _ = model(input_ids, **kwargs)
  logp = token_logprobs(logits, input_ids) * batch["loss_mask"].astype(jnp.float32)
  return logp, logp.sum(axis=-1)
