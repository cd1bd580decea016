"""Reading the JSONL files users give (generate's prompts, benchmark rows): strictly, every
problem a UserError naming the file and the line. (Training data is read leniently instead,
counting malformed lines: data/sources.py.)"""

import codecs
import json

from lvlm_jax.errors import UserError


def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
  """(line number, object) of each non-blank line of a JSONL file a user gives (UTF-8, an
  optional BOM); a line that is not UTF-8, not JSON or not an object, and a file without one,
  are UserErrors naming the file (and line) and `what` it should hold."""
  try:
    with open(path, "rb") as f:
      lines = f.read().removeprefix(codecs.BOM_UTF8).split(b"\n")
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror} ({what})") from None
  rows = []
  for number, raw in enumerate(lines, 1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UserError(f"{path}:{number}: not valid UTF-8 (byte {e.start} of the line: "
                      f"{e.reason}); save the file as UTF-8") from None
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); expected {what}") from None
    if not isinstance(row, dict):
      raise UserError(f"{path}:{number}: expected a JSON object ({what})")
    rows.append((number, row))
  if not rows:
    raise UserError(f"{path}: holds no records; expected {what}")
  return rows
