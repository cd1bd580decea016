"""CaD-VI's two-image training batches against transformers' LLaVA on a tiny random model: the
phase-1 records of image pairs, batched by the data pipeline, hold the ids LlavaProcessor makes
of the same conversation and images, and the model's logits and loss on the batch equal
LlavaForConditionalGeneration's on the processor's inputs."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
from training_fixtures import CACHE_DIR  # noqa: E402,F401  (turns the compile cache on)

from conftest import forward  # noqa: E402
from lvlm_jax.data.pipeline import DataConfig, make_dataset  # noqa: E402
from lvlm_jax.data.shapes_tokenizer import SYSTEM_PROMPT  # noqa: E402
from lvlm_jax.data.sources import ConversationSource  # noqa: E402
from lvlm_jax.methods import cadvi  # noqa: E402
from lvlm_jax.models import hf  # noqa: E402
from lvlm_jax.models.llava_next import batch_images  # noqa: E402
from lvlm_jax.training import checkpoint  # noqa: E402

ROWS = 4


@pytest.fixture(scope="module")
def setup(tiny_shapes_export, tmp_path_factory):
  root = tmp_path_factory.mktemp("cadvi_parity")
  config = cadvi.default_config()
  config.model.hf_dir = tiny_shapes_export
  config.model.tokenizer = ""
  config.data.shapes.max_objects = 2
  config.data.shapes.image_size = 40  # resized to the tower's 16 px
  config.data.phase1_pairs = 2
  config.cad.summary_prompt = "Summarize the commonalities and differences of the two images."
  config.cad.selection_prompt = "{statement} Is it image 1 or image 2?"
  config = cadvi.parse(config)
  images = str(root / "images")
  cadvi.write_shapes_pairs(config, images)
  records = str(root / "phase1.jsonl")
  cadvi.write_phase1_data(config, os.path.join(images, "pairs1.jsonl"), records, None)
  model = hf.load_model(tiny_shapes_export)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_shapes_export)
  data = DataConfig(batch_size=ROWS, length_buckets=(128,), max_images=2, shuffle=False,
                    num_epochs=1, system_prompt=SYSTEM_PROMPT).for_model(model, tiny_shapes_export)
  export = str(root / "export")
  checkpoint.export_hf(model, export, "float32", tokenizer, data=data)
  source = ConversationSource(records, (images,))
  batch = next(iter(make_dataset(source, tokenizer, data)))
  reference = transformers.LlavaForConditionalGeneration.from_pretrained(export).eval()
  return (model, reference, transformers.AutoProcessor.from_pretrained(export), source, batch,
          tokenizer)


def _processor_inputs(processor, tokenizer, record):
  turns = record["conversations"]
  messages = [{"role": "user", "content": turns[0]["value"]},
              {"role": "assistant", "content": turns[1]["value"]}]
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  pictures = [Image.open(p).convert("RGB") for p in record["images"]]
  return processor(text=text, images=pictures, return_tensors="pt", add_special_tokens=False)


def test_two_image_batches_equal_transformers_llava(setup):
  model, reference, processor, source, batch, tokenizer = setup
  assert batch["pixel_values"].shape[:2] == (ROWS, 2)
  logits, _ = forward(model, jnp.asarray(batch["input_ids"]),
                      attention_mask=jnp.asarray(batch["attention_mask"]),
                      pixel_values=batch_images({k: jnp.asarray(v) for k, v in batch.items()}))
  logits = np.asarray(logits)
  kinds = set()
  for row in range(ROWS):
    record = source[row]
    kinds.add(record["id"].rsplit("-", 1)[1].rstrip("12"))
    inputs = _processor_inputs(processor, tokenizer, record)
    real = batch["attention_mask"][row].astype(bool)
    ids = batch["input_ids"][row][real]
    np.testing.assert_array_equal(ids, inputs["input_ids"][0].numpy())
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (ids == image_id).sum() == 2 * model.config.tokens_per_image
    labels = torch.tensor(np.where(batch["loss_mask"][row][real] > 0, ids, -100)[None]).long()
    with torch.no_grad():
      out = reference(**inputs, labels=labels)
    want = out.logits[0].numpy()
    got = logits[row][real]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # The loss on the supervised tokens (the answer and its </s>), as transformers computes it.
    shifted = got - got.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets = np.roll(np.where(batch["loss_mask"][row][real] > 0, ids, -1), -1)[:-1]
    picked = logp[:-1][targets >= 0, targets[targets >= 0]]
    np.testing.assert_allclose(-picked.mean(), out.loss.item(), rtol=1e-5)
  assert kinds == {"summary", "select"}
