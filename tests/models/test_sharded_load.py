"""Loading onto an 8-device CPU mesh: parameters land sharded by their logical axes, logits unchanged."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from lvlm_jax.models import hf
    from lvlm_jax.sharding import make_mesh

    directory = sys.argv[1]
    mesh = make_mesh((2, 2, 2))
    sharded = hf.load_lvlm(directory, mesh=mesh)
    single = hf.load_lvlm(directory)
    ids = jnp.asarray([[3, 4] + [127] * 16 + [5, 6, 7]], jnp.int32)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 28, 28, 3)), jnp.float32)
    run = nnx.jit(lambda m, i, p: m(i, pixel_values=p)[0])
    with jax.set_mesh(mesh):
      sharded_logits = np.asarray(run(sharded, ids, pixels))
    single_logits = np.asarray(run(single, ids, pixels))
    specs = {".".join(map(str, k)): str(v.get_value().sharding.spec)
             for k, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
    print(json.dumps({"max_diff": float(np.abs(sharded_logits - single_logits).max()),
                      "devices": len(jax.devices()), "specs": specs}))
""")


def test_load_onto_mesh_shards_by_logical_axes(tiny_llava_dir):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT, tiny_llava_dir], capture_output=True,
                          text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8
  specs = report["specs"]
  # embed -> fsdp, heads/mlp/vocab -> tensor; norms replicated.
  assert specs["llm.layers.0.attn.q_proj.kernel"] == "P('fsdp', 'tensor')"
  assert specs["llm.layers.0.mlp.down_proj.kernel"] == "P('tensor', 'fsdp')"
  assert specs["llm.embed_tokens.embedding"] == "P('tensor', 'fsdp')"
  assert specs["llm.norm.scale"] == "P()"
  assert report["max_diff"] <= 1e-5
