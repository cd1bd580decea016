"""The Grain pipeline: batch contract, buckets, skip-and-count, refusals, resume, workers, sharding."""

import dataclasses
import json

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import bpe_tokenizer
from lvlm_jax.data import sources
from lvlm_jax.data.images import CLIP_MEAN, ImageProcessing
from lvlm_jax.data.pipeline import DataConfig, make_dataset
from lvlm_jax.data.text import BoxFormat
from lvlm_jax.errors import UserError
from lvlm_jax.models.llava_next import batch_images

TOKENS_PER_IMAGE = 4
SIZE = 16


@pytest.fixture(scope="module")
def tokenizer():
  return bpe_tokenizer(vocab_size=300, sentences=[
      "A chat between a curious user and an artificial intelligence assistant.",
      "USER: ASSISTANT: What colour is the square? Answer 0 1 2 3 4 5 6 7 8 9."])


def config(**overrides):
  base = DataConfig(batch_size=4, length_buckets=(64, 128, 256), max_images=2,
                    tokens_per_image=TOKENS_PER_IMAGE, image=ImageProcessing(size=SIZE),
                    seed=3, read_threads=2, system_prompt="A chat.")
  return dataclasses.replace(base, **overrides)


def write_image(path, seed, shape=(12, 20, 3)):
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)


def conversation(i, images=("0.png",)):
  question = "Image 1: <image>\nImage 2: <image>\nSame?" if len(images) == 2 else "What colour?"
  return {"id": f"r{i}", "image": list(images),
          "conversations": [{"from": "human", "value": question},
                            {"from": "gpt", "value": f"Answer {i}."}]}


@pytest.fixture
def data_dir(tmp_path):
  for i in range(4):
    write_image(tmp_path / f"{i}.png", i)
  return tmp_path


def write_jsonl(path, lines):
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  return path


def answers(tokenizer, batch, prefix=""):
  """The target text of each row: what the loss is on (the space before an answer rides on its
  first token, so it is a target too)."""
  return [tokenizer.decode(ids[mask > 0]).lstrip() for ids, mask in
          zip(batch[prefix + "input_ids"], batch[prefix + "loss_mask"])]


def test_sft_batch_contract(tokenizer, data_dir):
  lines = [conversation(i, [f"{i % 4}.png"] if i % 3 else ["1.png", "2.png"]) for i in range(8)]
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", lines))
  it = iter(make_dataset(src, tokenizer, config(num_epochs=1, shuffle=False)))
  batch = next(it)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "input_ids": ((4, 64), np.int32), "loss_mask": ((4, 64), np.float32),
      "attention_mask": ((4, 64), np.int32), "positions": ((4, 64), np.int32),
      "pixel_values": ((4, 2, SIZE, SIZE, 3), np.uint8), "image_mask": ((4, 2), np.int32),
      "pixel_mean": ((4, 3), np.float32), "pixel_std": ((4, 3), np.float32)}
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  np.testing.assert_array_equal(batch["image_mask"], [[1, 1], [1, 0], [1, 0], [1, 1]])
  np.testing.assert_array_equal((batch["input_ids"] == image_id).sum(1),
                                batch["image_mask"].sum(1) * TOKENS_PER_IMAGE)
  assert answers(tokenizer, batch) == [f"Answer {i}.</s>" for i in range(4)]
  lengths = batch["attention_mask"].sum(1)
  for row, n in enumerate(lengths):
    np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
    assert (batch["positions"][row, n:] == 0).all() and (batch["input_ids"][row, n:] == 0).all()
    assert batch["attention_mask"][row, :n].all() and not batch["loss_mask"][row, n:].any()
  # Real image slots hold the image (LLaVA pad + resize), normalised on the device to the host
  # normalisation's values; empty slots are zero.
  processing = ImageProcessing(size=SIZE)
  image = np.asarray(Image.open(data_dir / "1.png"))
  np.testing.assert_array_equal(batch["pixel_values"][1, 0], processing.resize(image))
  on_device = np.asarray(jax.jit(batch_images)(batch))
  np.testing.assert_allclose(on_device[1, 0], processing(image), rtol=1e-6, atol=1e-6)
  assert not batch["pixel_values"][1, 1].any()


