"""A run folder's checkpoints: preparing the folder, saving ``model.pt`` / ``model_ema.pt`` /
``checkpoint.pt``, and resuming from ``checkpoint.pt`` (weights, optimiser, scheduler and EMA states, RNG)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from firekit.core.errors import FirekitError
from firekit.fire.checkpoint import load_checkpoint, save_model
from firekit.fire.model import Fire, architecture_differences
from firekit.training.config import TrainConfig
from firekit.training.optim import apply_rates

__all__ = ["RUN_FILES", "RunState", "prepare_run_dir", "model_extra", "save_run", "resume_run", "restore_extras"]

# Files train() owns in a run folder; ``overwrite`` removes these and nothing else.
RUN_FILES = ("checkpoint.pt", "model.pt", "model_ema.pt", "model_best.pt", "config.yaml", "losses.csv",
             "validation.csv")

# Settings a resumed run may change without leaving the path an uninterrupted run would take.
_FREE_ON_RESUME = {"iterations", "val_every", "checkpoint_every", "amp", "amp_cpu", "sync_every", "loader_threads",
                   "compile", "channels_last"}


@dataclass
class RunState:
    """What a checkpoint carries besides the weights and optimiser states."""

    step: int = 0
    saved_step: int = 0
    seconds: float = 0.0
    losses: dict = dataclasses.field(default_factory=dict)
    best_val_dice: float | None = None
    best_step: int | None = None
    latest_dice: float | None = None
    saved: dict = dataclasses.field(default_factory=dict)  # the checkpoint's extra, when resumed


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """``run_dir`` ready for a run: checked for ``resume`` (its leftover temporary files removed), or
    created, or emptied of :data:`RUN_FILES` with ``overwrite``."""
    if resume and overwrite:
        raise FirekitError("pass --resume or --overwrite, not both")
    if run_dir.exists() and not run_dir.is_dir():
        raise FirekitError(f"{run_dir} is a file; pass a folder for the run")
    if resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise FirekitError(
                f"{run_dir / 'checkpoint.pt'} not found; nothing to resume (drop --resume to start a new run)"
            )
        for name in RUN_FILES:  # half-written temporary files of a killed run (the files themselves are whole)
            for tmp in run_dir.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        return run_dir
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise FirekitError(f"{run_dir} is not empty; pass --resume to continue or --overwrite to start again")
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
            for tmp in run_dir.glob(f".{name}.*.tmp"):  # left by a crash mid-write
                tmp.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def model_extra(config: TrainConfig, data: dict, extra: dict, state: RunState) -> dict:
    """The extra saved with a model file: training settings, step, data settings and ``extra``."""
    return {"train": config.to_dict(), "step": state.step, "data": data, **extra}


def save_run(
    run_dir: Path,
    model: Fire,
    optimizers: dict[str, torch.optim.Optimizer],
    config: TrainConfig,
    data: dict,
    extra: dict,
    state: RunState,
    device: torch.device,
    schedulers: dict | None = None,
    average=None,
) -> None:
    """Write model.pt (and model_ema.pt), then checkpoint.pt (each atomically) for ``state.step``."""
    save_model(model, run_dir / "model.pt", extra=model_extra(config, data, extra, state))
    more = {}
    if schedulers:
        more["schedulers"] = {name: scheduler.state_dict() for name, scheduler in schedulers.items()}
    if average is not None:
        save_model(average.module, run_dir / "model_ema.pt", extra={**model_extra(config, data, extra, state), "ema": True})
        more["ema"] = {"weights": average.module.state_dict(), "count": int(average.n_averaged)}
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    save_model(
        model,
        run_dir / "checkpoint.pt",
        extra={
            "step": state.step,
            "train": config.to_dict(),
            "data": data,
            "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
            "rng": rng,
            "seconds": state.seconds,
            "losses": state.losses,
            "best_val_dice": state.best_val_dice,
            "best_step": state.best_step,
            "latest_dice": state.latest_dice,
            **more,
        },
    )
    state.saved_step = state.step


def resume_run(
    run_dir: Path,
    model: Fire,
    optimizers: dict[str, torch.optim.Optimizer],
    config: TrainConfig,
    data: dict,
    device: torch.device,
    stacklevel: int = 1,
) -> RunState:
    """Load checkpoint.pt into ``model`` and ``optimizers`` and restore the RNG state; return the saved
    run state.

    Settings changed since the checkpoint (other than those free on resume) are warned about and
    ``config``'s rates and betas replace the saved ones; the warning points at the frame
    ``stacklevel`` up the stack, counting this function's caller as 1.
    """
    path = run_dir / "checkpoint.pt"
    saved_model, saved = load_checkpoint(path, map_location="cpu")
    step = _checked_step(path, run_dir, model, saved_model, saved, config)
    model.load_state_dict(saved_model.state_dict())
    _load_optimizers(path, optimizers, saved)
    changed = sorted(
        k for k, v in config.to_dict().items() if k not in _FREE_ON_RESUME and saved["train"].get(k, v) != v
    )
    if saved.get("data", data) != data:
        changed.append("data")
    if changed:
        warnings.warn(
            f"resuming {run_dir} with changed {', '.join(changed)}: the run will differ from an uninterrupted one",
            stacklevel=stacklevel + 1,
        )
        apply_rates(optimizers, config)
    rng = saved.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return RunState(
        step=step, saved_step=step, seconds=float(saved.get("seconds", 0.0)), losses=dict(saved.get("losses", {})),
        best_val_dice=saved.get("best_val_dice"), best_step=saved.get("best_step"),
        latest_dice=saved.get("latest_dice"), saved=saved,
    )


def _checked_step(path: Path, run_dir: Path, model: Fire, saved_model: Fire, saved: dict, config: TrainConfig) -> int:
    """The step of a checkpoint, refused unless it is a training checkpoint of ``model``'s
    architecture at a step within ``config.iterations``."""
    missing = [key for key in ("step", "train", "optimizers") if key not in saved]
    if missing:
        raise FirekitError(
            f"{path}: not a training checkpoint (no {', '.join(missing)}); pass --overwrite to start again"
        )
    differ = architecture_differences(model.config, saved_model.config)
    if differ:
        ours, theirs = model.config.to_dict(), saved_model.config.to_dict()
        changes = ", ".join(f"{k}: {theirs.get(k)} saved, {ours.get(k)} given" for k in differ)
        raise FirekitError(
            f"{path} holds a different model ({changes}); build it from {run_dir / 'config.yaml'} or pass --overwrite"
        )
    step = int(saved["step"])
    if step > config.iterations:
        raise FirekitError(
            f"{path} is at step {step}, past iterations={config.iterations}; raise iterations to continue"
        )
    return step


def _load_optimizers(path: Path, optimizers: dict[str, torch.optim.Optimizer], saved: dict) -> None:
    """The saved optimiser states into ``optimizers`` (the same names, each fitting its group)."""
    if set(saved["optimizers"]) != set(optimizers):
        raise FirekitError(f"{path}: optimisers {sorted(saved['optimizers'])} do not match {sorted(optimizers)}")
    for name, optimizer in optimizers.items():
        try:
            optimizer.load_state_dict(saved["optimizers"][name])
        except (ValueError, KeyError) as exc:
            raise FirekitError(f"{path}: {name} optimiser state does not fit the model ({exc})") from None


def restore_extras(run_dir: Path, state: RunState, schedulers: dict, average) -> None:
    """Put a resumed checkpoint's scheduler states and EMA weights back (a resume that turns
    either on starts it from the checkpoint's weights)."""
    saved = state.saved
    for name, scheduler in schedulers.items():
        if name in saved.get("schedulers", {}):
            scheduler.load_state_dict(saved["schedulers"][name])
        elif state.step:
            scheduler.last_epoch = state.step - 1
            scheduler.step()
    if average is not None and "ema" in saved:
        try:
            average.module.load_state_dict(saved["ema"]["weights"])
        except (RuntimeError, KeyError) as exc:
            raise FirekitError(f"{run_dir / 'checkpoint.pt'}: EMA weights do not fit the model ({exc}); "
                               "pass --overwrite to start again") from None
        average.n_averaged.fill_(int(saved["ema"].get("count", 1)))
    elif average is not None and state.step:
        average.n_averaged.fill_(1)  # EMA turned on at resume: start it from the resumed weights
