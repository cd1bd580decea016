"""REC and SC-Tune's self-consistency over box records on real images (a grounding JSONL, or a
RefCOCO-family split), with a config's grounding prompt and box format.

A record: "images" (decoded, uint8 [H, W, 3]), "box" normalised [x1, y1, x2, y2], "expression"
(None: the record only counts for self-consistency). `scores` answers records and gives each
one's result, so a caller can log them batch by batch and resume; `summary` turns the results
into metrics: grounding_acc50 / grounding_mean_iou / grounding_parsed over the records with an
expression (expression -> the model's box), self_consistency_acc50 over all (box -> the model's
description -> the model's box).
"""

import dataclasses

import jax
import numpy as np
from flax import nnx

from lvlm_jax.data.shapes import held_out_world
from lvlm_jax.eval.shapes import ShapesEvaluator


def scores(model, tokenizer, data, config, mesh, records: list[dict]) -> list[dict]:
  """Per record, in order: "iou" and "parsed" of the model's box for its expression (None
  without one) and "self_consistency_iou"."""
  evaluator = ShapesEvaluator(tokenizer, data, held_out_world(config.data.shapes),
                              dataclasses.replace(config.eval, yes_no=0, grounding=0, captions=0,
                                                  self_consistency=0), mesh)
  model.eval()
  graphdef, state = nnx.split(model)
  out = [{"iou": None, "parsed": None} for _ in records]
  with jax.set_mesh(mesh):
    referring = [i for i, r in enumerate(records) if r["expression"]]
    if referring:
      ious, boxes = evaluator.ground(graphdef, state, [records[i] for i in referring],
                                     [records[i]["expression"] for i in referring])
      for i, iou, box in zip(referring, ious, boxes):
        out[i] = {"iou": float(iou), "parsed": box is not None}
    if records:
      back = evaluator.self_consistency_ious(graphdef, state, records, answer_start="")
      for entry, iou in zip(out, back):
        entry["self_consistency_iou"] = float(iou)
  return out


def summary(results: list[dict]) -> dict:
  """The metrics of `scores`' results (of one call or of many, concatenated)."""
  referring = [r for r in results if r["iou"] is not None]
  metrics = {"expressions": len(referring)}
  if referring:
    ious = np.asarray([r["iou"] for r in referring])
    metrics.update(grounding_acc50=float(np.mean(ious >= 0.5)),
                   grounding_mean_iou=float(ious.mean()),
                   grounding_parsed=float(np.mean([r["parsed"] for r in referring])))
  if results:
    metrics["self_consistency_acc50"] = float(np.mean(
        [r["self_consistency_iou"] >= 0.5 for r in results]))
  return metrics


def metrics(model, tokenizer, data, config, mesh, records: list[dict]) -> dict:
  """`summary` of `scores`: the metrics of the records answered in one go."""
  return summary(scores(model, tokenizer, data, config, mesh, records))
