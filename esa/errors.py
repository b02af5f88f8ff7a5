"""The one exception type that reaches the user as a one-line message."""


class EsaError(Exception):
    """A problem the user can fix: bad input, a missing file, a refused configuration.

    The CLI prints ``error: <message>`` and exits with status 2; no traceback. Messages are one line and say
    what to do about it.
    """
