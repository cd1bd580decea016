"""What every command-line entry point shares: every failure is one line on stderr, nothing hangs.

A UserError (bad config, file, flag) prints `error: <message>` and exits 2. Any other exception
is a bug or an environment problem: it prints `error: <Type>: <message>` with a hint and exits 1.
Libraries' log records keep their message but lose their traceback (Orbax logs one per failed
background thread), and exceptions that die in threads are one `warning:` line each.
`LVLM_JAX_DEBUG=1` in the environment shows every traceback instead.
"""

import logging
import os
import sys
import threading
from typing import Callable

from lvlm_jax.errors import UserError

DEBUG_ENV = "LVLM_JAX_DEBUG"


def debugging() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line_reports() -> None:
  """Log records with an exception carry its type and message instead of its traceback, and
  exceptions no one catches (in threads, native callbacks) are one warning line each."""
  make_record = logging.getLogRecordFactory()
  if getattr(make_record, "one_line", False):
    return

  def factory(*args, **kwargs):
    record = make_record(*args, **kwargs)
    if record.exc_info and record.exc_info[1] is not None:
      error = record.exc_info[1]
      suffix = f" ({type(error).__name__}: {' '.join(str(error).split())[:300]})"
      record.msg = str(record.msg) + (suffix.replace("%", "%%") if record.args else suffix)
      record.exc_info, record.exc_text = None, None
    return record

  factory.one_line = True
  logging.setLogRecordFactory(factory)
  # What dies in a library's thread or native callback after the failure (tensorstore calling
  # into a closed asyncio loop) reaches these hooks: one line each.
  sys.excepthook = lambda kind, error, _: _warn(f"{kind.__name__}: {error}")
  threading.excepthook = lambda hook: _warn(f"{hook.exc_type.__name__} in a thread: "
                                            f"{hook.exc_value}")
  sys.unraisablehook = lambda u: _warn(f"{type(u.exc_value).__name__} ignored: {u.exc_value}")


_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn(message: str) -> None:
  """`warning: message` on stderr, once per distinct message (dying threads repeat theirs)."""
  line = f"warning: {' '.join(message.split())[:300]}\n"
  with _warn_lock:
    if line not in _warned:
      _warned.add(line)
      sys.stderr.write(line)


def _exit(code: int) -> None:
  """Exits with `code`. After a failure, a library thread still running (an Orbax save waiting
  out a barrier after its sibling failed, a reader thread) would hold the interpreter's shutdown
  for minutes: leave without joining it. A success exits normally (atexit handlers and buffered
  files are flushed)."""
  if code and any(t.is_alive() and not t.daemon for t in threading.enumerate()
                  if t is not threading.current_thread()):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def device_line(tool: str) -> str:
  """What JAX runs on, e.g. `lvlm_jax.train: JAX 0.10.2 on tpu, 8 devices (4 on this host, 2
  processes)`: a CPU-only jaxlib on an accelerator host shows in the first line."""
  import jax
  return (f"{tool}: JAX {jax.__version__} on {jax.default_backend()}, {jax.device_count()} "
          f"devices ({jax.local_device_count()} on this host, {jax.process_count()} processes)")


def print_devices(tool: str) -> None:
  """`device_line(tool)` on stderr, from process 0 only. Call it after multi-process start-up
  (`sharding.initialize`), which must come before anything touches the devices."""
  import jax
  if jax.process_index() == 0:
    print(device_line(tool), file=sys.stderr, flush=True)


def run_cli(main: Callable[[], int | None]) -> None:
  """Runs `main` and exits with its code (0 for None); failures as the module docstring says."""
  if not debugging():
    _one_line_reports()
  try:
    code = main()
  except UserError as e:
    if debugging():
      raise
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    _exit(2)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    _exit(130)
  except Exception as e:  # the one place that turns unexpected failures into one line
    if debugging():
      raise
    message = " ".join(str(e).split())[:500]
    print(f"error: {type(e).__name__}: {message} (unexpected; rerun with {DEBUG_ENV}=1 for the "
          "traceback and report it)", file=sys.stderr)
    _exit(1)
  _exit(code or 0)
