"""A small CLIP trained from scratch, contrastively, on shapes-world images against the sentences
of their captions: the image-text scorer CSR calibrates its rewards with on the shapes world
(no pretrained CLIP knows this world, and none can be downloaded here).

  train          symmetric InfoNCE with a learned temperature (CLIP's loss). Each example is a
                 fresh scene of the world rendered as the LVLM sees it and one random sentence of
                 its caption; targets are shared by every identical sentence of the batch (many
                 scenes say "There are two objects in the image."). Exports an HF CLIPModel
                 folder (config, safetensors, tokenizer, preprocessor_config.json) to
                 workdir/export/hf, which transformers' CLIPModel loads.
  eval_retrieval held-out image -> sentence retrieval: each held-out image against one object
                 or relation sentence of every held-out image; correct when the best-scoring
                 sentence is true of the image (accuracy, and the chance level of a random pick);
                 and hallucination_accuracy, what CSR's calibration needs: the share of held-out
                 images whose first object's sentence scores above the same sentence naming a
                 colour and shape the scene does not have.
"""

import dataclasses
import json
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

from lvlm_jax.data.images import CLIP_MEAN, CLIP_STD, ImageProcessing
from lvlm_jax.data.shapes import ShapesConfig, caption, held_out_world, make_scene, render
from lvlm_jax.data.shapes_tokenizer import shapes_clip_tokenizer
from lvlm_jax.dataclass_config import help_field, method_defaults, method_help, parse_method
from lvlm_jax.errors import UserError
from lvlm_jax.eval.clip_score import CLIPScorer
from lvlm_jax.methods.pipeline import Pipeline, PipelineConfig, Stage
from lvlm_jax.models import hf
from lvlm_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, unit_norm
from lvlm_jax.models.vision import CLIPVisionConfig
from lvlm_jax.sharding import MeshConfig

# The training scenes are neither the LVLM's (world seed) nor any evaluation's (held_out_world).
_TRAIN_WORLD = 3


@dataclasses.dataclass(frozen=True)
class CLIPModelSettings:
  """The dual encoder's size."""
  image_size: int = help_field(32, "Vision tower input side (pixels).")
  patch_size: int = help_field(8, "Vision patch side.")
  hidden_size: int = help_field(64, "Width of both towers.")
  intermediate_size: int = help_field(128, "MLP width of both towers.")
  num_layers: int = help_field(2, "Layers of each tower.")
  num_heads: int = help_field(4, "Attention heads of each tower.")
  max_text_tokens: int = help_field(32, "Text context (CLIP: 77); longer texts are truncated.")
  projection_dim: int = help_field(64, "Shared embedding size.")


@dataclasses.dataclass(frozen=True)
class CLIPTrainSettings:
  """The contrastive training."""
  shapes: ShapesConfig = help_field(ShapesConfig(), "The shapes world (set it to the LVLM's).")
  num_steps: int = help_field(1000, "Updates.")
  batch_size: int = help_field(64, "Image-sentence pairs per update.")
  lr: float = help_field(1e-3, "Peak learning rate (AdamW, warmup then cosine).")
  warmup_steps: int = help_field(50, "Linear warmup updates.")
  weight_decay: float = help_field(0.01, "AdamW weight decay.")
  seed: int = help_field(0, "Initialisation and sentence draws.")
  eval_images: int = help_field(500, "Held-out images for retrieval accuracy.")
  log_every: int = help_field(100, "Updates between loss lines.")


@dataclasses.dataclass(frozen=True)
class CLIPMethodConfig:
  model: CLIPModelSettings
  train: CLIPTrainSettings
  mesh: MeshConfig = MeshConfig()
  pipeline: PipelineConfig = PipelineConfig()


SECTIONS = {"model": CLIPModelSettings, "train": CLIPTrainSettings, "mesh": MeshConfig,
            "pipeline": PipelineConfig}


def default_config() -> config_dict.ConfigDict:
  return method_defaults("clip", SECTIONS, {})


def config_help() -> list[str]:
  return method_help("clip", SECTIONS, {})


def parse(config) -> CLIPMethodConfig:
  parsed = parse_method(CLIPMethodConfig, config)
  if parsed.model.image_size % parsed.model.patch_size:
    raise UserError("model.image_size must be a multiple of model.patch_size")
  if parsed.train.batch_size < 2:
    raise UserError("train.batch_size must be at least 2 (contrastive pairs)")
  return parsed


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[clip] {message}", flush=True)


