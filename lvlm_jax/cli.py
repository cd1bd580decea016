"""What every command-line entry point shares: user errors as one line and exit code 2."""

import sys
from typing import Callable

from lvlm_jax.errors import UserError


def run_cli(main: Callable[[], int | None]) -> None:
  """Runs `main`; a UserError prints `error: <message>` to stderr (no traceback) and exits 2."""
  try:
    code = main()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)
