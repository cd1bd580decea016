"""Images: safe loading, LLaVA preprocessing (pad to square, resize, normalise), STIC corruptions.

Images travel through the data pipeline as `uint8 [H, W, 3]` RGB arrays; only the last step
(`ImageProcessing.normalize`) turns them into the float32 pixels a vision tower reads.
"""

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from lvlm_jax.errors import UserError

# OpenAI CLIP's normalisation, which LLaVA-1.5's vision tower (CLIP ViT-L/14-336) expects.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The statistics each vision tower was trained with (its HF image processor's defaults), by the
# tower's HF model_type: a model directory without a preprocessor config gets its tower's own.
TOWER_NORMALIZATION = {
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}


class BadImage(UserError):
  """An image that cannot be used; `reason` names the counter it is skipped under."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason

  def __reduce__(self):
    # Exceptions pickle through `args`; keep `reason` when one crosses a worker boundary.
    return (BadImage, (self.reason, str(self)))


def _inside(path: str, root: str) -> bool:
  return os.path.commonpath([path, root]) == root


def resolve_image_path(path: str, roots: Sequence[str]) -> str:
  """The real path of `path` under the first root that has it.

  Raises `BadImage`: reason "image_outside_root" when the path (or a symlink on it) leads out of
  every root that would hold it ("../x.jpg", "/etc/x.jpg"), "image_missing" when no root has it,
  "bad_image_path" when it is no path at all (a NUL byte in it).
  """
  escaped = False
  for root in roots:
    real_root = os.path.realpath(root)
    try:
      candidate = os.path.realpath(os.path.join(real_root, path))
    except (ValueError, TypeError, OSError) as e:  # a NUL byte, a path too long to resolve
      raise BadImage("bad_image_path", f"image path {path!r} is not a usable path ({e})") from None
    if not _inside(candidate, real_root):
      escaped = True
    elif os.path.isfile(candidate):
      return candidate
  if escaped:
    raise BadImage("image_outside_root",
                   f"image path {path!r} leads outside the image roots {list(roots)}; refused")
  raise BadImage("image_missing", f"image {path!r} is in none of the image roots {list(roots)}")


def to_rgb8(img: Image.Image) -> np.ndarray:
  """A PIL image of any mode -> `uint8 [H, W, 3]` RGB on the 0..255 scale.

  PIL's own `convert("RGB")` clips wider samples instead of scaling them, so a 16-bit PNG comes
  out almost all white; here integer modes (`I;16*`, `I`) are read on the 16-bit scale 0..65535
  (what 16-bit PNG, TIFF and PGM samples load as) and float images (`F`) on 0..1, or on PIL's
  0..255 when a value exceeds 1. Alpha and palette transparency are dropped, as LLaVA's
  `convert("RGB")` drops them; CMYK, 1-bit, palette and the rest convert as PIL converts them.
  """
  if img.mode == "F" or img.mode == "I" or img.mode.startswith("I;16"):
    x = np.nan_to_num(np.asarray(img, np.float64))
    top = (1.0 if x.max(initial=0) <= 1 else 255.0) if img.mode == "F" else 65535.0
    gray = np.round(np.clip(x, 0, top) * (255 / top)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")  # the same colours, without PIL's warning about bytes transparency
  return np.asarray(img.convert("RGB"))


def load_image(path: str, max_pixels: int | None = None) -> np.ndarray:
  """Decodes an image file to `uint8 [H, W, 3]` RGB, upright per its EXIF orientation.

  Images over `max_pixels` (default: PIL's `Image.MAX_IMAGE_PIXELS`) are refused before decoding,
  so a decompression bomb never allocates. Raises `BadImage` ("image_missing", "image_too_large",
  "image_unreadable").
  """
  limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
  try:
    with Image.open(path) as img:  # reads the header only
      width, height = img.size
      if limit is not None and width * height > limit:
        raise BadImage("image_too_large", f"image {path!r} has {width}x{height} pixels, over the "
                       f"limit of {limit} (a decompression bomb?); refused")
      with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return to_rgb8(ImageOps.exif_transpose(img))
  except BadImage:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadImage("image_too_large", f"image {path!r} refused as a decompression bomb: {e}") from None
  except FileNotFoundError:
    raise BadImage("image_missing", f"image {path!r} does not exist") from None
  except Exception as e:  # Decoders of untrusted files fail in many ways; all mean "unreadable".
    raise BadImage("image_unreadable", f"image {path!r} cannot be decoded: {e}") from None


def expand2square(image: np.ndarray, fill: Sequence[int]) -> np.ndarray:
  """LLaVA's pad-to-square: `uint8 [H, W, 3]` centred on a `fill`-coloured `[S, S, 3]`, S = max(H, W)."""
  height, width, _ = image.shape
  if height == width:
    return image
  side = max(height, width)
  out = np.empty((side, side, 3), np.uint8)
  out[...] = np.asarray(fill, np.uint8)
  top, left = (side - height) // 2, (side - width) // 2
  out[top:top + height, left:left + width] = image
  return out


def resize(image: np.ndarray, height: int, width: int, resample: int = Image.BICUBIC) -> np.ndarray:
  """`uint8 [H, W, 3]` -> `uint8 [height, width, 3]` with PIL (bicubic by default, as CLIP)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
  """How an image becomes vision-tower pixels: optional pad-to-square, resize, normalise."""

  size: int = 336
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  # LLaVA-1.5's `image_aspect_ratio=pad`; False gives CLIP's resize-shortest-side + centre crop.
  pad_to_square: bool = True
  resample: int = Image.BICUBIC

  @classmethod
  def for_model(cls, hf_dir: str, model) -> "ImageProcessing":
    """Pixels as `model`'s vision tower expects them: the HF directory's preprocessor config
    when it has one, else the tower's own normalisation (TOWER_NORMALIZATION) at its image size
    (pad to square, as LLaVA-1.5)."""
    size = model.config.vision.image_size
    processor = os.path.join(hf_dir, "preprocessor_config.json") if hf_dir else ""
    if processor and os.path.exists(processor):
      processing = cls.from_hf_preprocessor_config(processor)
      if processing.size != size:
        raise UserError(f"{processor}: image size {processing.size}, but the vision tower "
                        f"takes {size}")
      return processing
    mean, std = TOWER_NORMALIZATION[model.config.vision.MODEL_TYPE]
    return cls(size=size, mean=mean, std=std)

  @classmethod
  def from_hf_preprocessor_config(cls, config: str | os.PathLike | Mapping,
                                  pad_to_square: bool = True) -> "ImageProcessing":
    """Reads `image_mean`, `image_std`, `crop_size`/`size` and `resample` from an HF
    `preprocessor_config.json` (a file, the directory holding it, or its parsed dict)."""
    if not isinstance(config, Mapping):
      path = os.fspath(config)
      if os.path.isdir(path):
        path = os.path.join(path, "preprocessor_config.json")
      try:
        with open(path) as f:
          config = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the preprocessor config {path}: {e}") from None
    size = config.get("crop_size") if config.get("do_center_crop", True) else None
    size = size or config.get("size")
    if isinstance(size, Mapping):
      if "height" in size and size["height"] != size.get("width"):
        raise UserError(f"preprocessor config: only square images are supported, got size {size}")
      size = size.get("height", size.get("shortest_edge"))
    if not isinstance(size, int):
      raise UserError(f"preprocessor config: cannot read an image size from {config.get('size')!r}")
    return cls(size=size, mean=tuple(config.get("image_mean", CLIP_MEAN)),
               std=tuple(config.get("image_std", CLIP_STD)), pad_to_square=pad_to_square,
               resample=int(config.get("resample", Image.BICUBIC)))

  @property
  def fill(self) -> tuple[int, ...]:
    """The padding colour: the mean as 0..255 integers (LLaVA's `expand2square` background)."""
    return tuple(int(m * 255) for m in self.mean)

  def resize(self, image: np.ndarray) -> np.ndarray:
    """`uint8 [H, W, 3]` -> `uint8 [size, size, 3]`."""
    if self.pad_to_square:
      return resize(expand2square(image, self.fill), self.size, self.size, self.resample)
    # CLIP: shortest side to `size` (long side truncated as HF does), then a centre crop.
    height, width, _ = image.shape
    long_side = int(self.size * max(height, width) / min(height, width))
    new_h, new_w = (self.size, long_side) if height <= width else (long_side, self.size)
    image = resize(image, new_h, new_w, self.resample)
    top, left = int((new_h - self.size) / 2), int((new_w - self.size) / 2)
    return image[top:top + self.size, left:left + self.size]

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """`uint8 [..., H, W, 3]` -> `float32 [..., H, W, 3]`, (x / 255 - mean) / std."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """`uint8 [H, W, 3]` -> `float32 [size, size, 3]`."""
    return self.normalize(self.resize(image))


# STIC's corruptions (METHODS.md 2.2), each `f(uint8 [H, W, 3], np.random.Generator) -> same shape`.


def low_resolution(image: np.ndarray, rng: np.random.Generator, short_side: int = 20) -> np.ndarray:
  """Shorter side down to `short_side` pixels (STIC's `Resize(20)`), then back up to the input size."""
  del rng  # deterministic; the argument keeps every corruption's signature the same
  height, width, _ = image.shape
  scale = short_side / min(height, width)
  small = resize(image, max(1, round(height * scale)), max(1, round(width * scale)), Image.BILINEAR)
  return resize(small, height, width, Image.BILINEAR)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """float [..., 3] in [0, 1] -> HSV with hue in [0, 1)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc, minc = rgb.max(-1), rgb.min(-1)
  delta = maxc - minc
  safe = np.where(delta > 0, delta, 1)
  hue = np.where(maxc == r, (g - b) / safe, np.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
  hue = np.where(delta > 0, (hue / 6) % 1.0, 0)
  sat = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1), 0)
  return np.stack([hue, sat, maxc], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  sector = np.floor(h * 6)
  f = h * 6 - sector
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  sector = sector.astype(np.int64) % 6
  choices = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
  return np.choose(sector[..., None], choices)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.5,
                 hue: float = 0.3) -> np.ndarray:
  """torchvision's `ColorJitter(brightness, hue)` (STIC): brightness x U[1-b, 1+b], hue shifted by
  U[-h, h] of a full turn, the two applied in random order."""
  x = image.astype(np.float64) / 255
  factor = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
  shift = rng.uniform(-hue, hue)
  for op in rng.permutation(2):
    if op == 0:
      x = np.clip(x * factor, 0, 1)
    else:
      hsv = _rgb_to_hsv(x)
      hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
      x = _hsv_to_rgb(hsv)
  return np.round(x * 255).astype(np.uint8)


def gaussian_blur(image: np.ndarray, rng: np.random.Generator,
                  sigma: tuple[float, float] = (0.1, 2.0)) -> np.ndarray:
  """Gaussian blur with sigma ~ U[sigma] pixels (torchvision `GaussianBlur`'s default range)."""
  radius = rng.uniform(*sigma)
  return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def stic_corruption(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """STIC's `load_image` corruption: low resolution or colour jitter, with probability 0.5 each."""
  if rng.random() < 0.5:
    return low_resolution(image, rng)
  return color_jitter(image, rng)
