"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class SymphonyError(Exception):
    """A user-facing error: bad input, bad config, an unusable checkpoint. The message says what and where."""
