"""Pure step functions over the train state, and jitting them with explicit shardings.

    sft_step(state, batch) -> (state, metrics)     one optimizer update on one global batch
    eval_step(state, batch) -> metrics             summed loss and tokens, no update
    model_for_step, accumulate, apply_gradients    the parts every train step (DPO's too) shares

The batch is the data layer's contract (`input_ids`, `loss_mask`, `attention_mask`, `positions`
[B, T], `pixel_values` [B, N, H, W, 3], ...). With `accum_steps = k` the batch is cut into k
micro-batches whose gradient sums are accumulated in a scan and divided once by the batch's
loss tokens: exactly the update of the whole batch at 1/k of the activation memory.
"""

import ctypes
import functools
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from lvlm_jax.sharding import batch_sharding, constrain, replicated
from lvlm_jax.training.losses import sft_loss_sums
from lvlm_jax.training.optim import current_lrs
from lvlm_jax.training.state import TrainState, merge


def model_for_step(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State,
                   rng: jax.Array) -> nnx.Module:
  """The model a step differentiates: `params` (the argument of the gradient) merged with
  `frozen`, its dropout reseeded from `rng`."""
  # Rebuilt Variables belong to the current trace (the gradient's), where dropout may then
  # advance its RNG count; the caller's belong to the outer jit trace and are read-only here.
  frozen = jax.tree.map(lambda x: x, frozen)
  model = nnx.merge(graphdef, params, frozen)
  # Dropout draws from the state's key folded with the step (and micro-batch), so a resumed run
  # draws the same masks as an uninterrupted one.
  nnx.reseed(model, dropout=rng, default=rng)
  return model


def micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B / k, ...]. Micro-batch j takes rows j, j + k, j + 2k, ..., so each
  device's contiguous block of rows feeds every micro-batch equally."""
  def cut(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
  return {key: cut(x) for key, x in batch.items()}


def accumulate(fn: Callable[[dict[str, jax.Array], jax.Array | int], Any],
               batch: dict[str, jax.Array], accum_steps: int) -> Any:
  """`fn(micro_batch, index)` summed over `accum_steps` micro-batches of `batch` [B, ...] in a
  scan (one compiled copy of `fn`); `fn(batch, 0)` when accum_steps is 1. `fn` returns a pytree
  of sums (gradients, losses, counts) that add up over micro-batches."""
  if accum_steps == 1:
    return fn(batch, 0)
  micro = micro_batches(batch, accum_steps)

  def body(carry, xs):
    index, mb = xs
    mb = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in mb.items()}
    return jax.tree.map(jnp.add, carry, fn(mb, index)), None

  zeros = jax.tree.map(jnp.zeros_like,
                       jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro), 0))
  sums, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
  return sums


def apply_gradients(state: TrainState, grads: nnx.State,
                    tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update with the batch's (already normalised) gradients: the new state (step
  + 1) and metrics grad_norm (before clipping), lr (and lr/<group> for each lr group)."""
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
  metrics = {"grad_norm": optax.tree.norm(grads)}
  lrs = current_lrs(opt_state)
  metrics["lr"] = lrs.pop("default", next(iter(lrs.values()), jnp.zeros(())))
  metrics.update({f"lr/{group}": lr for group, lr in lrs.items()})
  return new_state, metrics


def sft_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
             tx: optax.GradientTransformation, accum_steps: int = 1,
             logits_chunk: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on the token-mean cross-entropy of `batch`'s `loss_mask` tokens.

  Metrics (float32 scalars): loss, loss_tokens, tokens (non-padding), grad_norm (before
  clipping), lr (and lr/<group> for each lr group).
  """
  step_rng = jax.random.fold_in(state["rng"], state["step"])

  def loss_sums(params, micro, index):
    model = model_for_step(graphdef, params, state["frozen"], jax.random.fold_in(step_rng, index))
    return sft_loss_sums(model, micro, logits_chunk)

  def summed(micro, index):
    (loss_sum, tokens), grads = jax.value_and_grad(loss_sums, has_aux=True)(
        state["params"], micro, index)
    return grads, loss_sum, tokens

  grads, loss_sum, tokens = accumulate(summed, batch, accum_steps)
  scale = 1.0 / jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: g * scale, grads)
  new_state, metrics = apply_gradients(state, grads, tx)
  metrics.update(loss=loss_sum * scale, loss_tokens=tokens,
                 tokens=jnp.sum(batch["attention_mask"]).astype(jnp.float32))
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
              logits_chunk: int = 0) -> dict[str, jax.Array]:
  """Summed loss and loss tokens of a batch (dropout off): {'loss_sum', 'loss_tokens'}."""
  model = merge(graphdef, state)
  model.eval()
  loss_sum, tokens = sft_loss_sums(model, batch, logits_chunk)
  return {"loss_sum": loss_sum, "loss_tokens": tokens}


def jit_train_step(step: Callable, shardings: TrainState, mesh: Mesh, **static) -> Callable:
  """`step(state, batch, **static)` jitted once: state in and out on `shardings` (donated, so the
  update happens in place), the batch split by rows, metrics replicated. Its first call, which
  compiles, ends with `release_freed_host_memory()`; `.lower` etc. are the jitted function's."""
  return _ReleaseAfterFirstCall(jax.jit(functools.partial(step, **static),
                                        in_shardings=(shardings, batch_sharding(mesh)),
                                        out_shardings=(shardings, replicated(mesh)),
                                        donate_argnums=0))


def release_freed_host_memory() -> None:
  """Returns the memory glibc's malloc holds free to the OS (`malloc_trim(0)`); a no-op on other
  C libraries and platforms.

  Compiling a step (XLA + LLVM) allocates and frees a few hundred MiB in small blocks over its
  threads' malloc arenas. glibc keeps those pages mapped and little reuses them (the step's own
  buffers are large enough to get fresh mmaps), so without a trim they stay in the process's
  resident memory for the whole run. The CPU `small` benchmark's SFT step: the trim takes 30 ms
  and returns 200 MiB, and the peak RSS of the steps after it falls by as much (2.51 -> 2.32 GiB).
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
  if not sys.platform.startswith("linux"):
    return None
  try:
    trim = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
  except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
    return None
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  return trim


class _ReleaseAfterFirstCall:
  """A jitted function that calls `release_freed_host_memory()` after its first call (the one
  that compiles) and is otherwise the jitted function (`lower`, `eval_shape`, ...)."""

  def __init__(self, jitted: Callable):
    self._jitted, self._called = jitted, False

  def __call__(self, *args, **kwargs):
    out = self._jitted(*args, **kwargs)
    if not self._called:
      self._called = True
      release_freed_host_memory()
    return out

  def __getattr__(self, name: str):
    return getattr(self._jitted, name)


def jit_eval_step(step: Callable, shardings: TrainState, mesh: Mesh, **static) -> Callable:
  """`step(state, batch, **static) -> metrics` jitted once, nothing donated."""
  return jax.jit(functools.partial(step, **static),
                 in_shardings=(shardings, batch_sharding(mesh)), out_shardings=replicated(mesh))
