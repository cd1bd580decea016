"""Reading benchmark files: every problem is a `UserError` naming the file and the row."""

import json
import os
from typing import Any

from lvlm_jax.errors import UserError


def exists(path: str, what: str) -> str:
  """`path`, or a UserError saying which file the benchmark wanted."""
  if not os.path.exists(path):
    raise UserError(f"{path}: no such file ({what})")
  return path


def read_json(path: str, what: str) -> Any:
  exists(path, what)
  try:
    with open(path, encoding="utf-8-sig") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e}); expected {what}") from None


def field(row: dict, key: str, where: str, kind: type | tuple = str) -> Any:
  """row[key], which must be of `kind`; else a UserError naming `where` (file:line)."""
  if key not in row:
    raise UserError(f"{where}: missing {key!r}")
  value = row[key]
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
    names = "/".join(k.__name__ for k in kinds)
    raise UserError(f"{where}: {key!r} must be a {names}, not {type(value).__name__}")
  return value


def folder(path: str | None, data: str) -> str:
  """The image folder: `path`, else the folder `data` is in (or `data` when it is a folder)."""
  if path is None:
    return data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))
  if not os.path.isdir(path):
    raise UserError(f"--images {path}: no such directory")
  return path
