"""Our own model checkpoint: an HF-style `config.json` plus the parameters as an Orbax PyTree.

Unlike an HF directory it keeps LoRA adapters separate from the base weights, restores straight
onto any mesh (each host reads only its shards) and is what `convert` writes. Layout:
  DIR/config.json      the model's HF config, plus `lvlm_jax_lora` when adapters are attached
  DIR/params/          Orbax StandardCheckpointer PyTree of every nnx.Param (LoRA ones included)
"""

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.lora import LoRA, LoraConfig, apply_lora
from lvlm_jax.output_paths import check_output_dir
from lvlm_jax.sharding import variable_sharding

LORA_KEY = "lvlm_jax_lora"


def _lora_config(model: nnx.Module) -> LoraConfig | None:
  """The adapters' config (rank, alpha, dropout) and a target that matches exactly their layers."""
  adapters = [(".".join(str(p) for p in path), node) for path, node in nnx.iter_graph(model)
              if isinstance(node, LoRA)]
  if not adapters:
    return None
  first = adapters[0][1]
  rank = first.lora_a.get_value().shape[1]
  dropout = first.dropout.rate if first.dropout is not None else 0.0
  target = "|".join(path.removesuffix(".lora").replace(".", r"\.") for path, _ in adapters)
  float32 = first.lora_a.get_value().dtype == "float32"  # else they are in their kernel's dtype
  return LoraConfig(rank=rank, alpha=first.scale * rank, dropout=dropout, target=target,
                    param_dtype="float32" if float32 else "base")


def save_model(model: nnx.Module, directory: str) -> None:
  """Writes config.json and the parameters. Every process must call it (Orbax saves collectively)."""
  directory = os.path.abspath(directory)
  # Before Orbax: its background save, failing to create the folder, leaves threads waiting 300 s.
  check_output_dir(directory, "output")
  config = hf.hf_config(model)
  lora = _lora_config(model)
  if lora is not None:
    config[LORA_KEY] = dataclasses.asdict(lora)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.join(directory, "params"), params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
      with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
  except Exception as e:  # OSError, or Orbax/tensorstore's ValueError for the same causes
    raise UserError(f"cannot write the model to {directory}: {type(e).__name__}: "
                    f"{' '.join(str(e).split())[:300]}") from None


def load_model(directory: str, *, mesh: Mesh | None = None, **config_overrides) -> nnx.Module:
  """Rebuilds the model abstractly and restores its parameters onto `mesh` (or the default device)."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(os.path.join(directory, "params")):
    raise UserError(f"{directory}: not an lvlm_jax model checkpoint (no params/ directory)")
  config = hf.read_hf_config(directory)
  lora = config.pop(LORA_KEY, None)
  model_class, model_config = hf.model_config(config, os.path.join(directory, "config.json"),
                                              **config_overrides)

  def build():
    model = model_class(model_config, rngs=nnx.Rngs(0))
    if lora is not None:
      apply_lora(model, LoraConfig(**lora), rngs=nnx.Rngs(0))
    return model

  abstract = nnx.eval_shape(build)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

  def target(variable):
    value = variable.get_value()
    sharding = (variable_sharding(variable, mesh) if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)

  abstract_params = jax.tree.map(target, params, is_leaf=_is_variable)
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"),
                                                  nnx.to_pure_dict(abstract_params))
  except ValueError as e:
    # Orbax lists each differing subtree as an unindented "path:" line under a long dump.
    paths = [line.rstrip(":") for line in str(e).splitlines()[1:]
             if line.endswith(":") and line[0] != " "]
    if not paths:
      raise UserError(f"{directory}/params: cannot be restored for the model its config.json "
                      f"describes ({' '.join(str(e).split())[:300]})") from None
    listed = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
    raise UserError(f"{directory}: params/ does not hold the parameters config.json describes "
                    f"(they differ at {listed}); restore the config that was saved with "
                    "them") from None
  except Exception as e:  # Orbax/tensorstore: missing, truncated or foreign files
    raise UserError(f"{directory}/params: cannot be restored for the model its config.json "
                    f"describes ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
  nnx.replace_by_pure_dict(params, restored)
  return nnx.merge(graphdef, params, jax.tree.map(_fresh_rng, rest, is_leaf=_is_variable))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _fresh_rng(variable: nnx.Variable) -> nnx.Variable:
  """The only non-parameter state of our models is LoRA dropout's RNG stream: start it afresh."""
  if isinstance(variable, nnx.RngKey):
    return variable.replace(jax.random.key(0))
  if isinstance(variable, nnx.RngCount):
    return variable.replace(jax.numpy.zeros((), jax.numpy.uint32))
  raise TypeError(f"unexpected non-parameter state {type(variable).__name__} in a model")
