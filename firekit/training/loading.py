"""Training batches: what a source gives, drawn ahead in threads, sliced per process, checked and
moved to the device."""

from __future__ import annotations

import inspect
import os
from typing import Protocol

import torch

from firekit.core.errors import FirekitError
from firekit.training.config import TrainConfig

__all__ = ["PairSource", "Prefetch", "open_prefetch", "batch_tensor", "step_tensors", "channels_last_format"]


class PairSource(Protocol):
    """What :func:`~firekit.training.loop.train` draws its training pairs from (e.g. the datasets of
    :mod:`firekit.data.pairs`)."""

    ndim: int

    def sample(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Batch for 0-based ``step``, a deterministic function of the source's seed and ``step``.

        A source whose ``sample`` also takes ``first`` (pairs ``first`` to ``first + batch_size
        - 1`` of the step's batch, as :class:`firekit.data.pairs.PairDataset`'s) lets each of several
        processes draw only its slice of the global batch; any other is drawn whole by every
        process, which keeps its own slice.

        Returns:
            ``{"x_a", "x_b"}``: ``(B, 1, *S)`` float32 in [-1, 1]; optionally ``"labels_a"``,
            ``"labels_b"``: ``(B, 1, *S)`` int64.
        """
        ...


class Prefetch:
    """Batches of the steps ahead, drawn in worker threads while the current step runs (each batch
    is a function of its step, so the result is the same as drawing in turn); pinned for CUDA.

    ``first`` asks the source for a slice of each step's batch (``sample(..., first=first)``);
    ``keep`` = ``(rank, size)`` keeps pairs ``rank * size`` to ``(rank + 1) * size - 1`` of each
    batch drawn whole.
    """

    def __init__(self, source, batch_size: int, ahead: int, pin: bool, first: int | None = None,
                 keep: tuple[int, int] | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.source, self.batch_size, self.ahead, self.pin = source, batch_size, max(0, int(ahead)), pin
        self.options = {} if first is None else {"first": first}  # a slice of each step's batch
        self.keep = keep
        self.pool = ThreadPoolExecutor(max_workers=self.ahead) if self.ahead else None
        self.pending: dict = {}

    def _draw(self, step: int) -> dict:
        batch = self.source.sample(step, self.batch_size, **self.options)
        if self.pin and isinstance(batch, dict):
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch

    def get(self, step: int, last: int) -> dict:
        """The batch of 0-based ``step``, drawing ahead up to step ``last`` (excluded)."""
        if self.pool is None:
            batch = self._draw(step)
        else:
            for ahead in range(step, min(step + self.ahead + 1, last)):
                if ahead not in self.pending:
                    self.pending[ahead] = self.pool.submit(self._draw, ahead)
            batch = self.pending.pop(step).result()
        return batch if self.keep is None else _shard(batch, *self.keep)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def open_prefetch(source, config: TrainConfig, device: torch.device, rank: int, world: int) -> Prefetch:
    """This process's batches of ``source``: one global batch per step, the same whatever the number
    of processes, of which rank ``rank`` trains on its slice (``config.batch_size`` is per process),
    drawn alone when the source can. On a GPU the next batches are drawn (augmented) on the CPU
    while the current step runs."""
    threads = config.loader_threads or (0 if device.type == "cpu" else _default_loader_threads())
    drawn_alone = world > 1 and _draws_slices(source)
    return Prefetch(source, config.batch_size if drawn_alone or world == 1 else config.batch_size * world,
                    ahead=threads, pin=device.type == "cuda",
                    first=rank * config.batch_size if drawn_alone else None,
                    keep=(rank, config.batch_size) if world > 1 and not drawn_alone else None)


def _shard(batch: dict, rank: int, size: int) -> dict:
    """Rank ``rank``'s ``size`` pairs of a global batch (every tensor's first axis; a view)."""
    return {k: v[rank * size:(rank + 1) * size] if torch.is_tensor(v) else v for k, v in batch.items()}


def _draws_slices(source) -> bool:
    """Whether ``source.sample`` takes ``first`` (draws a slice of a step's batch)."""
    try:
        return "first" in inspect.signature(source.sample).parameters
    except (TypeError, ValueError):
        return False


def _default_loader_threads() -> int:
    """Threads drawing batches ahead on a GPU: the cores of this process's share, at most 8."""
    per_process = (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(2, min(8, per_process))


def batch_tensor(batch: dict, key: str, where: str, device: torch.device,
                 memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """``batch[key]`` checked (a tensor; images finite) and moved to ``device``: labels as int64,
    images as float32 in ``memory_format``. ``where`` names the batch in the errors."""
    if not isinstance(batch, dict) or key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise FirekitError(f"{where} must give a dict with {key!r}, got {keys}")
    value = batch[key]
    if not torch.is_tensor(value):
        raise FirekitError(f"{where}[{key!r}] must be a tensor (B, 1, *spatial), got {type(value).__name__}")
    if key.startswith("labels"):
        return value.to(device=device, dtype=torch.int64)
    # Checked on the host, where the batch was drawn (on a GPU the check would wait for it).
    if value.device.type == "cpu" and value.is_floating_point() and not torch.isfinite(value).all():
        raise FirekitError(f"{where}[{key!r}] contains NaN or Inf values; clean or mask the images")
    value = value.to(device=device, dtype=torch.float32, non_blocking=True)
    return value if memory_format is None else value.contiguous(memory_format=memory_format)


def step_tensors(batch: dict, index: int, config: TrainConfig, device: torch.device,
                 memory_format: torch.memory_format | None):
    """The tensors of step ``index``'s batch that ``config`` trains on, on ``device``.

    Returns:
        ``x_a, x_b`` ``(B, 1, *S)``; ``targets`` ``(u_a2b, u_b2a)`` ``(B, ndim, *S)`` for the
        auxiliary loss, or None; ``counterparts`` ``(x_b_on_a, x_a_on_b)`` ``(B, 1, *S)`` for the
        synthesis and invariance losses, or None.
    """
    where = f"source.sample({index})"
    x_a, x_b = (batch_tensor(batch, key, where, device, memory_format) for key in ("x_a", "x_b"))
    targets = None
    if config.aux_weight and "u_a2b" in batch:
        targets = tuple(batch_tensor(batch, key, where, device) for key in ("u_a2b", "u_b2a"))
    counterparts = None
    if (config.synthesis_weight or config.invariance_weight) and "x_b_on_a" in batch:
        counterparts = tuple(batch_tensor(batch, key, where, device, memory_format)
                             for key in ("x_b_on_a", "x_a_on_b"))
    return x_a, x_b, targets, counterparts


def channels_last_format(ndim: int) -> torch.memory_format:
    """Channels-last order of a ``(B, C, *S)`` tensor with ``ndim`` spatial axes."""
    return {2: torch.channels_last, 3: torch.channels_last_3d}[ndim]
