"""Checks that an output can be written, made before the work whose result it will hold.

A CLI that finds out only at the end that its output folder is a file, read-only or full loses
everything it computed; these checks write (and remove) a probe file first. The probe writes a
byte, so a read-only mount and a full disk fail here too, also for root (which ignores mode bits).
"""

import os
import tempfile

from lvlm_jax.errors import UserError


def _unwritable(directory: str) -> str | None:
  """Why no file can be written in `directory` (created if missing), or None if one can."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    return "exists and is not a directory"
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe_") as probe:
      probe.write(b"0")
      probe.flush()
      os.fsync(probe.fileno())
  except OSError as e:
    return f"cannot write there ({e.strerror or e})"
  return None


def check_output_dir(path: str, what: str) -> None:
  """Creates directory `path` if missing and checks that a file can be written in it; `what`
  names it in the error (a flag, 'workdir')."""
  reason = _unwritable(path)
  if reason:
    raise UserError(f"{what} {path}: {reason}")


def check_output_file(path: str, what: str) -> None:
  """Checks that file `path` can be written (its folder is created if missing)."""
  if os.path.isdir(path):
    raise UserError(f"{what} {path}: is a directory, expected a file name")
  folder = os.path.dirname(os.path.abspath(path))
  reason = _unwritable(folder)
  if reason:
    raise UserError(f"{what} {path}: its folder {folder} {reason}")
