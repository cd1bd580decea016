"""Image loading (refusals included), path resolution, LLaVA/CLIP preprocessing, STIC corruptions."""

import colorsys
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from lvlm_jax.data import images
from lvlm_jax.data.images import BadImage, ImageProcessing
from lvlm_jax.errors import UserError


def random_image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_load_converts_to_rgb(tmp_path):
  rgb = random_image((5, 7, 3))
  Image.fromarray(rgb).save(tmp_path / "a.png")
  np.testing.assert_array_equal(images.load_image(str(tmp_path / "a.png")), rgb)
  Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
  gray = images.load_image(str(tmp_path / "gray.png"))
  assert gray.shape == (5, 7, 3) and (gray == rgb[..., :1]).all()
  Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(images.load_image(str(tmp_path / "rgba.png")), rgb)


def test_every_pil_mode_loads_on_the_8_bit_scale(tmp_path):
  # Each image's true 8-bit RGB is known: a 16-bit sample v is round(v / 257), a 0..1 float f is
  # round(255 f); alpha and palette transparency are dropped as LLaVA's convert("RGB") drops them.
  v = np.arange(256 * 256, dtype=np.int64).reshape(256, 256)
  want16 = np.repeat(np.round(v / 257).astype(np.uint8)[..., None], 3, -1)
  gray = random_image((6, 5))
  palette = random_image((16, 3), seed=1)
  indices = random_image((6, 5), seed=2) % 16
  cmyk = np.asarray([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 128, 0, 0], [0, 0, 0, 255]]], np.uint8)
  cases = {
      "i16.png": (Image.fromarray(v.astype(np.uint16)), want16),
      "i32.tif": (Image.fromarray(v.astype(np.int32), "I"), want16),
      "f01.tif": (Image.fromarray((v / 65535).astype(np.float32), "F"), want16),
      "f255.tif": (Image.fromarray(gray.astype(np.float32), "F"), np.dstack([gray] * 3)),
      "la.png": (Image.fromarray(np.dstack([gray, random_image((6, 5), 3)]), "LA"),
                 np.dstack([gray] * 3)),
      "cmyk.tif": (Image.fromarray(cmyk, "CMYK"),
                   np.asarray([[[255, 255, 255], [0, 255, 255], [255, 127, 255], [0, 0, 0]]])),
      "bits.png": (Image.fromarray(gray > 127), np.dstack([np.where(gray > 127, 255, 0)] * 3)),
  }
  p_image = Image.fromarray(indices, "P")
  p_image.putpalette(palette.reshape(-1).tolist())
  p_image.info["transparency"] = 3
  cases["p.png"] = (p_image, palette[indices])
  for name, (image, want) in cases.items():
    image.save(tmp_path / name)
    with Image.open(tmp_path / name) as reopened:
      mode = reopened.mode
    got = images.load_image(str(tmp_path / name))
    assert got.dtype == np.uint8 and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=f"{name} ({mode})")
  assert images.load_image(str(tmp_path / "i16.png")).mean() == pytest.approx(127.5, abs=0.01)


def test_load_applies_exif_orientation(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to view"
  Image.fromarray(random_image((10, 30, 3))).save(tmp_path / "r.jpg", exif=exif)
  assert images.load_image(str(tmp_path / "r.jpg")).shape == (30, 10, 3)


def test_corrupt_and_missing_images_are_bad_images(tmp_path):
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  with pytest.raises(BadImage, match="cannot be decoded") as e:
    images.load_image(str(tmp_path / "bad.jpg"))
  assert e.value.reason == "image_unreadable" and isinstance(e.value, UserError)
  Image.fromarray(random_image((40, 40, 3))).save(tmp_path / "cut.png")
  (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:200])
  with pytest.raises(BadImage) as e:
    images.load_image(str(tmp_path / "cut.png"))
  assert e.value.reason == "image_unreadable"
  with pytest.raises(BadImage) as e:
    images.load_image(str(tmp_path / "nope.png"))
  assert e.value.reason == "image_missing"


def png_header_only(width, height):
  """A valid PNG that claims width x height pixels in a few bytes: a decompression bomb's header."""
  chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                              + struct.pack(">I", zlib.crc32(kind + data)))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


