"""The device mesh and the one table that maps logical axis names onto it.

Parameters carry logical axis names (`axes` metadata, see models/layers.py); activations are
constrained with the same names. Only this file names the mesh axes `data`, `fsdp`, `tensor`.
"""

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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

