"""CLIP image-text scores: CSR's image-relevance reward (METHODS.md 3.4).

score(image, text) = exp(logit_scale) * cos(image embedding, text embedding), which is
transformers' `CLIPModel.logits_per_image` (about 100 * cos for a trained CLIP), optionally
clamped at 0 (the paper's R_I = max(100 cos, 0); the released code does not clamp). Texts are
tokenized with the CLIP tokenizer, truncated to 77 tokens (or the tower's context, if shorter),
images are preprocessed as CLIP's processor does (shortest side resized, centre crop), and each
image is embedded once for all the texts scored against it.
"""

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from lvlm_jax.data.images import ImageProcessing
from lvlm_jax.errors import UserError
from lvlm_jax.models import hf
from lvlm_jax.models.clip import CLIPModel, unit_norm

MAX_TEXT_TOKENS = 77  # CLIP's context


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _image_embeds(graphdef, state, pixels):
  """pixels float32 [B, S, S, 3] -> unit embeddings float32 [B, E]."""
  return unit_norm(nnx.merge(graphdef, state).image_embeds(pixels))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _text_embeds(graphdef, state, ids, mask):
  """ids, mask int [B, T] -> unit embeddings float32 [B, E]."""
  return unit_norm(nnx.merge(graphdef, state).text_embeds(ids, mask))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _text_scores(graphdef, state, image_embeds, ids, mask):
  """image_embeds [B, E] (unit), ids, mask int [B, T] -> exp(logit_scale) * cos, float32 [B]."""
  model = nnx.merge(graphdef, state)
  text = unit_norm(model.text_embeds(ids, mask))
  return jnp.exp(model.logit_scale[...].astype(jnp.float32)) * jnp.sum(image_embeds * text, -1)


class CLIPScorer:
  """Scores (image, text) pairs with one CLIP model. clamp: max(score, 0). batch_size: rows per
  call (a fixed shape, so one compilation each for images and texts)."""

  def __init__(self, model: CLIPModel, tokenizer, processing: ImageProcessing, *,
               clamp: bool = False, batch_size: int = 64):
    model.eval()
    self.graphdef, self.state = nnx.split(model)
    self.tokenizer, self.processing = tokenizer, processing
    self.clamp, self.batch_size = clamp, batch_size
    self.max_length = min(MAX_TEXT_TOKENS, model.config.text.max_position_embeddings)

  @classmethod
  def load(cls, hf_dir: str, **kwargs) -> "CLIPScorer":
    """An HF CLIPModel folder (config, safetensors, tokenizer, preprocessor_config.json), e.g.
    openai/clip-vit-large-patch14-336 or the export of configs/clip_shapes.py."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
      raise UserError(f"{hf_dir}: no CLIP model there (config.json missing); for the shapes "
                      "world train one first: python -m lvlm_jax.train --config "
                      "configs/clip_shapes.py")
    model = hf.load_clip(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    processing = ImageProcessing.from_hf_preprocessor_config(hf_dir, pad_to_square=False)
    return cls(model, tokenizer, processing, **kwargs)

  def _rows(self, n: int):
    for first in range(0, n, self.batch_size):
      yield first, min(first + self.batch_size, n)

  def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 [H, W, 3] each -> unit embeddings float32 [N, E]."""
    out = []
    for first, last in self._rows(len(images)):
      pixels = np.zeros((self.batch_size, self.processing.size, self.processing.size, 3),
                        np.float32)
      for i, image in enumerate(images[first:last]):
        pixels[i] = self.processing(image)
      out.append(np.asarray(_image_embeds(self.graphdef, self.state, pixels))[:last - first])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) int32 [N, max_length], truncated with the end token kept."""
    encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                             padding="max_length")
    return (np.asarray(encoded["input_ids"], np.int32),
            np.asarray(encoded["attention_mask"], np.int32))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Unit text embeddings float32 [M, E]."""
    ids, mask = self.tokenize(texts)
    out = []
    for first, last in self._rows(len(texts)):
      pad = self.batch_size - (last - first)
      rows = lambda x: np.concatenate([x[first:last], np.repeat(x[first:first + 1], pad, 0)])
      out.append(np.asarray(_text_embeds(self.graphdef, self.state, rows(ids),
                                         rows(mask)))[:last - first])
    return np.concatenate(out)

  @property
  def logit_scale(self) -> float:
    """exp(logit_scale): score = logit_scale * cos."""
    return float(np.exp(np.asarray(self.state["logit_scale"][...], np.float32)))

  def scores_of_embedded(self, image_embeds: np.ndarray, image_index: Sequence[int],
                         texts: Sequence[str]) -> np.ndarray:
    """float32 [M]: text m against image image_index[m] of `image_embeds` [N, E]."""
    if not len(texts):
      return np.zeros((0,), np.float32)
    ids, mask = self.tokenize(texts)
    index = np.asarray(image_index)
    out = []
    for first, last in self._rows(len(texts)):
      pad = self.batch_size - (last - first)
      rows = lambda x: np.concatenate([x[first:last], np.repeat(x[first:first + 1], pad, 0)])
      out.append(np.asarray(_text_scores(self.graphdef, self.state, image_embeds[rows(index)],
                                         rows(ids), rows(mask)))[:last - first])
    scores = np.concatenate(out)
    return np.maximum(scores, 0.0) if self.clamp else scores

  def scores(self, images: Sequence[np.ndarray], image_index: Sequence[int],
             texts: Sequence[str]) -> np.ndarray:
    """float32 [M]: text m against images[image_index[m]]; each image is embedded once."""
    return self.scores_of_embedded(self.embed_images(images), image_index, texts)
