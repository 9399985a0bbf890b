"""The one exception type the CLI turns into a one-line error and a non-zero exit, and the one way to warn."""
import sys


class SymphonyError(Exception):
    """A user-facing error: bad input, bad config, an unusable checkpoint. The message says what and where."""


def warn(message: str):
    """One `warning: ...` line on stderr: something the user should know that does not stop the command."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
