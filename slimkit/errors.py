"""The one exception users see: a clear sentence naming the problem and what to do."""


class SlimkitError(ValueError):
    """Bad input or an unsupported case; the CLI prints its message on one line and exits with code 2."""
