"""SC-Tune's describer update: PPO-clip with a self-critical baseline and no value network.

    advantages(rollout, snapshot, mask, reward, baseline, config) -> A [B, T]
    ppo_loss(logp, rollout, adv, mask, config) -> (loss [], metrics)
    ppo_step(state, batch) -> (state, metrics)      one optimizer update on one rollout batch
    ppo_update(state, batch)                         up to `ppo_epochs` updates, KL early stop
    token_logps(graphdef, params, frozen, batch)    per-token log-probs for the rollout, no grad

The formulas are METHODS.md 1.3's (the released trainer's `training_step` / `compute_loss`):

    kl_t  = logp_rollout_t - logp_snapshot_t                 (policy at rollout vs frozen snapshot)
    r_t   = -kl_coef * kl_t * mask_t  (+ reward at each row's last mask token)
    R_t   = sum_{t' >= t} gamma^(t' - t) r_t'
    B_t   = gamma^(last - t) * baseline                      (= baseline at every t for gamma 1)
    A_t   = (R_t - B_t) * mask_t
    rho_t = exp(logp_theta_t - logp_rollout_t)
    L     = sum_{b, t} max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) * mask_t / sum mask,
            and L = 0 when the mean ratio over the mask tokens exceeds `ratio_guard`.

`mask` is the EOS-inclusive caption mask (`sctune_masks.eos_inclusive_mask`). The baseline is
discounted like the reward it stands for, as the released code does; with gamma 1, its only value,
that is B_t = baseline. No advantage normalisation.

Epochs. A rollout batch is trained on `ppo_epochs` times (2), each an optimizer update on the
same batch: `ppo_update` runs them in one jitted step and stops after an epoch whose `policy_kl`
(mean of logp_rollout - logp_theta, measured before that epoch's update) exceeds
`policy_kl_stop`: that epoch's update is kept, the next ones are skipped, as in the released
trainer. So the first epoch always runs; the check bites once the policy has drifted from the
rollout policy by the previous epochs (or, in the first epoch, when the training forward disagrees
with the rollout's). The train state's `step` counts rollout batches (SC-Tune's 200 describer
steps are rollout batches); `epochs_run` says how many updates each made.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.llava_next import IMAGE_KEYS
from lvlm_jax.training.losses import masked_token_logprobs, token_logprobs
from lvlm_jax.training.state import TrainState
from lvlm_jax.training.steps import accumulate, apply_gradients, model_for_step


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """SC-Tune's describer PPO (METHODS.md 1.3; the released trainer's constants)."""
  kl_coef: float = help_field(0.01, "beta: weight of the per-token KL to the frozen snapshot "
                              "inside the reward (a fixed controller, as SC-Tune's).")
  gamma: float = help_field(1.0, "Discount of the token rewards in the returns (SC-Tune: 1).")
  clip_range: float = help_field(0.2, "eps: the ratio is clipped to [1 - eps, 1 + eps].")
  ppo_epochs: int = help_field(2, "Optimizer updates on each rollout batch.")
  policy_kl_stop: float = help_field(1.5, "Skip the remaining epochs of a rollout batch after one "
                                     "whose policy KL to the rollout policy exceeds this.")
  ratio_guard: float = help_field(10.0, "The loss (and gradient) of an update is zero when the "
                                  "mean ratio over its caption tokens exceeds this.")

  def __post_init__(self):
    for name, ok, bound in (("kl_coef", self.kl_coef >= 0, ">= 0"),
                            ("gamma", 0 < self.gamma <= 1, "in (0, 1]"),
                            ("clip_range", 0 < self.clip_range < 1, "in (0, 1)"),
                            ("ppo_epochs", self.ppo_epochs >= 1, ">= 1"),
                            ("policy_kl_stop", self.policy_kl_stop > 0, "> 0"),
                            ("ratio_guard", self.ratio_guard > 0, "> 0")):
      if not ok:
        raise UserError(f"ppo.{name}={getattr(self, name)} must be {bound}")


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """x, mask [B, T] -> [] mean of x over the mask (0 for an empty mask)."""
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def last_token(mask: jax.Array) -> jax.Array:
  """mask [B, T] -> float32 [B, T]: 1 at each row's last mask position (a zero row stays zero)."""
  length = mask.shape[1]
  last = length - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
  one_hot = jnp.arange(length)[None] == last[:, None]
  return (one_hot & jnp.any(mask > 0, axis=1, keepdims=True)).astype(jnp.float32)


