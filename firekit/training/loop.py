"""The training loop: :func:`train` runs the steps of a run, logging, validating and checkpointing it.

A run folder holds everything one training run writes; :func:`train` fills it and can resume it:

* ``checkpoint.pt``: model, the three optimisers' states, step, RNG state (what resuming needs).
* ``model.pt``: the model alone, for :func:`firekit.load`.
* ``model_best.pt``: the model at the best validation Dice (only with validation data).
* ``config.yaml``: model, training and data settings.
* ``losses.csv``: one row per step, every term of :class:`~firekit.fire.losses.FireLoss`.
* ``validation.csv``: Dice of each validation (only with validation data).

Steps are counted from 1 in these files: row ``step = k`` is the k-th optimisation step, trained on
``source.sample(k - 1, batch_size)``, and a checkpoint at step ``k`` resumes with step ``k + 1``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from firekit.core.errors import FirekitError
from firekit.fire.checkpoint import save_model
from firekit.fire.losses import FireLoss
from firekit.fire.model import Fire
from firekit.training.checkpoints import (RunState, model_extra, prepare_run_dir, restore_extras, resume_run,
                                          save_run)
from firekit.training.config import TrainConfig
from firekit.training.distill import refinement_targets
from firekit.training.distributed import barrier, close_distributed, init_distributed, process_device, wrap_ddp
from firekit.training.interrupt import HeldInterrupt
from firekit.training.loading import PairSource, Prefetch, channels_last_format, open_prefetch, step_tensors
from firekit.training.logs import PendingStep, open_logs, plain, read_losses, write_config_yaml
from firekit.training.optim import averaged_model, make_optimizers, make_schedulers
from firekit.training.step import half_resolution, train_step
from firekit.training.validation import check_validation_batch, validate

# A run stops when this many steps in a row had non-finite gradients (each was skipped): one bad
# batch is weathered, a diverged model is not trained on for hours.
MAX_SKIPPED_IN_A_ROW = 20

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        out_dir: the run folder.
        steps: optimisation steps done, counting those before a resume.
        losses: every FireLoss term of the last step (empty when no step was ever run).
        best_val_dice: best mean validation Dice (a2b and b2a averaged), or None without validation.
        seconds: training wall time, counting the time before a resume.
        best_step: step of ``best_val_dice``.
    """

    out_dir: Path
    steps: int
    losses: dict[str, float]
    best_val_dice: float | None
    seconds: float
    best_step: int | None = None


