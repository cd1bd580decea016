"""The optimizer: AdamW with parameter groups, warmup + cosine / constant schedules, clipping.

Which parameters train is one regex over dotted parameter paths (`trainable`); the rest are
frozen: they are split off the train state's `params`, so they get no gradient and no optimizer
memory. Among the trainable ones, `lr_groups` give some paths their own peak learning rate (LLaVA
trains the projector at 2e-5 beside LoRA adapters at another rate); every group follows the
same schedule shape. Paths look like `llm.layers.3.attn.q_proj.kernel`,
`llm.layers.3.attn.q_proj.lora.lora_a`, `projector.linear_1.bias`, `vision.layers.0.mlp.fc1.kernel`.
"""

import dataclasses
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError

SCHEDULES = ("cosine", "constant")
DEFAULT_GROUP = "default"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW, its schedule and which parameters it trains."""
  lr: float = help_field(2e-4, "Peak learning rate of every trainable parameter outside lr_groups.")
  lr_groups: tuple[tuple[str, float], ...] = help_field(
      (), "(regex, peak lr) pairs: trainable parameters whose dotted path fully matches a regex "
      "(the first that does) train at that peak lr, e.g. (('projector\\\\..*', 2e-5),).")
  trainable: str = help_field(".*", "Regex (full match) over dotted parameter paths of the "
                              "parameters that train; all others are frozen. '.*' trains "
                              "everything; LoRA: '.*\\\\.lora_[ab]' (plus e.g. "
                              "'|projector\\\\..*').")
  schedule: str = help_field("cosine", f"Learning-rate schedule after warmup, one of {SCHEDULES}.")
  warmup_ratio: float = help_field(0.03, "Fraction of the steps spent warming "
                                   "up linearly from 0 (LLaVA: 0.03).")
  final_lr_ratio: float = help_field(0.0, "Cosine ends at this fraction of the peak learning rate.")
  weight_decay: float = help_field(0.0, "Decoupled weight decay (AdamW) on matrices (kernels, "
                                   "embeddings); never on biases and norm scales.")
  b1: float = help_field(0.9, "Adam beta1.")
  b2: float = help_field(0.999, "Adam beta2.")
  eps: float = help_field(1e-8, "Adam epsilon.")
  clip_norm: float = help_field(1.0, "Clip gradients to this global norm (over all trainable "
                                "parameters); 0 disables clipping.")

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise UserError(f"optim.schedule={self.schedule!r} is not one of {SCHEDULES}")
    if not 0 <= self.warmup_ratio < 1:
      raise UserError(f"optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
    for name in ("lr", "clip_norm", "weight_decay", "final_lr_ratio", "b1", "b2", "eps"):
      value = getattr(self, name)
      if not (0 <= value < math.inf):  # written so that NaN fails it too
        raise UserError(f"optim.{name}={value} must be a finite number >= 0")
    for pattern, lr in self.lr_groups:
      if not (0 <= lr < math.inf):
        raise UserError(f"optim.lr_groups: lr {lr} of {pattern!r} must be a finite number >= 0")
    for pattern in [self.trainable] + [p for p, _ in self.lr_groups]:
      try:
        re.compile(pattern)
      except re.error as e:
        raise UserError(f"optim: bad regex {pattern!r}: {e}") from None


def path_str(path) -> str:
  """A state or pytree path (tuple of keys) -> 'llm.layers.0.attn.q_proj.kernel'."""
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def trainable_filter(config: OptimConfig):
  """An NNX filter selecting the parameters that train."""
  pattern = re.compile(config.trainable)
  return lambda path, x: isinstance(x, nnx.Param) and pattern.fullmatch(path_str(path)) is not None


def group_of(path: str, config: OptimConfig) -> str:
  """The lr group of a trainable parameter: the first matching lr_groups regex, else 'default'."""
  for pattern, _ in config.lr_groups:
    if re.fullmatch(pattern, path):
      return pattern
  return DEFAULT_GROUP


def param_groups(params: nnx.State, config: OptimConfig) -> list[str]:
  """The lr group of every leaf of `params`, in `jax.tree.leaves` order."""
  return [group_of(path_str(path), config)
          for path, _ in jax.tree.leaves_with_path(params, is_leaf=_is_variable)]


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def schedule(config: OptimConfig, peak: float, num_steps: int) -> optax.Schedule:
  """Step -> learning rate: linear warmup from 0 over warmup_ratio * num_steps, then cosine decay
  to final_lr_ratio * peak at num_steps, or constant."""
  warmup = int(round(config.warmup_ratio * num_steps))
  if config.schedule == "constant":
    if not warmup:
      return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.constant_schedule(peak)], [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1),
                                            end_value=config.final_lr_ratio * peak)


class GroupLrState(NamedTuple):
  count: jax.Array               # int32 [], updates so far
  lrs: dict[str, jax.Array]      # float32 [] each: the learning rate of the latest update, by group


def scale_by_group_lr(groups: list[str], peaks: dict[str, float],
                      shape: optax.Schedule) -> optax.GradientTransformation:
  """updates -> -lr * updates, lr = the leaf's group peak * shape(count)."""
  def init(params):
    del params
    return GroupLrState(jnp.zeros((), jnp.int32), {g: jnp.zeros((), jnp.float32) for g in peaks})

  def update(updates, state, params=None):
    del params
    factor = shape(state.count)
    lrs = {g: jnp.asarray(peak * factor, jnp.float32) for g, peak in peaks.items()}
    leaves, treedef = jax.tree.flatten(updates)
    scaled = [-lrs[g] * u for g, u in zip(groups, leaves, strict=True)]
    return jax.tree.unflatten(treedef, scaled), GroupLrState(state.count + 1, lrs)

  return optax.GradientTransformation(init, update)


def _decay_mask(params):
  # Matrices decay; vectors (biases, norm scales, CLIP's class embedding) do not, as in LLaVA's
  # HF Trainer, which exempts biases and LayerNorm weights.
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config: OptimConfig, num_steps: int,
                   params: nnx.State) -> optax.GradientTransformation:
  """AdamW for the trainable `params` (abstract is fine) over a run of `num_steps` updates:
  clip -> Adam -> decoupled weight decay -> x (-group lr). One Adam over all leaves, whatever
  the groups, keeps the compiled update small.

  A new learning rate mid-run is a new optimizer (`dataclasses.replace(config, lr=...)`) and
  `state.reset_optimizer`; SC-Tune does this at every phase switch.
  """
  groups = param_groups(params, config)
  peaks = {DEFAULT_GROUP: config.lr, **dict(config.lr_groups)}
  peaks = {g: peaks[g] for g in dict.fromkeys(groups)}
  parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
  parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay, _decay_mask))
  parts.append(scale_by_group_lr(groups, peaks, schedule(config, 1.0, num_steps)))
  return optax.chain(*parts)


def current_lrs(opt_state) -> dict[str, jax.Array]:
  """Learning rate of the latest update, by group: {'default': ..., '<regex>': ...}."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GroupLrState))
           if isinstance(s, GroupLrState)]
  return dict(found[0].lrs) if found else {}
