"""The DPO step against an independent computation, its two reference modes, the LoRA reference,
the noisy-rejected mode, the reference pass over a JSONL, and a (2, 2, 2) mesh."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from test_preference import reference_loss
from training_fixtures import batch, logits_of, run_python, tiny_lvlm
from lvlm_jax.models.lora import LoraConfig, apply_lora
from lvlm_jax.sharding import global_batch, make_mesh
from lvlm_jax.training import dpo, optim, state as train_state, steps
from lvlm_jax.training.preference import PreferenceLossConfig

LORA = LoraConfig(rank=4, alpha=8.0, target=r"llm\.layers\.\d+\..*_proj")
LORA_TRAINABLE = r".*\.lora_[ab]|projector\..*"


def preference_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """Chosen and rejected rows of different lengths and targets, sharing one image per row."""
  chosen, rejected = batch(seed=2 * seed + 1), batch(seed=2 * seed + 2)
  out = {f"{side}_{k}": v for side, b in (("chosen", chosen), ("rejected", rejected))
         for k, v in b.items() if k not in ("pixel_values", "image_mask")}
  out.update(pixel_values=chosen["pixel_values"], image_mask=chosen["image_mask"])
  return out


def side(b, name):
  return {"input_ids": b[f"{name}_input_ids"], "positions": b[f"{name}_positions"],
          "attention_mask": b[f"{name}_attention_mask"], "pixel_values": b["pixel_values"]}


def sequence_logps_np(model, b) -> tuple[np.ndarray, np.ndarray]:
  """float64 summed log-probs of each side's loss_mask tokens, from the model's plain logits."""
  out = []
  for name in ("chosen", "rejected"):
    logits = np.asarray(logits_of(model, side(b, name)), np.float64)[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ids = b[f"{name}_input_ids"][:, 1:]
    picked = np.take_along_axis(logp, ids[..., None], -1)[..., 0]
    out.append((picked * b[f"{name}_loss_mask"][:, 1:]).sum(1))
  return out[0], out[1]


def make_state(model, trainable: str, mesh, tx, reference: bool):
  config = optim.OptimConfig(trainable=trainable)
  graphdef, params, frozen = train_state.split_model(model, optim.trainable_filter(config))
  abstract = train_state.abstract_state(params, frozen, tx)
  if reference:
    abstract["ref"] = dpo.reference_part(params)
  shardings = train_state.state_shardings(abstract, mesh)
  state = train_state.init_state(params, frozen, tx, 0, shardings)
  return graphdef, shardings, dpo.with_reference(state) if reference else state


@pytest.fixture(scope="module")
def mesh():
  return make_mesh()


def run(step, state, b, mesh, n=1):
  seen = []
  with jax.set_mesh(mesh):
    for _ in range(n):
      state, metrics = step(state, global_batch(b, mesh))
      seen.append({k: float(v) for k, v in metrics.items()})
  return state, seen


LOSSES = [PreferenceLossConfig("sigmoid", beta=0.5, label_smoothing=0.1, nll_coef=1 / 64),
          PreferenceLossConfig("ipo", beta=0.2), PreferenceLossConfig("hinge", beta=0.5)]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda c: c.loss_type)
def test_loss_and_gradient_equal_an_independent_computation(loss, mesh):
  """Plain SGD at lr 1: the update is minus the gradient. The expected gradient is the chain rule
  through the formula (numeric dL/dlogp) and the model's own logits (jax.grad)."""
  b = preference_batch(seed=1)
  model = tiny_lvlm()
  pc, pr = sequence_logps_np(model, b)
  rng = np.random.default_rng(0)
  # References near the policy, so every loss (the hinge too) is in its sloped part.
  b["ref_chosen_logp"] = (pc + rng.uniform(-1, 1, pc.shape)).astype(np.float32)
  b["ref_rejected_logp"] = (pr + rng.uniform(-1, 1, pr.shape)).astype(np.float32)
  rc, rr = b["ref_chosen_logp"].astype(np.float64), b["ref_rejected_logp"].astype(np.float64)
  lengths = [b[f"{name}_loss_mask"][:, 1:].sum(1) for name in ("chosen", "rejected")]
  assert lengths[0].tolist() != lengths[1].tolist()  # IPO's per-token averaging shows
  expected = reference_loss(loss, pc, pr, rc, rr, *lengths)

  dlogp = []
  for which in range(2):
    d = np.zeros_like(pc)
    for i in range(len(pc)):
      up, down = [pc.copy(), pr.copy()], [pc.copy(), pr.copy()]
      up[which][i] += 1e-4
      down[which][i] -= 1e-4
      d[i] = (reference_loss(loss, *up, rc, rr, *lengths)
              - reference_loss(loss, *down, rc, rr, *lengths)) / 2e-4
    dlogp.append(jnp.asarray(d, jnp.float32))
  graphdef, params = nnx.split(tiny_lvlm())

  def weighted(p):
    m = nnx.merge(graphdef, p)
    total = 0.0
    for name, w in zip(("chosen", "rejected"), dlogp):
      logits, _ = m(**side(b, name))
      logp = jax.nn.log_softmax(logits[:, :-1], -1)
      picked = jnp.take_along_axis(logp, b[f"{name}_input_ids"][:, 1:, None], -1)[..., 0]
      total += jnp.sum(w * jnp.sum(picked * b[f"{name}_loss_mask"][:, 1:], 1))
    return total

  expected_grad = jax.jit(jax.grad(weighted))(params)

  tx = optax.sgd(1.0)
  for accum in (1, 2) if loss.loss_type == "sigmoid" else (1,):
    graphdef_s, shardings, state = make_state(tiny_lvlm(), ".*", mesh, tx, reference=False)
    before = jax.tree.map(np.asarray, state["params"])
    step = steps.jit_train_step(dpo.dpo_step, shardings, mesh, graphdef=graphdef_s, tx=tx,
                                loss=loss, accum_steps=accum)
    state, (metrics,) = run(step, state, b, mesh)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), accum
    # The metrics report the log-probs the loss compares: per-token means for IPO (as TRL).
    compared = pc / lengths[0] if loss.loss_type == "ipo" else pc
    assert metrics["logps/chosen"] == pytest.approx(compared.mean(), rel=1e-5)
    assert metrics["tokens"] == b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum()
    # float32 sums of terms of both signs: entries carry errors of ~1e-5 of the leaf's norm (and
    # leaves with no gradient, of ~1e-12 of the whole gradient's); old - new also loses the
    # rounding of new (norm scales near 1 take updates of 1e-5).
    scale = float(optax.global_norm(expected_grad))
    for new, old, g in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before),
                           jax.tree.leaves(expected_grad)):
      g = np.asarray(g)
      assert np.linalg.norm(old - np.asarray(new) - g) <= (1e-4 * np.linalg.norm(g) + 1e-8 * scale
                                                     + 2e-7 * np.linalg.norm(old))


