"""Preference losses against an independent numpy computation of each formula, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvlm_jax.training.preference import PreferenceLossConfig, noisy_token_logps, preference_loss


def reference_loss(config, pc, pr, rc, rr, nc=None, nr=None):
  """float64 numpy, written from the papers' formulas (DPO eq. 7, cDPO, IPO eq. 17, SLiC hinge).
  Log-probs are sums over each response; IPO divides them by the response lengths nc, nr first,
  as TRL's DPOTrainer does for loss_type="ipo" (`average_log_prob`)."""
  nll = pc
  if config.loss_type == "ipo":
    pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
  z = (pc - pr) - (rc - rr)
  b = config.beta
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  if config.loss_type == "sigmoid":
    eps = config.label_smoothing
    losses = -(1 - eps) * log_sigmoid(b * z) - eps * log_sigmoid(-b * z)
  elif config.loss_type == "ipo":
    losses = (z - 1 / (2 * b)) ** 2
  else:
    losses = np.maximum(0.0, 1 - b * z)
  return np.mean(losses - config.nll_coef * nll)


CONFIGS = [
    PreferenceLossConfig("sigmoid", beta=0.1),
    PreferenceLossConfig("sigmoid", beta=0.5, label_smoothing=0.2),
    PreferenceLossConfig("sigmoid", beta=0.1, nll_coef=1 / 1024),  # STIC
    PreferenceLossConfig("ipo", beta=0.3),
    PreferenceLossConfig("ipo", beta=0.1, nll_coef=1 / 1024),
    PreferenceLossConfig("hinge", beta=0.1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.loss_type}-{c.beta}-{c.label_smoothing}-{c.nll_coef}")
def test_loss_and_gradients_match_the_formula(config):
  rng = np.random.default_rng(0)
  # Summed log-probs of long responses: tens to hundreds of nats, margins on both sides of zero.
  inputs = [rng.uniform(-120, -20, 6) for _ in range(4)]
  lengths = [rng.integers(5, 60, 6), rng.integers(5, 60, 6)]  # response tokens, chosen / rejected
  tokens = dict(chosen_tokens=jnp.asarray(lengths[0]), rejected_tokens=jnp.asarray(lengths[1]))
  loss, _ = preference_loss(config, *map(jnp.asarray, inputs), **tokens)
  np.testing.assert_allclose(float(loss), reference_loss(config, *inputs, *lengths), rtol=1e-5,
                             atol=1e-6)
  grads = jax.grad(lambda pc, pr: preference_loss(config, pc, pr, *map(jnp.asarray, inputs[2:]),
                                                  **tokens)[0],
                   argnums=(0, 1))(*map(jnp.asarray, inputs[:2]))
  for which, grad in enumerate(grads):
    numeric = np.zeros(6)
    for i in range(6):
      up = [x.copy() for x in inputs]
      down = [x.copy() for x in inputs]
      up[which][i] += 1e-5
      down[which][i] -= 1e-5
      numeric[i] = (reference_loss(config, *up, *lengths)
                    - reference_loss(config, *down, *lengths)) / 2e-5
    np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-3, atol=1e-6)


def test_reference_gets_no_gradient_and_metrics():
  config = PreferenceLossConfig(beta=0.1)
  pc, pr, rc, rr = (jnp.asarray(v) for v in ([-10.0, -30.0], [-20.0, -10.0], [-15.0, -15.0], [-15.0, -15.0]))
  loss, metrics = preference_loss(config, pc, pr, rc, rr)
  np.testing.assert_allclose(metrics["rewards/chosen"], 0.1 * np.mean([5.0, -15.0]), rtol=1e-6)
  np.testing.assert_allclose(metrics["rewards/rejected"], 0.1 * np.mean([-5.0, 5.0]), rtol=1e-6)
  assert float(metrics["rewards/accuracy"]) == 0.5
  assert float(metrics["rewards/margin"]) == pytest.approx(0.1 * np.mean([10.0, -20.0]))


def test_precomputed_and_in_step_reference_give_the_same_loss():
  """The loss sees only numbers: a reference computed now or read from the batch is the same input."""
  config = PreferenceLossConfig(beta=0.1, nll_coef=1 / 1024)
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 11, (2, 5)))
  per_token = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
  in_step = per_token.sum(-1)
  stored = np.asarray(in_step).tolist()  # e.g. written into the preference JSONL
  pc, pr = jnp.asarray([-3.0, -4.0]), jnp.asarray([-6.0, -2.0])
  a, _ = preference_loss(config, pc, pr, in_step, in_step[::-1])
  b, _ = preference_loss(config, pc, pr, jnp.asarray(stored), jnp.asarray(stored[::-1]))
  assert float(a) == float(b)


def test_noisy_token_logps_takes_top1_or_top2_when_top1_is_the_label():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 7, 13)).astype(np.float32)
  labels = rng.integers(0, 13, (3, 7))
  labels[0, :] = logits[0].argmax(-1)  # a row whose labels are always the model's top-1
  got = np.asarray(noisy_token_logps(jnp.asarray(logits), jnp.asarray(labels)))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  for b in range(3):
    for t in range(7):
      order = np.argsort(-logp[b, t])
      token = order[1] if order[0] == labels[b, t] else order[0]
      assert got[b, t] == pytest.approx(logp[b, t, token], abs=1e-5)


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="loss_type"):
    PreferenceLossConfig(loss_type="kto")
  with pytest.raises(ValueError, match="label_smoothing"):
    PreferenceLossConfig(label_smoothing=0.5)
