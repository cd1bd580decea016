"""Random-access sources over the data formats researchers already have, and mixtures of them.

Every source is a Grain random-access source (`__len__`, `__getitem__`, picklable) yielding records:
  conversation: {"id", "images", "conversations": [{"from": "human" | "gpt", "value"}, ...]}
  preference:   {"id", "images", "prompt": [turns, last one human], "chosen": str, "rejected": str}
  grounding:    {"id", "images": [one], "box": [x1, y1, x2, y2] in [0, 1], "expression": str | None}
`images` holds resolved file paths (or `uint8 [H, W, 3]` arrays in sources built in memory).
Keys a source does not know pass through untouched; file sources add "origin" ("file:line").

A file is parsed and checked once, on construction: malformed records are skipped and counted in
`skipped`; more than `max_bad_fraction` of them is a `UserError` naming the file and first bad line.
The good records are kept as one JSON byte string with offsets, which is compact and pickles to
Grain's worker processes in one copy. Image paths resolve lazily in `__getitem__`, which raises
`images.BadImage` for a missing image or one outside the image roots; the pipeline counts those.
"""

import codecs
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from lvlm_jax.data.images import BadImage, resolve_image_path
from lvlm_jax.data.text import ensure_image_placeholders, to_messages
from lvlm_jax.errors import UserError

