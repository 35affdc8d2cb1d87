"""The one exception type the CLI turns into a one-line error message."""


class PipelineError(Exception):
    """A problem with the user's input or environment, explained in one line.

    Anything raised as PipelineError is expected and actionable, so the CLI prints
    it without a traceback (``--debug`` shows one).
    """
