"""Files a method pipeline's stages leave in the workdir: complete, or resumable, never half-written.

A stage's output appears under its final name only when complete (written to a temporary name,
then renamed), so "the file exists" means "the stage is done". Generated records go to
`PATH.partial` batch by batch; a stage killed midway resumes after the last complete batch,
which regenerates nothing already on disk and (batches being deterministic) gives the file an
uninterrupted run writes. Process 0 writes; with several hosts the workdir must be shared.
"""

import json
import os
from typing import Any

import jax


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented JSON at `path`, atomically (process 0 only)."""
  if jax.process_index():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
  os.replace(tmp, path)


def write_jsonl(path: str, records: list[dict]) -> None:
  """One JSON object per line at `path`, atomically (process 0 only)."""
  if jax.process_index():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  os.replace(tmp, path)


def append_jsonl(path: str, records: list[dict]) -> None:
  """`records` appended to `path`, one JSON object per line, on disk (fsynced) before returning
  (process 0 only): a kill loses at most the records of the call in flight."""
  if jax.process_index() or not records:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class JsonlWriter:
  """Records appended in batches of `batch_size` to `path.partial`, renamed to `path` by `close`."""

  def __init__(self, path: str, batch_size: int):
    self.path, self.partial, self.batch_size = path, path + ".partial", batch_size

  def resume(self) -> int:
    """Records already written in complete batches; anything after them (a batch cut short by a
    kill, a torn last line) is dropped from the partial file."""
    if not os.path.exists(self.partial):
      return 0
    with open(self.partial, "rb") as f:
      lines = f.read().split(b"\n")[:-1]  # the last piece has no newline: torn or empty
    kept = []
    for line in lines:
      try:
        json.loads(line)
      except ValueError:
        break
      kept.append(line)
    kept = kept[:len(kept) // self.batch_size * self.batch_size]
    if jax.process_index() == 0:
      with open(self.partial + ".tmp", "wb") as f:
        f.write(b"".join(line + b"\n" for line in kept))
      os.replace(self.partial + ".tmp", self.partial)
    return len(kept)

  def append(self, records: list[dict]) -> None:
    """One batch of records, flushed to disk before returning."""
    append_jsonl(self.partial, records)

  def close(self) -> None:
    """Publishes the file under its final name."""
    if jax.process_index() == 0:
      if not os.path.exists(self.partial):
        open(self.partial, "w").close()
      os.replace(self.partial, self.path)
