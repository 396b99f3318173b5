"""One exception type for every user-facing failure.

A ``SasaError`` message is a single line that names the problem and the fix; the ``sasa``
command prints it as ``sasa: error: ...`` and exits with status 2, without a traceback.
Anything else that escapes is a bug and keeps its traceback.
"""


class SasaError(Exception):
    """A problem with the user's input or environment, explained in one line."""
