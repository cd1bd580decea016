"""What a trained shapes-world model's decoder knows about the object it is asked to ground.

    python benchmarks/position_probe.py --workdir workdir/quickstart

For held-out single-object scenes, the decoder's final hidden state at the first token of the
box answer (the prompt ends where training's target `<box>` begins, as the evaluator's does) is
fitted by ridge regression (on 2/3 of the prompts, scored on the rest) to the object's box
centre x, centre y and width. R^2 near 1: the hidden state encodes it linearly; near 0 (or
below): it does not. The quickstart's model reads how big the object is but not where it is.
"""

import argparse
import json
import os

import jax.numpy as jnp
import numpy as np

from lvlm_jax.data import training_sources
from lvlm_jax.data.shapes import ShapesSource, held_out_world
from lvlm_jax.data.tokenizer import load_tokenizer
from lvlm_jax.methods import sft
from lvlm_jax.models import hf
from lvlm_jax.sampling.service import Prompt, prompt_ids


def ridge_r2(features: np.ndarray, targets: np.ndarray, lam: float) -> np.ndarray:
  n = len(features) * 2 // 3
  mean, std = features[:n].mean(0), features[:n].std(0) + 1e-6
  x = np.c_[(features - mean) / std, np.ones(len(features))]
  w = np.linalg.solve(x[:n].T @ x[:n] + lam * np.eye(x.shape[1]), x[:n].T @ targets[:n])
  residual = ((x[n:] @ w - targets[n:]) ** 2).sum(0)
  return 1 - residual / ((targets[n:] - targets[n:].mean(0)) ** 2).sum(0)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="workdir/quickstart", help="a finished SFT run")
  p.add_argument("--prompts", type=int, default=1200, help="held-out grounding prompts drawn")
  args = p.parse_args()
  with open(os.path.join(args.workdir, "config.json")) as f:
    config = sft.parse(json.load(f))
  model = hf.load_model(os.path.join(args.workdir, "export", "hf"))
  tokenizer = load_tokenizer(config.model, (config.data.pipeline.grounding_prompt,))
  data = training_sources.pipeline_config(config.data, model, "", 8)
  source = ShapesSource(held_out_world(config.data.shapes), "grounding", args.prompts)
  records = [r for r in (source[i] for i in range(args.prompts))
             if len(r["scene"]["objects"]) == 1]
  rows = [prompt_ids(Prompt.question(data.grounding_prompt.format(expression=r["expression"]),
                                     tuple(r["images"]), data.box_format.open), tokenizer, data)
          for r in records]
  length = max(map(len, rows))
  hidden = []
  for first in range(0, len(rows), 100):
    chunk = rows[first:first + 100]
    ids = np.zeros((len(chunk), length), np.int32)
    positions = -np.ones((len(chunk), length), np.int32)
    for i, row in enumerate(chunk):  # left-padded: the last position is the answer's start
      ids[i, length - len(row):], positions[i, length - len(row):] = row, np.arange(len(row))
    pixels = np.stack([data.image(r["images"][0]) for r in records[first:first + 100]])[:, None]
    states, _ = model.llm.hidden(model.embed(jnp.asarray(ids), jnp.asarray(pixels)),
                                 jnp.asarray(positions))
    hidden.append(np.asarray(states[:, -1]))
  boxes = np.asarray([r["box"] for r in records])
  targets = np.c_[(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                  boxes[:, 2] - boxes[:, 0]]
  r2 = ridge_r2(np.concatenate(hidden), targets, lam=10.0)
  print(f"{len(records)} single-object prompts; ridge R^2 of the decoder's hidden state at the "
        f"box answer's start: centre x {r2[0]:.2f}, centre y {r2[1]:.2f}, width {r2[2]:.2f}")


if __name__ == "__main__":
  main()
