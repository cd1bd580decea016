"""Describe-and-Respond (STIC's DaR inference): describe the image first, then answer with the
description in the prompt.

`infuse` is the prompt rewrite of STIC's `add_des_to_data.py`, shared by DaR and by the
description-infused SFT data: the first user turn `<image>\\n{q}` becomes
`<image>\\nImage description:\\n{d}\\n\\n{q}` (a turn without the leading placeholder gets the
description in front).
"""

import jax
import numpy as np
from flax import nnx

from lvlm_jax.eval.shapes import ShapesEvaluator
from lvlm_jax.sampling.decode import SamplingConfig
from lvlm_jax.sampling.service import GenerationService, Prompt

DESCRIPTION = "Image description:\n{description}\n\n"


def infuse(turns: list[dict], description: str, image_token: str = "<image>") -> list[dict]:
  """The conversation with `description` put before the first user question."""
  turns = [dict(t) for t in turns]
  first = next(t for t in turns if t.get("from", t.get("role")) in ("human", "user"))
  key = "value" if "value" in first else "content"
  infix = DESCRIPTION.format(description=description)
  head = image_token + "\n"
  text = first[key]
  first[key] = head + infix + text[len(head):] if text.startswith(head) else infix + text
  return turns


def describe(service: GenerationService, sampling: SamplingConfig, images: list[np.ndarray],
             prompt: str, seed: int = 0) -> list[str]:
  """One description per image under `prompt`."""
  return service.texts([Prompt.question(prompt, (image,)) for image in images], sampling,
                       jax.random.key(seed), desc="describe")


def dar_yes_no_accuracy(evaluator: ShapesEvaluator, model: nnx.Module, service: GenerationService,
                        sampling: SamplingConfig, prompt: str) -> tuple[float, list[str]]:
  """The evaluator's yes/no accuracy when every question carries the model's own description of
  its image (described under `prompt` by `service`, which holds the same model).
  Returns (accuracy, descriptions)."""
  records = evaluator.yes_no
  descriptions = describe(service, sampling, [r["images"][0] for r in records], prompt)
  infused = [dict(r, conversations=infuse(r["conversations"], d, evaluator.data.image_token))
             for r, d in zip(records, descriptions)]
  graphdef, state = nnx.split(model)
  original = evaluator.yes_no
  evaluator.yes_no = infused
  try:
    return evaluator.yes_no_accuracy(graphdef, state), descriptions
  finally:
    evaluator.yes_no = original
