"""A run whose loss or gradient turns NaN/inf stops with the step named, before saving it; a
non-finite number in the config is refused when parsed."""

import math
import os

import numpy as np
import pytest

from training_fixtures import tiny_run_config
from lvlm_jax.errors import UserError
from lvlm_jax.methods import sft
from lvlm_jax.training import checkpoint, optim


@pytest.mark.parametrize("key, value", [("optim.lr", math.nan), ("optim.b2", math.inf),
                                        ("train.peak_flops", -math.inf)])
def test_non_finite_config_numbers_are_refused(key, value):
  with pytest.raises(UserError, match=rf"{key}=.*finite"):
    sft.parse(tiny_run_config(**{key: value}))


def test_nan_lr_refused_when_built_directly():
  with pytest.raises(UserError, match="optim.lr=nan"):
    optim.OptimConfig(lr=math.nan)


def test_diverging_run_stops_before_saving_a_spoilt_state(tmp_path):
  """lr 1e30 without clipping: the weights overflow within a few steps. The run stops naming the
  first step whose loss or grad_norm is not finite, and every checkpoint on disk holds finite
  weights."""
  config = tiny_run_config(**{"optim.lr": 1e30, "optim.clip_norm": 0.0, "train.num_steps": 8,
                              "checkpoint.every_steps": 1, "checkpoint.keep": 8})
  with pytest.raises(UserError, match=r"^step (\d+): (loss|grad_norm) is (nan|inf|-inf); the run "
                     r"stopped without saving \(last good checkpoint: step \d+\)") as info:
    sft.run(sft.parse(config), str(tmp_path), raw_config=config)
  bad_step = int(str(info.value).split(":")[0].split()[1])
  assert 1 < bad_step <= 8
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps and max(steps) < bad_step
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(max(steps)) / "state")
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(restored["params"])]
  assert leaves and all(np.isfinite(x).all() for x in leaves)
