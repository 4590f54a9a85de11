"""Corpus sources: which files a source names, in a fixed order, and which of them are text.

A source is a file, a directory (walked recursively; files whose *name* matches one of the
include globs; hidden directories and symlinks skipped; paths sorted so every machine reads the
same files in the same order), or the literal `"stdlib"`: the pure-Python standard library of the
running interpreter, a real corpus present on every machine (the byte-level code corpus in the
spirit of nanoGPT's character-level Shakespeare, Karpathy 2022).

For `"stdlib"` only the standard library proper is read: third-party packages
(`site-packages`, Debian's `dist-packages`), compiled caches and extension modules
(`__pycache__`, `lib-dynload`), the build configuration (`config-*`, `_sysconfigdata_*.py`,
which embed machine-specific build paths) and the test suites (`test`, `tests`, `idle_test`,
which many distributions ship separately or not at all) are left out.

A file is text when it decodes as UTF-8 and holds no NUL byte (NUL separates documents in the
packed stream, so it must not occur inside one).
"""

from __future__ import annotations

import fnmatch
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.data.manifest import DataError

STDLIB = "stdlib"

_STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib-dynload",
        "test",
        "tests",
        "idle_test",
    }
)


@dataclass(frozen=True)
class CorpusFile:
    """One candidate file: its path on disk and its size when listed."""

    path: Path
    size: int


def stdlib_root() -> Path:
    """The running interpreter's standard-library source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_skips_dir(rel_parts: tuple[str, ...]) -> bool:
    name = rel_parts[-1]
    top_level = len(rel_parts) == 1
    return name in _STDLIB_SKIP_DIRS or (top_level and name.startswith("config-"))


def _matches(name: str, include: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in include)


def _walk(root: Path, include: Sequence[str], stdlib: bool) -> list[CorpusFile]:
    found: list[tuple[str, CorpusFile]] = []

    def on_error(exc: OSError) -> None:  # unreadable directories are skipped
        return None

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        here = Path(dirpath)
        rel = here.relative_to(root).parts
        keep = []
        for d in dirnames:
            if d.startswith(".") or (here / d).is_symlink():
                continue
            if stdlib and _stdlib_skips_dir((*rel, d)):
                continue
            keep.append(d)
        dirnames[:] = sorted(keep)
        for name in filenames:
            if not _matches(name, include):
                continue
            if stdlib and not rel and name.startswith("_sysconfigdata_"):
                continue
            path = here / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if path.is_symlink() or not path.is_file():
                continue
            found.append(("/".join((*rel, name)), CorpusFile(path, st.st_size)))
    found.sort(key=lambda item: item[0])
    return [f for _, f in found]


def list_files(source: str | Path, include: Sequence[str]) -> list[CorpusFile]:
    """The files SOURCE names, in packing order; raise DataError if there are none.

    A source that is a single file is taken as is, whatever its name. The literal "stdlib"
    always means the standard library; write "./stdlib" for a local directory of that name.
    """
    text = str(source)
    if not text:
        raise DataError("the data source is empty; give a file, a directory or 'stdlib'")
    if not include or not all(isinstance(g, str) and g for g in include):
        raise DataError("the include globs must be a non-empty list of non-empty patterns")
    stdlib = text == STDLIB
    root = stdlib_root() if stdlib else Path(text)
    if root.is_file():
        return [CorpusFile(root, root.stat().st_size)]
    if root.exists() and not root.is_dir():
        raise DataError(f"data source {text!r} is not a regular file or a directory")
    if not root.is_dir():
        if stdlib:
            raise DataError(f"the Python standard library source is not present at {root}")
        raise DataError(
            f"data source {text!r} does not exist; give a file, a directory or 'stdlib'"
        )
    files = _walk(root, include, stdlib)
    if not files:
        globs = ", ".join(include)
        raise DataError(f"no files under {text!r} match the include globs ({globs})")
    return files


def read_text(path: Path) -> bytes | None:
    """The bytes of PATH if it is readable UTF-8 text without NUL bytes, else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data
