"""Preference-optimisation losses on sequence log-probs: DPO (sigmoid), IPO, hinge, plus an NLL term.

Everything here is a pure function of per-example log-probs, so the same code serves reference
log-probs precomputed over the data and those computed inside the step from the adapter-disabled
policy. Conventions follow TRL (`trl/trainer/dpo_trainer.py`), which the STIC and CSR repositories
patch; see METHODS.md sections 2.3 and 3.5.
"""

import dataclasses

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
  """loss_type: "sigmoid" (DPO), "ipo" or "hinge". IPO, as in TRL, compares per-token mean
  log-probs (each response's sum over its length); sigmoid and hinge compare the sums.
  beta: inverse temperature of the implicit reward (TRL default 0.1; STIC and CSR keep it).
  label_smoothing: conservative DPO's epsilon, the assumed rate of flipped labels (sigmoid only).
  nll_coef: weight of -log pi(chosen) added to the loss; STIC uses 1/1024 on summed log-probs.
  """
  loss_type: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  nll_coef: float = 0.0

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def preference_loss(config: PreferenceLossConfig, policy_chosen: jax.Array,
                    policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array, *,
                    chosen_tokens: jax.Array | None = None,
                    rejected_tokens: jax.Array | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Log-probs: float32 [B] summed over each response. Returns (mean loss [], metrics of scalars).

  chosen_tokens, rejected_tokens: [B] response lengths, needed by IPO, which (as TRL's
  `average_log_prob` for "ipo") divides the policy and reference log-probs by them first.
  logits = (pi_c - pi_r) - (ref_c - ref_r); the implicit rewards are beta * (pi - ref), both on
  the log-probs the loss compares. The NLL term stays on the summed log-prob.
  """
  nll = policy_chosen
  if config.loss_type == "ipo":
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError("IPO averages log-probs per token: pass chosen_tokens and rejected_tokens")
    per_chosen = 1 / jnp.maximum(chosen_tokens, 1).astype(jnp.float32)
    per_rejected = 1 / jnp.maximum(rejected_tokens, 1).astype(jnp.float32)
    policy_chosen, ref_chosen = policy_chosen * per_chosen, ref_chosen * per_chosen
    policy_rejected, ref_rejected = policy_rejected * per_rejected, ref_rejected * per_rejected
  logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
  beta = config.beta
  if config.loss_type == "sigmoid":
    eps = config.label_smoothing
    losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - eps)
              - jax.nn.log_sigmoid(-beta * logits) * eps)
  elif config.loss_type == "ipo":
    losses = (logits - 1 / (2 * beta)) ** 2
  else:
    losses = jax.nn.relu(1 - beta * logits)
  if config.nll_coef:
    losses = losses - config.nll_coef * nll
  reward_chosen = beta * jax.lax.stop_gradient(policy_chosen - ref_chosen)
  reward_rejected = beta * jax.lax.stop_gradient(policy_rejected - ref_rejected)
  metrics = {
      "rewards/chosen": reward_chosen.mean(),
      "rewards/rejected": reward_rejected.mean(),
      "rewards/margin": (reward_chosen - reward_rejected).mean(),
      "rewards/accuracy": (reward_chosen > reward_rejected).astype(jnp.float32).mean(),
      "logps/chosen": jax.lax.stop_gradient(policy_chosen).mean(),
      "logps/rejected": jax.lax.stop_gradient(policy_rejected).mean(),
  }
  return losses.mean(), metrics


def noisy_token_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The STIC/POVID repository's "noisy" rejected log-prob, per token.

  logits: float32 [B, T, V] predicting `labels` int [B, T]. At each position it takes the model's
  own top-1 token, or its top-2 when the top-1 equals the label, and returns that token's log-prob
  [B, T]. The released STIC code scores rejected responses (and their reference) this way instead
  of by their labels; it is offered as an option to reproduce the repository, not as the default.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  top2_logp, top2_ids = jax.lax.top_k(logp, 2)
  use_second = top2_ids[..., 0] == labels
  return jnp.where(use_second, top2_logp[..., 1], top2_logp[..., 0])
