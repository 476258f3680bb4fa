"""prunekit: make language and vision-language models smaller, with numbers at every step."""

__version__ = "0.1.0"


class PrunekitError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""
