"""On-policy training with phases: batches made from the current state (a rollout), a frozen
snapshot re-synced and the optimizer reset with another learning rate at every phase switch, and
a resume mid-phase or exactly at a switch that is bitwise equal to an uninterrupted run."""

import functools
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from training_fixtures import batch, tiny_lvlm
from lvlm_jax.sharding import abstract_tree, make_mesh
from lvlm_jax.training import checkpoint, loop, metrics, state as train_state, steps

STEPS = 10  # phases of 3 and 2 updates: switches after steps 3, 5, 8


@functools.partial(jax.jit, static_argnames="graphdef")
def greedy_targets(graphdef, params, frozen, b):
  """The batch with its supervised tokens replaced by the model's own teacher-forced argmax."""
  model = nnx.merge(graphdef, params, frozen)
  logits, _ = model(b["input_ids"], positions=b["positions"], attention_mask=b["attention_mask"],
                    pixel_values=b["pixel_values"])
  guess = jnp.argmax(logits, -1).astype(jnp.int32)
  ids = b["input_ids"].at[:, 1:].set(
      jnp.where(b["loss_mask"][:, 1:] > 0, guess[:, :-1], b["input_ids"][:, 1:]))
  return {**b, "input_ids": ids}


def run(directory, stop_at=None):
  """(final state, status, {step: (phase, loss)} logged so far) of a run in `directory` (resumed
  if it has checkpoints)."""
  mesh = make_mesh()
  graphdef, params, frozen = train_state.split_model(tiny_lvlm(), nnx.Param)
  txs = (optax.adam(1e-3), optax.adam(4e-3))
  abstract = train_state.abstract_state(params, frozen, txs[0])
  abstract["snapshot"] = params
  shardings = train_state.state_shardings(abstract, mesh)
  data = iter(grain.MapDataset.range(1000).map(lambda i: batch(seed=int(i))))
  checkpointer = checkpoint.Checkpointer(str(directory / "ckpt"), checkpoint.CheckpointConfig(
      every_steps=2, keep=10, async_save=False))
  latest = checkpointer.latest_step()
  if latest is None:
    state = train_state.init_state(params, frozen, txs[0], 0, shardings)
    state["snapshot"] = jax.tree.map(jnp.copy, state["params"])
  else:
    state = checkpointer.restore(latest, abstract_tree(jax.eval_shape(lambda: abstract),
                                                       shardings), data)
  writer = metrics.MetricsWriter(str(directory / "metrics"), tensorboard=False,
                                 resumed_from=latest or 0)

  def enter(tx):
    def switch(s):
      s = train_state.reset_optimizer(s, tx, shardings)
      return {**s, "snapshot": jax.tree.map(jnp.copy, s["params"])}
    return switch

  def rollout(source):
    def next_batch(s, batches):
      b = next(batches)
      with jax.set_mesh(mesh):
        made = greedy_targets(graphdef, s[source], s["frozen"], b)
      return jax.tree.map(np.asarray, made)
    return next_batch

  def step(tx):
    return steps.jit_train_step(steps.sft_step, shardings, mesh, graphdef=graphdef, tx=tx)

  phases = (loop.Phase("policy", 3, step(txs[0]), rollout("params"), enter(txs[0])),
            loop.Phase("snapshot", 2, step(txs[1]), rollout("snapshot"), enter(txs[1])))
  config = loop.TrainConfig(num_steps=STEPS, batch_size=8, log_every=1, progress_bar=False,
                            tensorboard=False)
  state, status = loop.train(state, batches=data, mesh=mesh, config=config,
                             checkpointer=checkpointer, writer=writer, phases=phases,
                             stop_at=stop_at)
  checkpointer.close()
  writer.close()
  with open(directory / "metrics" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  seen = {r["step"]: (("policy", "snapshot")[int(r["phase"])], r["loss"]) for r in records}
  assert len(seen) == len(records)  # every step logged once, resumed or not
  return state, status, seen


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  state, status, seen = run(tmp_path_factory.mktemp("straight"))
  assert status == "done"
  return state, seen


def test_phase_at():
  phases = (loop.Phase("a", 3, None), loop.Phase("b", 2, None))
  assert [loop.phase_at(phases, i) for i in range(7)] == [
      (0, True), (0, False), (0, False), (1, True), (1, False), (0, True), (0, False)]


def test_phases_alternate_and_the_snapshot_follows_the_switches(straight):
  state, seen = straight
  assert [seen[s][0] for s in range(1, STEPS + 1)] == (["policy"] * 3 + ["snapshot"] * 2) * 2
  # Re-synced when the second policy phase began (after step 5), then 5 more updates.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state["params"],
                       state["snapshot"])
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("stop_at", [4, 5])
def test_resume_mid_phase_and_at_a_switch_is_exact(straight, tmp_path, stop_at):
  _, status, first = run(tmp_path, stop_at=stop_at)
  assert status == "preempted" and max(first) == stop_at
  state, status, logged = run(tmp_path)
  expected_state, expected = straight
  assert status == "done" and logged == expected
  for key in ("params", "snapshot", "opt_state"):
    for a, b in zip(jax.tree.leaves(state[key]), jax.tree.leaves(expected_state[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
