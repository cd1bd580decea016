"""The Grain pipeline: records -> preprocessed examples -> fixed-shape batches (ARCHITECTURE.md).

    range(len(source)) -> seeded shuffle (new order each epoch) -> repeat -> shard by process
      -> map(Preprocess): load + pad/resize images, render + tokenize (threads, or worker processes)
      -> BatchIterator (main process): drop skipped examples and count them, pad to a length bucket

An example that cannot be used (unreadable/missing image, path outside its root, too long, ...)
becomes a `Skipped` marker rather than vanishing inside a worker, so the main process sees every
one: it counts them by reason (`BatchIterator.skip_counts`), refuses to go on past
`max_skip_fraction`, and fills each batch with exactly `batch_size` good examples. Batching after
the worker processes also makes the batches independent of `worker_count`.
"""

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence

import grain
import numpy as np
from absl import flags

from lvlm_jax.data.anyres import AnyResProcessing
from lvlm_jax.data.images import BadImage, ImageProcessing, load_image
from lvlm_jax.data.qwen2_vl_images import Qwen2VLImageProcessing, pack_images
from lvlm_jax.data.text import (TEMPLATES, BadConversation, BoxFormat, ensure_image_placeholders,
                                fit_to_length, image_token_id, tokenize_conversation)
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.llava_next import LlavaNextConfig
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.models.qwen2_vl import Qwen2VLConfig

KINDS = ("sft", "preference", "grounding")
_NEEDS = {"sft": ("conversations",), "preference": ("prompt", "chosen", "rejected"),
          "grounding": ("box",)}

# The skip fraction is judged over at least this many examples, so that one bad example early in
# a run does not count as 100%.
_MIN_EXAMPLES_FOR_FRACTION = 100
# The image placeholder of LLaVA-format records and prompts.
LLAVA_IMAGE_PLACEHOLDER = "<image>"
# Qwen2-VL's image placeholder token and the markup around each image (its chat template's).
QWEN2_VL_IMAGE_TOKEN = "<|image_pad|>"
QWEN2_VL_IMAGE_MARKUP = ("<|vision_start|>", "<|vision_end|>")
# A batch's Qwen2-VL patches are padded to the smallest of these that holds them, a power of two
# (few shapes, few compilations; each a multiple of the 2 x 2 merge).
MIN_PATCH_SLOTS = 256


