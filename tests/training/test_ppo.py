"""SC-Tune's PPO against an independent float64 computation of METHODS.md 1.3 (advantages, the
clipped loss and its gradient, the EOS mask, the ratio guard), the epochs' KL early stop, and the
step on a tiny LVLM (its update is the formula's gradient, accumulated too; A = 0 moves nothing)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from training_fixtures import batch, logits_of, tiny_lvlm
from lvlm_jax.errors import UserError
from lvlm_jax.sharding import global_batch, make_mesh
from lvlm_jax.training import ppo, state as train_state, steps


def reference(logp, rollout, snapshot, mask, reward, baseline, beta, gamma, eps, guard):
  """float64 numpy, loop by loop from METHODS.md 1.3: (loss, dloss/dlogp [B, T], A [B, T],
  metrics). Off the mask nothing is read."""
  rows, length = mask.shape
  adv = np.zeros((rows, length))
  for b in range(rows):
    tokens = np.flatnonzero(mask[b])
    r, base = np.zeros(length), np.zeros(length)
    for t in tokens:
      r[t] = -beta * (rollout[b, t] - snapshot[b, t])
    r[tokens[-1]] += reward[b]
    base[tokens[-1]] = baseline[b]
    for t in tokens:
      ret = sum(gamma ** (u - t) * r[u] for u in range(t, length))
      base_ret = sum(gamma ** (u - t) * base[u] for u in range(t, length))
      adv[b, t] = ret - base_ret
  on = mask > 0
  n = on.sum()
  rho = np.exp(np.where(on, logp - rollout, 0.0))
  unclipped, clipped = -adv * rho, -adv * np.clip(rho, 1 - eps, 1 + eps)
  loss = np.where(on, np.maximum(unclipped, clipped), 0.0).sum() / n
  # d(-A rho)/dlogp = -A rho where the unclipped term is the max; the clipped one is constant.
  grad = np.where(on & (unclipped >= clipped), -adv * rho, 0.0) / n
  metrics = {"ratio": rho[on].mean(), "clip_fraction": (clipped > unclipped)[on].mean(),
             "policy_kl": (rollout - logp)[on].mean()}
  if metrics["ratio"] > guard:
    loss, grad = 0.0, np.zeros_like(grad)
  return loss, grad, adv, metrics


# Three rows of 10 tokens: a 2-3 token prompt, the caption, its EOS (in the mask), then padding.
MASK = np.zeros((3, 10))
MASK[0, 2:7] = 1  # EOS at 6
MASK[1, 3:9] = 1  # EOS at 8
MASK[2, 2:10] = 1  # cut at max_new_tokens: no EOS
# Ratios chosen on both sides of the clip range, for both signs of the advantage.
RATIOS = np.ones((3, 10))
RATIOS[0, 2:7] = [1.5, 0.6, 1.0, 1.3, 0.9]  # A > 0
RATIOS[1, 3:9] = [0.5, 1.4, 0.7, 1.05, 1.25, 0.85]  # A < 0
RATIOS[2, 2:10] = [1.1, 0.75, 1.35, 0.95, 1.0, 1.21, 0.79, 1.0]  # A's sign from the KL
REWARD, BASELINE = np.array([0.9, 0.0, 0.5]), np.array([0.1, 0.6, 0.5])


def inputs(seed=0, ratios=RATIOS):
  """(logp, rollout, snapshot) float64 [3, 10]: log-probs on the mask; off it, values that would
  overflow float32 exp (logp - rollout = 100) or swamp any sum if they were read."""
  rng = np.random.default_rng(seed)
  rollout = rng.uniform(-4, -0.1, MASK.shape)
  snapshot = rollout + rng.normal(0, 0.5, MASK.shape)
  logp = rollout + np.log(ratios)
  off = MASK == 0
  logp[off], rollout[off], snapshot[off] = 100.0, 0.0, -1e4
  return logp, rollout, snapshot


def jax_loss(config, logp, rollout, snapshot, mask=MASK, reward=REWARD, baseline=BASELINE):
  """(loss, dloss/dlogp, A, metrics) in float32 from the module's functions."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  adv = ppo.advantages(f32(rollout), f32(snapshot), f32(mask), f32(reward), f32(baseline), config)
  loss_fn = lambda lp: ppo.ppo_loss(lp, f32(rollout), adv, f32(mask), config)
  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(f32(logp))
  return float(loss), np.asarray(grad), np.asarray(adv), {k: float(v) for k, v in metrics.items()}


