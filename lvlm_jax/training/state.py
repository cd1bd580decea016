"""The train state: a pytree beside a static NNX graphdef.

    state = {"params":    trainable parameters (nnx.State of Params),
             "frozen":    every other variable of the model (frozen weights, e.g. the vision
                          tower or LoRA's base kernels, and LoRA dropout's RNG stream),
             "opt_state": the optax state of `params` only,
             "step":      int32 [], updates done,
             "rng":       a PRNG key, folded with `step` for each step's randomness}

`nnx.merge(graphdef, state["params"], state["frozen"])` is the model. Step functions are pure
functions of this dict; the graphdef (module structure, configs) is static under jit.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from lvlm_jax.errors import UserError
from lvlm_jax.sharding import place, tree_shardings

TrainState = dict[str, Any]


def split_model(model: nnx.Module, trainable) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, frozen rest); `trainable` is an NNX filter (optim.trainable_filter)."""
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  if not jax.tree.leaves(params):
    raise UserError("optim.trainable matches no parameter of the model; nothing would train")
  return graphdef, params, frozen


def merge(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The model a train state describes (inside a jitted step: a traced view, not a copy)."""
  return nnx.merge(graphdef, state["params"], state["frozen"])


def abstract_state(params: nnx.State, frozen: nnx.State,
                   tx: optax.GradientTransformation) -> TrainState:
  """The train state's shapes and dtypes, without allocating it (params/frozen may be abstract)."""
  return {"params": params, "frozen": frozen,
          "opt_state": jax.eval_shape(tx.init, params),
          "step": jax.ShapeDtypeStruct((), jnp.int32),
          "rng": jax.eval_shape(lambda: jax.random.key(0))}


def state_shardings(abstract: TrainState, mesh: Mesh) -> TrainState:
  """Shardings of every leaf: parameters and their Adam moments by their logical axes, scalars
  (step, counts, learning rates, keys) replicated."""
  return tree_shardings(abstract, mesh)


def init_state(params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
  """A fresh train state on its shardings: the optimizer state is created sharded, in place."""
  params = place(params, shardings["params"])
  frozen = place(frozen, shardings["frozen"])
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  return {"params": params, "frozen": frozen, "opt_state": opt_state,
          "step": place(jnp.zeros((), jnp.int32), shardings["step"]),
          "rng": place(jax.random.key(seed), shardings["rng"])}


def reset_optimizer(state: TrainState, tx: optax.GradientTransformation,
                    shardings: TrainState) -> TrainState:
  """The same state with a fresh optimizer: zero moments, its schedule back at step 0.

  `tx` may differ from the optimizer so far in its learning rates (SC-Tune switches the constant
  lr at every phase); its state must have the same structure, so the same param groups.
  """
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state["params"])
  return {**state, "opt_state": opt_state}


def count_params(tree: Any) -> int:
  """Number of parameter values in a (possibly abstract) tree; RNG keys do not count."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree)
             if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
