"""The loss masks of SC-Tune's two phases, over token arrays (numpy, for the data layer).

Both keep a span that ends at, and includes, the first end token: the released trainer's
`expand_mask` (its Qwen-VL tokenizer pads with the end token, so "non-pad plus the first pad" is
"up to and including the first EOS"). Positions index tokens, as `losses.token_logprobs` does:
a mask value at t weighs log p(input_ids[t] | input_ids[:t]).
"""

import numpy as np


def eos_inclusive_mask(input_ids: np.ndarray, start: np.ndarray, eos_id: int) -> np.ndarray:
  """float32 [B, T]: 1 at start[b] <= t <= the first eos_id at or after start[b] in row b, or to
  the row's end where none follows (a caption cut at max_new_tokens). input_ids int [B, T],
  start int [B] (e.g. where each row's sampled caption begins)."""
  input_ids, start = np.asarray(input_ids), np.asarray(start)
  positions = np.arange(input_ids.shape[1])[None]
  is_end = (input_ids == eos_id) & (positions >= start[:, None])
  end = np.where(is_end.any(axis=1), np.argmax(is_end, axis=1), input_ids.shape[1] - 1)
  return ((positions >= start[:, None]) & (positions <= end[:, None])).astype(np.float32)


def locator_loss_mask(input_ids: np.ndarray, box_open_id: int, eos_id: int) -> np.ndarray:
  """float32 [B, T] of the locator phase: the tokens after the row's last `box_open_id` (the
  `<box>` that ends the locator prompt `<ref>{caption}</ref><box>` and opens the answer), up to
  and including the first eos_id after it: `(x1,y1),(x2,y2)</box>` and the end token. The last
  `<box>` rather than the first, because a generated caption may itself contain one.
  input_ids int [B, T]; `box_open_id` is one token (the shapes tokenizer's `<box>`, Qwen-VL's
  151853). Raises ValueError for a row without it."""
  input_ids = np.asarray(input_ids)
  is_open = input_ids == box_open_id
  missing = np.flatnonzero(~is_open.any(axis=1))
  if missing.size:
    raise ValueError(f"rows {missing.tolist()} have no box-open token {box_open_id}: the "
                     "locator prompt must end with it")
  last_open = input_ids.shape[1] - 1 - np.argmax(is_open[:, ::-1], axis=1)
  return eos_inclusive_mask(input_ids, last_open + 1, eos_id)