_LLAVA_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def _read(path: str):
  """Yields (origin, parsed object or None, error message or None) for a JSON list or JSONL file."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"cannot read data file {path}: {e}") from None
  data = _as_utf8(data, path)
  # Sniff rather than trust the extension: LLaVA-style ".json" files are sometimes JSONL.
  if data.lstrip()[:1] == b"[":
    try:
      records = json.loads(data)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
      line = data[:e.start].count(b"\n") + 1
      raise UserError(f"{path}:{line}: not valid UTF-8 (byte {e.start}: {e.reason}); save the "
                      "file as UTF-8") from None
    for i, obj in enumerate(records):
      yield f"{path}[{i}]", obj, None
    return
  for lineno, line in enumerate(data.splitlines(), 1):
    if not line.strip():
      continue
    try:
      yield f"{path}:{lineno}", json.loads(line), None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      yield f"{path}:{lineno}", None, f"not valid JSON ({e})"


def _as_utf8(data: bytes, path: str) -> bytes:
  """The file's bytes as UTF-8 without a byte-order mark. Editors on Windows save JSON with a
  UTF-8 BOM or as UTF-16; both are read (UTF-16 by its BOM, or by the NUL bytes of ASCII text)."""
  if data.startswith(codecs.BOM_UTF8):
    return data[len(codecs.BOM_UTF8):]
  encoding = None
  if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
    encoding = "utf-16"
  elif len(data) >= 2 and data[1] == 0 and data[0] != 0:
    encoding = "utf-16-le"
  elif len(data) >= 2 and data[0] == 0 and data[1] != 0:
    encoding = "utf-16-be"
  if encoding is None:
    return data
  try:
    return data.decode(encoding).encode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: looks like {encoding.upper()} but does not decode as it (byte "
                    f"{e.start}: {e.reason}); save the file as UTF-8") from None


def _images_field(obj: Mapping, keys=("image", "images")) -> list[str]:
  for key in keys:
    if key in obj:
      value = obj[key]
      value = [value] if isinstance(value, str) else value
      if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise UserError(f"'{key}' must be a path or a list of paths")
      return value
  return []


def _llava_turns(turns, key: str) -> list[dict]:
  if not isinstance(turns, list) or not turns:
    raise UserError(f"'{key}' must be a non-empty list of turns")
  return [{"from": _LLAVA_ROLE[m["role"]], "value": m["content"]} for m in to_messages(turns)]


def _extras(obj: Mapping, consumed: Sequence[str]) -> dict:
  return {k: v for k, v in obj.items() if k not in consumed}


class JsonRecordSource:
  """Base of the file sources: parse and check on construction, decode one record per access."""

  def __init__(self, path: str | os.PathLike, image_roots: Sequence[str] | None = None, *,
               max_bad_fraction: float = 0.05):
    """`image_roots`: folders searched in order for relative image paths (default: the data
    file's folder); `max_bad_fraction`: the share of malformed records tolerated."""
    self.path = os.fspath(path)
    self.image_roots = tuple(image_roots or (os.path.dirname(os.path.abspath(self.path)),))
    skipped, chunks, first_bad, total = Counter(), [], None, 0
    for origin, obj, error in _read(self.path):
      total += 1
      reason = "bad_json" if error else "bad_record"
      if error is None:
        try:
          if not isinstance(obj, dict):
            raise UserError(f"a record must be a JSON object, not {type(obj).__name__}")
          record = self.parse(obj)
          record["id"] = str(obj.get("id", origin))
          record.setdefault("origin", origin)
          chunks.append(json.dumps(record).encode())
        except UserError as e:
          error = str(e)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
          error = f"malformed record ({type(e).__name__}: {e})"
      if error is not None:
        skipped[reason] += 1
        first_bad = first_bad or f"{origin}: {error}"
    bad = total - len(chunks)
    if not total:
      raise UserError(f"{self.path}: holds no records (an empty file or an empty JSON list)")
    if not chunks or bad > max_bad_fraction * total:
      raise UserError(f"{self.path}: {bad} of {total} records are malformed (tolerated: "
                      f"max_bad_fraction={max_bad_fraction}); first: {first_bad}")
    self._blob = b"".join(chunks)
    self._offsets = np.cumsum([0] + [len(c) for c in chunks], dtype=np.int64)
    self.skipped: dict[str, int] = dict(skipped)  # malformed records by reason

  def parse(self, obj: dict) -> dict:
    """One raw JSON object -> a record (image paths still relative); raises `UserError`."""
    raise NotImplementedError

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> dict:
    record = json.loads(self._blob[self._offsets[index]:self._offsets[index + 1]])
    try:
      record["images"] = [resolve_image_path(p, self.image_roots) for p in record["images"]]
    except BadImage as e:
      raise BadImage(e.reason, f"{record['origin']}: {e}") from None
    return record


class ConversationSource(JsonRecordSource):
  """LLaVA instruction data: a JSON list or JSONL of `{"id", "image": path | [paths],
  "conversations": [{"from": "human" | "gpt", "value"}, ...]}`; text-only records have no image."""

  def parse(self, obj: dict) -> dict:
    images = _images_field(obj)
    turns = _llava_turns(obj.get("conversations"), "conversations")
    if not any(t["from"] == "gpt" for t in turns):
      raise UserError("the conversation has no 'gpt' turn to learn from")
    return {**_extras(obj, ("image", "images", "conversations")), "images": images,
            "conversations": ensure_image_placeholders(turns, len(images))}


def _answer(value, key: str) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, list) and value:  # TRL's conversational layout: a list ending in the answer
    last = to_messages(value)[-1]
    if last["role"] == "assistant":
      return last["content"]
  raise UserError(f"'{key}' must be a string or a list of turns ending with the assistant's")


class PreferenceSource(JsonRecordSource):
  """Preference pairs, in either layout:
  flat (TRL/STIC): `{"id", "image"|"images", "prompt": str | [turns], "chosen", "rejected"}`;
  LLaVA (CSR): `{"id", "image", "conversations": [..., gpt chosen], "rejected_conversations":
  [..., gpt rejected]}`. Extra keys such as `ref_chosen_logp` pass through."""

  def parse(self, obj: dict) -> dict:
    images = _images_field(obj)
    if "conversations" in obj:
      chosen_turns = _llava_turns(obj["conversations"], "conversations")
      rejected_turns = _llava_turns(obj.get("rejected_conversations"), "rejected_conversations")
      if chosen_turns[-1]["from"] != "gpt" or rejected_turns[-1]["from"] != "gpt":
        raise UserError("'conversations' and 'rejected_conversations' must end with a 'gpt' turn")
      prompt, chosen, rejected = chosen_turns[:-1], chosen_turns[-1]["value"], rejected_turns[-1]["value"]
      consumed = ("image", "images", "conversations", "rejected_conversations")
    else:
      raw = obj.get("prompt")
      prompt = [{"from": "human", "value": raw}] if isinstance(raw, str) else _llava_turns(raw, "prompt")
      chosen, rejected = _answer(obj.get("chosen"), "chosen"), _answer(obj.get("rejected"), "rejected")
      consumed = ("image", "images", "prompt", "chosen", "rejected")
    if not prompt or prompt[-1]["from"] != "human":
      raise UserError("the prompt must end with a 'human' turn")
    return {**_extras(obj, consumed), "images": images,
            "prompt": ensure_image_placeholders(prompt, len(images)),
            "chosen": chosen, "rejected": rejected}