def train(
    model: Fire,
    source: PairSource,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    validation: list[dict[str, torch.Tensor]] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    extra: dict | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on pairs from ``source``, writing a resumable run folder.

    Args:
        model: the model to train; moved to ``device``. With ``resume`` its weights are replaced
            by the checkpoint's, and its config must match the checkpoint's.
        source: ``source.sample(step, batch_size)`` gives the batch of 0-based ``step`` (see
            :class:`~firekit.training.loading.PairSource`); ``source.describe()``, if present, is
            saved as the ``data`` section.
        config: optimisation settings; ``iterations`` counts the steps of the whole run.
        out_dir: run folder; created if missing. A non-empty one needs ``resume`` or ``overwrite``.
        validation: fixed batches like ``source``'s, each with ``labels_a`` and ``labels_b``;
            scored by mean Dice over non-zero labels every ``config.val_every`` steps and at the end.
        resume: continue from ``out_dir/checkpoint.pt``: the steps after it compute the same
            losses an uninterrupted run computes (bitwise on the CPU).
        overwrite: start again, removing only :data:`~firekit.training.checkpoints.RUN_FILES` from ``out_dir``.
        device: ``"cuda"`` when available, else ``"cpu"``, by default.
        progress: show a tqdm bar (total, syn, reg, smooth = lambda R_smooth, latest val Dice).
        extra: plain data added to ``model.pt``'s extra (e.g. the command line).
        callback: called for every step, in order, with the 1-based step and its loss terms
            (``FireLoss.as_floats()``, plus ``val_dice`` when validation ran at that step) once
            they are read back (after each step on the CPU, every ``config.sync_every`` steps on a
            GPU), e.g. a live plot (``viz.LossPlot``).

    Returns:
        a :class:`TrainResult`.

    Raises:
        FirekitError: a run-folder conflict, an unusable checkpoint, bad batches or a non-finite loss.
        KeyboardInterrupt: after checkpointing the last completed step. Ctrl-C or SIGTERM (``kill``;
            a scheduler's end of job) lets the running step finish first; a second one stops at
            once, keeping the previous checkpoint.
    """
    run = _start_run(model, source, config, out_dir, validation, resume, overwrite, device, extra)
    bar = tqdm(
        total=config.iterations, initial=run.state.step, disable=not (progress and run.main), unit="step",
        desc=run.run_dir.name, dynamic_ncols=True,
    )
    prefetch = open_prefetch(source, config, run.device, run.rank, run.world)
    try:
        _run_steps(run, prefetch, bar, callback)
    except KeyboardInterrupt:
        _stop(run, bar)
        raise
    finally:
        prefetch.close()
        bar.close()
        run.losses_log.close()
        if run.val_log is not None:
            run.val_log.close()
        close_distributed()
    state = run.state
    return TrainResult(run.run_dir, state.step, state.losses, state.best_val_dice, run.seconds(), state.best_step)


@dataclass
class _Run:
    """One call of :func:`train`: what it set up, and what its steps read and update."""

    run_dir: Path
    model: Fire
    config: TrainConfig
    data: dict  # source.describe(), as plain data
    extra: dict
    validation: list[dict]
    device: torch.device
    rank: int
    world: int
    state: RunState = field(default_factory=RunState)
    memory_format: torch.memory_format | None = None
    optimizers: dict = field(default_factory=dict)
    schedulers: dict = field(default_factory=dict)
    average: Any = None  # the EMA's AveragedModel, or None
    scored: Fire | None = None  # what validation and model_best use: the EMA's average or the model
    net: Any = None  # what the steps run: the model, wrapped by DDP and/or compiled
    use_amp: bool = False
    sync_every: int = 1  # read the losses back every this many steps
    similarity: Any = None
    losses_log: Any = None
    val_log: Any = None  # None without validation
    started: float = 0.0  # time.perf_counter() when the steps started
    seconds_before: float = 0.0  # training time before a resume
    in_step: bool = False  # a step is changing the weights
    pending: list[PendingStep] = field(default_factory=list)  # steps done whose losses are still on the device
    skipped_in_a_row: int = 0  # steps whose non-finite gradients were skipped, up to the last one read

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes the run folder."""
        return self.rank == 0

    def seconds(self) -> float:
        """Training time, counting the time before a resume."""
        return self.seconds_before + time.perf_counter() - self.started

    def save(self) -> None:
        """Checkpoint the run at its state's step (model.pt, model_ema.pt, checkpoint.pt)."""
        self.state.seconds = self.seconds()
        save_run(self.run_dir, self.model, self.optimizers, self.config, self.data, self.extra, self.state,
                 self.device, self.schedulers, self.average)

    def kept(self) -> str:
        """What the checkpoint holds, for an error message ("" before the first checkpoint)."""
        saved = self.state.saved_step
        return f"; {self.run_dir / 'checkpoint.pt'} holds step {saved}" if saved else ""

    def read_back(self) -> list[dict[str, float]]:
        """The pending steps' loss rows, read in one go and logged; raises at a non-finite loss
        (the weights are then past it: nothing is saved)."""
        rows = read_losses(self.pending, self.world)
        for row in rows:
            if not math.isfinite(row["total"]):
                raise FirekitError(f"step {row['step']}: loss became {row['total']}; lower the learning rates or "
                                   f"check the inputs{self.kept()}")
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if row["skipped"] > 0 else 0
            if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise FirekitError(f"step {row['step']}: the gradients were non-finite at {self.skipped_in_a_row} "
                                   f"steps in a row (each skipped); lower the learning rates or check the "
                                   f"inputs{self.kept()}")
            self.losses_log.write(row)
            self.state.step, self.state.losses = row["step"], {k: row[k] for k in FireLoss._fields}
        self.pending.clear()
        return rows


def _start_run(model: Fire, source: PairSource, config: TrainConfig, out_dir, validation, resume: bool,
               overwrite: bool, device, extra: dict | None) -> _Run:
    """Check the inputs, prepare the run folder, set the model and its optimisers up (from the
    checkpoint with ``resume``), write config.yaml and open the logs."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    source_ndim = getattr(source, "ndim", model.ndim)
    if source_ndim != model.ndim:
        raise FirekitError(
            f"the data are {source_ndim}D but the model is {model.ndim}D; build the model with ndim={source_ndim}"
        )
    describe = getattr(source, "describe", None)
    data = plain(describe() if callable(describe) else {}, "source.describe()")
    extra = plain(extra or {}, "extra")
    validation = [check_validation_batch(batch, i) for i, batch in enumerate(validation or [])]
    rank, world, local_rank = init_distributed()
    device = process_device(device, world, local_rank)
    run_dir = prepare_run_dir(Path(out_dir), resume, overwrite) if rank == 0 else Path(out_dir)
    barrier(world)
    if not resume:
        torch.manual_seed(config.seed)
    run = _Run(run_dir, model, config, data, extra, validation, device, rank, world)
    _set_up_training(run, resume)
    run.use_amp = config.amp if device.type == "cuda" else (config.amp_cpu and device.type == "cpu")
    # Reading a loss back waits for the device; on a GPU the steps between reads queue up.
    run.sync_every = config.sync_every or (1 if device.type == "cpu" else 25)
    if run.main:
        write_config_yaml(run_dir, model, config, data)
    run.losses_log, run.val_log = open_logs(run_dir, run.main, run.state.step if resume else None, bool(validation))
    run.started, run.seconds_before = time.perf_counter(), run.state.seconds
    if config.similarity_weight:
        from firekit.core.similarity import get_similarity

        run.similarity = get_similarity(config.similarity, radius=1, dilation=1)
    return run


def _set_up_training(run: _Run, resume: bool) -> None:
    """Move the model to the device, make its optimisers, schedulers and EMA, load the checkpoint
    with ``resume``, and wrap the model for several processes and ``config.compile``."""
    model, config = run.model, run.config
    run.memory_format = channels_last_format(model.ndim) if config.channels_last else None
    model.to(device=run.device, memory_format=run.memory_format or torch.preserve_format)
    run.optimizers = make_optimizers(model, config)
    run.schedulers = make_schedulers(run.optimizers, config)
    if resume:
        # A warning about changed settings points at train()'s caller (4: here, _start_run, train, its caller).
        run.state = resume_run(run.run_dir, model, run.optimizers, config, run.data, run.device, stacklevel=4)
    run.average = averaged_model(model, config)
    restore_extras(run.run_dir, run.state, run.schedulers, run.average)
    run.scored = model if run.average is None else run.average.module
    run.net = model
    if run.world > 1:
        run.net = wrap_ddp(model, run.device, find_unused_parameters=config.affine_first_steps > 0)
    if config.compile:
        run.net = torch.compile(run.net)


def _run_steps(run: _Run, prefetch: Prefetch, bar, callback) -> None:
    """Steps from the run's state to ``config.iterations``; a Ctrl-C or SIGTERM stops them between
    two steps (KeyboardInterrupt)."""
    config, state = run.config, run.state
    with HeldInterrupt() as interrupt:
        for index in range(state.step, config.iterations):
            batch = prefetch.get(index, config.iterations)
            run.in_step = True
            try:
                loss = _take_step(run, batch, index)
            except FirekitError as exc:
                # train_step checks before any optimiser steps: the steps before it stand, once
                # their losses are read and found finite.
                run.in_step = False
                run.read_back()
                if run.main and state.step > state.saved_step:
                    run.save()
                raise FirekitError(f"step {index + 1}: {exc}{run.kept()}") from None
            for scheduler in run.schedulers.values():
                scheduler.step()
            if run.average is not None:
                run.average.update_parameters(run.model)
            run.in_step = False
            run.pending.append(PendingStep(index + 1, loss, run.seconds()))
            _after_step(run, index, interrupt, bar, callback)


def _take_step(run: _Run, batch: dict, index: int) -> FireLoss:
    """Step ``index`` (0-based) on ``batch``: its tensors on the device, then :func:`train_step`."""
    config = run.config
    x_a, x_b, targets, counterparts = step_tensors(batch, index, config, run.device, run.memory_format)
    affine_first = index < config.affine_first_steps
    if affine_first:
        x_a, x_b, targets = half_resolution(x_a, x_b, targets, run.model)
    distill_targets = None
    if config.distill_weight:
        distill_targets = refinement_targets(x_a, x_b)
    return train_step(
        run.net, run.optimizers, x_a, x_b, config.grad_clip, index,
        0 if run.schedulers else config.warmup_steps, autocast=run.use_amp,
        targets=targets, aux_weight=config.aux_weight, similarity=run.similarity,
        similarity_weight=config.similarity_weight, distill_targets=distill_targets,
        distill_weight=config.distill_weight, affine_only=affine_first,
        check_finite=run.sync_every == 1, counterparts=None if affine_first else counterparts,
        synthesis_weight=config.synthesis_weight, invariance_weight=config.invariance_weight,
    )


def _after_step(run: _Run, index: int, interrupt: HeldInterrupt, bar, callback) -> None:
    """After step ``index`` (0-based), when due: read the losses back, validate, checkpoint, report
    and stop at a held interrupt."""
    config = run.config
    last = index + 1 == config.iterations
    validated = run.val_log is not None and (last or _due(index + 1, config.val_every))
    checkpointed = last or _due(index + 1, config.checkpoint_every)
    # Every rank reads at the same steps (the read averages over the ranks), so with
    # several processes a Ctrl-C waits for the next read to stop them all at one step.
    if not (len(run.pending) >= run.sync_every or validated or checkpointed or (interrupt.pending and run.world == 1)):
        return
    rows = run.read_back()
    validated = validated and run.main
    if validated:
        _validate_now(run)
    if run.main and checkpointed:
        run.save()
    if callback is not None:
        for row in rows:
            terms = {k: row[k] for k in FireLoss._fields}
            if validated and row is rows[-1]:
                terms["val_dice"] = run.state.latest_dice
            callback(row["step"], terms)
    bar.set_postfix(_postfix(rows[-1], run.state.latest_dice), refresh=False)
    bar.update(len(rows))
    if interrupt.pending:
        raise KeyboardInterrupt


def _validate_now(run: _Run) -> None:
    """Validate at the run's step: a validation.csv row, and model_best.pt at a better Dice."""
    state = run.state
    scores = validate(run.scored, run.validation, run.device)
    run.val_log.write({"step": state.step, **scores})
    state.latest_dice = scores["dice_mean"]
    if not math.isnan(scores["dice_mean"]) and (
        state.best_val_dice is None or scores["dice_mean"] > state.best_val_dice
    ):
        state.best_val_dice, state.best_step = scores["dice_mean"], state.step
        save_model(run.scored, run.run_dir / "model_best.pt", extra=model_extra(run.config, run.data, run.extra, state))


def _stop(run: _Run, bar) -> None:
    """At a Ctrl-C or SIGTERM: checkpoint the last completed step, and say what the checkpoint holds."""
    state = run.state
    # Mid-step (a second Ctrl-C) the groups may be half updated: keep the last checkpoint then.
    if not run.in_step and run.pending and run.world == 1:
        try:
            run.read_back()
        except FirekitError:
            pass  # a non-finite loss among them: the weights are past it, keep the checkpoint
    if run.main and not run.in_step and not run.pending and state.step > state.saved_step:
        run.save()
    bar.write(
        f"interrupted; {run.run_dir / 'checkpoint.pt'} holds step {state.saved_step}"
        if state.saved_step else "interrupted before the first checkpoint"
    )


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _postfix(row: dict[str, float], dice: float | None) -> dict[str, str]:
    """The progress bar's numbers: total, syn, reg, smooth (lambda R_smooth) and the latest Dice."""
    loss = FireLoss(**{k: row[k] for k in FireLoss._fields})  # of floats: its Eq. 6 and 9 sums
    shown = {"total": loss.total, "syn": loss.syn, "reg": loss.reg, "smooth": loss.smooth_weight * loss.r_smooth}
    postfix = {k: f"{v:.4f}" for k, v in shown.items()}
    if dice is not None:
        postfix["dice"] = f"{dice:.3f}"
    return postfix