def sentences(text: str) -> list[str]:
  """A caption's sentences, each with its full stop."""
  return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def model_config(settings: CLIPModelSettings, tokenizer) -> CLIPConfig:
  s = settings
  return CLIPConfig(
      text=CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=s.hidden_size,
                          intermediate_size=s.intermediate_size, num_layers=s.num_layers,
                          num_heads=s.num_heads, max_position_embeddings=s.max_text_tokens,
                          eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id,
                          pad_token_id=tokenizer.pad_token_id),
      vision=CLIPVisionConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                              num_layers=s.num_layers, num_heads=s.num_heads,
                              image_size=s.image_size, patch_size=s.patch_size),
      projection_dim=s.projection_dim)


def reinitialise(model: CLIPModel, seed: int) -> None:
  """Every matrix drawn at std fan_in ** -0.5 and the class token at width ** -0.5, about as
  transformers initialises CLIP: with the decoder-style 0.02 of models/layers.py, a new tower's
  pooled class token barely depends on its input and the contrastive loss stalls at log(B)."""
  key = jax.random.key(seed)
  for i, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    value = variable[...]
    name = str(path[-1])
    if value.ndim == 2 and name == "kernel":
      std = value.shape[0] ** -0.5
    elif value.ndim == 1 and "class" in name:
      std = value.shape[0] ** -0.5
    else:
      continue
    variable[...] = std * jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype)


def contrastive_loss(model: CLIPModel, pixels, ids, mask, same) -> jax.Array:
  """Symmetric InfoNCE. pixels [B, S, S, 3]; ids, mask [B, T]; same bool [B, B]: text j is
  the same sentence as text i (each row's targets spread over its identical sentences)."""
  image = unit_norm(model.image_embeds(pixels))
  text = unit_norm(model.text_embeds(ids, mask))
  scale = jnp.exp(jnp.minimum(model.logit_scale[...], jnp.log(100.0)))
  logits = scale * image @ text.T
  targets = same / jnp.sum(same, axis=1, keepdims=True)
  per_image = optax.softmax_cross_entropy(logits, targets)
  per_text = optax.softmax_cross_entropy(logits.T, targets)
  return (per_image.mean() + per_text.mean()) / 2


@nnx.jit
def _train_step(model, optimizer, pixels, ids, mask, same):
  loss, grads = nnx.value_and_grad(contrastive_loss)(model, pixels, ids, mask, same)
  optimizer.update(model, grads)
  return loss


def _preprocessor_config(size: int) -> dict:
  """CLIP's image processor at `size`: shortest side resized, centre crop."""
  return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
          "size": {"shortest_edge": size}, "do_center_crop": True,
          "crop_size": {"height": size, "width": size}, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
          "image_std": list(CLIP_STD), "resample": 3, "do_convert_rgb": True}


class _Examples:
  """Training pairs: scene index -> (its image, a random sentence of its caption)."""

  def __init__(self, config: CLIPMethodConfig, tokenizer, processing: ImageProcessing):
    self.world = dataclasses.replace(config.train.shapes,
                                     seed=config.train.shapes.seed + _TRAIN_WORLD)
    self.tokenizer, self.processing = tokenizer, processing
    self.max_length = config.model.max_text_tokens
    self.rng = np.random.default_rng(config.train.seed)

  def batch(self, first: int, size: int):
    pixels, texts = [], []
    for index in range(first, first + size):
      scene = make_scene(self.world, index)
      pixels.append(self.processing(render(scene, self.world.image_size)))
      options = sentences(caption(scene))
      texts.append(options[self.rng.integers(len(options))])
    encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                             padding="max_length")
    same = np.asarray([[a == b for b in texts] for a in texts])
    return (np.stack(pixels), np.asarray(encoded["input_ids"], np.int32),
            np.asarray(encoded["attention_mask"], np.int32), same)