def test_pixels_travel_as_uint8(tokenizer, data_dir):
  """The batch's pixels take a quarter of the float32 bytes on the host (and on the way to the
  device): 4 rows x 2 slots x 16 x 16 x 3 = 6,144 bytes, not 24,576; per-row mean and std add
  96 bytes."""
  lines = [conversation(i, ["1.png", "2.png"]) for i in range(4)]
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", lines))
  batch = next(iter(make_dataset(src, tokenizer, config(num_epochs=1, shuffle=False))))
  pixels = 4 * 2 * SIZE * SIZE * 3
  assert batch["pixel_values"].nbytes == pixels
  assert batch["pixel_mean"].nbytes + batch["pixel_std"].nbytes == 2 * 4 * 3 * 4
  np.testing.assert_array_equal(batch["pixel_mean"], np.broadcast_to(np.float32(CLIP_MEAN), (4, 3)))


def test_length_buckets(tokenizer, data_dir):
  short = conversation(0)
  long = dict(conversation(1), conversations=[{"from": "human", "value": "What colour? " * 12},
                                              {"from": "gpt", "value": "Answer 1."}])
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", [short] * 4 + [long] * 4))
  it = iter(make_dataset(src, tokenizer, config(num_epochs=1, shuffle=False)))
  assert next(it)["input_ids"].shape == (4, 64)
  assert next(it)["input_ids"].shape == (4, 128)


def test_preference_batch(tokenizer, data_dir):
  lines = [{"id": str(i), "image": "0.png", "prompt": "What colour?", "chosen": f"Answer {i}.",
            "rejected": "Answer 9 9 9." * (i + 1), "ref_chosen_logp": -i, "ref_rejected_logp": -2 * i}
           for i in range(4)]
  src = sources.PreferenceSource(write_jsonl(data_dir / "p.jsonl", lines))
  cfg = config(kind="preference", with_ref_logps=True, num_epochs=1, shuffle=False, max_images=1)
  batch = next(iter(make_dataset(src, tokenizer, cfg)))
  for side in ("chosen", "rejected"):  # one T for both sides: the longest rejected needs 128
    for key in ("input_ids", "loss_mask", "attention_mask", "positions"):
      assert batch[f"{side}_{key}"].shape == (4, 128)
  assert batch["pixel_values"].shape == (4, 1, SIZE, SIZE, 3)
  assert answers(tokenizer, batch, "chosen_") == [f"Answer {i}.</s>" for i in range(4)]
  assert answers(tokenizer, batch, "rejected_")[1] == "Answer 9 9 9.Answer 9 9 9.</s>"
  # Both sides share the prompt tokens.
  n = int(np.argmax(batch["chosen_loss_mask"][0]))
  np.testing.assert_array_equal(batch["chosen_input_ids"][:, :n], batch["rejected_input_ids"][:, :n])
  np.testing.assert_array_equal(batch["ref_chosen_logp"], [0, -1, -2, -3])
  np.testing.assert_array_equal(batch["ref_rejected_logp"], [0, -2, -4, -6])
  assert batch["ref_chosen_logp"].dtype == np.float32


def test_identical_preference_pairs_are_skipped_and_counted(tokenizer, data_dir):
  # chosen == rejected has zero gradient: such a pair trains nothing, so it is counted, not used.
  lines = [{"id": str(i), "image": "0.png", "prompt": "What colour?", "chosen": f"Answer {i}.",
            "rejected": f"Answer {i}." if i % 3 == 0 else "Answer 9."} for i in range(9)]
  src = sources.PreferenceSource(write_jsonl(data_dir / "p.jsonl", lines))
  cfg = config(kind="preference", num_epochs=1, shuffle=False, max_images=1, batch_size=2,
               max_skip_fraction=0.5)
  it = iter(make_dataset(src, tokenizer, cfg))
  batches = list(it)
  assert it.skip_counts == {"identical_pair": 3}
  assert answers(tokenizer, batches[0], "chosen_") == ["Answer 1.</s>", "Answer 2.</s>"]
  same = [dict(l, rejected=l["chosen"]) for l in lines]
  src = sources.PreferenceSource(write_jsonl(data_dir / "same.jsonl", same))
  with pytest.raises(UserError, match="all 9 examples were skipped; last: .*the same tokens"):
    list(make_dataset(src, tokenizer, dataclasses.replace(cfg, max_skip_fraction=1.0)))


