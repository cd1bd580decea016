"""Optimizer construction: schedules, param groups, frozen parameters, decay mask, reset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from training_fixtures import tiny_lvlm
from lvlm_jax.errors import UserError
from lvlm_jax.models.lora import LoraConfig, apply_lora
from lvlm_jax.sharding import make_mesh
from lvlm_jax.training import optim, state as train_state


def test_warmup_cosine_and_constant_schedules():
  config = optim.OptimConfig(lr=1.0, warmup_ratio=0.1, final_lr_ratio=0.1)
  cosine = optim.schedule(config, 2.0, 100)
  assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(1.0)
  assert float(cosine(10)) == pytest.approx(2.0)
  assert float(cosine(55)) == pytest.approx(0.2 + 1.8 * 0.5, rel=1e-5)  # half way down the cosine
  assert float(cosine(100)) == pytest.approx(0.2)
  constant = optim.schedule(optim.OptimConfig(schedule="constant", warmup_ratio=0.0), 3e-4, 100)
  assert float(constant(0)) == float(constant(99)) == pytest.approx(3e-4)


def test_bad_settings_are_user_errors():
  with pytest.raises(UserError, match="schedule"):
    optim.OptimConfig(schedule="linear")
  with pytest.raises(UserError, match="regex"):
    optim.OptimConfig(lr_groups=(("projector(", 1e-5),))


@pytest.fixture(scope="module")
def lora_model():
  model = tiny_lvlm()
  apply_lora(model, LoraConfig(rank=2, target=r"llm\.layers\.\d+\..*_proj"), rngs=nnx.Rngs(1))
  return model


def test_lora_trainable_filter_and_groups(lora_model):
  config = optim.OptimConfig(trainable=r".*\.lora_[ab]|projector\..*", lr=1e-4,
                             lr_groups=((r"projector\..*", 2e-5),))
  _, params, frozen = train_state.split_model(lora_model, optim.trainable_filter(config))
  paths = {optim.path_str(p) for p, _ in jax.tree.leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert all(p.startswith("projector.") or p.endswith((".lora_a", ".lora_b")) for p in paths)
  assert "llm.layers.0.attn.q_proj.lora.lora_a" in paths and "projector.linear_1.kernel" in paths
  frozen_paths = {optim.path_str(p) for p, v in jax.tree.leaves_with_path(
      frozen, is_leaf=lambda x: isinstance(x, nnx.Variable)) if isinstance(v, nnx.Param)}
  assert "llm.layers.0.attn.q_proj.kernel" in frozen_paths and "vision.pre_norm.scale" in frozen_paths
  groups = dict(zip(sorted(paths), [optim.group_of(p, config) for p in sorted(paths)]))
  assert groups["projector.linear_2.bias"] == r"projector\..*"
  assert groups["llm.layers.1.mlp.down_proj.lora.lora_b"] == "default"


def test_nothing_trainable_is_an_error(lora_model):
  with pytest.raises(UserError, match="matches no parameter"):
    train_state.split_model(lora_model, optim.trainable_filter(optim.OptimConfig(trainable="nope")))


def _tree():
  return {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,)), "head": {"kernel": jnp.ones((2, 2))}}


def test_group_learning_rates_decay_mask_and_clipping():
  config = optim.OptimConfig(lr=0.1, lr_groups=((r"head\..*", 0.01),), warmup_ratio=0.0,
                             schedule="constant", weight_decay=0.5, clip_norm=1.0)
  params = _tree()
  tx = optim.make_optimizer(config, 10, params)
  opt_state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, opt_state = tx.update(zero, opt_state, params)
  # Zero gradients: only weight decay moves matrices (-lr * wd * p); vectors never decay.
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((3, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.01 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["bias"], 0)
  assert {k: float(v) for k, v in optim.current_lrs(opt_state).items()} == pytest.approx(
      {"default": 0.1, r"head\..*": 0.01})
  huge = jax.tree.map(lambda x: 1e6 * x, params)
  plain = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())
  expected, _ = plain.update(huge, plain.init(params), params)
  no_decay = optim.make_optimizer(optim.OptimConfig(lr=1.0, warmup_ratio=0.0, schedule="constant"),
                                  10, params)
  got, _ = no_decay.update(huge, no_decay.init(params), params)
  np.testing.assert_allclose(got["kernel"], -expected["kernel"], rtol=1e-6)


def test_reset_optimizer_zeroes_moments_and_restarts_schedule():
  config = optim.OptimConfig(lr=1.0, warmup_ratio=0.5)
  params = _tree()
  mesh = make_mesh()
  tx = optim.make_optimizer(config, 4, params)
  abstract = train_state.abstract_state(params, {}, tx)
  shardings = train_state.state_shardings(abstract, mesh)
  state = train_state.init_state(params, {}, tx, 0, shardings)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    _, state["opt_state"] = tx.update(grads, state["opt_state"], params)
  assert float(optim.current_lrs(state["opt_state"])["default"]) > 0.5
  faster = optim.make_optimizer(optim.OptimConfig(lr=5.0, warmup_ratio=0.0, schedule="constant"),
                                4, params)
  state = train_state.reset_optimizer(state, faster, shardings)
  adam = state["opt_state"][1]
  assert int(adam.count) == 0 and all(float(jnp.abs(m).max()) == 0 for m in jax.tree.leaves(adam.mu))
  _, opt_state = faster.update(grads, state["opt_state"], params)
  assert float(optim.current_lrs(opt_state)["default"]) == pytest.approx(5.0)
