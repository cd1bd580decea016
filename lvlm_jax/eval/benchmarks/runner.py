"""Answers a benchmark's items with greedy decoding through the generation service.

Items go in batches of the service's batch size; each batch's answers are appended to the
prediction log before the next batch starts (a rerun skips the ids answered, a kill loses at
most one batch). An item whose image is missing or unreadable, or whose prompt leaves no room
for an answer in the model's context, is a counted skip: its record carries "error". Progress
with ETA goes to stderr (process 0). Every process makes the same calls: the service splits
each batch's rows over the mesh's data axes, across hosts too.
"""

import io
import sys

import jax
import tqdm
from jax.experimental import multihost_utils
from PIL import Image

from lvlm_jax import preemption
from lvlm_jax.data.images import BadImage, load_image, resolve_image_path, to_rgb8
from lvlm_jax.errors import UserError
from lvlm_jax.eval.benchmarks.benchmark import Item
from lvlm_jax.eval.benchmarks.predictions import PredictionLog
from lvlm_jax.sampling.decode import SamplingConfig
from lvlm_jax.sampling.service import GenerationService, Prompt, pad_id


def load_images(item: Item, root: str) -> tuple:
  """uint8 [H, W, 3] of each of the item's images; `BadImage` when one cannot be used."""
  out = []
  for image in item.images:
    if isinstance(image, bytes):
      try:
        with Image.open(io.BytesIO(image)) as img:
          out.append(to_rgb8(img))
      except Exception as e:  # untrusted encoded bytes fail in many ways; all mean unreadable
        raise BadImage("image_unreadable", f"item {item.id}: its image cannot be decoded: {e}"
                       ) from None
    else:
      out.append(load_image(resolve_image_path(image, [root])))
  return tuple(out)


def _prepared(service: GenerationService, item: Item, root: str):
  """(the item's Prompt, its length in padded tokens); a UserError when it cannot be asked."""
  prompt = Prompt.question(item.question, load_images(item, root))
  length = len(service.prompt_ids(prompt))
  padded = -(-length // service.pad_to) * service.pad_to
  if padded >= service.context:
    raise UserError(f"item {item.id}: its prompt of {length} tokens leaves no room for an "
                    f"answer in the model's context of {service.context}")
  return prompt, padded


def answer(items: list[Item], service: GenerationService, log: PredictionLog, root: str,
           max_new_tokens: int, desc: str = "answering") -> dict[str, dict]:
  """Every item's record (id, answer or error) by id, generating only those `log` holds no
  answer for (a skip is tried again: its image may be there now). An answer stops at
  `max_new_tokens` or at the model's context, whichever comes first."""
  ids = [item.id for item in items]
  if len(set(ids)) != len(ids):
    duplicate = next(i for i in ids if ids.count(i) > 1)
    raise UserError(f"the benchmark has item id {duplicate!r} twice; ids must be unique")
  done = log.read()
  if jax.process_count() > 1:  # every host reads the log before process 0 appends to it
    multihost_utils.sync_global_devices("benchmark predictions read")
  todo = [item for item in items if "answer" not in done.get(item.id, {})]
  if done and todo:
    print(f"resuming {log.path}: {len(items) - len(todo)} of {len(items)} items already "
          "answered", file=sys.stderr)
  eos = service.tokenizer.eos_token_id
  with tqdm.tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="item",
                 file=sys.stderr, dynamic_ncols=True, disable=jax.process_index() != 0) as bar:
    for first in range(0, len(todo), service.batch_size):
      chunk = todo[first:first + service.batch_size]
      prompts, records = {}, {}
      for item in chunk:
        try:
          prompts[item.id] = _prepared(service, item, root)
        except UserError as e:
          records[item.id] = {"id": item.id, "error": str(e)}
      if prompts:
        room = min(max_new_tokens, service.context - max(n for _, n in prompts.values()))
        sampling = SamplingConfig(max_new_tokens=room, pad_token_id=pad_id(service.tokenizer),
                                  eos_token_ids=(eos,) if eos is not None else ())
        texts = service.texts([p for p, _ in prompts.values()], sampling)
        for item_id, text in zip(prompts, texts):
          records[item_id] = {"id": item_id, "answer": text}
      batch = [records[item.id] for item in chunk]
      log.append(batch)
      done.update((r["id"], r) for r in batch)
      bar.update(len(chunk))
      preemption.check()  # SIGTERM in a pipeline stage: stop here, the log has every answer
  return {item.id: done[item.id] for item in items}
