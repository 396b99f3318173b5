"""Documents to harvest: the built-in corpus and loaders for user files.

Every source yields documents one at a time, in a fixed order, so packing never holds the
whole dataset and the same input always gives the same token stream. A document is a ``str``
(to be tokenised) or, for already tokenised data, a list of token ids.

The built-in corpus is real English prose that every machine with sasa installed already has,
so ``sasa harvest --out DIR`` works with no network: the docstrings of the Python standard
library (read with ``ast``, never imported; test suites and ``>>>`` examples skipped), then
the language reference
in ``pydoc_data.topics``, then the docstrings of numpy and torch (sasa's own dependencies).
Together that is well over a million MiniLM tokens; it is read lazily in that order and stops
as soon as enough tokens are packed. Its contents depend on the installed Python, numpy and
torch, so the dataset's revision records their versions and a fingerprint of every file it
can read (path and size, and the topics' lengths): two installs with the same version strings can
still differ (one measured machine yielded 2.2M tokens where another had given over 4.3M,
bench/RESULTS_minilm.md round 10), and a resumed harvest or a comparison of caches must see it.
Computing it stats each file once and reads none.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, NamedTuple

from sasa.errors import SasaError

BUILTIN_NAME = "sasa-builtin-docstrings-v1"
# Folders whose docstrings are code-heavy or duplicated: skipped for cleaner prose.
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "lib2to3", "site-packages", "dist-packages",
              "__pycache__", "_vendor", "vendored", "third_party"}
_BATCH_ROWS = 1024


class DocumentSource(NamedTuple):
    """A dataset, opened: what it is, and a way to iterate its documents from the start."""
    name: str                               # as the user named it (or the built-in name)
    revision: str                           # content hash or versions that fix the contents
    kind: str                               # "text" or "input_ids"
    documents: Callable[[], Iterator]       # each call starts a fresh, identical iteration


def open_dataset(spec: str | None, text_column: str = "text") -> DocumentSource:
    """Open ``spec`` (None: the built-in corpus) and check it has a usable column."""
    if spec is None:
        return builtin_corpus()
    path = Path(spec)
    if not path.exists():
        raise SasaError(f"dataset {spec!r} not found; pass a .txt, .jsonl or .parquet file or a "
                        "folder written by datasets' save_to_disk")
    if path.is_dir():
        return _datasets_folder(path, text_column)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return DocumentSource(spec, _file_hash(path), "text", lambda: _txt_documents(path))
    if suffix in (".jsonl", ".json"):
        return _jsonl(path, text_column)
    if suffix == ".parquet":
        return _parquet(path, text_column)
    raise SasaError(f"dataset {spec!r}: unknown file type {suffix or '(none)'}; use .txt, .jsonl, "
                    ".parquet or a datasets folder")


def _pick_column(spec, columns, text_column: str) -> tuple[str, str]:
    if text_column in columns:
        return text_column, "text"
    if "input_ids" in columns:
        return "input_ids", "input_ids"
    raise SasaError(f"dataset {spec!r} has no {text_column!r} column (columns: "
                    f"{', '.join(map(str, columns)) or 'none'}); pass --text-column NAME, or "
                    "give token lists in an input_ids column")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _not_text(path: Path, err: UnicodeDecodeError, line: int | None = None) -> SasaError:
    where = f"line {line}" if line is not None else f"byte {err.start}"
    return SasaError(f"dataset {str(path)!r} is not UTF-8 text ({where}: {err.reason}); pass a text "
                     "file, or convert it (e.g. iconv -t utf-8)")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of a UTF-8 text file; a binary file is a one-line error."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if b"\0" in raw:
                raise SasaError(f"dataset {str(path)!r} holds binary data (a NUL byte on line {n}); "
                                "pass a UTF-8 text file")
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_text(path, err, n) from None


def _txt_documents(path: Path) -> Iterator[str]:
    """One document per blank-line-separated paragraph."""
    para: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para).strip()
            para = []
    if para:
        yield "".join(para).strip()


def _json_line(path: Path, n: int, line: str):
    try:
        return json.loads(line)
    except ValueError as err:
        raise SasaError(f"dataset {str(path)!r} line {n} is not JSON ({err.msg}); each line must be "
                        "one JSON object") from None


def _jsonl(path: Path, text_column: str) -> DocumentSource:
    first = None
    for n, line in _lines(path):
        if line.strip():
            first = _json_line(path, n, line)
            break
    if first is None:
        raise SasaError(f"dataset {str(path)!r} is empty; it holds no records")
    if not isinstance(first, dict):
        raise SasaError(f"dataset {str(path)!r}: each line must be a JSON object with a "
                        f"{text_column!r} field")
    column, kind = _pick_column(str(path), list(first), text_column)

    def documents():
        for n, line in _lines(path):
            if not line.strip():
                continue
            record = _json_line(path, n, line)
            value = record.get(column) if isinstance(record, dict) else None
            if value is None:
                raise SasaError(f"dataset {str(path)!r} line {n} has no {column!r} field")
            yield value
    return DocumentSource(str(path), _file_hash(path), kind, documents)


def _parquet(path: Path, text_column: str) -> DocumentSource:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise SasaError(f"dataset {str(path)!r} is not a readable Parquet file ({str(err).splitlines()[0]}); "
                        "restore it or pass another file") from None
    column, kind = _pick_column(str(path), pf.schema_arrow.names, text_column)
    if pf.metadata.num_rows == 0:
        raise SasaError(f"dataset {str(path)!r} is empty; it holds no rows")

    def documents():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=[column]):
            yield from batch.column(0).to_pylist()
    return DocumentSource(str(path), _file_hash(path), kind, documents)


def _datasets_folder(path: Path, text_column: str) -> DocumentSource:
    try:
        import datasets
    except ImportError:
        raise SasaError("reading a datasets folder needs the datasets package; "
                        "pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise SasaError(f"dataset folder {str(path)!r} was not written by datasets' "
                        "save_to_disk; pass that folder, or a .txt/.jsonl/.parquet file") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise SasaError(f"dataset {str(path)!r} has splits {', '.join(ds)} but no 'train'; "
                            "pass the folder of one split")
        ds = ds["train"]
    column, kind = _pick_column(str(path), ds.column_names, text_column)
    if len(ds) == 0:
        raise SasaError(f"dataset {str(path)!r} is empty; it holds no rows")

    def documents():
        for start in range(0, len(ds), _BATCH_ROWS):
            yield from ds[start:start + _BATCH_ROWS][column]
    return DocumentSource(str(path), ds._fingerprint, kind, documents)


# -- the built-in corpus ------------------------------------------------------------------
def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def _py_files(root: Path) -> Iterator[Path]:
    """The ``.py`` files under ``root`` that the corpus reads, in its (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                yield Path(dirpath, fn)


def _docstrings(root: Path) -> Iterator[str]:
    """Module, class and function docstrings under ``root``, files in sorted order."""
    for path in _py_files(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken examples
        for node in _definitions(tree):
            doc = _prose(ast.get_docstring(node) or "")
            if len(doc) >= 40:  # skip one-line stubs
                yield doc


_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _definitions(node) -> Iterator[ast.AST]:
    """Modules, classes and functions in source order, descending only through statements
    (``ast.walk`` visits every expression node too: 5x slower on big files)."""
    if isinstance(node, _DEFS):
        yield node
    for name in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, name, ()):
            if isinstance(child, ast.stmt) or isinstance(child, ast.excepthandler):
                yield from _definitions(child)


def _prose(doc: str) -> str:
    """A docstring without its interactive examples (``>>>`` lines and their output)."""
    keep, in_example = [], False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_example = True
        elif not stripped:
            in_example = False
        if not in_example:
            keep.append(line)
    return "\n".join(keep).strip()


def _builtin_roots() -> list[tuple[str, Path]]:
    """(name, folder) of every package tree the corpus reads, in its order."""
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for pkg in ("numpy", "torch"):
        root = _package_dir(pkg)
        if root is not None:
            roots.append((pkg, root))
    return roots


def _topics() -> list[tuple[str, str]]:
    """The language reference's topics in ``pydoc_data.topics``, (key, text) by key."""
    import pydoc_data.topics
    return sorted(pydoc_data.topics.topics.items())


def _builtin_documents() -> Iterator[str]:
    (_, stdlib), *packages = _builtin_roots()
    yield from _docstrings(stdlib)
    for _, text in _topics():
        yield text
    for _, root in packages:
        yield from _docstrings(root)


def files_fingerprint(roots: list[tuple[str, Path]], extra: str = "") -> str:
    """12 hex digits of a hash over every file the corpus would read under ``roots`` (its
    root's name, path relative to the root, size) and ``extra``: any file added, removed or
    resized changes it, with one ``stat`` per file and no reads."""
    h = hashlib.sha256(extra.encode())
    for name, root in roots:
        for path in _py_files(root):
            h.update(f"{name}/{path.relative_to(root).as_posix()}:{path.stat().st_size}\n"
                     .encode())
    return h.hexdigest()[:12]


def builtin_revision() -> str:
    """The installed versions the corpus comes from and ``files_fingerprint`` of what it reads
    (the topics' keys and lengths as ``extra``)."""
    parts = [f"python-{platform.python_version()}"]
    for pkg in ("numpy", "torch"):
        try:
            mod = __import__(pkg)
            parts.append(f"{pkg}-{mod.__version__}")
        except ImportError:
            parts.append(f"{pkg}-absent")
    extra = "".join(f"{key}:{len(text)}\n" for key, text in _topics())
    parts.append(f"files-{files_fingerprint(_builtin_roots(), extra)}")
    return ",".join(parts)


def builtin_corpus() -> DocumentSource:
    return DocumentSource(BUILTIN_NAME, builtin_revision(), "text", _builtin_documents)
