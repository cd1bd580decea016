"""Predictions as an append-only JSONL keyed by item id: a rerun skips the ids already answered.

Each batch is appended and fsynced before the next starts, so a kill loses at most the batch in
flight; a torn last line (a kill mid-write) is dropped on the next start. Process 0 writes;
every process reads (with several hosts the output folder must be shared).
"""

import json
import os

import jax

from lvlm_jax.artifacts import append_jsonl
from lvlm_jax.errors import UserError


class PredictionLog:
  """Records `{"id": ..., "answer": ...}` (or `"error"` for a skipped item) at `path`."""

  def __init__(self, path: str):
    self.path = path

  def read(self) -> dict[str, dict]:
    """The records already written, by id; a torn last line is cut off the file."""
    if not os.path.exists(self.path):
      return {}
    with open(self.path, "rb") as f:
      data = f.read()
    lines = data.split(b"\n")
    complete, torn = lines[:-1], lines[-1]
    records = {}
    for number, line in enumerate(complete, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        raise UserError(f"{self.path}:{number}: not valid JSON; the predictions file is "
                        "damaged: delete it (or the line) and run again") from None
      records[record["id"]] = record
    if torn.strip() and jax.process_index() == 0:
      with open(self.path, "r+b") as f:
        f.truncate(len(data) - len(torn))
    return records

  def append(self, records: list[dict]) -> None:
    append_jsonl(self.path, records)
