"""Teacher-forced log-probabilities of given continuations: per token and summed over a mask.

DPO, PPO and CSR's sentence scores all need log p(continuation | prompt) under some model. This is
a pure function of an NNX model (call it on `nnx.merge(graphdef, state)` inside a jitted step);
the per-token log-probs are the training loss's (`training.losses.token_logprobs`).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lvlm_jax.models.llm import LLM
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.training.losses import token_logprobs


def sequence_logprobs(model: LLM | LVLM, batch: Mapping[str, jax.Array],
                      logits_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Log-probs of the `loss_mask` tokens of each row, teacher-forced.

  batch: `input_ids` int [B, T]; `attention_mask` [B, T]; `loss_mask` [B, T], 1 on the tokens whose
  log-prob is wanted (a token is scored given everything before it); optional `positions` [B, T];
  `pixel_values` float32 [B, N, H, W, 3] for a LVLM. `logits_chunk` > 0 bounds the memory of the
  LM head (see `token_logprobs`); the result is the same.
  Returns (per-token log-probs float32 [B, T], 0 off the mask; their sums float32 [B]).
  """
  logp = token_logprobs(model, batch, logits_chunk) * batch["loss_mask"].astype(jnp.float32)
  return logp, logp.sum(axis=-1)
