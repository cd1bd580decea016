"""The one exception type for mistakes a user can make (bad config, bad file, bad flag)."""


class UserError(Exception):
  """A problem the user can fix; CLIs print its message on one line, without a traceback, and exit 2."""