def test_answers_past_the_longest_bucket_are_skipped_and_counted(tokenizer, data_dir):
  # Cutting an answer loses its end token (the model would learn not to stop): skipped, counted.
  long = dict(conversation(1), conversations=[{"from": "human", "value": "What colour?"},
                                              {"from": "gpt", "value": "Answer 1 2 3. " * 12}])
  lines = [conversation(i) for i in range(4)] + [long]
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", lines))
  it = iter(make_dataset(src, tokenizer, config(num_epochs=1, shuffle=False, length_buckets=(64,),
                                                max_skip_fraction=0.5)))
  batch = next(it)
  assert answers(tokenizer, batch) == [f"Answer {i}.</s>" for i in range(4)]
  with pytest.raises(StopIteration):
    next(it)
  assert it.skip_counts == {"answer_too_long": 1}


def test_length_buckets_past_the_model_context_are_refused():
  with pytest.raises(UserError, match=r"length_buckets \(64, 256\) go past the model's context of "
                                      r"128 tokens"):
    config(length_buckets=(64, 256), context_length=128)
  assert config(length_buckets=(64, 128), context_length=128).max_length == 128


def test_grounding_batch(tokenizer, data_dir):
  boxes = [[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1], [0.25, 0.25, 0.75, 0.75], [0.5, 0.1, 0.9, 0.3]]
  lines = [{"image": "0.png", "box": b, "expression": "the square"} for b in boxes]
  lines.append({"image": "0.png", "box": [0, 0, 1, 1]})  # no expression: skipped and counted
  src = sources.GroundingSource(write_jsonl(data_dir / "g.jsonl", lines), max_bad_fraction=0)
  cfg = config(kind="grounding", num_epochs=1, shuffle=False, max_images=1,
               box_format=BoxFormat(grid=100))
  it = iter(make_dataset(src, tokenizer, cfg))
  batch = next(it)
  np.testing.assert_allclose(batch["boxes"], boxes)
  assert batch["boxes"].dtype == np.float32
  assert answers(tokenizer, batch) == [BoxFormat(grid=100).to_text(b) + "</s>" for b in boxes]
  assert "Where is the square?" in tokenizer.decode(batch["input_ids"][0])
  with pytest.raises(StopIteration):
    next(it)
  assert it.skip_counts == {"no_expression": 1}


