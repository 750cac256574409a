"""Training settings: :class:`TrainConfig` and its presets."""

from __future__ import annotations

from dataclasses import dataclass

from firekit.core.config import PlainConfig
from firekit.core.errors import FirekitError

__all__ = ["TrainConfig", "TRAIN_PRESETS"]


@dataclass
class TrainConfig(PlainConfig):
    """Optimisation settings.

    Attributes:
        lr_affine, lr_nonrigid, lr_synthesis: learning rates of the three Adam optimisers
            (T_af of both directions; T_nr of both; G with both F).
        betas: Adam betas, shared.
        grad_clip: clip each group's gradient norm to this (None: no clipping).
        warmup_steps: ramp every learning rate linearly from 0 over this many steps. Adam's
            first steps move every weight by about ``lr`` whatever the gradient's size; on the
            affine head's output layer that adds up over its inputs and, with the noisy
            gradients of an untrained synthesis, can throw the affine off (measured: README).
        iterations: total optimisation steps of the run (a resumed run counts those done).
        batch_size: pairs per step.
        seed: seeds torch when a run starts (a resumed run restores the saved RNG state).
        val_every: validate every this many steps and at the end (0: only at the end).
        checkpoint_every: write checkpoint.pt and model.pt every this many steps and at the
            end (0: only at the end).
        amp: bf16 autocast for the forward pass on CUDA.
        amp_cpu: bf16 autocast on the CPU too: 1.5x faster steps on a CPU with native bf16
            (AVX512-BF16 or AMX; bench/throughput.md), slower on one without.
        sync_every: read the step losses back to the host (CSV rows, callback, progress bar,
            the finiteness check) every this many steps, each read waiting for the device to
            finish; 0: every step on the CPU (where it costs nothing), every 25 steps on a GPU.
            Validation, checkpoints and the end read at once; a non-finite loss is then reported
            up to this many steps late, and nothing written after it. The ``seconds`` column
            counts when each step was queued on the device.
        loader_threads: batches drawn (augmented) ahead in this many threads while the device
            runs a step, pinned for the copy; 0: none on the CPU (the step uses the cores), on a
            GPU ``min(8, cores per process)``.
        compile: ``torch.compile`` the network for the step (compiles on the first step).
        channels_last: keep weights and batches in channels-last memory order (GPU tensor cores
            prefer it; on the CPU slower in float32, 7 % faster with ``amp_cpu``: bench/throughput.md).
        aux_weight: weight of the auxiliary self-supervised loss on the augmentation's own
            transform (batches carrying ``u_a2b``/``u_b2a``); not in the paper, 0 = off.
        similarity_weight: weight of a direct similarity between each warped image and the
            other input (``similarity``, modality independent) on the registration path; not in
            the paper, 0 = off.
        similarity: ``"mind"`` or ``"ngf"`` (any key of :data:`firekit.core.similarity.SIMILARITIES`).
        distill_weight: weight of the supervision of both displacements by what
            :func:`firekit.registration.refine.refine` finds for the same pair (distillation; costs one
            refinement per pair and direction per step); not in the paper, 0 = off.
        synthesis_weight: weight of :func:`~firekit.fire.losses.synthesis_supervision`, each synthesis
            against the other contrast aligned with its input (batches carrying ``x_b_on_a`` /
            ``x_a_on_b``: augmented pairs of one subject); not in the paper, 0 = off.
        invariance_weight: weight of :func:`~firekit.fire.losses.feature_invariance`, G's codes of
            those aligned counterparts against the inputs' (one more pass of G); not in the paper,
            0 = off.
        train_only: ``"all"`` (the paper) or ``"decoders"``: only F_AB and F_BA learn (G and both T
            frozen), a synthesis stage that cannot change a registration; not in the paper.
        affine_first_steps: the first this many steps train the affine subnets only (zero
            non-rigid flow), on images at half resolution (when that keeps the network's minimum
            size); not in the paper, 0 = off.
        schedule: ``"constant"`` rates (the paper) or ``"cosine"``: a torch ``LambdaLR`` per
            optimiser, linear warm-up over ``warmup_steps`` then a cosine from each rate down to
            ``min_lr_fraction`` of it at ``iterations``.
        min_lr_fraction: where the cosine schedule ends, as a fraction of each rate.
        ema_decay: keep an exponential moving average of the weights
            (``torch.optim.swa_utils.AveragedModel``) with this decay per step, saved as
            ``model_ema.pt`` beside ``model.pt``; validation and ``model_best.pt`` then use it.
            0 = off.

    The paper preset has every addition off (``aux_weight``, ``similarity_weight``,
    ``distill_weight``, ``affine_first_steps`` 0; the model's ``prealign`` ``"none"``,
    ``affine_pooling`` ``"mean"``, ``residual_bound`` 0). Their measured effect: bench/training.md.
    """

    config_name = "training config"

    lr_affine: float = 1e-5
    lr_nonrigid: float = 5e-5
    lr_synthesis: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    warmup_steps: int = 0
    iterations: int = 1000
    batch_size: int = 1
    seed: int = 0
    val_every: int = 100
    checkpoint_every: int = 100
    amp: bool = True
    amp_cpu: bool = False
    sync_every: int = 0
    loader_threads: int = 0
    compile: bool = False
    channels_last: bool = False
    aux_weight: float = 0.0
    similarity_weight: float = 0.0
    similarity: str = "mind"
    distill_weight: float = 0.0
    synthesis_weight: float = 0.0
    invariance_weight: float = 0.0
    train_only: str = "all"
    affine_first_steps: int = 0
    schedule: str = "constant"
    min_lr_fraction: float = 0.05
    ema_decay: float = 0.0

    def __post_init__(self):
        from firekit.core.similarity import SIMILARITIES

        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise FirekitError(f"TrainConfig.betas needs 2 values, got {list(self.betas)}")
        if self.similarity not in SIMILARITIES:
            raise FirekitError(f"TrainConfig.similarity must be one of {sorted(SIMILARITIES)}, got {self.similarity!r}")
        if self.train_only not in ("all", "decoders"):
            raise FirekitError(f"TrainConfig.train_only must be 'all' or 'decoders', got {self.train_only!r}")
        if self.schedule not in ("constant", "cosine"):
            raise FirekitError(f"TrainConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise FirekitError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise FirekitError(f"TrainConfig.min_lr_fraction must be in [0, 1], got {self.min_lr_fraction!r}")
        for name in ("aux_weight", "similarity_weight", "distill_weight", "synthesis_weight", "invariance_weight"):
            if not getattr(self, name) >= 0:
                raise FirekitError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        minimum = {"iterations": 1, "batch_size": 1, "val_every": 0, "checkpoint_every": 0, "warmup_steps": 0,
                   "affine_first_steps": 0, "sync_every": 0, "loader_threads": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FirekitError(f"TrainConfig.{name} must be an integer >= {low}, got {value!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        """The settings of preset ``name`` (a key of :data:`TRAIN_PRESETS`), ``overrides`` on top."""
        if name not in TRAIN_PRESETS:
            raise FirekitError(f"unknown preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return cls(**{**TRAIN_PRESETS[name], **overrides})


TRAIN_PRESETS: dict[str, dict] = {
    # Section 3.8, for 144,000 iterations.
    "paper": dict(
        lr_affine=1e-5, lr_nonrigid=5e-5, lr_synthesis=1e-4, iterations=144_000, val_every=1000,
        checkpoint_every=1000,
    ),
    # Chosen by experiment for a few hundred CPU steps (README, "Presets").
    "small": dict(lr_affine=3e-3, lr_nonrigid=1e-3, lr_synthesis=1e-3),
}
