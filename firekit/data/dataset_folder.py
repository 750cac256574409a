"""The folder a generated dataset is written to: its JSON index, and whether it can be reused.

Shared by :mod:`firekit.data.braindata` (demo brains) and :mod:`firekit.data.cinephantom` (cine phantom).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from firekit.core.errors import FirekitError


def read_index(path: Path) -> dict | None:
    """A dataset's JSON index, or None when it is missing or unreadable."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def same_or_refuse(out: Path, what: str, old: dict | None, new: dict, keys: Sequence[str], overwrite: bool) -> bool:
    """Whether ``out`` holds a ``what`` built with the same ``keys`` as ``new`` (``old``: the
    parameters it was built with, None when it holds none), so that a complete one can be reused.

    Raises a one-line :class:`FirekitError` when ``out`` is a file, or a non-empty folder holding
    something else, unless ``overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise FirekitError(f"{out}: is a file; give a folder for the {what}")
    same = old is not None and all(old.get(key) == new[key] for key in keys)
    if out.is_dir() and any(out.iterdir()) and not (same or overwrite):
        if old is not None:
            differ = [key for key in keys if old.get(key) != new[key]]
            raise FirekitError(f"{out}: holds a {what} with other {', '.join(differ)}; "
                               "pass --overwrite (overwrite=True in Python) or choose another folder")
        raise FirekitError(f"{out}: folder is not empty and holds no {what}; choose an empty folder "
                           "or pass --overwrite (overwrite=True in Python)")
    return same
