"""The device mesh, the one table that maps logical axis names onto it, and multi-host start-up.

Parameters carry logical axis names (`axes` metadata, see models/layers.py); activations are
constrained with the same names (`constrain`). Only this file names the mesh axes `data`, `fsdp`,
`tensor`. Train states and batches get their shardings here (`tree_shardings`, `batch_sharding`),
so a jitted step can name its in/out shardings explicitly.
"""

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes). Names absent here, and None, are replicated.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "norm": None,
}


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one entry of `shape` may be -1 for the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict | None = None) -> PartitionSpec:
  """PartitionSpec for an array with these logical axes; a dimension that its mesh axes do not
  divide, or whose mesh axes an earlier dimension already uses, stays replicated."""
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    ways = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
    if not mesh_axes or ways == 1 or size % ways:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: dict | None = None) -> NamedSharding:
  """Where a (possibly abstract) variable's array lives: from its `axes` metadata, else replicated."""
  shape = variable.get_value().shape
  axes = variable.get_metadata().get("axes") or (None,) * len(shape)
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))



@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The devices of a run: how processes find each other and how the mesh is shaped."""
  shape: tuple[int, ...] = help_field((1, -1, 1), "Mesh shape over ('data', 'fsdp', 'tensor'); one "
                                      "entry may be -1 for the remaining devices. (1, -1, 1) is "
                                      "pure FSDP.")
  coordinator_address: str = help_field(
      "", "host:port of process 0 for a multi-process run started by hand (e.g. 2 processes on one "
      "box); '' = detect a TPU pod / SLURM / single process from the environment.")
  num_processes: int = help_field(1, "Processes in a run started by hand "
                                  "(with coordinator_address).")
  process_id: int = help_field(0, "This process's index in a run started "
                               "by hand (with coordinator_address).")
  cpu_devices: int = help_field(0, "Split the CPU into this many JAX devices (tests, CPU-only "
                                "multi-device runs); 0 leaves the platform as it is.")


# Environment variables that say this process is one of several a cluster started, in which case
# `jax.distributed.initialize()` finds the coordinator on its own.
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _in_cluster() -> bool:
  workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in workers:
    return True
  return any(int(os.environ.get(name, "1") or 1) > 1 for name in _CLUSTER_ENV[1:])


def initialize(config: MeshConfig) -> None:
  """Starts multi-process JAX when the config or the environment asks for it. Call it once, before
  anything touches the devices (never at import: Grain's worker processes import this module)."""
  if config.cpu_devices:
    jax.config.update("jax_num_cpu_devices", config.cpu_devices)
  if config.coordinator_address:
    if not 0 <= config.process_id < config.num_processes:
      raise UserError(f"mesh.process_id={config.process_id} must be in [0, "
                      f"mesh.num_processes={config.num_processes})")
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes, process_id=config.process_id)
  elif _in_cluster():
    jax.distributed.initialize()


def mesh_from_config(config: MeshConfig) -> Mesh:
  try:
    return make_mesh(tuple(config.shape))
  except ValueError as e:
    raise UserError(f"mesh.shape: {e}") from None


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def tree_shardings(tree: Any, mesh: Mesh, rules: dict | None = None) -> Any:
  """The sharding of every leaf of a (possibly abstract) tree: an nnx Variable by its `axes`
  metadata (optimizer moments are Variables too, so they shard like their parameters), anything
  else (step, RNG key, counters) replicated."""
  def leaf(x):
    if isinstance(x, nnx.Variable):
      return x.replace(variable_sharding(x, mesh, rules))
    return replicated(mesh)
  return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_tree(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with the given shardings: the target Orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def place(tree: Any, shardings: Any) -> Any:
  """Moves every leaf onto its sharding. With several processes, a leaf that is not yet a global
  array must hold the same value on every process (built from the same seed)."""
  def put(x, sharding):
    if isinstance(x, jax.Array) and (x.sharding == sharding or jax.process_count() == 1
                                     or not x.is_fully_addressable):
      return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding),
                                      impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


def batch_sharding(mesh: Mesh, rules: dict | None = None) -> NamedSharding:
  """Rows over the `batch` mesh axes, everything else replicated; valid for arrays of any rank."""
  rules = DEFAULT_RULES if rules is None else rules
  target = rules.get("batch")
  return NamedSharding(mesh, PartitionSpec(target))


def batch_shards(mesh: Mesh, rules: dict | None = None) -> int:
  """How many ways the batch dimension is split: a global batch must be a multiple of it."""
  spec = batch_sharding(mesh, rules).spec[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return int(np.prod([mesh.shape[a] for a in axes]))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh,
                 rules: dict | None = None) -> dict[str, jax.Array]:
  """This process's rows `[B / num_processes, ...]` -> global arrays `[B, ...]` sharded by rows.

  Each process passes its own data shard; together they form the global batch."""
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def constrain(x: jax.Array, axes: Sequence[str | None], rules: dict | None = None) -> jax.Array:
  """Pins an activation's sharding by logical axis names, e.g. ('batch', 'length', 'embed').

  A no-op outside a mesh context (`jax.set_mesh`), so models run unchanged on one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def per_process_batch(global_batch: int, mesh: Mesh, accum_steps: int) -> int:
  """Rows each process feeds; the global batch must split evenly over processes and devices."""
  shards, processes = batch_shards(mesh), jax.process_count()
  if global_batch % processes:
    raise UserError(f"train.batch_size={global_batch} must be a multiple of the "
                    f"{processes} processes")
  if (global_batch // accum_steps) % shards:
    raise UserError(f"train.batch_size / train.grad_accum_steps = {global_batch // accum_steps} "
                    f"must be a multiple of the {shards} ways the mesh splits the batch")
  return global_batch // processes
