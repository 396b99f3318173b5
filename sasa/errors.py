"""One exception type for every user-facing failure.

A ``SasaError`` message is a single line that names the problem and the fix; the ``sasa``
command prints it as ``sasa: error: ...`` and exits with status 2, without a traceback.
Anything else that escapes is a bug and keeps its traceback.
"""


class SasaError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def check_writable(target, what: str = "--out", *, folder: bool = True) -> None:
    """Refuse an output location sasa cannot write, before any work is done.

    ``target`` is a local path or an fsspec URL (URLs other than ``file://`` are left to the
    store, which reports its own errors). ``folder`` says whether the output is a folder (a
    run, a cache) or a file (a report, an eval.json). The check creates and removes one
    temporary file in the nearest existing ancestor; it leaves nothing behind.
    """
    import os
    import tempfile

    text = str(target)
    if "://" in text:
        if not text.startswith("file://"):
            return
        text = text[len("file://"):]
    path = os.path.abspath(text)
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise SasaError(f"{what} {target} is a file, not a folder; pass a folder path")
        if not folder and os.path.isdir(path):
            raise SasaError(f"{what} {target} is a folder; pass a file path")
    ancestor = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise SasaError(f"{what} {target} cannot be created: {ancestor} is a file, not a folder; "
                        "choose another path")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".sasa-write-check-"):
            pass
    except OSError as err:
        raise SasaError(f"{what} {target} is not writable (cannot create a file in {ancestor}: "
                        f"{err.strerror or err}); choose a location you can write to") from None