def lora_model():
  model = tiny_lvlm()
  apply_lora(model, LORA, rngs=nnx.Rngs(params=1, dropout=2))
  return model


BETA = 0.5


@pytest.fixture(scope="module")
def lora_runs(mesh):
  """Three Adam steps on the same batches with the in-step reference and with references
  precomputed from the base model (ref pass jitted as the precompute uses it)."""
  loss = PreferenceLossConfig("sigmoid", beta=BETA, nll_coef=1 / 64)
  tx = optax.adam(1e-2)
  batches = [preference_batch(seed=s) for s in range(3)]
  base_state = nnx.split(tiny_lvlm())
  results = {}
  for mode in ("in_step", "precomputed"):
    graphdef, shardings, state = make_state(lora_model(), LORA_TRAINABLE, mesh, tx,
                                            reference=mode == "in_step")
    step = steps.jit_train_step(dpo.dpo_step, shardings, mesh, graphdef=graphdef, tx=tx, loss=loss)
    seen = []
    for b in batches:
      if mode == "precomputed":
        c, r = dpo._reference_pass(*base_state, b, noisy_rejected=False)
        b = dict(b, ref_chosen_logp=np.asarray(c), ref_rejected_logp=np.asarray(r))
      state, (metrics,) = run(step, state, b, mesh)
      seen.append(metrics)
    results[mode] = (graphdef, state, seen)
  return results