def train(config: CLIPMethodConfig, export_dir: str) -> dict:
  """Trains and writes the HF folder to export_dir (atomically); returns the run's summary."""
  tokenizer = shapes_clip_tokenizer()
  model = CLIPModel(model_config(config.model, tokenizer), rngs=nnx.Rngs(config.train.seed))
  reinitialise(model, config.train.seed)
  t = config.train
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps,
                                                max(t.num_steps, t.warmup_steps + 1))
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=t.weight_decay),
                            wrt=nnx.Param)
  processing = ImageProcessing(size=config.model.image_size, pad_to_square=False)
  examples = _Examples(config, tokenizer, processing)
  started, losses = time.time(), []
  for step in range(t.num_steps):
    loss = _train_step(model, optimizer, *examples.batch(step * t.batch_size, t.batch_size))
    losses.append(float(loss))
    if (step + 1) % t.log_every == 0 or step + 1 == t.num_steps:
      _log(f"step {step + 1}/{t.num_steps}: loss {np.mean(losses[-t.log_every:]):.4f}, "
           f"temperature scale {float(jnp.exp(model.logit_scale[...])):.1f}, "
           f"{time.time() - started:.0f} s")
  partial = export_dir + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  hf.save_hf(model, partial)
  tokenizer.save_pretrained(partial)
  with open(os.path.join(partial, "preprocessor_config.json"), "w") as f:
    json.dump(_preprocessor_config(config.model.image_size), f, indent=2)
  shutil.rmtree(export_dir, ignore_errors=True)
  os.replace(partial, export_dir)
  return {"status": "done", "step": t.num_steps, "initial_loss": float(np.mean(losses[:20])),
          "final_loss": float(np.mean(losses[-20:]))}


def retrieval_accuracy(scorer: CLIPScorer, world: ShapesConfig, count: int,
                       seed: int = 0) -> dict[str, float]:
  """Image -> sentence retrieval over `count` held-out scenes of `world` (see the module)."""
  rng = np.random.default_rng(seed)
  scenes = [make_scene(world, i) for i in range(count)]
  truths = [set(sentences(caption(s))[1:]) for s in scenes]  # the count sentence is shared
  texts = [sorted(t)[rng.integers(len(t))] for t in truths]
  scores = scorer.embed_images([render(s, world.image_size) for s in scenes]) @ (
      scorer.embed_texts(texts).T)  # [images, texts], cos; the scale does not change the order
  correct, chance = 0, 0.0
  for i in range(count):
    correct += texts[int(np.argmax(scores[i]))] in truths[i]
    chance += np.mean([t in truths[i] for t in texts])
  return {"retrieval_accuracy": correct / count, "retrieval_chance": chance / count}


def hallucination_pairs(world: ShapesConfig, count: int,
                        seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
  """(count images, 2 * count texts): each held-out scene's first object sentence, then the same
  sentence naming a colour and shape the scene does not have."""
  rng = np.random.default_rng(seed)
  images, texts = [], []
  for i in range(count):
    scene = make_scene(world, i)
    obj = scene.objects[0]
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [(c, s) for c in world.colors for s in world.shapes if (c, s) not in present]
    color, shape = absent[rng.integers(len(absent))]
    true = sentences(caption(scene))[1]  # the first object's sentence
    images.append(render(scene, world.image_size))
    texts += [true, true.replace(obj.description, f"{obj.size} {color} {shape}")]
  return images, texts


def hallucination_accuracy(scorer: CLIPScorer, world: ShapesConfig, count: int) -> float:
  """The share of `hallucination_pairs` whose true sentence scores higher."""
  images, texts = hallucination_pairs(world, count)
  scores = scorer.scores(images, np.repeat(np.arange(count), 2), texts)
  return float(np.mean(scores[0::2] > scores[1::2]))


def run(config: CLIPMethodConfig, workdir: str, *, raw_config=None) -> dict:
  export_dir = os.path.join(workdir, "export", "hf")

  def train_stage():
    os.makedirs(os.path.dirname(export_dir), exist_ok=True)
    return train(config, export_dir)

  def evaluate():
    scorer = CLIPScorer.load(export_dir, batch_size=config.train.batch_size)
    world = held_out_world(config.train.shapes)
    return {**retrieval_accuracy(scorer, world, config.train.eval_images),
            "hallucination_accuracy": hallucination_accuracy(scorer, world,
                                                             config.train.eval_images)}

  stages = [Stage("train", train_stage),
            Stage("eval_retrieval", evaluate, eval_label="retrieval")]
  return Pipeline("clip", workdir, stages, config.pipeline, raw_config, config).run()
