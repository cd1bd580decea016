"""Frozen-dataclass configs <-> locked ml_collections ConfigDicts, with their help text.

Every config section is a frozen dataclass whose fields carry help (`metadata={"help": ...}`, or
a trailing `# comment` on the field's line). `to_config_dict` turns defaults into a ConfigDict a
config file edits and the command line overrides (`--config.optim.lr=1e-5`); locking it makes a
misspelled key an error, and ConfigDict refuses a value of the wrong type. `from_config_dict`
builds the dataclass back, checking what a ConfigDict cannot (unknown keys in files, element types).
"""

import dataclasses
import importlib.util
import inspect
import math
import os
import re
import traceback
import types
import typing
from typing import Any

from ml_collections import config_dict

from lvlm_jax.errors import UserError


def help_field(default, doc: str):
  """A dataclass field with a default and the help text `field_help` and `--help` show."""
  return dataclasses.field(default=default, metadata={"help": doc})


def _optional_type(annotation) -> type | None:
  """`X | None` -> X for a simple X (so a None default still has a type); else None."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type):
      return args[0]
  return None


def _inner(exclude: tuple[str, ...], name: str) -> tuple[str, ...]:
  return tuple(e.removeprefix(name + ".") for e in exclude if e.startswith(name + "."))


def to_config_dict(obj: Any, exclude: tuple[str, ...] = ()) -> config_dict.ConfigDict:
  """A dataclass instance (nested ones included) as a ConfigDict of its field values, less the
  `exclude`d fields (dotted names reach into nested sections: 'pipeline.batch_size')."""
  hints = typing.get_type_hints(type(obj))
  out = config_dict.ConfigDict()
  for field in dataclasses.fields(obj):
    if field.name in exclude:
      continue
    value = getattr(obj, field.name)
    if dataclasses.is_dataclass(value):
      out[field.name] = to_config_dict(value, _inner(exclude, field.name))
    elif value is None and _optional_type(hints[field.name]) is not None:
      out[field.name] = config_dict.placeholder(_optional_type(hints[field.name]))
    else:
      out[field.name] = value
  return out


def _check(value, annotation, where: str):
  """Converts lists to tuples and checks element types of the annotations configs use."""
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if annotation is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    for arg in (a for a in args if a is not type(None)):
      try:
        return _check(value, arg, where)
      except UserError:
        continue
    raise UserError(f"{where}={value!r}: expected {annotation}")
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      raise UserError(f"{where}={value!r}: expected a tuple")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
      raise UserError(f"{where}={value!r}: expected {len(args)} entries")
    return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if annotation is float and isinstance(value, float) and not math.isfinite(value):
    # NaN passes every `x < 0` range check and poisons a whole run; no setting means infinity.
    raise UserError(f"{where}={value!r}: expected a finite number")
  if isinstance(annotation, type) and not isinstance(value, annotation):
    raise UserError(f"{where}={value!r}: expected {annotation.__name__}, got {type(value).__name__}")
  return value


def from_config_dict(cls: type, values, where: str, **given) -> Any:
  """`cls(**values)` for a dataclass: nested sections recursively, `given` fields set by the
  caller. Raises UserError naming the key for an unknown key or a value of the wrong type."""
  values = values.to_dict() if isinstance(values, config_dict.ConfigDict) else dict(values)
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise UserError(f"{where}.{unknown[0]}: unknown key; known keys: {', '.join(sorted(names))}")
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
      kwargs[name] = from_config_dict(hint, value, f"{where}.{name}")
    else:
      kwargs[name] = _check(value, hint, f"{where}.{name}")
  kwargs.update(given)
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise UserError(f"{where}: {e}") from None


def field_help(cls: type) -> dict[str, str]:
  """Help text per field: the `help` metadata, else the comment ending the field's source line
  or the comment lines right above it, else `name: text.` in the class docstring, else the
  docstring's first line."""
  try:
    lines = inspect.getsource(cls).splitlines()
  except (OSError, TypeError):
    lines = []
  comments = {}
  for i, line in enumerate(lines):
    match = re.match(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.+))?$", line)
    if not match or line.strip().startswith("#"):
      continue
    above = []
    for previous in reversed(lines[:i]):
      if not previous.strip().startswith("#"):
        break
      above.insert(0, previous.strip().lstrip("#").strip())
    comments[match.group(1)] = match.group(2) or " ".join(above)
  doc = inspect.getdoc(cls) or ""
  for match in re.finditer(r"(?:^|\s)(\w+): ([^:]+?\.)(?=\s+\w+:|\s*$)", doc):
    if not comments.get(match.group(1)):
      comments[match.group(1)] = match.group(2).strip()
  fallback = f"part of {cls.__name__}: {doc.splitlines()[0]}" if doc else ""
  return {f.name: " ".join((f.metadata.get("help") or comments.get(f.name) or fallback).split())
          for f in dataclasses.fields(cls)}


