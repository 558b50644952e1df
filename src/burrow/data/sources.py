"""Text sources: the standard-library corpus, a text file, a directory, or a .jsonl file.

A source is named by one string. ``"stdlib"`` is the embedded default corpus: the ``.py`` files of
the running Python's standard library, without ``site-packages`` so that what is installed does
not change the corpus. Anything else is a path: a text file is one document, a directory gives one
document per file with a chosen extension, and a ``.jsonl`` file gives one document per line.

Documents come in a fixed order (sorted by relative path, or by line), and the train/validation
split is decided by each document's name alone, so it never depends on position or order.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from burrow.errors import UserError

STDLIB = "stdlib"
DEFAULT_EXTENSIONS = (".txt", ".md", ".py")
SOURCE_HELP = "pass 'stdlib', a text file, a directory of text files or a .jsonl file"


@dataclass(frozen=True)
class Document:
    """One unit of text: the split and the document boundaries in the shards follow these."""

    name: str  # relative path, or "file.jsonl:LINE"
    text: str


@dataclass
class SourceStats:
    """Counts gathered while a source is read; pass one to `iter_documents` and read it after."""

    documents: int = 0
    skipped_non_utf8: int = 0

    def warning(self) -> str | None:
        """The one warning line to show a user, or None when nothing was skipped."""
        if not self.skipped_non_utf8:
            return None
        return f"warning: skipped {self.skipped_non_utf8} documents that are not valid UTF-8"


def stdlib_root() -> Path:
    """Directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_source(source: str) -> str:
    """A source as a config stores it: a path made absolute, so that a run can change its working
    directory. "stdlib" and paths that do not exist (left for `iter_documents` to report) come back
    as they are."""
    return source if source == STDLIB or not Path(source).exists() else str(Path(source).resolve())


def _walk(root: Path, extensions: tuple[str, ...], skip_dir: str | None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the files under root with one of the extensions, sorted.

    Hidden files and directories (a name starting with ".") are left out, as is any directory
    named skip_dir; symbolic links to directories are not followed.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != skip_dir]
        for filename in filenames:
            if filename.endswith(extensions) and not filename.startswith("."):
                path = Path(dirpath, filename)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return found


def source_files(
    source: str, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
) -> list[tuple[str, Path]]:
    """The files a source reads, as (name, path) in document order.

    For a text or .jsonl file this is the file itself, named by its file name.
    """
    if source == STDLIB:
        return _walk(stdlib_root(), (".py",), skip_dir="site-packages")
    path = Path(source).expanduser()
    if path.is_dir():
        files = _walk(path, extensions, skip_dir=None)
        if not files:
            raise UserError(
                f"directory {source} holds no files ending in {', '.join(extensions)}; "
                "point --data at a directory of text files"
            )
        return files
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"data file {source} is empty; {SOURCE_HELP}")
        return [(path.name, path)]
    raise UserError(f"data source {source!r} {_not_readable(path)}; {SOURCE_HELP}")


def _not_readable(path: Path) -> str:
    """Why a path that is neither a directory nor a regular file cannot be read as text."""
    if not path.exists():
        return "is a broken symbolic link" if path.is_symlink() else "does not exist"
    mode = path.stat().st_mode
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"exists but is {kind}, not a file of text"


def _jsonl_documents(
    name: str, path: Path, text_field: str, stats: SourceStats
) -> Iterator[Document]:
    """One document per non-blank line of a .jsonl file: the string in text_field."""
    with path.open("rb") as file:
        for line_number, raw in enumerate(file, start=1):
            where = f"{name}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.skipped_non_utf8 += 1
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path}:{line_number} is not valid JSON ({error.msg}); "
                    "a .jsonl file holds one JSON object per line"
                ) from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                fields = ", ".join(record) if isinstance(record, dict) else "none"
                raise UserError(
                    f"{path}:{line_number} has no string field {text_field!r} "
                    f"(fields: {fields}); pass the right one with --text-field (data.text_field)"
                )
            if text:
                yield Document(where, text)


def _file_documents(files: list[tuple[str, Path]], stats: SourceStats) -> Iterator[Document]:
    """One document per UTF-8 file; other files are counted in stats and skipped."""
    for name, path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1
            continue
        if text:
            yield Document(name, text)


def iter_documents(
    source: str,
    *,
    text_field: str = "text",
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    stats: SourceStats | None = None,
) -> Iterator[Document]:
    """Yield the documents of a source in a fixed order, skipping empty ones.

    Files that are not valid UTF-8 (and .jsonl lines that are not) are skipped and counted in
    ``stats.skipped_non_utf8``, so that the caller can print one warning line
    (``stats.warning()``) after the iteration. Raises UserError for a missing path, an empty
    file, a source with no readable text, and a .jsonl line that is not JSON or lacks the field.
    """
    stats = stats if stats is not None else SourceStats()
    files = source_files(source, extensions)
    path = Path(source).expanduser()
    if source != STDLIB and path.suffix == ".jsonl" and path.is_file():
        documents = _jsonl_documents(*files[0], text_field, stats)
    else:
        documents = _file_documents(files, stats)
    start = stats.documents
    for document in documents:
        stats.documents += 1
        yield document
    if stats.documents == start:
        raise UserError(f"data source {source} holds no readable text; {SOURCE_HELP} in UTF-8")


def split_of(name: str, val_fraction: float) -> str:
    """The split of a document, "train" or "val", from a hash of its name alone.

    The first 8 bytes of sha256(name), read as a fraction of 2**64, fall below val_fraction for
    about that fraction of the documents; the answer never depends on the order or the position.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def source_fingerprint(source: str, *, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> str:
    """A 16-hex-digit digest of a source's content: every file's name, size and bytes.

    It changes whenever a file is added, removed, renamed or edited, and not when the same files
    sit in another place, so that a prepared dataset and a checkpoint can be matched to their
    text on any machine. Reading the 31 MB stdlib corpus takes about half a second.
    """
    digest = hashlib.blake2b(digest_size=8)
    for name, path in source_files(source, extensions):
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
