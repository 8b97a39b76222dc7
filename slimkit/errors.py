"""The one exception users see: a clear sentence naming the problem and what to do."""


class SlimkitError(ValueError):
    """Bad input or an unsupported case; the CLI prints its message on one line and exits with code 2."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn attributed to the first caller outside slimkit: the user's line, however deep inside slimkit
    the warning is raised and whichever public function led there."""
    import os
    import sys
    import warnings

    root = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(root + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def brief(e: BaseException, limit: int = 300) -> str:
    """'Type: message' in at most about `limit` characters: a long message (a Triton compile error: the source
    excerpt first, the cause last) keeps its start and its end."""
    msg = str(e).strip()
    if len(msg) > limit:
        msg = msg[: limit // 3] + " ... " + msg[-(limit - limit // 3):]
    return f"{type(e).__name__}: {msg}"
