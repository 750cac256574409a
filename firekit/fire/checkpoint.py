"""FIRE checkpoints on disk: weights and config in one weights-only torch file, written atomically.

Only tensors and plain data are ever unpickled (``torch.load(weights_only=True)``), so a file that
would run code is refused before any of it runs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from firekit.core.errors import FirekitError
from firekit.data.atomic import atomic_path
from firekit.fire.model import Fire, FireConfig

CHECKPOINT_FORMAT = "firekit-checkpoint"
CHECKPOINT_VERSION = 1


def save_model(model: Fire, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model``'s weights + config atomically (temp file + rename); ``extra`` must be plain data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Fire, dict]:
    """Load ``(model, extra)`` from ``path`` with ``weights_only=True``; one-line errors on bad files.

    Only tensors and plain data are unpickled: a file that would import anything else (code, a
    pickled object) is refused before any of it runs. The model remembers ``path`` (``model.path``)
    so later errors can name it.
    """
    path = Path(path)
    if path.is_dir():
        raise FirekitError(f"{path}: is a directory; pass the model.pt file written by training")
    if not path.is_file():
        raise FirekitError(f"{path}: checkpoint not found; pass the model.pt written by training")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated zips, disallowed globals
        raise FirekitError(f"{path}: {_load_failure(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FirekitError(f"{path}: not a firekit checkpoint; use a model.pt written by firekit")
    try:
        config = FireConfig.from_dict(payload["config"])
    except (FirekitError, KeyError, TypeError, ValueError) as exc:
        raise FirekitError(
            f"{path}: unusable model config ({_first_line(exc)}); use a model.pt written by firekit"
        ) from None
    model = Fire(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise FirekitError(
            f"{path}: weights do not match the stored {config.ndim}D {config.preset} config ({_first_detail(exc)}); "
            "the file was edited or mixed from two models: use a model.pt written by firekit"
        ) from None
    extra = payload.get("extra", {})
    extra = extra if isinstance(extra, dict) else {}
    if isinstance(extra.get("spacing"), (int, float)):
        model.spacing = float(extra["spacing"])
    model.path = path
    return model, extra


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def _first_detail(exc: BaseException) -> str:
    """The first specific line of a multi-line error (load_state_dict lists every mismatch)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:200]


def _load_failure(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line with the fix."""
    import pickle
    import re

    text = str(exc)
    blocked = re.search(r"unsupported GLOBAL (\S+)", text, re.IGNORECASE)
    if blocked:
        why = f"it would import {blocked.group(1)}: pickled code, not only tensors and plain data; refused, nothing ran"
    elif isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        why = "not a weights-only torch file: a plain pickle or another format; refused, nothing ran"
    else:
        why = f"truncated or corrupt: {_first_line(exc)}"
    return f"not a loadable firekit checkpoint ({why}); use a model.pt written by firekit"