def discounted_returns(rewards: jax.Array, gamma: float) -> jax.Array:
  """rewards [B, T] -> returns [B, T]: R_t = sum_{t' >= t} gamma^(t' - t) r_t'."""
  def back(carry, r):
    carry = r + gamma * carry
    return carry, carry
  _, returns = jax.lax.scan(back, jnp.zeros(rewards.shape[:1], rewards.dtype), rewards.T,
                            reverse=True)
  return returns.T


def advantages(rollout_logps: jax.Array, snapshot_logps: jax.Array, mask: jax.Array,
               reward: jax.Array, baseline: jax.Array, config: PPOConfig) -> jax.Array:
  """A_t float32 [B, T] of a rollout batch: logps and mask [B, T], reward and baseline [B].

  Token rewards -kl_coef * (rollout - snapshot) on the mask, the row's reward added at its last
  mask token; returns minus the (discounted) baseline, zero off the mask.
  """
  mask = mask.astype(jnp.float32)
  last = last_token(mask)
  kl = (rollout_logps - snapshot_logps) * mask
  rewards = -config.kl_coef * kl + reward[:, None] * last
  baseline_returns = discounted_returns(baseline[:, None] * last, config.gamma)
  return (discounted_returns(rewards, config.gamma) - baseline_returns) * mask


def policy_loss_sums(logp: jax.Array, rollout_logps: jax.Array, adv: jax.Array, mask: jax.Array,
                     clip_range: float) -> dict[str, jax.Array]:
  """Sums over the mask tokens of logp, rollout_logps, adv (A_t), mask [B, T], which add up over
  micro-batches: loss (the clipped objective), ratio, clipped (tokens where the clip is active),
  policy_kl (rollout - logp), tokens."""
  mask = mask.astype(jnp.float32)
  # Off the mask the log-prob difference may be anything (padding); exp of it must not overflow.
  ratio = jnp.exp(jnp.where(mask > 0, logp - rollout_logps, 0.0))
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  return {"loss": jnp.sum(jnp.maximum(unclipped, clipped) * mask),
          "ratio": jnp.sum(ratio * mask),
          "clipped": jnp.sum((clipped > unclipped) * mask),
          "policy_kl": jnp.sum((rollout_logps - logp) * mask),
          "tokens": jnp.sum(mask)}


def loss_scale(sums: dict[str, jax.Array], ratio_guard: float) -> jax.Array:
  """[]: what turns the summed loss (and its gradient) into the update's: 1 / tokens, or 0 when
  the mean ratio exceeds `ratio_guard` (the released code drops such a batch)."""
  tokens = jnp.maximum(sums["tokens"], 1.0)
  return jnp.where(sums["ratio"] / tokens > ratio_guard, 0.0, 1.0 / tokens)


def policy_metrics(sums: dict[str, jax.Array], ratio_guard: float) -> dict[str, jax.Array]:
  """Means over the mask tokens: ratio, clip_fraction, policy_kl; ratio_guarded (1 or 0).

  clip_fraction is the share of tokens whose clipped term is the larger one (no gradient), TRL's
  `pg_clipfrac`. The released SC-Tune code logs `gt(pg_loss1, pg_loss2)` instead: the tokens
  outside the range whose unclipped term wins.
  """
  tokens = jnp.maximum(sums["tokens"], 1.0)
  ratio = sums["ratio"] / tokens
  return {"ratio": ratio, "clip_fraction": sums["clipped"] / tokens,
          "policy_kl": sums["policy_kl"] / tokens,
          "ratio_guarded": (ratio > ratio_guard).astype(jnp.float32)}