def reference_of(config, logp, rollout, snapshot):
  return reference(logp, rollout, snapshot, MASK, REWARD, BASELINE, config.kl_coef, config.gamma,
                   config.clip_range, config.ratio_guard)


def assert_close(actual, expected, rel=1e-5):
  """Float32 against float64: relative to the largest magnitude of the array."""
  np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


CONFIGS = [ppo.PPOConfig(), ppo.PPOConfig(kl_coef=0.3, gamma=0.9, clip_range=0.22)]


@pytest.mark.parametrize("config", CONFIGS, ids=["sctune", "kl0.3-gamma0.9-clip0.22"])
def test_loss_and_gradient_equal_the_formula(config):
  logp, rollout, snapshot = inputs()
  loss, grad, adv, metrics = jax_loss(config, logp, rollout, snapshot)
  expected, expected_grad, expected_adv, expected_metrics = reference_of(config, logp, rollout,
                                                                         snapshot)
  on = MASK > 0
  rho = np.exp(np.where(on, logp - rollout, 0.0))
  eps = config.clip_range
  branches = {"clipped above, A > 0": on & (rho > 1 + eps) & (expected_adv > 0),
              "clipped below, A < 0": on & (rho < 1 - eps) & (expected_adv < 0),
              "above, A < 0": on & (rho > 1 + eps) & (expected_adv < 0),
              "below, A > 0": on & (rho < 1 - eps) & (expected_adv > 0),
              "inside": on & (rho > 1 - eps) & (rho < 1 + eps)}
  assert all(b.any() for b in branches.values()), {k: b.sum() for k, b in branches.items()}
  assert_close(adv, expected_adv)
  assert loss == pytest.approx(expected, rel=1e-5)
  assert_close(grad, expected_grad)
  clipped = branches["clipped above, A > 0"] | branches["clipped below, A < 0"]
  assert np.all(grad[clipped | ~on] == 0)
  assert np.all(grad[on & ~clipped] != 0)
  for key, value in expected_metrics.items():
    assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  assert metrics["ratio_guarded"] == 0.0


def test_tokens_after_the_eos_change_nothing():
  """The mask ends at the EOS: whatever follows it (and the prompt) is not read."""
  config = ppo.PPOConfig()
  logp, rollout, snapshot = inputs()
  first = jax_loss(config, logp, rollout, snapshot)
  off = MASK == 0
  logp[off], rollout[off], snapshot[off] = -3.0, -50.0, 7.0
  second = jax_loss(config, logp, rollout, snapshot)
  assert first[0] == second[0]
  for a, b in zip(first[1:3], second[1:3]):
    np.testing.assert_array_equal(a, b)
  assert first[3] == second[3]


def test_ratio_guard_zeroes_loss_and_gradient_above_a_mean_ratio_of_ten():
  config = ppo.PPOConfig()
  for mean_ratio, guarded in ((20.0, True), (9.5, False)):
    ratios = np.where(MASK > 0, mean_ratio, 1.0)
    logp, rollout, snapshot = inputs(seed=1, ratios=ratios)
    loss, grad, _, metrics = jax_loss(config, logp, rollout, snapshot)
    expected, expected_grad, _, _ = reference_of(config, logp, rollout, snapshot)
    assert metrics["ratio"] == pytest.approx(mean_ratio, rel=1e-5)
    assert metrics["ratio_guarded"] == float(guarded)
    if guarded:
      assert loss == 0.0 and np.all(grad == 0)
    else:
      assert loss != 0.0 and loss == pytest.approx(expected, rel=1e-5)
      assert_close(grad, expected_grad)


def test_config_rejects_out_of_range_values():
  with pytest.raises(UserError, match="ppo.clip_range=1.5 must be in"):
    ppo.PPOConfig(clip_range=1.5)
  with pytest.raises(UserError, match="ppo.ppo_epochs=0"):
    ppo.PPOConfig(ppo_epochs=0)


def fake_step(kls):
  """A step that counts its calls in the state and reports the next policy KL of `kls`."""
  def step(state, batch, config):
    del batch, config
    calls = state["calls"]
    return {**state, "calls": calls + 1}, {"policy_kl": jnp.asarray(kls, jnp.float32)[calls],
                                           "loss": calls.astype(jnp.float32)}
  return step


