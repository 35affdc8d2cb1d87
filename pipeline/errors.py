"""The one exception type the CLI turns into a one-line error message, and the helpers that keep
messages about other exceptions to one line."""

import errno

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, a file-size limit, a quota


class PipelineError(Exception):
    """A problem with the user's input or environment, explained in one line.

    Anything raised as PipelineError is expected and actionable, so the CLI prints
    it without a traceback (``--debug`` shows one).
    """


def first_line(e: BaseException) -> str:
    """What a library's exception says, in one line (its type when it says nothing)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
