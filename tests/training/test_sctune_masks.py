"""SC-Tune's loss masks on hand-written token rows: the span ends at and keeps the first EOS."""

import numpy as np
import pytest

from lvlm_jax.training.sctune_masks import eos_inclusive_mask, locator_loss_mask

PAD, EOS, BOX, BOX_END = 0, 2, 5, 6


def test_caption_mask_keeps_the_first_eos_and_nothing_after():
  ids = np.array([
      [1, 9, 9, 7, 8, EOS, PAD, PAD],   # caption from 3, EOS at 5, padding
      [1, 9, 7, 7, 7, 7, 7, 7],         # caption from 2, cut at the row's end: no EOS
      [1, 9, 9, EOS, 8, EOS, EOS, EOS],  # pad == EOS (Qwen-VL): an EOS before start is not read
      [1, 9, 9, 9, EOS, 8, 8, 8],       # the first token is the EOS: an empty caption keeps it
  ])
  expected = np.array([
      [0, 0, 0, 1, 1, 1, 0, 0],
      [0, 0, 1, 1, 1, 1, 1, 1],
      [0, 0, 0, 0, 1, 1, 0, 0],
      [0, 0, 0, 0, 1, 0, 0, 0],
  ], np.float32)
  mask = eos_inclusive_mask(ids, np.array([3, 2, 4, 4]), EOS)
  assert mask.dtype == np.float32
  np.testing.assert_array_equal(mask, expected)


def test_locator_mask_is_the_box_after_the_last_box_token_and_the_end_token():
  ids = np.array([
      # <ref> caption </ref> <box> ( 1 , 2 ) ... </box> EOS pad
      [1, 20, 30, 31, 21, BOX, 40, 41, 42, BOX_END, EOS, PAD],
      # the caption itself holds a <box>: the answer opens at the last one
      [1, 20, BOX, 31, 21, BOX, 40, 41, BOX_END, EOS, PAD, PAD],
      # pad == EOS
      [1, 20, 30, 21, BOX, 40, 41, 42, 43, BOX_END, EOS, EOS],
  ])
  expected = np.array([
      [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0],
      [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
      [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0],
  ], np.float32)
  np.testing.assert_array_equal(locator_loss_mask(ids, BOX, EOS), expected)


def test_locator_mask_refuses_a_row_without_the_box_token():
  ids = np.array([[1, BOX, 40, EOS], [1, 20, 40, EOS]])
  with pytest.raises(ValueError, match=r"rows \[1\] have no box-open token 5"):
    locator_loss_mask(ids, BOX, EOS)