class GroundingSource(JsonRecordSource):
  """Boxes on images: `{"id", "image", "box": [x1, y1, x2, y2] normalised to [0, 1],
  "expression": str (optional)}`; SC-Tune's `image_id`/`bbox` spelling is accepted too."""

  def parse(self, obj: dict) -> dict:
    images = _images_field(obj, ("image", "image_id", "images"))
    if len(images) != 1:
      raise UserError(f"a grounding record needs exactly one image, got {len(images)}")
    box = obj.get("box", obj.get("bbox"))
    if (not isinstance(box, list) or len(box) != 4
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
      raise UserError(f"'box' must be four numbers [x1, y1, x2, y2], got {box!r}")
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
      raise UserError(f"'box' {box} must be normalised to [0, 1] with x1 < x2 and y1 < y2")
    expression = obj.get("expression")
    if expression is not None and not isinstance(expression, str):
      raise UserError("'expression' must be a string")
    return {**_extras(obj, ("image", "image_id", "images", "box", "bbox", "expression")),
            "images": images, "box": [float(v) for v in box], "expression": expression}


class Mixture:
  """Several sources as one: each repeated an integer number of times (LLaVA/CaD-VI listing a file
  twice), or drawn in proportion to `weights` to `num_examples` records in all (default: the
  sources' total), a seeded random subset or cycle of each source, evenly interleaved."""

  def __init__(self, sources: Sequence, *, repeats: Sequence[int] | None = None,
               weights: Sequence[float] | None = None, num_examples: int | None = None,
               seed: int = 0):
    if not sources:
      raise UserError("a mixture needs at least one source")
    if repeats is not None and weights is not None:
      raise UserError("give a mixture either repeats or weights, not both")
    sizes = [len(s) for s in sources]
    if not all(sizes):
      raise UserError(f"a mixture's sources must not be empty; sizes: {sizes}")
    if weights is None:
      repeats = [1] * len(sources) if repeats is None else list(repeats)
      if len(repeats) != len(sources) or any(int(r) != r or r < 0 for r in repeats):
        raise UserError(f"repeats {repeats} must be one non-negative integer per source")
      which = np.repeat(np.arange(len(sources)), [n * r for n, r in zip(sizes, repeats)])
      local = np.concatenate([np.tile(np.arange(n), r) for n, r in zip(sizes, repeats)])
    else:
      if len(weights) != len(sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"weights {list(weights)} must be one non-negative number per source")
      total = sum(sizes) if num_examples is None else num_examples
      share = np.asarray(weights, np.float64) / sum(weights) * total
      counts = np.floor(share).astype(np.int64)
      counts[np.argsort(counts - share)[:total - counts.sum()]] += 1  # largest remainders
      rng = np.random.default_rng(seed)
      which = np.repeat(np.arange(len(sources)), counts)
      local = np.concatenate([rng.permutation(n)[np.arange(c) % n] for n, c in zip(sizes, counts)])
      # Interleave: the k-th draw of a source sits at fraction (k + 0.5) / count of the stream.
      position = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
      order = np.argsort(position, kind="stable")
      which, local = which[order], local[order]
    self.sources = list(sources)
    self._which, self._local = which.astype(np.int32), local.astype(np.int64)

  @property
  def skipped(self) -> dict[str, int]:
    """Malformed records skipped while the sources were parsed, by reason."""
    total = Counter()
    for source in {id(s): s for s in self.sources}.values():  # a source listed twice counts once
      total.update(getattr(source, "skipped", {}))
    return dict(total)

  def __len__(self) -> int:
    return len(self._which)

  def __getitem__(self, index: int) -> dict:
    return self.sources[self._which[index]][int(self._local[index])]
