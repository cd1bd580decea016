"""Preemption: SIGTERM becomes a request that long work honours at its next safe point.

A preemptible TPU pod sends SIGTERM and waits a little before killing. The default handler
would end the process at once, mid-stage. Once `install()`ed (the train CLI does it first
thing), SIGTERM only sets a flag: the training loop saves a checkpoint and returns at the next
step boundary, generation stages stop after their last complete batch (`check()`), and a
pipeline stops before its next stage. The CLI then exits 75 ("run me again").
"""

import contextlib
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

_state = {"requested": False, "installed": False}


class Preempted(Exception):
  """Raised at a safe point after SIGTERM: everything finished so far is on disk."""


def _handle(signum, frame) -> None:
  del signum, frame
  _state["requested"] = True


def install() -> None:
  """Routes SIGTERM to the flag from now on (main thread only; idempotent)."""
  if not _state["installed"]:
    signal.signal(signal.SIGTERM, _handle)
    _state["installed"] = True


@contextlib.contextmanager
def during():
  """SIGTERM routed to the flag inside the block, unless `install` did it for the whole process
  already; the previous handler comes back after (a library caller's process keeps its own)."""
  if _state["installed"]:
    yield
    return
  previous = signal.signal(signal.SIGTERM, _handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def request() -> None:
  """Asks for a stop, as SIGTERM would (tests, and `stop_at`-style hooks)."""
  _state["requested"] = True


def clear() -> None:
  """Forgets a request (a new run in the same process, e.g. tests)."""
  _state["requested"] = False


def requested() -> bool:
  """Whether this process was asked to stop."""
  return _state["requested"]


def anywhere() -> bool:
  """Whether any process was asked to stop (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return _state["requested"]
  return bool(np.any(multihost_utils.process_allgather(np.int32(_state["requested"]))))


def check() -> None:
  """Raises Preempted if any process was asked to stop (a collective, as `anywhere`)."""
  if anywhere():
    raise Preempted()