@pytest.mark.parametrize("kls, epochs, ran", [
    ((0.2, 1.6, 0.1), 3, 2),  # stops after the epoch whose KL exceeds 1.5
    ((0.2, 1.5, 0.1), 3, 3),  # 1.5 itself does not exceed
    ((2.0, 0.1), 2, 1),
    ((0.0, 0.3, 0.0), 2, 2),  # never more than ppo_epochs
])
def test_epochs_stop_after_the_policy_kl_exceeds_the_limit(kls, epochs, ran):
  config = ppo.PPOConfig(ppo_epochs=epochs)
  state = {"calls": jnp.int32(0), "step": jnp.int32(7), "rng": jax.random.key(0)}
  state, metrics = jax.jit(lambda s: ppo.ppo_update(s, {}, config=config,
                                                    step_fn=fake_step(kls)))(state)
  assert int(state["calls"]) == ran and float(metrics["epochs_run"]) == ran
  assert int(state["step"]) == 8  # one rollout batch, whatever the epochs
  assert float(metrics["policy_kl"]) == pytest.approx(kls[ran - 1])


# The step on a tiny LVLM.

TX = optax.sgd(1.0)  # no decay: the update is minus the gradient


@pytest.fixture(scope="module")
def setup():
  """(mesh, graphdef, shardings, fresh_state(), the jitted step, model logps float64 [B, T])."""
  mesh = make_mesh()
  model = tiny_lvlm()
  graphdef, params, frozen = train_state.split_model(model, nnx.Param)
  shardings = train_state.state_shardings(train_state.abstract_state(params, frozen, TX), mesh)

  def fresh_state():
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return train_state.init_state(copy(params), copy(frozen), TX, 0, shardings)

  step = steps.jit_train_step(ppo.ppo_step, shardings, mesh, graphdef=graphdef, tx=TX,
                              config=ppo.PPOConfig())
  b = batch(seed=3)
  logits = np.asarray(logits_of(model, b), np.float64)[:, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, b["input_ids"][:, 1:, None], -1)[..., 0]
  return mesh, graphdef, shardings, fresh_state, step, np.pad(picked, ((0, 0), (1, 0)))


def rollout_batch(logp, shift, reward, baseline, snapshot_noise=0.0):
  """batch(seed=3) as a rollout: rollout_logps = the model's logps - shift (so the ratio is
  exp(shift)), the snapshot's a little off."""
  b = batch(seed=3)
  rng = np.random.default_rng(4)
  rollout = (logp - shift) * b["loss_mask"]
  snapshot = rollout + snapshot_noise * rng.normal(size=rollout.shape) * b["loss_mask"]
  b.update(rollout_logps=rollout.astype(np.float32), snapshot_logps=snapshot.astype(np.float32),
           reward=np.asarray(reward, np.float32), baseline=np.asarray(baseline, np.float32))
  return b


def run(setup, b, step=None, state=None):
  mesh, _, _, fresh_state, default_step, _ = setup
  with jax.set_mesh(mesh):
    state, metrics = (step or default_step)(state or fresh_state(), global_batch(b, mesh))
  return state, {k: float(v) for k, v in metrics.items()}


def test_token_logps_are_the_models(setup):
  mesh, graphdef, _, fresh_state, _, logp = setup
  state = fresh_state()
  with jax.set_mesh(mesh):
    got = ppo.token_logps(graphdef, state["params"], state["frozen"],
                          global_batch(batch(seed=3), mesh))
  assert_close(np.asarray(got), logp)


