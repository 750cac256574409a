"""What a run writes beside its checkpoints: ``losses.csv``, ``validation.csv``, ``config.yaml``, and the
step losses read back from the device for them."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from firekit.core.errors import FirekitError
from firekit.data.atomic import atomic_write_text
from firekit.fire.losses import FireLoss
from firekit.fire.model import Fire
from firekit.training.config import TrainConfig
from firekit.training.distributed import mean_over_processes

__all__ = ["LOSS_FIELDS", "VALIDATION_FIELDS", "CsvLog", "NoLog", "open_logs", "PendingStep", "read_losses", "plain",
           "write_config_yaml"]

# The columns of losses.csv (every FireLoss term; ``seconds``: training time when the step was queued)
# and of validation.csv.
LOSS_FIELDS = ["step", *FireLoss._fields, "seconds"]
VALIDATION_FIELDS = ["step", "dice_a2b", "dice_b2a", "dice_mean"]


class CsvLog:
    """A CSV log flushed every row. With ``keep_until``, rows past that step are dropped first."""

    def __init__(self, path: Path, fields: list[str], keep_until: int | None = None):
        rows = []
        if keep_until is not None and path.is_file():
            with open(path, newline="") as file:
                rows = [row for row in csv.DictReader(file) if _row_step(row) <= keep_until]
        text = io.StringIO()
        writer = csv.DictWriter(text, fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fields, restval="", extrasaction="ignore")

    def write(self, row: dict) -> None:
        self._writer.writerow(row)  # floats print as repr: they read back exactly
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _row_step(row: dict) -> int | float:
    try:
        return int(row.get("step") or "")
    except ValueError:
        return math.inf


class NoLog:
    """What ranks other than 0 log: nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_logs(run_dir: Path, main: bool, keep_until: int | None,
              validation: bool) -> tuple[CsvLog | NoLog, CsvLog | NoLog | None]:
    """``losses.csv`` and ``validation.csv`` (None without validation) of ``run_dir``, rows past
    ``keep_until`` dropped (a resume); :class:`NoLog` on every rank but 0 (``main``)."""
    losses = CsvLog(run_dir / "losses.csv", LOSS_FIELDS, keep_until) if main else NoLog()
    if not validation:
        return losses, None
    return losses, CsvLog(run_dir / "validation.csv", VALIDATION_FIELDS, keep_until) if main else NoLog()


class PendingStep(NamedTuple):
    """A step done whose loss terms are still on the device."""

    step: int
    loss: FireLoss
    seconds: float


def read_losses(pending: list[PendingStep], world: int) -> list[dict[str, float]]:
    """Log rows (``step``, every FireLoss term, ``seconds``) of ``pending``, their tensors read back
    in one copy and averaged over the processes in one all-reduce; Python-number terms (lambda,
    terms that are off) are taken as they are."""
    if not pending:
        return []
    tensors = [(i, k, v) for i, p in enumerate(pending) for k, v in p.loss._asdict().items() if torch.is_tensor(v)]
    values = []
    if tensors:
        stacked = torch.stack([v.reshape(()).float() for _, _, v in tensors])
        values = mean_over_processes(stacked, world).tolist()
    rows = [{"step": p.step, **{k: float(v) for k, v in p.loss._asdict().items()
                                if not torch.is_tensor(v)}, "seconds": p.seconds} for p in pending]
    for (i, key, _), value in zip(tensors, values):
        rows[i][key] = value
    return [{k: row[k] for k in LOSS_FIELDS} for row in rows]


def plain(value: Any, where: str) -> Any:
    """``value`` as plain data, safe for yaml.safe_dump and torch.load(weights_only=True)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int)) else str(k): plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, where) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars and small arrays
        return plain(value.tolist(), where)
    raise FirekitError(f"{where} holds a {type(value).__name__}; use plain data (str, numbers, lists, dicts)")


def write_config_yaml(run_dir: Path, model: Fire, config: TrainConfig, data: dict) -> None:
    """``run_dir/config.yaml``: the model's, training's and data's settings and the firekit version."""
    from firekit import __version__  # the package is fully imported by the time train() runs

    document = {
        "model": model.config.to_dict(),
        "train": config.to_dict(),
        "data": data,
        "firekit_version": __version__,
    }
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(document, sort_keys=False))