def help_lines(cls: type, prefix: str, exclude: tuple[str, ...] = ()) -> list[str]:
  """`prefix.field (default): help` for every field, nested sections expanded."""
  helps = field_help(cls)
  hints = typing.get_type_hints(cls)
  defaults = cls()
  lines = []
  for field in dataclasses.fields(cls):
    if field.name in exclude:
      continue
    value = getattr(defaults, field.name)
    if dataclasses.is_dataclass(hints[field.name]):
      lines += help_lines(hints[field.name], f"{prefix}.{field.name}", _inner(exclude, field.name))
      continue
    lines.append(f"  {prefix}.{field.name} (default {value!r}): {helps[field.name]}".rstrip(": "))
  return lines


def method_defaults(method: str, sections: dict[str, type],
                    excluded: dict[str, tuple[str, ...]]) -> config_dict.ConfigDict:
  """A method's config at its defaults: `method` and one section per dataclass of `sections`
  (less the `excluded` fields, which the run sets); config files start from this."""
  config = config_dict.ConfigDict()
  config.method = method
  for name, cls in sections.items():
    config[name] = to_config_dict(cls(), exclude=excluded.get(name, ()))
  return config


def method_help(method: str, sections: dict[str, type],
                excluded: dict[str, tuple[str, ...]]) -> list[str]:
  """`--help` lines of a method's config keys."""
  lines = [f"  config.method: the method to run ({method!r})."]
  for name, cls in sections.items():
    lines += help_lines(cls, f"config.{name}", excluded.get(name, ()))
  return lines


def parse_method(cls: type, config) -> Any:
  """A method's typed config (`cls`) from its ConfigDict or dict; a UserError names any unknown
  key or bad value."""
  values = config.to_dict() if isinstance(config, config_dict.ConfigDict) else dict(config)
  values.pop("method", None)
  return from_config_dict(cls, values, "config")


def load_config_file(path: str, flag: str = "--config") -> config_dict.ConfigDict:
  """`get_config()` of a Python config file; its errors as UserErrors naming the file and line."""
  if not os.path.exists(path):
    raise UserError(f"{flag} {path}: no such file")
  spec = importlib.util.spec_from_file_location("lvlm_jax_user_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config()
  except SyntaxError as e:
    raise UserError(f"{flag} {path}:{e.lineno}: SyntaxError: {e.msg}") from None
  except Exception as e:  # a config file is a program: it can raise anything
    line = next((frame.lineno for frame in reversed(traceback.extract_tb(e.__traceback__))
                 if os.path.abspath(frame.filename) == os.path.abspath(path)), None)
    where = f"{path}:{line}" if line else path
    raise UserError(f"{flag} {where}: {type(e).__name__}: {e}") from None


def sibling_config(config_file: str, name: str) -> config_dict.ConfigDict:
  """The config of the file `name` beside `config_file` (a config file's `__file__`), wherever
  it is run from: how a config starts from another's recipe or reads the quickstart's world."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))