def test_step_update_is_the_formulas_gradient(setup):
  """SGD at lr 1: params - new params = the chain rule of the formula's dL/dlogp (float64, at the
  model's log-probs) through the model's own logits (jax.grad); also with 2 micro-batches."""
  mesh, graphdef, shardings, fresh_state, step, logp = setup
  rng = np.random.default_rng(5)
  shift = rng.uniform(-0.5, 0.5, logp.shape)  # ratios in [0.6, 1.65]: both clips are hit
  b = rollout_batch(logp, shift, rng.uniform(0, 1, 8), rng.uniform(0, 1, 8), snapshot_noise=0.3)
  config = ppo.PPOConfig()
  expected, dlogp, _, expected_metrics = reference(
      logp, b["rollout_logps"].astype(np.float64), b["snapshot_logps"].astype(np.float64),
      b["loss_mask"], b["reward"], b["baseline"], config.kl_coef, config.gamma,
      config.clip_range, config.ratio_guard)
  assert 0 < expected_metrics["clip_fraction"] < 0.5
  weights = jnp.asarray(dlogp[:, 1:], jnp.float32)
  model_inputs = {k: b[k] for k in ("input_ids", "positions", "attention_mask", "pixel_values")}
  initial = fresh_state()
  before, frozen = initial["params"], initial["frozen"]

  def weighted(p):
    logits, _ = nnx.merge(graphdef, p, frozen)(**model_inputs)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1),
                                 b["input_ids"][:, 1:, None], -1)[..., 0]
    return jnp.sum(weights * picked)

  expected_grad = jax.jit(jax.grad(weighted))(before)
  scale = float(optax.tree.norm(expected_grad))
  accumulated = steps.jit_train_step(ppo.ppo_step, shardings, mesh, graphdef=graphdef, tx=TX,
                                     config=config, accum_steps=2)
  for jitted in (step, accumulated):
    state, metrics = run(setup, b, jitted)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    for key, value in expected_metrics.items():
      assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert metrics["reward"] == pytest.approx(b["reward"].mean(), rel=1e-6)
    assert metrics["baseline"] == pytest.approx(b["baseline"].mean(), rel=1e-6)
    assert metrics["loss_tokens"] == b["loss_mask"].sum()
    assert int(state["step"]) == 1
    # As in test_dpo: float32 sums of terms of both signs, relative to each leaf's norm.
    for new, old, g in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before),
                           jax.tree.leaves(expected_grad)):
      old, g = np.asarray(old), np.asarray(g)
      assert np.linalg.norm(old - np.asarray(new) - g) <= (1e-4 * np.linalg.norm(g) + 1e-8 * scale
                                                         + 2e-7 * np.linalg.norm(old))


def test_zero_advantage_moves_nothing(setup):
  """reward == baseline and snapshot == rollout == the policy: A = 0, so no parameter moves."""
  *_, fresh_state, _, logp = setup
  reward = np.linspace(0, 1, 8)
  state, metrics = run(setup, rollout_batch(logp, 0.0, reward, reward))
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert metrics["advantage"] == 0.0 and metrics["kl"] == 0.0 and metrics["grad_norm"] == 0.0
  assert abs(metrics["policy_kl"]) < 1e-5 and metrics["ratio"] == pytest.approx(1.0, abs=1e-5)
  for new, old in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(fresh_state()["params"])):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_ratio_guard_in_the_step_moves_nothing(setup):
  *_, fresh_state, _, logp = setup
  rng = np.random.default_rng(6)
  state, metrics = run(setup, rollout_batch(logp, 3.0, rng.uniform(0, 1, 8), np.zeros(8)))
  assert metrics["ratio"] == pytest.approx(np.exp(3.0), rel=1e-5)
  assert metrics["ratio_guarded"] == 1.0 and metrics["loss"] == 0.0
  assert metrics["grad_norm"] == 0.0
  for new, old in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(fresh_state()["params"])):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_epochs_of_the_real_step_stop_on_policy_kl(setup):
  """A rollout policy 2 nats above the model on every caption token: policy_kl 2 > 1.5 after the
  first epoch, so one update runs; the state's step counts the rollout batch."""
  mesh, graphdef, shardings, fresh_state, _, logp = setup
  update = steps.jit_train_step(ppo.ppo_update, shardings, mesh, graphdef=graphdef, tx=TX,
                                config=ppo.PPOConfig())
  b = global_batch(rollout_batch(logp, -2.0, np.full(8, 0.7), np.full(8, 0.2)), mesh)
  with jax.set_mesh(mesh):
    state, metrics = update(fresh_state(), b)
  assert float(metrics["epochs_run"]) == 1 and int(state["step"]) == 1
  assert float(metrics["policy_kl"]) == pytest.approx(2.0, rel=1e-5)
  # Both epochs when the rollout policy is the model itself (policy_kl 0 < 1.5).
  b = global_batch(rollout_batch(logp, 0.0, np.full(8, 0.7), np.full(8, 0.2)), mesh)
  with jax.set_mesh(mesh):
    state, metrics = update(fresh_state(), b)
  assert float(metrics["epochs_run"]) == 2 and int(state["step"]) == 1