def ppo_loss(logp: jax.Array, rollout_logps: jax.Array, adv: jax.Array, mask: jax.Array,
             config: PPOConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped policy loss [] of logp_theta [B, T] (differentiable), given rollout_logps, adv
  (A_t from `advantages`) and mask [B, T], and its `policy_metrics`."""
  sums = policy_loss_sums(logp, rollout_logps, adv, mask, config.clip_range)
  return sums["loss"] * loss_scale(sums, config.ratio_guard), policy_metrics(sums,
                                                                             config.ratio_guard)


def ppo_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
             tx: optax.GradientTransformation, config: PPOConfig, accum_steps: int = 1,
             logits_chunk: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on the clipped policy loss of a rollout batch.

  batch: input_ids, attention_mask, loss_mask (the caption's, EOS-inclusive), rollout_logps,
  snapshot_logps [B, T] (`token_logps` of the sampled sequence under the policy at rollout time and
  under the frozen snapshot), pixel_values [B, N, H, W, 3], reward and baseline [B] (IoUs), and
  optionally positions [B, T]. With `accum_steps = k` the batch is cut into k micro-batches; the
  ratio guard looks at the whole batch, so the update is the whole batch's.
  Metrics (float32 scalars): loss, loss_tokens, tokens, grad_norm, lr (+ lr/<group>); reward,
  baseline (row means), advantage, kl (rollout - snapshot) (token means); ratio, clip_fraction,
  policy_kl, ratio_guarded (see `policy_metrics`).
  """
  step_rng = jax.random.fold_in(state["rng"], state["step"])
  mask = batch["loss_mask"].astype(jnp.float32)
  adv = advantages(batch["rollout_logps"], batch["snapshot_logps"], mask, batch["reward"],
                   batch["baseline"], config)
  needed = ("input_ids", "attention_mask", "positions", "rollout_logps", *IMAGE_KEYS)
  micro_inputs = {k: batch[k] for k in needed if k in batch}
  micro_inputs.update(loss_mask=mask, advantages=adv)

  def loss_sums(params, micro, index):
    model = model_for_step(graphdef, params, state["frozen"], jax.random.fold_in(step_rng, index))
    logp = masked_token_logprobs(model, micro, micro["loss_mask"], logits_chunk)
    sums = policy_loss_sums(logp, micro["rollout_logps"], micro["advantages"], micro["loss_mask"],
                            config.clip_range)
    return sums["loss"], sums

  def summed(micro, index):
    (_, sums), grads = jax.value_and_grad(loss_sums, has_aux=True)(state["params"], micro, index)
    return grads, sums

  grads, sums = accumulate(summed, micro_inputs, accum_steps)
  scale = loss_scale(sums, config.ratio_guard)
  grads = jax.tree.map(lambda g: g * scale, grads)
  new_state, metrics = apply_gradients(state, grads, tx)
  metrics.update(policy_metrics(sums, config.ratio_guard))
  metrics.update(
      loss=sums["loss"] * scale, loss_tokens=sums["tokens"],
      tokens=jnp.sum(batch["attention_mask"]).astype(jnp.float32),
      reward=jnp.mean(batch["reward"]), baseline=jnp.mean(batch["baseline"]),
      advantage=masked_mean(adv, mask),
      kl=masked_mean(batch["rollout_logps"] - batch["snapshot_logps"], mask))
  return new_state, metrics


def ppo_update(state: TrainState, batch: dict[str, jax.Array], *, config: PPOConfig,
               step_fn: Callable = ppo_step, **static) -> tuple[TrainState, dict]:
  """Every PPO epoch of one rollout batch, as one jittable step: up to `config.ppo_epochs`
  calls of `step_fn(state, batch, config=config, **static)` (`ppo_step`), stopping after the
  first whose policy_kl exceeds `policy_kl_stop` (its update kept), in a `lax.while_loop`.
  The state's step counts rollout batches: it moves by one whatever the epochs (so the training
  loop's step, phases and checkpoints count rollouts), and epoch e draws its dropout key from the
  state's key folded with e. Metrics: the last epoch's, plus `epochs_run`."""
  step, rng = state["step"], state["rng"]

  def epoch(s, index):
    s = {**s, "step": step, "rng": jax.random.fold_in(rng, index)}
    return step_fn(s, batch, config=config, **static)

  def more(carry):
    _, metrics, index = carry
    return (index < config.ppo_epochs) & (metrics["policy_kl"] <= config.policy_kl_stop)

  def again(carry):
    s, _, index = carry
    s, metrics = epoch(s, index)
    return s, metrics, index + 1

  state, metrics = epoch(state, 0)
  state, metrics, epochs = jax.lax.while_loop(more, again, (state, metrics, jnp.int32(1)))
  return {**state, "step": step + 1, "rng": rng}, {**metrics,
                                                   "epochs_run": epochs.astype(jnp.float32)}


@functools.partial(jax.jit, static_argnames=("graphdef", "logits_chunk"))
def token_logps(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State,
                batch: dict[str, jax.Array], logits_chunk: int = 0) -> jax.Array:
  """float32 [B, T]: log p(input_ids[:, t] | input_ids[:, :t]) under the model `params` + `frozen`
  (dropout off, no gradient): a batch's rollout_logps (the policy's params) or snapshot_logps
  (the snapshot's). batch: input_ids, attention_mask, pixel_values (and positions) as ppo_step's."""
  model = nnx.merge(graphdef, params, frozen)
  model.eval()
  return jax.lax.stop_gradient(token_logprobs(model, batch, logits_chunk))
