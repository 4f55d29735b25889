"""One error type for every mistake a user can fix: the CLI prints its message on one line and exits 2."""


class GlasslabError(Exception):
    """A user-facing error. The message names the problem and the fix, on one line."""