def patch_slots(patches: int) -> int:
  """The patch count P a batch whose rows hold at most `patches` patches is padded to."""
  slots = MIN_PATCH_SLOTS
  while slots < patches:
    slots *= 2
  return slots


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """How records become batches."""

  kind: str = help_field("sft", "Batch kind: 'sft' (conversations), 'preference' (chosen/rejected "
                         "pairs sharing images) or 'grounding' (box records as "
                         "box-text SFT + boxes).")
  batch_size: int = help_field(8, "Examples per batch on this process (the per-host batch).")
  length_buckets: tuple[int, ...] = help_field(
      (256, 512, 1024, 2048), "Sequence lengths T a batch is padded to: the smallest that fits its "
      "longest example. Few buckets = few compilations; the largest is the maximum length: text "
      "past it is cut when untrained, else the example is skipped (too_long, answer_too_long).")
  context_length: int | None = help_field(None, "The model's context (max_position_embeddings); "
                                          "length buckets longer than it are refused. None: "
                                          "unchecked (the training setup fills it in).")
  max_images: int = help_field(1, "Image slots N per example; examples with more images are "
                               "skipped. 2 for CaD-VI image pairs.")
  tokens_per_image: int = help_field(576, "Image-token copies per image: the vision tower's patch "
                                     "count (576 for CLIP ViT-L/14 at 336 px).")
  template: str = help_field("vicuna_v1", f"Chat template, one of {TEMPLATES}; 'tokenizer' uses "
                             "the tokenizer's own Jinja template, 'plain' is LLaVA's pretraining "
                             "format (image, caption).")
  system_prompt: str | None = help_field(None, "System prompt; None keeps the template's "
                                         "default, '' drops it.")
  image_token: str = help_field("<image>", "The placeholder marking each image in the text; the "
                                "tokenizer must hold it as one token.")
  image: ImageProcessing = help_field(ImageProcessing(), "Pad-to-square, resize and normalisation; "
                                      "see ImageProcessing.from_hf_preprocessor_config.")
  anyres: AnyResProcessing | None = help_field(
      None, "LLaVA-NeXT's AnyRes tiling (AnyResProcessing.for_config): each image becomes its "
      "base view + tiles, normalised as its `tile` (in place of `image`), and takes the image "
      "tokens its size gives (in place of tokens_per_image); None: one view per image.")
  qwen2_vl: Qwen2VLImageProcessing | None = help_field(
      None, "Qwen2-VL's native-resolution patches (data.qwen2_vl_images; DataConfig.for_model "
      "sets it): each image is resized within min/max pixels, takes the image tokens its size "
      "gives (in place of `image` and tokens_per_image) and sits between <|vision_start|> and "
      "<|vision_end|>; None: fixed-size images.")
  max_image_pixels: int | None = help_field(None, "Images with more pixels are refused as "
                                            "decompression bombs (None: PIL's MAX_IMAGE_PIXELS).")
  grounding_prompt: str = help_field(
      "<image>\nWhere is {expression}? Answer with a box.", "User turn of a grounding example; the "
      "answer is the box text. Records without an expression are skipped.")
  box_format: BoxFormat = help_field(BoxFormat(), "How boxes are written as "
                                     "text (grid and markup).")
  with_ref_logps: bool = help_field(False, "Preference only: carry each record's ref_chosen_logp / "
                                    "ref_rejected_logp into the batch (records without them are "
                                    "skipped), so the reference model is not run in training.")
  shuffle: bool = help_field(True, "Shuffle the records (a new order every epoch).")
  seed: int = help_field(0, "Shuffle seed; the same seed gives the same batches.")
  num_epochs: int | None = help_field(None, "Passes over the data; None repeats forever (train by "
                                      "steps; needed for multi-host runs, whose shards skip "
                                      "different numbers of examples).")
  worker_count: int = help_field(0, "Worker processes that load and preprocess "
                                 "(0: in this process).")
  worker_buffer_size: int = help_field(16, "Preprocessed examples each worker keeps ready.")
  read_threads: int = help_field(4, "Threads per process that load and preprocess ahead.")
  read_buffer_size: int = help_field(64, "Examples per process those threads keep ready.")
  max_skip_fraction: float = help_field(0.05, "Largest share of examples that may be skipped (bad "
                                        "image, too long, ...) before the run stops with an error.")

  def __post_init__(self):
    if self.kind not in KINDS:
      raise UserError(f"data kind {self.kind!r} is not one of {KINDS}")
    if self.template not in TEMPLATES:
      raise UserError(f"chat template {self.template!r} is not one of {TEMPLATES}")
    if not self.length_buckets or list(self.length_buckets) != sorted(set(self.length_buckets)) \
        or self.length_buckets[0] <= 0:
      raise UserError(f"length_buckets {self.length_buckets} must be increasing positive lengths")
    if self.context_length is not None and self.length_buckets[-1] > self.context_length:
      raise UserError(f"length_buckets {self.length_buckets} go past the model's context of "
                      f"{self.context_length} tokens (max_position_embeddings); use buckets up to "
                      f"{self.context_length}")
    if self.batch_size <= 0 or self.max_images < 0 or self.tokens_per_image <= 0:
      raise UserError("batch_size and tokens_per_image must be positive, max_images >= 0")
    if self.qwen2_vl is not None and self.anyres is not None:
      raise UserError("qwen2_vl and anyres image processing exclude each other; set one")

  @property
  def max_length(self) -> int:
    return self.length_buckets[-1]

  def for_model(self, model, hf_dir: str) -> "DataConfig":
    """This config with the image fields `model` decides: its tower's image processing (the HF
    directory's preprocessor config when `hf_dir` has one), its tokens per image and, for a
    LLaVA-NeXT or -OneVision model, AnyRes tiling at its `image_grid_pinpoints` (and OneVision's
    feature cap); for a Qwen2-VL or Qwen2.5-VL model its patches (`qwen2_vl`, the directory's
    pixel budget) and <|image_pad|> placeholders. A text-only model: unchanged."""
    if not isinstance(model, LVLM):
      return self
    if isinstance(model.config, Qwen2VLConfig):
      return dataclasses.replace(
          self, image_token=QWEN2_VL_IMAGE_TOKEN, anyres=None,
          qwen2_vl=Qwen2VLImageProcessing.for_model(hf_dir, model.config.vision))
    image = ImageProcessing.for_model(hf_dir, model)
    if isinstance(model.config, LlavaNextConfig):
      # tokens_per_image is unread with AnyRes (each image's size gives its count); the base
      # view's count keeps it valid.
      return dataclasses.replace(self, image=image, tokens_per_image=model.config.tokens_per_tile,
                                 anyres=AnyResProcessing.for_config(model.config, image))
    return dataclasses.replace(self, image=image, tokens_per_image=model.config.tokens_per_image,
                               anyres=None)

  def place_images(self, turns: Sequence[Mapping], num_images: int) -> list[dict]:
    """The turns with one `image_token` per image (`ensure_image_placeholders`: LLaVA's rule
    when the text has none). For Qwen2-VL, LLaVA-format `<image>` placeholders (datasets,
    prompts) become its own, each between <|vision_start|> and <|vision_end|> (once: a text
    that has the markup keeps it). Raises UserError for a count that differs."""
    if self.qwen2_vl is None:
      return ensure_image_placeholders(turns, num_images, self.image_token)
    start, end = QWEN2_VL_IMAGE_MARKUP
    marked = start + self.image_token + end
    turns = [dict(t) for t in turns]
    for turn in turns:
      key = "value" if "value" in turn else "content"
      if isinstance(turn.get(key), str):
        turn[key] = turn[key].replace(LLAVA_IMAGE_PLACEHOLDER, self.image_token)
    turns = ensure_image_placeholders(turns, num_images, self.image_token)
    for turn in turns:
      key = "value" if "value" in turn else "content"
      if isinstance(turn.get(key), str):
        turn[key] = turn[key].replace(marked, self.image_token).replace(self.image_token, marked)
    return turns

  def box_image_size(self, image: np.ndarray | str) -> tuple[int, int] | None:
    """The (height, width) a pixels_json box of `image` (uint8 [H, W, 3], or a path) is
    written in: the image as the model sees it (Qwen2-VL's resize; other models: the image's own
    size); None for grid boxes, which need no size."""
    if self.box_format.style != "pixels_json":
      return None
    if isinstance(image, str):
      image = load_image(image, self.max_image_pixels)
    height, width = image.shape[:2]
    if self.qwen2_vl is not None:
      return self.qwen2_vl.resized_size(height, width)
    return height, width

  def box_text(self, box, image: np.ndarray | str) -> str:
    """`box_format`'s text of the normalised box [x1, y1, x2, y2] in `image`."""
    return self.box_format.to_text(box, self.box_image_size(image))

  def parse_box(self, text, image: np.ndarray | str) -> np.ndarray | None:
    """The first box of `text` in `image`, normalised (`BoxFormat.parse`), or None."""
    return self.box_format.parse(text, self.box_image_size(image))

  def image_tokens(self, images: Sequence[np.ndarray]) -> int | list[int]:
    """The image-token count of `images` (uint8 [H, W, 3] each) for `text.tokenize`:
    tokens_per_image for every one, or with AnyRes each image's own (from its size and, in
    LLaVA-OneVision, whether the row tiles: `AnyResProcessing.tiles_row`), or Qwen2-VL's (from
    its size)."""
    if self.qwen2_vl is not None:
      return [self.qwen2_vl.image_tokens(*image.shape[:2]) for image in images]
    if self.anyres is None:
      return self.tokens_per_image
    tiled = self.anyres.tiles_row(len(images))
    return [self.anyres.image_tokens(*image.shape[:2], tiled) for image in images]

  def image_arrays(self, images: Sequence[Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
    """Each row's images (uint8 [H, W, 3]) in N slots, N the most of any row, as a batch holds
    them (`Collate`): pixel_values float32 [B, N, S, S, 3], or with AnyRes [B, N, K, S, S, 3]
    views and image_sizes, image_grids, feature_grids int32 [B, N, 2], or Qwen2-VL's patches
    float32 [B, P, D] (P: `patch_slots`) and patch_grids int32 [B, N, 3]. Empty slots are
    zeros, never read."""
    rows, slots = len(images), max(map(len, images))
    if self.qwen2_vl is not None:
      processed = [[self.qwen2_vl(image) for image in row] for row in images]
      most = max(sum(len(p) for p, _ in row) for row in processed)
      packed = pack_images(processed, patch_slots(most), slots, self.qwen2_vl.merge_size)
      return {"pixel_values": packed.patches, "patch_grids": packed.grids}
    if self.anyres is None:
      size = self.image.size
      pixels = np.zeros((rows, slots, size, size, 3), np.float32)
      for i, row in enumerate(images):
        for j, image in enumerate(row):
          pixels[i, j] = self.image(image)
      return {"pixel_values": pixels}
    size = self.anyres.tile.size
    views = np.zeros((rows, slots, self.anyres.max_tiles, size, size, 3), np.float32)
    sizes, grids, features = np.zeros((3, rows, slots, 2), np.int32)
    for i, row in enumerate(images):
      tiled = self.anyres.tiles_row(len(row))
      for j, image in enumerate(row):
        views[i, j], grids[i, j] = self.anyres(image, tiled)
        sizes[i, j] = image.shape[:2]
        features[i, j] = self.anyres.feature_grid(*image.shape[:2], tiled)
    return {"pixel_values": views, "image_sizes": sizes, "image_grids": grids,
            "feature_grids": features}


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record that produced no example: `reason` is its counter, `detail` names file/line/image."""

  reason: str
  detail: str


class _Skip(Exception):

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


class _WrongKind(UserError):
  """Records of another kind than the config's: the source is wrong, not one record."""


class Preprocess:
  """Record index -> example (`uint8 [n, S, S, 3]` images, `int32 [L]` tokens) or `Skipped`."""

  def __init__(self, source, tokenizer, config: DataConfig):
    self.source, self.tokenizer, self.config = source, tokenizer, config
    self.image_id = image_token_id(tokenizer, config.image_token)

  def __call__(self, index: int) -> dict | Skipped:
    try:
      return self._example(self.source[index])
    except (BadImage, _Skip) as e:
      return Skipped(e.reason, str(e))
    except _WrongKind:  # about the whole source, not this record
      raise
    except Exception as e:  # anything else one record causes is a counted skip, never a crash
      return Skipped("bad_record", f"record {index}: {type(e).__name__}: {e}")

  def _example(self, record: Mapping) -> dict:
    cfg = self.config
    where = record.get("origin") or f"record {record.get('id')!r}"
    missing = [key for key in _NEEDS[cfg.kind] if key not in record]
    if missing:  # the wrong kind of source for this config, not one bad record
      raise _WrongKind(f"{where}: kind={cfg.kind!r} needs {missing} in every record")
    images = list(record.get("images", ()))
    if len(images) > cfg.max_images:
      raise _Skip("too_many_images", f"{where}: {len(images)} images, max_images={cfg.max_images}")
    # Tokens first: an example too long to use never loads its images, unless the token counts
    # follow the image sizes (AnyRes, Qwen2-VL).
    loaded = (self._load(images, where) if cfg.anyres is not None or cfg.qwen2_vl is not None
              else None)
    counts = cfg.tokens_per_image if loaded is None else cfg.image_tokens(loaded)
    example = {}
    if cfg.kind == "sft":
      example.update(self._tokens("", record["conversations"], len(images), counts, where))
    elif cfg.kind == "grounding":
      if record.get("expression") is None:
        raise _Skip("no_expression", f"{where}: a grounding record without an expression")
      question = cfg.grounding_prompt.format(expression=record["expression"])
      if cfg.box_format.style == "pixels_json" and loaded is None:
        loaded = self._load(images, where)  # a pixel box is written in its image's size
      box = (cfg.box_text(record["box"], loaded[0]) if cfg.box_format.style == "pixels_json"
             else cfg.box_format.to_text(record["box"]))
      turns = [{"from": "human", "value": question}, {"from": "gpt", "value": box}]
      example.update(self._tokens("", turns, len(images), counts, where))
      example["boxes"] = np.asarray(record["box"], np.float32)
    else:
      for side in ("chosen", "rejected"):
        turns = list(record["prompt"]) + [{"from": "gpt", "value": record[side]}]
        example.update(self._tokens(side + "_", turns, len(images), counts, where))
      if np.array_equal(example["chosen_input_ids"], example["rejected_input_ids"]):
        # The loss of such a pair has zero gradient: it would train on nothing, uncounted.
        raise _Skip("identical_pair", f"{where}: the chosen and rejected answers are the same tokens")
      if cfg.with_ref_logps:
        try:
          for side in ("chosen", "rejected"):
            example[f"ref_{side}_logp"] = np.float32(record[f"ref_{side}_logp"])
        except (KeyError, TypeError, ValueError):
          raise _Skip("missing_ref_logp",
                      f"{where}: no numeric ref_chosen_logp/ref_rejected_logp") from None
    example.update(self._images(loaded if loaded is not None else self._load(images, where)))
    return example

  def _load(self, images: Sequence, where: str) -> list[np.ndarray]:
    """The record's images (paths or arrays) as `uint8 [H, W, 3]` arrays."""
    out = []
    for i, image in enumerate(images):
      if isinstance(image, str):
        try:
          image = load_image(image, self.config.max_image_pixels)
        except BadImage as e:
          raise _Skip(e.reason, f"{where}: {e}") from None
      elif not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[-1] == 3):
        raise _Skip("bad_image_array", f"{where}: image {i} is not a uint8 [H, W, 3] array")
      out.append(image)
    return out

  def _images(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """images: `uint8 [H, W, 3]` each -> {"images": `uint8 [n, S, S, 3]`}; with AnyRes
    `uint8 [n, K, S, S, 3]` views and their "image_sizes", "image_grids", "feature_grids"
    `int32 [n, 2]` (untiled in a LLaVA-OneVision record of several images); with Qwen2-VL
    "patches" `float32 [P, D]` (the images' patches one after another) and "patch_grids"
    `int32 [n, 3]`."""
    cfg = self.config
    if cfg.qwen2_vl is not None:
      processed = [cfg.qwen2_vl(image) for image in images]
      q = cfg.qwen2_vl
      dim = 3 * q.temporal_patch_size * q.patch_size ** 2
      patches = [p for p, _ in processed]
      return {"patches": np.concatenate(patches) if patches else np.zeros((0, dim), np.float32),
              "patch_grids": np.asarray([g for _, g in processed], np.int32).reshape(-1, 3)}
    if cfg.anyres is None:
      size = cfg.image.size
      out = np.zeros((len(images), size, size, 3), np.uint8)
      for i, image in enumerate(images):
        out[i] = cfg.image.resize(image)
      return {"images": out}
    k, size = cfg.anyres.max_tiles, cfg.anyres.tile.size
    tiled = cfg.anyres.tiles_row(len(images))
    out = np.zeros((len(images), k, size, size, 3), np.uint8)
    for i, image in enumerate(images):
      out[i] = cfg.anyres.views(image, k, tiled)
    shapes = [image.shape[:2] for image in images]

    def pairs(grid):
      return np.asarray([grid(*hw, tiled) for hw in shapes], np.int32).reshape(-1, 2)

    return {"images": out, "image_sizes": np.asarray(shapes, np.int32).reshape(-1, 2),
            "image_grids": pairs(cfg.anyres.grid), "feature_grids": pairs(cfg.anyres.feature_grid)}

  def _tokens(self, prefix: str, turns, num_images: int, counts: int | list[int],
              where: str) -> dict:
    """counts: the image tokens of every image, or of each in order (AnyRes)."""
    cfg = self.config
    try:
      turns = cfg.place_images(turns, num_images)
    except UserError as e:
      raise _Skip("image_count_mismatch", f"{where}: {e}") from None
    try:
      ids, mask = tokenize_conversation(turns, self.tokenizer, cfg.template,
                                        system=cfg.system_prompt, image_token=cfg.image_token,
                                        tokens_per_image=counts)
    except BadConversation as e:
      raise _Skip("bad_conversation", f"{where}: {e}") from None
    fitted = fit_to_length(ids, mask, cfg.max_length, self.image_id)
    if isinstance(fitted, str):
      raise _Skip(fitted, f"{where}: {len(ids)} tokens do not fit max length {cfg.max_length} "
                  "without cutting image tokens or an answer")
    return {prefix + "input_ids": fitted[0], prefix + "loss_mask": fitted[1]}


class Collate:
  """Examples -> one batch of the batch contract, tokens padded to the smallest bucket that fits.

  SFT/grounding: `input_ids`, `positions`, `attention_mask` int32 `[B, T]`, `loss_mask` float32
  `[B, T]`; preference: the same under `chosen_` and `rejected_` (one T for both). All kinds:
  `pixel_values uint8 [B, N, S, S, 3]` (resized, not normalised), `pixel_mean`, `pixel_std`
  float32 `[B, 3]` (the normalisation the model applies on the device), `image_mask int32 [B, N]`;
  grounding: `boxes float32 [B, 4]`; with ref log-probs: `ref_chosen_logp`, `ref_rejected_logp`
  float32 `[B]`. With AnyRes: `pixel_values uint8 [B, N, K, S, S, 3]` (K views an image, the
  unused ones zero) and
  `image_sizes`, `image_grids`, `feature_grids` int32 `[B, N, 2]` (the LlavaNext forward's).
  With Qwen2-VL: `pixel_values float32 [B, P, D]` patches (`patch_slots`) and `patch_grids`
  int32 `[B, N, 3]` (the Qwen2VL forward's `Qwen2VLImages`).
  """

  def __init__(self, config: DataConfig, pad_id: int):
    self.config, self.pad_id = config, pad_id

  def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    cfg, batch_size = self.config, len(examples)
    prefixes = ("chosen_", "rejected_") if cfg.kind == "preference" else ("",)
    longest = max(len(e[p + "input_ids"]) for e in examples for p in prefixes)
    length = next(b for b in cfg.length_buckets if b >= longest)
    batch = {}
    for p in prefixes:
      ids = np.full((batch_size, length), self.pad_id, np.int32)
      loss_mask = np.zeros((batch_size, length), np.float32)
      attention_mask = np.zeros((batch_size, length), np.int32)
      positions = np.zeros((batch_size, length), np.int32)
      for i, e in enumerate(examples):
        n = len(e[p + "input_ids"])
        ids[i, :n], loss_mask[i, :n] = e[p + "input_ids"], e[p + "loss_mask"]
        attention_mask[i, :n], positions[i, :n] = 1, np.arange(n)
      batch.update({p + "input_ids": ids, p + "loss_mask": loss_mask,
                    p + "attention_mask": attention_mask, p + "positions": positions})
    if cfg.qwen2_vl is not None:
      batch.update(self._patches(examples))
    else:
      batch.update(self._pixels(examples))
    for key in ("boxes", "ref_chosen_logp", "ref_rejected_logp"):
      if key in examples[0]:
        batch[key] = np.stack([e[key] for e in examples]).astype(np.float32)
    return batch

  def _patches(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """Qwen2-VL: patches float32 [B, P, D] (P: `patch_slots`), patch_grids int32 [B, N, 3],
    image_mask int32 [B, N]."""
    cfg, batch_size = self.config, len(examples)
    slots = patch_slots(max(len(e["patches"]) for e in examples))
    patches = np.zeros((batch_size, slots, examples[0]["patches"].shape[1]), np.float32)
    grids = np.zeros((batch_size, cfg.max_images, 3), np.int32)
    image_mask = np.zeros((batch_size, cfg.max_images), np.int32)
    for i, e in enumerate(examples):
      n = len(e["patch_grids"])
      patches[i, :len(e["patches"])] = e["patches"]
      grids[i, :n], image_mask[i, :n] = e["patch_grids"], 1
    return {"pixel_values": patches, "patch_grids": grids, "image_mask": image_mask}

  def _pixels(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """pixel_values and image_mask; with AnyRes its views, image_sizes, image_grids and
    feature_grids."""
    cfg, batch_size = self.config, len(examples)
    batch = {}
    processing = cfg.image if cfg.anyres is None else cfg.anyres.tile
    size = processing.size
    views = () if cfg.anyres is None else (cfg.anyres.max_tiles,)
    pixels = np.zeros((batch_size, cfg.max_images, *views, size, size, 3), np.uint8)
    image_mask = np.zeros((batch_size, cfg.max_images), np.int32)
    for i, e in enumerate(examples):
      n = len(e["images"])
      if n:
        pixels[i, :n], image_mask[i, :n] = e["images"], 1
    # Normalised on the device (models.llava_next.batch_images): a quarter of the bytes to move.
    mean = np.broadcast_to(np.asarray(processing.mean, np.float32), (batch_size, 3)).copy()
    std = np.broadcast_to(np.asarray(processing.std, np.float32), (batch_size, 3)).copy()
    batch.update(pixel_values=pixels, image_mask=image_mask, pixel_mean=mean, pixel_std=std)
    for key in ("image_sizes", "image_grids", "feature_grids") if views else ():
      batch[key] = np.zeros((batch_size, cfg.max_images, 2), np.int32)
      for i, e in enumerate(examples):
        batch[key][i, :len(e[key])] = e[key]
    return batch


class BatchIterator(grain.DatasetIterator):
  """Fixed-shape batches, with the skipped examples counted; `get_state`/`set_state` resume
  exactly (counters included), and Grain's Orbax handler saves it like any Grain iterator."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, collate: Collate,
               max_skip_fraction: float, source_skipped: Mapping[str, int]):
    super().__init__(parent)
    self._batch_size, self._collate = batch_size, collate
    self._max_skip_fraction, self._source_skipped = max_skip_fraction, dict(source_skipped)
    self._seen, self._skipped, self._last_skip = 0, Counter(), None

  @property
  def examples_seen(self) -> int:
    """Records this process has preprocessed, the skipped ones included."""
    return self._seen

  @property
  def skip_counts(self) -> dict[str, int]:
    """Skipped records by reason: malformed lines found when the sources were read, plus the
    examples dropped since (image_missing, image_unreadable, too_long, answer_too_long,
    identical_pair, bad_conversation, ...). For the metrics."""
    return dict(Counter(self._source_skipped) + self._skipped)

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    while len(examples) < self._batch_size:
      try:
        item = next(self._parent)
      except StopIteration:
        if self._seen and not self._seen - sum(self._skipped.values()):
          raise UserError(f"all {self._seen} examples were skipped; last: {self._last_skip}") from None
        raise
      self._seen += 1
      if isinstance(item, Skipped):
        self._skipped[item.reason] += 1
        self._last_skip = item.detail
        skipped = sum(self._skipped.values())
        if skipped > self._max_skip_fraction * max(self._seen, _MIN_EXAMPLES_FOR_FRACTION):
          raise UserError(f"{skipped} of {self._seen} examples were skipped ({dict(self._skipped)}), "
                          f"more than max_skip_fraction={self._max_skip_fraction}; last: {item.detail}")
      else:
        examples.append(item)
    return self._collate(examples)

  def get_state(self) -> dict:
    return {"examples": self._parent.get_state(), "seen": self._seen,
            "skipped": dict(self._skipped)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["examples"])
    self._seen, self._skipped = state["seen"], Counter(state["skipped"])

  def __str__(self) -> str:
    return f"BatchIterator(batch_size={self._batch_size})"


class _Batches(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, batch_size: int, collate: Collate,
               max_skip_fraction: float, source_skipped: Mapping[str, int]):
    super().__init__(parent)
    self._args = (batch_size, collate, max_skip_fraction, source_skipped)

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self._parent.__iter__(), *self._args)

  def __str__(self) -> str:
    return f"Batches(batch_size={self._args[0]})"


def make_dataset(source, tokenizer, config: DataConfig,
                 shard_options: grain.sharding.ShardOptions | None = None) -> grain.IterDataset:
  """A Grain dataset of batches; `iter()` of it is a `BatchIterator`.

  `source`: any random-access source of records (sources.py, the shapes world, a list of dicts);
  `tokenizer`: a fast HF tokenizer holding `config.image_token`; `shard_options`: which part of
  the data this process reads (default `ShardByJaxProcess`: one shard per JAX process).
  """
  shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  ds = grain.MapDataset.range(len(source))
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(config.num_epochs)[shard.shard_index::shard.shard_count]
  ds = ds.map(Preprocess(source, tokenizer, config))
  examples = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                  prefetch_buffer_size=config.read_buffer_size))
  if config.worker_count:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read absl flags; outside absl.app.run (notebooks, tests) nothing
      # parsed them, so take the defaults.
      flags.FLAGS.mark_as_parsed()
    examples = examples.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return _Batches(examples, config.batch_size, Collate(config, pad_id), config.max_skip_fraction,
                  getattr(source, "skipped", {}))
