"""The SFT step: it learns, accumulation equals one big batch, LoRA trains only what it should,
remat changes nothing numerically."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from training_fixtures import batch, logits_of, tiny_lvlm
from lvlm_jax.models.llm import LLM, LLMConfig
from lvlm_jax.models.lora import LoraConfig, apply_lora, lora_disabled
from lvlm_jax.sharding import global_batch, make_mesh
from lvlm_jax.training import losses, optim, state as train_state, steps


def make_state(model, config: optim.OptimConfig, mesh, tx=None):
  graphdef, params, frozen = train_state.split_model(model, optim.trainable_filter(config))
  tx = tx or optim.make_optimizer(config, 100, params)
  shardings = train_state.state_shardings(train_state.abstract_state(params, frozen, tx), mesh)
  return graphdef, tx, shardings, train_state.init_state(params, frozen, tx, 0, shardings)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh()


def run_steps(step, state, b, mesh, n):
  losses_seen = []
  with jax.set_mesh(mesh):
    for _ in range(n):
      state, metrics = step(state, global_batch(b, mesh))
      losses_seen.append(float(metrics["loss"]))
  return state, losses_seen, metrics


def test_full_finetune_learns(mesh):
  config = optim.OptimConfig(lr=3e-3, warmup_ratio=0.0, schedule="constant")
  graphdef, tx, shardings, state = make_state(tiny_lvlm(), config, mesh)
  evaluate = steps.jit_eval_step(steps.eval_step, shardings, mesh, graphdef=graphdef)
  with jax.set_mesh(mesh):
    before = evaluate(state, global_batch(batch(), mesh))
  step = steps.jit_train_step(steps.sft_step, shardings, mesh, graphdef=graphdef, tx=tx)
  state, seen, metrics = run_steps(step, state, batch(), mesh, 8)
  # The eval step scores the same loss the first train step saw (before its update).
  assert float(before["loss_sum"] / before["loss_tokens"]) == pytest.approx(seen[0], rel=1e-6)
  assert seen[-1] < seen[0] - 0.5 and all(b < a for a, b in zip(seen, seen[1:])), seen
  assert int(state["step"]) == 8 and float(metrics["lr"]) == pytest.approx(3e-3)
  assert float(metrics["tokens"]) == batch()["attention_mask"].sum()


def test_step_releases_freed_host_memory_after_its_first_call(mesh, monkeypatch):
  """malloc_trim once, after the call that compiles; `lower` (the training loop compiles through
  it) still reaches the jitted function."""
  steps.release_freed_host_memory()  # the real one: callable here, whatever the C library
  calls = []
  monkeypatch.setattr(steps, "release_freed_host_memory", lambda: calls.append(1))
  config = optim.OptimConfig(lr=1e-3, warmup_ratio=0.0)
  graphdef, tx, shardings, state = make_state(tiny_lvlm(), config, mesh)
  step = steps.jit_train_step(steps.sft_step, shardings, mesh, graphdef=graphdef, tx=tx)
  with jax.set_mesh(mesh):
    step.lower(state, global_batch(batch(), mesh)).compile()
  assert calls == []
  run_steps(step, state, batch(), mesh, 2)
  assert calls == [1]


def test_accumulation_equals_one_big_batch(mesh):
  """With plain SGD (update = -grad) the updated parameters are the gradients themselves."""
  b = batch(seed=3)
  results = []
  for k in (1, 4):
    graphdef, tx, shardings, state = make_state(tiny_lvlm(), optim.OptimConfig(), mesh,
                                                tx=optax.sgd(1.0))
    before = jax.tree.map(np.asarray, state["params"])
    step = steps.jit_train_step(steps.sft_step, shardings, mesh, graphdef=graphdef, tx=tx,
                                accum_steps=k)
    state, seen, metrics = run_steps(step, state, b, mesh, 1)
    delta = jax.tree.map(lambda a, p: np.asarray(a) - p, state["params"], before)
    results.append((seen[0], float(metrics["loss_tokens"]), delta))
  (loss1, tokens1, delta1), (loss4, tokens4, delta4) = results
  assert tokens1 == tokens4 == b["loss_mask"][:, 1:].sum()
  np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
  # float32 gradient sums in another order (a tiny entry may be the difference of large terms, so
  # scale to the largest gradient) and new - old parameters, which round at eps * |param|.
  largest = lambda tree: max(np.abs(x).max() for x in jax.tree.leaves(tree))
  atol = 1e-6 * largest(delta1) + 2e-7 * largest(before)
  for d1, d4 in zip(jax.tree.leaves(delta1), jax.tree.leaves(delta4)):
    np.testing.assert_allclose(d4, d1, rtol=1e-5, atol=atol)


def test_lora_trains_only_adapters_and_projector(mesh):
  base = tiny_lvlm()
  b = batch(seed=5)
  base_logits = np.asarray(logits_of(base, b))
  apply_lora(base, LoraConfig(rank=4, alpha=8.0, dropout=0.1,
                              target=r"llm\.layers\.\d+\..*_proj"),
             rngs=nnx.Rngs(params=1, dropout=2))
  config = optim.OptimConfig(lr=1e-2, warmup_ratio=0.0, trainable=r".*\.lora_[ab]|projector\..*")
  graphdef, tx, shardings, state = make_state(base, config, mesh)
  params_before = jax.tree.map(np.asarray, state["params"])
  # Frozen base weights (and the dropout RNG's state, which steps reseed but never change).
  as_host = lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  frozen_before = jax.tree.map(as_host, state["frozen"])
  step = steps.jit_train_step(steps.sft_step, shardings, mesh, graphdef=graphdef, tx=tx)
  state, seen, _ = run_steps(step, state, b, mesh, 3)
  assert seen[-1] < seen[0]
  for old, new in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(as_host(new), old)
  changed = {optim.path_str(path): not np.array_equal(np.asarray(v), before)
             for (path, v), before in zip(jax.tree.leaves_with_path(state["params"]),
                                          jax.tree.leaves(params_before))}
  assert all(changed.values()), [p for p, c in changed.items() if not c]
  trained = train_state.merge(graphdef, state)
  assert not np.allclose(np.asarray(logits_of(trained, b)), base_logits, atol=1e-4)
  # The projector trained too, so the adapters-off model equals the base on text: no images.
  text_only = dict(b, pixel_values=None)
  with lora_disabled(trained):
    off_text = np.asarray(logits_of(trained, text_only))
  np.testing.assert_array_equal(off_text, np.asarray(logits_of(tiny_lvlm(), text_only)))


def test_remat_gives_the_same_gradients():
  config = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
  b = {k: v for k, v in batch(seed=7).items() if k != "pixel_values"}
  results = {}
  for policy in ("none", "full"):
    model = LLM(config, rngs=nnx.Rngs(0))
    model.remat = policy
    graphdef, params = nnx.split(model)
    grad = jax.jit(jax.grad(lambda p: losses.sft_loss_sums(nnx.merge(graphdef, p), b)[0]))
    results[policy] = grad(params)
  # Recomputed in another order: rounding scales with the largest gradient of the model.
  atol = 1e-6 * max(np.abs(np.asarray(a)).max() for a in jax.tree.leaves(results["none"]))
  for a, c in zip(jax.tree.leaves(results["none"]), jax.tree.leaves(results["full"])):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=atol)


def test_bf16_compute_with_float32_master_weights():
  """dtype=bfloat16 computes in bf16 while parameters and their gradients stay float32."""
  b = {k: v for k, v in batch(seed=9).items() if k != "pixel_values"}
  losses_by_dtype = {}
  for dtype in ("float32", "bfloat16"):
    config = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, dtype=dtype, param_dtype="float32")
    graphdef, params = nnx.split(LLM(config, rngs=nnx.Rngs(0)))
    loss_fn = lambda p: losses.sft_loss_sums(nnx.merge(graphdef, p), b)[0]
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    losses_by_dtype[dtype] = float(loss)
  assert losses_by_dtype["bfloat16"] == pytest.approx(losses_by_dtype["float32"], rel=2e-2)