def test_decompression_bomb_refused_before_decoding(tmp_path):
  (tmp_path / "bomb.png").write_bytes(png_header_only(40_000, 40_000))  # 1.6 G pixels
  with pytest.raises(BadImage, match="decompression bomb") as e:
    images.load_image(str(tmp_path / "bomb.png"))
  assert e.value.reason == "image_too_large"
  Image.fromarray(random_image((20, 20, 3))).save(tmp_path / "small.png")
  with pytest.raises(BadImage, match="400 pixels|20x20"):
    images.load_image(str(tmp_path / "small.png"), max_pixels=399)
  assert images.load_image(str(tmp_path / "small.png"), max_pixels=400).shape == (20, 20, 3)


def test_roots_searched_in_order(tmp_path):
  first, second = tmp_path / "a", tmp_path / "b"
  (first / "sub").mkdir(parents=True)
  second.mkdir()
  for path in (first / "both.jpg", second / "both.jpg", second / "only_b.jpg", first / "sub/x.jpg"):
    path.write_bytes(b"x")
  roots = [str(first), str(second)]
  assert images.resolve_image_path("both.jpg", roots) == str(first / "both.jpg")
  assert images.resolve_image_path("only_b.jpg", roots) == str(second / "only_b.jpg")
  assert images.resolve_image_path("sub/../sub/x.jpg", roots) == str(first / "sub/x.jpg")
  assert images.resolve_image_path(str(second / "only_b.jpg"), roots) == str(second / "only_b.jpg")
  with pytest.raises(BadImage) as e:
    images.resolve_image_path("none.jpg", roots)
  assert e.value.reason == "image_missing"


def test_path_traversal_refused(tmp_path):
  root = tmp_path / "root"
  root.mkdir()
  secret = tmp_path / "secret.jpg"
  secret.write_bytes(b"x")
  os.symlink(secret, root / "link.jpg")
  os.symlink(tmp_path, root / "up")
  for path in ("../secret.jpg", str(secret), "link.jpg", "up/secret.jpg", "sub/../../secret.jpg"):
    with pytest.raises(BadImage, match="outside the image roots") as e:
      images.resolve_image_path(path, [str(root)])
    assert e.value.reason == "image_outside_root"
  # A symlink that stays inside the root is fine.
  (root / "real.jpg").write_bytes(b"x")
  os.symlink(root / "real.jpg", root / "inside.jpg")
  assert images.resolve_image_path("inside.jpg", [str(root)]) == str(root / "real.jpg")


def test_expand2square_centres_on_fill():
  image = np.full((2, 4, 3), 7, np.uint8)
  square = images.expand2square(image, (1, 2, 3))
  assert square.shape == (4, 4, 3)
  np.testing.assert_array_equal(square[0, 0], [1, 2, 3])
  np.testing.assert_array_equal(square[3, 3], [1, 2, 3])
  assert (square[1:3] == 7).all()
  tall = images.expand2square(np.full((5, 2, 3), 7, np.uint8), (0, 0, 0))
  assert (tall[:, 1:3] == 7).all() and (tall[:, [0, 3, 4]] == 0).all()  # left pad (5-2)//2 = 1


