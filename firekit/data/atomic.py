"""Atomic file writes: a temp file in the target's folder, then one rename (no half-written outputs).

Standard library only, so every module that writes files (io, model, train, ...) can share it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_files", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp path beside ``path`` to write; on success rename it onto ``path``.

    The temp file is named ``.{name}.XXXX{suffix}`` (a suffix such as ``.tmp.nii.gz`` lets writers
    that choose a format by extension work), gets the usual permissions (mkstemp makes 0600),
    and is removed if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (newlines as given)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            handle.write(text)
    return Path(path)


@contextmanager
def atomic_files(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path named like ``path`` in a temp folder beside it, for writers that add files.

    A header + data pair (``.mhd`` + ``.zraw``, ``.nhdr`` + ``.raw.gz``) names its data file after the
    header, so both are written in the temp folder under their final names; on success the data
    files are renamed into place first and the header last (a reader never sees a header whose data
    is missing). The temp folder is removed either way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield str(folder / path.name)
        for item in sorted(folder.iterdir(), key=lambda p: p.name == path.name):
            os.chmod(item, 0o666 & ~_umask())
            os.replace(item, path.parent / item.name)
    finally:
        for item in folder.iterdir():
            item.unlink(missing_ok=True)
        folder.rmdir()
