"""The FIRE model (Section 3.1): shared encoder G, decoders F_AB / F_BA, transformation nets T_AB / T_BA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from firekit.core import spatial
from firekit.core.config import PlainConfig
from firekit.core.errors import FirekitError
from firekit.fire.nets import AffineHead, Decoder, Encoder, FlowHead, KeypointAffineHead

__all__ = ["FireConfig", "TransformNet", "Transform", "Fire", "FireOutput", "PRESETS"]


@dataclass
class FireConfig(PlainConfig):
    """Architecture of a FIRE model; stored inside every checkpoint.

    Attributes:
        ndim: 2 or 3 spatial dimensions.
        in_channels: channels of each input image (modalities A and B alike).
        widths: encoder widths (7x7 conv, first and second stride-2 conv); the decoders mirror them.
        encoder_blocks: residual blocks at the end of G.
        decoder_blocks: residual blocks at the start of each F.
        synthesis_head_channels: output channels of F's 7x7 conv block before the 1x1 conv (3 in the paper).
        affine_channels: widths of T_af's three stride-2 convs.
        affine_hidden: width of T_af's first dense layer.
        flow_channels: width of each of T_nr's two parallel branches.
        leaky: LeakyReLU slope in T_af and T_nr.
        affine_pooling: how T_af pools its last conv: ``"mean"`` (the paper's global average
            pooling) or ``"moments"`` (mean plus each channel's spatial-softmax centroid and
            second moments; see :class:`~firekit.fire.nets.AffineHead`), or ``"keypoints"``: soft
            keypoints found in each image alone and a least-squares affine between them
            (:class:`~firekit.fire.nets.KeypointAffineHead`). Not in the paper.
        prealign: ``"none"`` (the paper) or ``"moments"``: each T starts from the moments affine of
            the pair (:func:`firekit.registration.moments.moments_init`, centre of mass + principal axes, rotation
            candidates scored by MIND; no gradient) and T_af predicts a residual on the moving
            features pre-aligned by it. Not in the paper; a switch for learning on a small budget.
        residual_bound: with ``prealign``, each entry of T_af's residual affine (its output minus
            the identity) passes through ``bound * tanh(x / bound)``, so no input can make the
            residual undo the start wholesale (measured: unbounded residuals of -1.1 on a few
            pairs wrecked validation after a few hundred steps). 0: unbounded. Not in the paper.
        preset: name of the preset this config came from (informational).
    """

    config_name = "model config"

    ndim: int = 2
    in_channels: int = 1
    widths: tuple[int, int, int] = (64, 128, 256)
    encoder_blocks: int = 4
    decoder_blocks: int = 4
    synthesis_head_channels: int = 3
    affine_channels: tuple[int, int, int] = (8, 10, 20)
    affine_hidden: int = 32
    flow_channels: int = 64
    leaky: float = 0.2
    affine_pooling: str = "mean"
    prealign: str = "none"
    residual_bound: float = 0.0
    preset: str = "paper"

    def __post_init__(self):
        if self.ndim not in (2, 3):
            raise FirekitError(f"FireConfig.ndim must be 2 or 3, got {self.ndim}")
        self.widths = tuple(int(w) for w in self.widths)
        self.affine_channels = tuple(int(c) for c in self.affine_channels)
        if len(self.widths) != 3 or len(self.affine_channels) != 3:
            raise FirekitError("FireConfig.widths and affine_channels need exactly 3 values each")
        if self.affine_pooling not in AFFINE_POOLING:
            raise FirekitError(f"FireConfig.affine_pooling must be one of {list(AFFINE_POOLING)}, "
                               f"got {self.affine_pooling!r}")
        if not self.residual_bound >= 0:
            raise FirekitError(f"FireConfig.residual_bound must be >= 0, got {self.residual_bound!r}")
        if self.prealign not in PREALIGN:
            raise FirekitError(f"FireConfig.prealign must be one of {list(PREALIGN)}, got {self.prealign!r}")

    @classmethod
    def from_preset(cls, name: str, ndim: int = 2, **overrides) -> "FireConfig":
        """A named preset (``"paper"`` or ``"small"``) with optional field overrides."""
        if name not in PRESETS:
            raise FirekitError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "ndim": ndim, "preset": name, **overrides})


def architecture_differences(ours: "FireConfig", theirs: "FireConfig") -> list[str]:
    """The config fields (the ``preset`` name aside) where two models differ, sorted."""
    a = {k: v for k, v in ours.to_dict().items() if k != "preset"}
    b = {k: v for k, v in theirs.to_dict().items() if k != "preset"}
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


PREALIGN = ("none", "moments")
AFFINE_POOLING = ("mean", "moments", "keypoints")


def other_direction(direction: str) -> str:
    """``"b2a"`` for ``"a2b"`` and back."""
    if direction not in ("a2b", "b2a"):
        raise FirekitError(f"direction must be 'a2b' or 'b2a', got {direction!r}")
    return "b2a" if direction == "a2b" else "a2b"

PRESETS: dict[str, dict] = {
    # Section 3.2-3.3 sizes: 19.7M parameters in 2D.
    "paper": dict(
        widths=(64, 128, 256), encoder_blocks=4, decoder_blocks=4, affine_channels=(8, 10, 20),
        affine_hidden=32, flow_channels=64,
    ),
    # CPU preset: same wiring, ~4% of the parameters (measured: bench/model_cost.py).
    "small": dict(
        widths=(16, 32, 64), encoder_blocks=2, decoder_blocks=2, affine_channels=(16, 32, 64),
        affine_hidden=64, flow_channels=32,
    ),
}


class Transform(NamedTuple):
    """Output of a transformation net.

    Attributes:
        theta: ``(B, ndim, ndim + 1)`` affine phi_af, normalised coordinates.
        flow: ``(B, ndim, *s)`` non-rigid displacement u_nr at G's resolution, normalised.
    """

    theta: torch.Tensor
    flow: torch.Tensor

    def affine_displacement(self, shape) -> torch.Tensor:
        """Displacement of phi_af alone on a grid of ``shape``: ``(B, ndim, *shape)``."""
        return spatial.affine_to_displacement(self.theta, shape)

    def displacement(self, shape) -> torch.Tensor:
        """Displacement of phi = phi_af o phi_nr on a grid of ``shape``.

        The non-rigid field is linearly resampled from G's grid first (Section 3.6, last line).
        """
        return spatial.compose_affine_displacement(self.theta, spatial.resize_displacement(self.flow, shape))


class TransformNet(nn.Module):
    """T: affine subnet, then non-rigid subnet on the affinely warped moving feature (Section 3.3)."""

    def __init__(self, config: FireConfig):
        super().__init__()
        channels = config.widths[2]
        if config.affine_pooling == "keypoints":
            self.affine = KeypointAffineHead(config.ndim, 2 * channels, config.affine_channels, config.leaky)
        else:
            self.affine = AffineHead(
                config.ndim, 2 * channels, config.affine_channels, config.affine_hidden, config.leaky,
                config.affine_pooling,
            )
        self.nonrigid = FlowHead(config.ndim, channels, config.flow_channels, config.leaky)
        self.residual_bound = config.residual_bound

    def affine_residual(self, moving: torch.Tensor, fixed: torch.Tensor,
                        theta0: torch.Tensor | None = None) -> torch.Tensor:
        """T_af's own output ``(B, ndim, ndim + 1)``: the affine itself without ``theta0``; with it,
        the residual on the moving features warped by ``theta0`` (bounded by ``residual_bound``)."""
        if theta0 is None:
            return self.affine(torch.cat([moving, fixed], dim=1))
        moving_start = spatial.warp(moving, spatial.affine_to_displacement(theta0, moving.shape[2:]))
        residual = self.affine(torch.cat([moving_start, fixed], dim=1))
        if self.residual_bound:
            identity = spatial.identity_affine(residual.shape[1], residual.shape[0], like=residual)
            bound = self.residual_bound
            residual = identity + bound * torch.tanh((residual - identity) / bound)
        return residual

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, affine_only: bool = False,
                theta0: torch.Tensor | None = None) -> Transform:
        """Features ``(B, C, *s)`` of the moving and fixed images -> :class:`Transform`.

        ``theta0`` ``(B, ndim, ndim + 1)``: a starting affine (pre-alignment); T_af then sees the
        moving features warped by it and its output is composed after it.
        """
        residual = self.affine_residual(moving, fixed, theta0)
        theta = residual if theta0 is None else spatial.compose_affines(theta0, residual)
        if affine_only:
            return Transform(theta, torch.zeros_like(moving[:, : theta.shape[1]]))
        moving_affine = spatial.warp(moving, spatial.affine_to_displacement(theta, moving.shape[2:]))
        return Transform(theta, self.nonrigid(moving_affine, fixed))


class FireOutput(NamedTuple):
    """Every tensor the FIRE losses (Eqs. 2-13) need, for one training step.

    Naming: ``_ab`` is the A->B path (A warped onto B's grid). All images are
    ``(B, C, *S)``, features ``(B, C_g, *S/4)``.

    Attributes:
        feat_a, feat_b: G(x^A), G(x^B).
        transform_ab, transform_ba: T^{A->B}, T^{B->A} outputs.
        disp_ab, disp_ba: full phi displacements on the image grid (normalised).
        synth_b, synth_a: x^B-hat = F_AB(G(x^A)), x^A-hat = F_BA(G(x^B)).
        synth_b_warped, synth_a_warped: x^B-hat_T = F_AB(G(x^A) o phi_AB), x^A-hat_T.
        feat_a_warped, feat_b_warped: G(x^A) o phi_AB, G(x^B) o phi_BA.
        feat_synth_b, feat_synth_a: G(x^B-hat), G(x^A-hat).
        cycle_a, cycle_b: F_BA(G(x^B-hat)), F_AB(G(x^A-hat)).
        reg_b, reg_a: F_AB(G(x^A o phi_AB)), F_BA(G(x^B o phi_BA)) (Eq. 7, image warped before G).
        synth_b_affine, synth_a_affine: F_AB(G(x^A) o phi_af_AB), F_BA(G(x^B) o phi_af_BA) (Eq. 11).
        reg_b_affine, reg_a_affine: F_AB(G(x^A o phi_af_AB)), F_BA(G(x^B o phi_af_BA)) (Eq. 12).
        warped_a, warped_b: x^A o phi_AB, x^B o phi_BA.
        cycled_a, cycled_b: x^A o phi_AB o phi_BA, x^B o phi_BA o phi_AB (Eq. 8).
        feat_b_on_a, feat_a_on_b: G(x^B-on-A), G(x^A-on-B) of the aligned counterparts (the other
            contrast of the same subject under the same transform) when ``forward`` got them, else
            None (not in the paper: the trainer's feature-invariance term).
    """

    feat_a: torch.Tensor
    feat_b: torch.Tensor
    transform_ab: Transform
    transform_ba: Transform
    disp_ab: torch.Tensor
    disp_ba: torch.Tensor
    synth_b: torch.Tensor
    synth_a: torch.Tensor
    synth_b_warped: torch.Tensor
    synth_a_warped: torch.Tensor
    feat_a_warped: torch.Tensor
    feat_b_warped: torch.Tensor
    feat_synth_b: torch.Tensor
    feat_synth_a: torch.Tensor
    cycle_a: torch.Tensor
    cycle_b: torch.Tensor
    reg_b: torch.Tensor
    reg_a: torch.Tensor
    synth_b_affine: torch.Tensor
    synth_a_affine: torch.Tensor
    reg_b_affine: torch.Tensor
    reg_a_affine: torch.Tensor
    warped_a: torch.Tensor
    warped_b: torch.Tensor
    cycled_a: torch.Tensor
    cycled_b: torch.Tensor
    feat_b_on_a: torch.Tensor | None = None
    feat_a_on_b: torch.Tensor | None = None


class Registration(NamedTuple):
    """Inference output of :meth:`Fire.register` (normalised units, moving warped onto the fixed grid).

    Attributes:
        theta: ``(B, ndim, ndim + 1)`` affine part.
        displacement: ``(B, ndim, *S)`` full displacement on the fixed grid.
        warped: ``(B, C, *S)`` moving image warped onto the fixed image.
        flow: ``(B, ndim, *s)`` the non-rigid part u_nr alone, on G's grid (zero when affine-only).
    """

    theta: torch.Tensor
    displacement: torch.Tensor
    warped: torch.Tensor
    flow: torch.Tensor | None = None


def _split(x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    return tuple(x.chunk(parts, dim=0))


class Fire(nn.Module):
    """FIRE: G, F_AB, F_BA, T_AB, T_BA wired as Section 3.1.

    Inputs are normalised images ``(B, in_channels, *S)`` in [-1, 1] (F ends in tanh), with
    every spatial size a multiple of 4 and at least :attr:`min_size`.
    """

    def __init__(self, config: FireConfig | None = None):
        super().__init__()
        self.config = config or FireConfig()
        c = self.config
        self.encoder = Encoder(c.ndim, c.in_channels, c.widths, c.encoder_blocks)
        self.decoder_ab = Decoder(c.ndim, c.in_channels, c.widths, c.decoder_blocks, c.synthesis_head_channels)
        self.decoder_ba = Decoder(c.ndim, c.in_channels, c.widths, c.decoder_blocks, c.synthesis_head_channels)
        self.transform_ab = TransformNet(c)
        self.transform_ba = TransformNet(c)

    # G downsamples by 4; T_af halves G's grid three more times and instance-normalises
    # after the first two, which needs at least 2 values per channel.
    size_multiple = 4
    min_size = 32
    # mm per voxel of the grid the model was trained on (set from the checkpoint by load; None:
    # unknown, run at the caller's spacing). ``register`` runs a coarser model on a coarser copy.
    spacing: float | None = None
    # the checkpoint it was loaded from (set by load; None: built in memory), for error messages
    path: Path | None = None

    @property
    def ndim(self) -> int:
        return self.config.ndim

    def check_input(self, x: torch.Tensor, name: str = "image", finite: bool = True) -> None:
        """Raise a one-line :class:`FirekitError` unless ``x`` fits the network.

        ``finite``: also refuse NaN/Inf values (reading the answer back waits for a GPU).
        """
        expected = self.ndim + 2
        if x.ndim != expected or x.shape[1] != self.config.in_channels:
            raise FirekitError(
                f"{name} must be a tensor (B, {self.config.in_channels}, *spatial) with {self.ndim} spatial dims "
                f"for this {self.ndim}D model, got shape {tuple(x.shape)}"
            )
        spatial_shape = tuple(x.shape[2:])
        if any(s % self.size_multiple or s < self.min_size for s in spatial_shape):
            raise FirekitError(
                f"{name} spatial size {spatial_shape} must be multiples of {self.size_multiple} and at least "
                f"{self.min_size}; pad the image first"
            )
        if finite and not torch.isfinite(x).all():
            raise FirekitError(f"{name} contains NaN or Inf values; clean or mask them before registering")

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters for the paper's three optimisers (Section 3.8): affine, nonrigid, synthesis."""
        return {
            "affine": [*self.transform_ab.affine.parameters(), *self.transform_ba.affine.parameters()],
            "nonrigid": [*self.transform_ab.nonrigid.parameters(), *self.transform_ba.nonrigid.parameters()],
            "synthesis": [
                *self.encoder.parameters(),
                *self.decoder_ab.parameters(),
                *self.decoder_ba.parameters(),
            ],
        }

    def _check_start(self, theta0: torch.Tensor | None, moving: torch.Tensor) -> None:
        """Refuse a missing start for a model trained from one (``prealign="moments"``) and a start of the wrong shape."""
        if theta0 is None:
            if self.config.prealign != "none":
                raise FirekitError(
                    f"this model starts each T from a {self.config.prealign} pre-alignment: pass theta0="
                    "firekit.registration.start.prealign(model.config, moving, fixed) (or register with firekit.register)")
            return
        expected = (moving.shape[0], self.ndim, self.ndim + 1)
        if tuple(theta0.shape) != expected:
            raise FirekitError(f"theta0 must be (B, n, n + 1) = {expected} normalised affines, got {tuple(theta0.shape)}")

    def _transform_net(self, direction: str) -> TransformNet:
        if direction == "a2b":
            return self.transform_ab
        if direction == "b2a":
            return self.transform_ba
        raise FirekitError(f"direction must be 'a2b' or 'b2a', got {direction!r}")

    def _decoder(self, direction: str) -> Decoder:
        self._transform_net(direction)  # validates the name
        return self.decoder_ab if direction == "a2b" else self.decoder_ba

    def synthesise(self, image: torch.Tensor, direction: str = "a2b") -> torch.Tensor:
        """Map an image into the other modality: ``F_AB(G(x))`` for ``"a2b"``, ``F_BA(G(x))`` for ``"b2a"``."""
        self.check_input(image)
        return self._decoder(direction)(self.encoder(image))

    def register(self, moving: torch.Tensor, fixed: torch.Tensor, direction: str = "a2b", affine_only: bool = False,
                 theta0: torch.Tensor | None = None) -> Registration:
        """Register ``moving`` onto ``fixed`` running only G and one T (Section 3.4).

        Args:
            moving: ``(B, C, *S)`` normalised tensor, modality A for ``"a2b"``, B for ``"b2a"`` (for
                files, arrays and millimetres use :func:`firekit.register`).
            fixed: the other modality, same shape.
            direction: ``"a2b"`` (T_AB) or ``"b2a"`` (T_BA).
            affine_only: skip the non-rigid subnet.
            theta0: ``(B, n, n + 1)`` normalised start of T for this direction (fixed point -> moving
                point): needed by a model with ``prealign="moments"``
                (:func:`firekit.registration.start.network_start` computes it); None for the paper's.

        Returns:
            :class:`Registration` (normalised units).
        """
        if not (isinstance(moving, torch.Tensor) and isinstance(fixed, torch.Tensor)):
            raise FirekitError("Fire.register takes normalised tensors (B, C, *spatial); for files, arrays or "
                               "nibabel images use firekit.register(model, moving, fixed)")
        self.check_input(moving, "moving")
        self.check_input(fixed, "fixed")
        if moving.shape != fixed.shape:
            raise FirekitError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} shapes differ")
        net = self._transform_net(direction)
        self._check_start(theta0, moving)
        features = self.encoder(torch.cat([moving, fixed], dim=0))
        feat_moving, feat_fixed = _split(features, 2)
        transform = net(feat_moving, feat_fixed, affine_only=affine_only, theta0=theta0)
        displacement = transform.displacement(moving.shape[2:])
        return Registration(transform.theta, displacement, spatial.warp(moving, displacement), transform.flow)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor, affine_only: bool = False,
                counterparts: tuple[torch.Tensor, torch.Tensor] | None = None,
                theta0: torch.Tensor | None = None) -> FireOutput:
        """Full training graph for a pair ``x_a``, ``x_b`` of shape ``(B, C, *S)``.

        ``counterparts``: ``(x_b_on_a, x_a_on_b)``, the B image aligned with ``x_a`` and the A image
        aligned with ``x_b`` (known for augmented pairs of one subject); G encodes them in the same
        call, for the trainer's feature-invariance term. ``theta0``: ``(B, n, n + 1)`` normalised
        A->B start of T_AB (:func:`firekit.registration.start.prealign`; T_BA starts from its inverse),
        needed by a model with ``prealign="moments"``.

        Calls of the same network are batched together; instance norm is per sample,
        so batching does not change any output. ``affine_only``: both T skip the non-rigid
        subnet (zero flow), for affine-first training. Off the CPU the values are not checked for
        NaN here (that would wait for the GPU every step): :func:`firekit.training.loop.train` checks its
        batches on the host, and ``train_step`` the loss.
        """
        on_cpu = x_a.device.type == "cpu"
        self.check_input(x_a, "x_a", finite=on_cpu)
        self.check_input(x_b, "x_b", finite=on_cpu)
        if x_a.shape != x_b.shape:
            raise FirekitError(f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} shapes differ")
        image_shape = x_a.shape[2:]

        inputs = [x_a, x_b, *(counterparts or ())]
        feat_a, feat_b, *feat_counterparts = _split(self.encoder(torch.cat(inputs)), len(inputs))
        feat_shape = feat_a.shape[2:]
        self._check_start(theta0, x_a)
        # The B->A start is the A->B one inverted, so the two starts are each other's inverse.
        t_ab = self.transform_ab(feat_a, feat_b, affine_only, theta0)
        t_ba = self.transform_ba(feat_b, feat_a, affine_only, None if theta0 is None else spatial.invert_affine(theta0))

        # phi on G's grid (for features) and on the image grid (for images).
        feat_a_warped = spatial.warp(feat_a, t_ab.displacement(feat_shape))
        feat_b_warped = spatial.warp(feat_b, t_ba.displacement(feat_shape))
        feat_a_affine = spatial.warp(feat_a, t_ab.affine_displacement(feat_shape))
        feat_b_affine = spatial.warp(feat_b, t_ba.affine_displacement(feat_shape))
        disp_ab, disp_ba = t_ab.displacement(image_shape), t_ba.displacement(image_shape)
        aff_ab, aff_ba = t_ab.affine_displacement(image_shape), t_ba.affine_displacement(image_shape)

        synth_b, synth_b_warped, synth_b_affine = _split(
            self.decoder_ab(torch.cat([feat_a, feat_a_warped, feat_a_affine])), 3
        )
        synth_a, synth_a_warped, synth_a_affine = _split(
            self.decoder_ba(torch.cat([feat_b, feat_b_warped, feat_b_affine])), 3
        )

        warped_a, warped_b = spatial.warp(x_a, disp_ab), spatial.warp(x_b, disp_ba)
        warped_a_affine, warped_b_affine = spatial.warp(x_a, aff_ab), spatial.warp(x_b, aff_ba)
        (feat_synth_b, feat_warped_a, feat_warped_a_affine,
         feat_synth_a, feat_warped_b, feat_warped_b_affine) = _split(
            self.encoder(torch.cat([synth_b, warped_a, warped_a_affine, synth_a, warped_b, warped_b_affine])), 6
        )
        cycle_b, reg_b, reg_b_affine = _split(
            self.decoder_ab(torch.cat([feat_synth_a, feat_warped_a, feat_warped_a_affine])), 3
        )
        cycle_a, reg_a, reg_a_affine = _split(
            self.decoder_ba(torch.cat([feat_synth_b, feat_warped_b, feat_warped_b_affine])), 3
        )

        # Eq. 8: x^A o phi_AB o phi_BA in one resampling of x^A.
        cycled_a = spatial.warp(x_a, spatial.compose(disp_ab, disp_ba))
        cycled_b = spatial.warp(x_b, spatial.compose(disp_ba, disp_ab))

        return FireOutput(
            feat_a=feat_a, feat_b=feat_b, transform_ab=t_ab, transform_ba=t_ba,
            disp_ab=disp_ab, disp_ba=disp_ba,
            synth_b=synth_b, synth_a=synth_a,
            synth_b_warped=synth_b_warped, synth_a_warped=synth_a_warped,
            feat_a_warped=feat_a_warped, feat_b_warped=feat_b_warped,
            feat_synth_b=feat_synth_b, feat_synth_a=feat_synth_a,
            cycle_a=cycle_a, cycle_b=cycle_b,
            reg_b=reg_b, reg_a=reg_a,
            synth_b_affine=synth_b_affine, synth_a_affine=synth_a_affine,
            reg_b_affine=reg_b_affine, reg_a_affine=reg_a_affine,
            warped_a=warped_a, warped_b=warped_b,
            cycled_a=cycled_a, cycled_b=cycled_b,
            **dict(zip(("feat_b_on_a", "feat_a_on_b"), feat_counterparts)),
        )