def test_precomputed_and_in_step_references_give_the_same_losses(lora_runs):
  (_, state_a, a), (_, state_b, b) = lora_runs["in_step"], lora_runs["precomputed"]
  # Step 1 starts at the base model (zero adapters): its margin is 0 whatever the reference; the
  # later steps tell a reference that moved with the policy from the initial one.
  # A margin is beta times a difference of sequence log-probs of size |logp|, so float32 rounding
  # leaves it off by about eps * beta * |logp| (-4.8e-7 instead of 0.0 on an AVX-512 machine).
  rounding = lambda m: 1e-6 * BETA * (abs(m["logps/chosen"]) + abs(m["logps/rejected"]))
  assert a[0]["rewards/margin"] == pytest.approx(0.0, abs=rounding(a[0]))
  assert abs(a[2]["rewards/margin"]) > 100 * rounding(a[2])
  for x, y in zip(a, b):
    assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert x["rewards/margin"] == pytest.approx(y["rewards/margin"], rel=1e-4, abs=rounding(x))
  for x, y in zip(jax.tree.leaves(state_a["params"]), jax.tree.leaves(state_b["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=2e-6)


def test_lora_reference_is_the_base_model(lora_runs):
  graphdef, state, _ = lora_runs["in_step"]
  b = preference_batch(seed=7)
  policy = np.asarray(logits_of(train_state.merge(graphdef, state), side(b, "chosen")))
  base = np.asarray(logits_of(tiny_lvlm(), side(b, "chosen")))
  assert not np.allclose(policy, base, atol=1e-4)  # the adapters and the projector trained
  ref = dpo.reference_model(graphdef, state)
  with dpo.lora_disabled(ref):
    np.testing.assert_allclose(np.asarray(logits_of(ref, side(b, "chosen"))), base, rtol=1e-6,
                               atol=1e-6)
  c, r = jax.jit(lambda s, x: dpo.reference_logps(dpo.reference_model(graphdef, s), x))(state, b)
  np.testing.assert_allclose(np.stack([c, r]), np.stack(sequence_logps_np(tiny_lvlm(), b)),
                             rtol=1e-5)


def test_noisy_rejected_scores_the_models_own_top_tokens():
  model = tiny_lvlm()
  b = preference_batch(seed=4)
  chosen, rejected = jax.jit(lambda x: dpo.response_logps(model, x, noisy_rejected=True))(b)
  np.testing.assert_allclose(chosen, sequence_logps_np(model, b)[0], rtol=1e-5)
  logits = np.asarray(logits_of(model, side(b, "rejected")), np.float64)[:, :-1]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  order = np.argsort(-logp, -1)
  labels = b["rejected_input_ids"][:, 1:]
  token = np.where(order[..., 0] == labels, order[..., 1], order[..., 0])
  noisy = np.take_along_axis(logp, token[..., None], -1)[..., 0]
  np.testing.assert_allclose(rejected, (noisy * b["rejected_loss_mask"][:, 1:]).sum(1), rtol=1e-5)
  assert not np.allclose(rejected, sequence_logps_np(model, b)[1], rtol=1e-3)


def test_reference_pass_writes_the_jsonl_with_log_probs(tmp_path, mesh):
  """write_reference_logps over a real preference JSONL (shapes tokenizer, PNG images) gives the
  numbers the in-step reference computes on the pipeline's batch of the same records."""
  from PIL import Image
  from lvlm_jax.data.images import ImageProcessing
  from lvlm_jax.data.pipeline import DataConfig, make_dataset
  from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer
  from lvlm_jax.models.lvlm import LVLM
  from training_fixtures import TINY_LVLM
  import dataclasses
  tokenizer = shapes_tokenizer()
  config = dataclasses.replace(TINY_LVLM, text=dataclasses.replace(TINY_LVLM.text,
                                                                  vocab_size=len(tokenizer)),
                               image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
  model = LVLM(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  lines = []
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lines.append({"id": str(i), "image": f"{i}.png", "prompt": "Describe the image.",
                  "chosen": "There is one red circle." * (1 + i % 2), "rejected": "A blue square.",
                  "extra": i})
  # A prompt beyond the 64-token bucket leaves nothing to score: written without log-probs.
  lines[3]["prompt"] = "Describe the image. " * 20
  path = tmp_path / "prefs.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  data = DataConfig(kind="preference", batch_size=4, length_buckets=(32, 64), tokens_per_image=4,
                    system_prompt="", image=ImageProcessing(size=16), shuffle=False, num_epochs=1,
                    read_threads=1)
  counts = dpo.write_reference_logps(model, str(path), str(tmp_path / "out.jsonl"), tokenizer, data,
                                     mesh, batch_size=2)
  assert counts == {"records": 5, "with_ref_logps": 4, "skipped": 1}
  written = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [w["extra"] for w in written] == list(range(5)) and "ref_chosen_logp" not in written[3]
  kept = [w for w in written if "ref_chosen_logp" in w]
  (tmp_path / "kept.jsonl").write_text("".join(json.dumps(w) + "\n" for w in kept))
  from lvlm_jax.data.sources import PreferenceSource
  b = next(iter(make_dataset(PreferenceSource(str(tmp_path / "kept.jsonl")), tokenizer,
                             dataclasses.replace(data, with_ref_logps=True))))
  c, r = jax.jit(lambda x: dpo.reference_logps(model, x))(b)
  np.testing.assert_allclose(b["ref_chosen_logp"], c, rtol=1e-5)
  np.testing.assert_allclose(b["ref_rejected_logp"], r, rtol=1e-5)

  # Killed after two records and part of a third: the rerun keeps the complete records, says
  # where it resumes, scores the rest and writes the uninterrupted file, with its counts.
  done = (tmp_path / "out.jsonl").read_text()
  partial = tmp_path / "again.jsonl.partial"
  partial.write_text("".join(done.splitlines(keepends=True)[:2]) + done.splitlines()[2][:20])
  messages = []
  again = dpo.write_reference_logps(model, str(path), str(tmp_path / "again.jsonl"), tokenizer,
                                    data, mesh, batch_size=2, log=messages.append)
  assert messages[0] == "reference: resuming after 2 of 5 records"
  assert again == counts and not partial.exists()
  scored = [json.loads(l) for l in (tmp_path / "again.jsonl").read_text().splitlines()]
  for a, b in zip(scored, written):
    assert a.keys() == b.keys() and a["extra"] == b["extra"]
    for key in ("ref_chosen_logp", "ref_rejected_logp"):
      if key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-5)


SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests/training")
import jax, numpy as np, optax
from test_dpo import BETA, LORA_TRAINABLE, lora_model, make_state, preference_batch
from lvlm_jax.sharding import global_batch, make_mesh
from lvlm_jax.training import dpo, steps
from lvlm_jax.training.preference import PreferenceLossConfig

assert jax.device_count() == 8
losses = {}
for name, mesh in (("one", make_mesh((1, 1, 1), jax.devices()[:1])), ("eight", make_mesh((2, 2, 2)))):
  tx = optax.adam(1e-2)
  graphdef, shardings, state = make_state(lora_model(), LORA_TRAINABLE, mesh, tx, reference=True)
  step = steps.jit_train_step(dpo.dpo_step, shardings, mesh, graphdef=graphdef, tx=tx,
                              loss=PreferenceLossConfig(beta=BETA, nll_coef=1 / 64))
  losses[name] = []
  with jax.set_mesh(mesh):
    for s in range(3):
      state, metrics = step(state, global_batch(preference_batch(seed=s), mesh))
      losses[name].append([float(metrics[k]) for k in ("loss", "rewards/margin", "logps/chosen",
                                                       "logps/rejected")])
  losses[name + "_spec"] = str(state["ref"]["projector"]["linear_1"]["kernel"][...].sharding.spec)
print("RESULT " + json.dumps(losses))
"""


def test_eight_device_mesh_gives_the_same_losses():
  proc = run_python(["-c", SCRIPT], XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                    "--xla_backend_optimization_level=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  result = json.loads(line[len("RESULT "):])
  assert "fsdp" in result["eight_spec"], result["eight_spec"]
  eight, one = np.asarray(result["eight"]), np.asarray(result["one"])
  np.testing.assert_allclose(eight[:, [0, 2, 3]], one[:, [0, 2, 3]], rtol=1e-4)
  # Margins are differences of log-probs: float32 rounding scales with |logp|, not with the margin.
  np.testing.assert_allclose(eight[:, 1], one[:, 1], rtol=1e-4,
                             atol=1e-6 * BETA * np.abs(one[:, 2:]).sum(1).max())
  assert abs(result["one"][2][1]) > 1e-4


def test_llava_onevision_preference_batch_scores_as_each_side_alone(shapes_llava_onevision_dir):
  """A LLaVA-OneVision preference batch from the data pipeline (a row of one capped image, tiled,
  and a row of two, untiled, with their feature grids): the one forward over both sides gives
  each side's own summed log-probs."""
  import transformers
  from lvlm_jax.data.pipeline import DataConfig, make_dataset
  from lvlm_jax.models import hf
  from lvlm_jax.models.llava_next import batch_images
  model = hf.load_model(shapes_llava_onevision_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(shapes_llava_onevision_dir)
  data = DataConfig(kind="preference", batch_size=2, length_buckets=(64,), max_images=2,
                    shuffle=False, num_epochs=1).for_model(model, shapes_llava_onevision_dir)
  rng = np.random.default_rng(1)
  big, small = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((30, 31), (8, 20)))
  question = {"from": "human", "value": "<image>\nIs there a red circle?"}
  records = [{"prompt": [question], "chosen": "yes", "rejected": "no", "images": [big]},
             {"prompt": [{"from": "human", "value": "<image>\n<image>\nIs there a red circle?"}],
              "chosen": "no", "rejected": "yes", "images": [big, small]}]
  b = next(iter(make_dataset(records, tokenizer, data)))
  # Row 0 capped (2 x 2 tiles' 4 x 4 features shrunk to 2 x 2), row 1 untiled (1, 0) each.
  assert b["feature_grids"].tolist() == [[[2, 2], [0, 0]], [[1, 0], [1, 0]]]
  assert (b["chosen_input_ids"] == 4).sum(1).tolist() == [4 + 2 * 3, 2 * (4 + 1)]
  chosen, rejected = jax.jit(dpo.response_logps)(model, b)
  for name, got in (("chosen", chosen), ("rejected", rejected)):
    alone = {"input_ids": b[f"{name}_input_ids"], "positions": b[f"{name}_positions"],
             "attention_mask": b[f"{name}_attention_mask"], "pixel_values": batch_images(b)}
    logits = np.asarray(logits_of(model, alone), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, b[f"{name}_input_ids"][:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, (picked * b[f"{name}_loss_mask"][:, 1:]).sum(1), rtol=1e-5)