@pytest.mark.parametrize("shape", [(50, 80, 3), (81, 47, 3), (32, 32, 3)])
def test_matches_hf_clip_image_processor(shape):
  image = random_image(shape, seed=shape[0])
  hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  want = hf(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = ImageProcessing(size=32, pad_to_square=False)(image)
  assert ours.dtype == np.float32 and ours.shape == (32, 32, 3)
  np.testing.assert_allclose(ours, want, atol=1e-5)
  # LLaVA's "pad": expand2square with the mean colour, then the same processor.
  padded = images.expand2square(image, tuple(int(m * 255) for m in images.CLIP_MEAN))
  want = hf(padded, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(ImageProcessing(size=32)(image), want, atol=1e-5)


def test_from_hf_preprocessor_config(tmp_path):
  clip = {"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336},
          "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5], "resample": 3}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(clip))
  for given in (clip, tmp_path, str(tmp_path / "preprocessor_config.json")):
    p = ImageProcessing.from_hf_preprocessor_config(given)
    assert (p.size, p.mean, p.std, p.pad_to_square) == (336, (0.1, 0.2, 0.3), (0.5,) * 3, True)
  assert p.fill == (25, 51, 76)
  siglip = {"do_center_crop": False, "size": {"height": 384, "width": 384}, "resample": 2}
  p = ImageProcessing.from_hf_preprocessor_config(siglip, pad_to_square=False)
  assert (p.size, p.mean, p.resample, p.pad_to_square) == (384, images.CLIP_MEAN, 2, False)
  with pytest.raises(UserError, match="square"):
    ImageProcessing.from_hf_preprocessor_config({"size": {"height": 384, "width": 512}})
  with pytest.raises(UserError, match="cannot read"):
    ImageProcessing.from_hf_preprocessor_config(tmp_path / "missing.json")


def test_low_resolution_goes_down_to_20_px_and_back():
  checker = (np.indices((60, 90)).sum(0) % 2 * 255).astype(np.uint8)
  image = np.dstack([checker] * 3)
  out = images.low_resolution(image, np.random.default_rng(0))
  assert out.shape == image.shape and out.dtype == np.uint8
  assert out.std() < 0.1 * image.std()  # a 1-px checkerboard does not survive 20 px
  smooth = np.dstack([np.tile(np.linspace(0, 255, 90), (60, 1)).astype(np.uint8)] * 3)
  assert np.abs(images.low_resolution(smooth, None).astype(int) - smooth).mean() < 3


def test_color_jitter_brightness_and_hue_in_numpy():
  image = random_image((8, 8, 3))
  # Brightness only: x * U[0.5, 1.5], clipped.
  factor = np.random.default_rng(1).uniform(0.5, 1.5)
  out = images.color_jitter(image, np.random.default_rng(1), brightness=0.5, hue=0.0)
  np.testing.assert_allclose(out, np.clip(np.round(image * factor), 0, 255), atol=1)
  # Hue only: each pixel's HSV hue turns by U[-0.3, 0.3] (checked with colorsys).
  rng = np.random.default_rng(2)
  rng.uniform(1, 1)
  shift = rng.uniform(-0.3, 0.3)
  out = images.color_jitter(image, np.random.default_rng(2), brightness=0.0, hue=0.3)
  for y, x in [(0, 0), (3, 5), (7, 7)]:
    h, s, v = colorsys.rgb_to_hsv(*(image[y, x] / 255))
    want = np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255
    np.testing.assert_allclose(out[y, x], want, atol=1)
  assert abs(shift) > 0.01 and not np.array_equal(out, image)


def test_corruptions_are_seeded():
  image = random_image((24, 32, 3))
  for corrupt in (images.color_jitter, images.gaussian_blur, images.stic_corruption,
                  images.low_resolution):
    a = corrupt(image, np.random.default_rng(5))
    b = corrupt(image, np.random.default_rng(5))
    assert a.shape == image.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, image)
  blurred = images.gaussian_blur(image, np.random.default_rng(0), sigma=(1.5, 2.0))
  assert blurred.std() < 0.7 * image.std()
  # STIC picks low resolution or jitter with probability 1/2 each.
  picks = [np.array_equal(images.stic_corruption(image, np.random.default_rng(s)),
                          images.low_resolution(image, None)) for s in range(40)]
  assert 10 < sum(picks) < 30


def test_for_model_without_a_preprocessor_config_uses_the_towers_statistics(tmp_path):
  """No preprocessor_config.json: each tower's own mean/std (transformers' SigLIP processor
  defaults; ImageNet's for DINOv2, as facebook/dinov2-* processors say), never CLIP's for all."""
  import types
  from transformers import SiglipImageProcessorPil
  from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
  from lvlm_jax.models.dinov2 import DINOv2Config
  from lvlm_jax.models.siglip import SiglipVisionConfig
  from lvlm_jax.models.vision import CLIPVisionConfig
  tower = dict(hidden_size=32, num_layers=1, num_heads=2, image_size=28)
  siglip = SiglipImageProcessorPil()
  for vision, mean, std in [
      (CLIPVisionConfig(intermediate_size=48, patch_size=7, **tower), images.CLIP_MEAN,
       images.CLIP_STD),
      (SiglipVisionConfig(intermediate_size=48, patch_size=7, **tower), siglip.image_mean,
       siglip.image_std),
      (DINOv2Config(patch_size=14, position_grid=2, **tower), IMAGENET_DEFAULT_MEAN,
       IMAGENET_DEFAULT_STD)]:
    model = types.SimpleNamespace(config=types.SimpleNamespace(vision=vision))
    p = ImageProcessing.for_model(str(tmp_path), model)
    assert (p.size, p.pad_to_square) == (28, True)
    np.testing.assert_array_equal(p.mean, mean)
    np.testing.assert_array_equal(p.std, std)