def test_bad_examples_are_skipped_and_counted(tokenizer, data_dir):
  (data_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  (data_dir.parent / "secret.png").write_bytes((data_dir / "0.png").read_bytes())
  write_image(data_dir / "big.png", 0, (30, 30, 3))
  lines = [conversation(i, [f"{i % 4}.png"]) for i in range(16)]
  lines[3] = '{"id": "broken", "image": "0.png", "conversations": ['
  lines[5]["image"] = ["corrupt.png"]
  lines[7]["image"] = ["missing.png"]
  lines[9]["image"] = ["../secret.png"]
  lines[11]["image"] = ["big.png"]  # over max_image_pixels
  lines[13]["conversations"][0]["value"] = "What colour? " * 40 + "<image>"  # image past 256
  lines[15]["conversations"].insert(1, {"from": "system", "value": "Be brief."})  # mid-dialogue
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", lines), max_bad_fraction=0.1)
  cfg = config(num_epochs=1, max_image_pixels=500, max_skip_fraction=0.1)
  it = iter(make_dataset(src, tokenizer, cfg))
  batches = list(it)
  assert len(batches) == 2  # 9 good examples: two full batches, the remainder dropped
  assert all(b["input_ids"].shape[0] == 4 and b["pixel_values"].shape == (4, 2, SIZE, SIZE, 3)
             for b in batches)
  assert it.skip_counts == {"bad_json": 1, "image_unreadable": 1, "image_missing": 1,
                            "image_outside_root": 1, "image_too_large": 1, "too_long": 1,
                            "bad_conversation": 1}
  assert it.examples_seen == 15


def test_any_per_record_failure_is_a_counted_skip(tokenizer, data_dir):
  """A NUL byte in an image path (os.path raises ValueError) and a record whose conversation is
  not text are skipped and counted, not fatal."""
  lines = [conversation(i, [f"{i % 4}.png"]) for i in range(12)]
  lines[2]["image"] = ["0\x00.png"]
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", lines))
  records = [src[i] for i in range(len(src)) if i != 2]
  records[4] = {**records[4], "conversations": [{"from": "human", "value": "What colour?"},
                                                {"from": "gpt", "value": None}]}
  for source in (src, records):
    it = iter(make_dataset(source, tokenizer, config(num_epochs=1, max_skip_fraction=0.1)))
    assert len(list(it)) == 2
    assert it.skip_counts == ({"bad_image_path": 1} if source is src else
                              {"bad_conversation": 1})


def test_wrong_kind_of_source_is_a_user_error(tokenizer):
  records = [{"id": "u", "images": [np.zeros((8, 8, 3), np.uint8)]}]  # unlabeled
  with pytest.raises(UserError, match=r"kind='sft' needs \['conversations'\]"):
    next(iter(make_dataset(records, tokenizer, config())))


def test_too_many_skips_stop_with_the_file_and_line(tokenizer, data_dir):
  (data_dir / "corrupt.png").write_bytes(b"not an image")
  lines = [conversation(i, ["corrupt.png"] if i % 2 else ["0.png"]) for i in range(10)]
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", lines))
  it = iter(make_dataset(src, tokenizer, config(shuffle=False)))  # repeats: the fraction builds up
  with pytest.raises(UserError, match=r"more than max_skip_fraction=0.05; last: .*d\.jsonl:\d+: "
                                      r"image .*corrupt\.png' cannot be decoded"):
    for _ in range(20):
      next(it)


def test_resume_from_iterator_state(tokenizer, data_dir):
  lines = [conversation(i, [f"{i % 4}.png"]) for i in range(10)]
  lines[4]["image"] = ["missing.png"]
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", lines))
  ds = make_dataset(src, tokenizer, config())
  it = iter(ds)
  first = [answers(tokenizer, next(it)) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  rest = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in rest:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert resumed.skip_counts == it.skip_counts and it.skip_counts["image_missing"] >= 2
  # Epoch 1 (the first 9 good examples, minus what a batch of 4 spans) is shuffled differently.
  seen = [a for batch in first for a in batch]
  assert sorted(seen[:9]) == sorted(f"Answer {i}.</s>" for i in range(10) if i != 4)
  assert seen[:9] != [f"Answer {i}.</s>" for i in range(10) if i != 4]


def test_shards_are_disjoint(tokenizer, data_dir):
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", [conversation(i) for i in range(16)]))
  seen = []
  for index in range(2):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2)
    ds = make_dataset(src, tokenizer, config(num_epochs=1), shard_options=shard)
    seen.append({a for batch in ds for a in answers(tokenizer, batch)})
  assert len(seen[0]) == len(seen[1]) == 8 and not seen[0] & seen[1]


def test_two_workers_equal_zero_workers(tokenizer, data_dir):
  lines = [conversation(i, [f"{i % 4}.png"]) for i in range(16)]
  lines[2]["image"] = ["missing.png"]  # a skip must not shift batches between workers
  src = sources.ConversationSource(write_jsonl(data_dir / "d.jsonl", lines))
  batches = {}
  for workers in (0, 2):
    it = iter(make_dataset(src, tokenizer, config(worker_count=workers, num_epochs=1)))
    batches[workers] = list(it)
    assert it.skip_counts == {"image_missing": 1}
    it.close()
  assert len(batches[0]) == len(batches[2]) == 3
  for want, got in zip(batches[0], batches[2]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_shapes_world_through_the_pipeline():
  shapes = pytest.importorskip("lvlm_jax.data.shapes")
  from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer
  tokenizer = shapes_tokenizer()
  src = shapes.ShapesSource(shapes.ShapesConfig(seed=0, image_size=32), "caption", 8)
  cfg = config(template="tokenizer", max_images=1, num_epochs=1, shuffle=False)
  batches = list(make_dataset(src, tokenizer, cfg))
  assert len(batches) == 2 and batches[0]["pixel_values"].shape == (4, 1, SIZE, SIZE, 3)
  for i, target in enumerate(answers(tokenizer, batches[1])):
    caption = src[4 + i]["conversations"][1]["value"]
    assert target == tokenizer.decode(tokenizer.encode(caption + "</s>", add_special_tokens=False))
  want = ImageProcessing(size=SIZE)(src[0]["images"][0])
  np.testing.assert_allclose(np.asarray(batch_images(batches[0]))[0, 0], want, rtol=1e-6,
                             atol=1e-6)
