"""The same steps on 1 CPU device and on an 8-device (2, 2, 2) mesh give the same losses, for full
fine-tuning and for LoRA (the latter with query-chunked attention). Runs in a subprocess: the
device count is fixed when JAX starts.

Tolerance: the sharded step splits reductions (matmul contractions over `embed`/`mlp`, the loss
and gradient sums over the batch) across devices, so float32 sums add up in another order.
Measured over three Adam steps: losses within 4e-7 relative, weights within 3e-8; the test
allows 1e-5 on both.
"""

import json

import numpy as np

from training_fixtures import run_python

SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests/training")
import jax, numpy as np
from flax import nnx
from training_fixtures import batch, tiny_lvlm
from lvlm_jax.models.lora import LoraConfig, apply_lora
from lvlm_jax.sharding import global_batch, make_mesh
from lvlm_jax.training import optim, state as train_state, steps

assert jax.device_count() == 8
results = {}
for mode in ("full", "lora"):
  trainable = ".*" if mode == "full" else r".*\.lora_[ab]|projector\..*"
  config = optim.OptimConfig(lr=1e-3, warmup_ratio=0.0, trainable=trainable)
  for name, mesh in (("one", make_mesh((1, 1, 1), jax.devices()[:1])), ("eight", make_mesh((2, 2, 2)))):
    model = tiny_lvlm()
    if mode == "lora":
      apply_lora(model, LoraConfig(rank=4, target=r"llm\.layers\.\d+\..*_proj"), rngs=nnx.Rngs(1))
      model.llm.attention_query_chunk = 8  # attention in query blocks, on the mesh too
    graphdef, params, frozen = train_state.split_model(model, optim.trainable_filter(config))
    tx = optim.make_optimizer(config, 10, params)
    shardings = train_state.state_shardings(train_state.abstract_state(params, frozen, tx), mesh)
    state = train_state.init_state(params, frozen, tx, 0, shardings)
    step = steps.jit_train_step(steps.sft_step, shardings, mesh, graphdef=graphdef, tx=tx)
    losses = []
    with jax.set_mesh(mesh):
      for _ in range(3):
        state, metrics = step(state, global_batch(batch(), mesh))
        losses.append(float(metrics["loss"]))
    model = train_state.merge(graphdef, state)
    gate = model.llm.layers[0].mlp.gate_proj
    # A trained weight: the kernel itself, or its adapter's B when the kernel is frozen.
    kernel = gate.kernel[...] if mode == "full" else gate.lora.lora_b[...]
    results[f"{mode}/{name}"] = {
        "losses": losses, "kernel": np.asarray(kernel).tolist(),
        "kernel_spec": str(kernel.sharding.spec), "devices": len(kernel.sharding.device_set)}
print("RESULT " + json.dumps(results))
"""


def test_one_device_and_eight_device_mesh_agree():
  proc = run_python(["-c", SCRIPT], XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                    "--xla_backend_optimization_level=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  results = json.loads(line[len("RESULT "):])
  for mode in ("full", "lora"):
    one, eight = results[f"{mode}/one"], results[f"{mode}/eight"]
    assert eight["devices"] == 8 and "tensor" in eight["kernel_spec"], eight["kernel_spec"]
    assert one["devices"] == 1
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    assert one["losses"][-1] < one["losses"][0]
    np.testing.assert_allclose(eight["kernel"], one["kernel"], rtol=0, atol=1e-5)
