"""n-D building blocks of FIRE (Sections 3.2-3.3): encoder G, decoder F, affine and flow heads.

Every block is written once; ``ndim`` (2 or 3) picks ``Conv2d``/``Conv3d`` etc.
Tensors are ``(B, C, *spatial)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as nnf

__all__ = ["ConvBlock", "ResBlock", "Encoder", "Decoder", "AffineHead", "KeypointAffineHead", "FlowHead",
           "fit_affine"]


def _conv(ndim: int) -> type[nn.Module]:
    return getattr(nn, f"Conv{ndim}d")


def _instance_norm(ndim: int, channels: int) -> nn.Module:
    return getattr(nn, f"InstanceNorm{ndim}d")(channels, affine=False)


def _activation(leaky: float | None) -> nn.Module:
    return nn.LeakyReLU(leaky, inplace=True) if leaky else nn.ReLU(inplace=True)


class ConvBlock(nn.Sequential):
    """Conv -> instance norm (optional) -> ReLU / LeakyReLU.

    The conv has no bias when a norm follows it (instance norm removes it anyway,
    and a bias with zero gradient would only confuse gradient checks).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm: bool = True,
        leaky: float | None = None,
    ):
        layers: list[nn.Module] = [
            _conv(ndim)(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=not norm)
        ]
        if norm:
            layers.append(_instance_norm(ndim, out_channels))
        layers.append(_activation(leaky))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """CycleGAN residual block: x + IN(conv(act(IN(conv(x)))))."""

    def __init__(self, ndim: int, channels: int, leaky: float | None = None):
        super().__init__()
        conv = _conv(ndim)
        self.body = nn.Sequential(
            conv(channels, channels, 3, padding=1, bias=False),
            _instance_norm(ndim, channels),
            _activation(leaky),
            conv(channels, channels, 3, padding=1, bias=False),
            _instance_norm(ndim, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """G: 7x7 conv (stride 1), two 3x3 stride-2 convs, residual blocks (Section 3.2).

    Maps ``(B, in_channels, *S)`` to latent features ``(B, widths[2], *S/4)``.
    """

    def __init__(self, ndim: int, in_channels: int, widths: Sequence[int], n_res: int):
        super().__init__()
        w0, w1, w2 = widths
        self.net = nn.Sequential(
            ConvBlock(ndim, in_channels, w0, 7),
            ConvBlock(ndim, w0, w1, 3, stride=2),
            ConvBlock(ndim, w1, w2, 3, stride=2),
            *[ResBlock(ndim, w2) for _ in range(n_res)],
        )
        self.out_channels = w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """F: residual blocks, two x2 upsampling 3x3 convs, a 7x7 conv block, 1x1 conv + tanh.

    Maps features ``(B, widths[2], *S/4)`` to an image ``(B, out_channels, *S)`` in [-1, 1].
    Upsampling is resize-then-convolve (stride-1 convs, as Section 3.2 states).
    """

    def __init__(
        self, ndim: int, out_channels: int, widths: Sequence[int], n_res: int, head_channels: int = 3
    ):
        super().__init__()
        w0, w1, w2 = widths
        self.mode = "bilinear" if ndim == 2 else "trilinear"
        self.res = nn.Sequential(*[ResBlock(ndim, w2) for _ in range(n_res)])
        self.up1 = ConvBlock(ndim, w2, w1, 3)
        self.up2 = ConvBlock(ndim, w1, w0, 3)
        self.head = nn.Sequential(
            ConvBlock(ndim, w0, head_channels, 7),
            _conv(ndim)(head_channels, out_channels, 1),
            nn.Tanh(),
        )

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        return nnf.interpolate(x, scale_factor=2, mode=self.mode, align_corners=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.res(features)
        x = self.up1(self._upsample(x))
        x = self.up2(self._upsample(x))
        return self.head(x)


class AffineHead(nn.Module):
    """T_af: conv stack on concatenated features, global average pooling, two dense layers.

    Three stride-2 convs (kernels 7, 5, 3) with LeakyReLU; instance norm on the first
    two only. ``pooling="moments"`` (not in the paper) pools each channel into its mean and
    the centroid and second moments of its spatial softmax, in normalised coordinates, so the
    dense layers see where each feature is, not only how strong: translation, scale and
    rotation become nearly linear in the pooled vector (the paper's global average pooling,
    ``"mean"``, keeps only the strength). An instance norm right before the pooling would make every pooled
    channel a constant (its mean is zero by construction), and the head would ignore
    its input (measured, see FINDINGS.md). The last dense layer starts at zero weight
    and identity bias, so the head starts at the identity transform.

    ``forward(features (B, 2*C, *s)) -> theta (B, ndim, ndim + 1)`` in normalised coordinates.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        channels: Sequence[int] = (8, 10, 20),
        hidden: int = 32,
        leaky: float = 0.2,
        pooling: str = "mean",
    ):
        super().__init__()
        c1, c2, c3 = channels
        if pooling not in ("mean", "moments"):
            raise ValueError(f"pooling must be 'mean' or 'moments', got {pooling!r}")
        self.ndim, self.pooling = ndim, pooling
        self.features = nn.Sequential(
            ConvBlock(ndim, in_channels, c1, 7, stride=2, leaky=leaky),
            ConvBlock(ndim, c1, c2, 5, stride=2, leaky=leaky),
            ConvBlock(ndim, c2, c3, 3, stride=2, norm=False, leaky=leaky),
        )
        pooled = c3 if pooling == "mean" else c3 * (1 + ndim + ndim * (ndim + 1) // 2)
        self.dense = nn.Sequential(nn.Linear(pooled, hidden), nn.LeakyReLU(leaky, inplace=True))
        self.out = nn.Linear(hidden, ndim * (ndim + 1))
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.copy_(torch.eye(ndim, ndim + 1).flatten())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.features(features)
        x = x.flatten(2).mean(dim=2) if self.pooling == "mean" else self._moments(x)
        theta = self.out(self.dense(x))
        return theta.view(-1, self.ndim, self.ndim + 1)


    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *s)`` -> ``(B, C * (1 + n + n(n+1)/2))``: mean, softmax centroid, second moments."""
        shape = x.shape[2:]
        axes = [torch.linspace(-1.0, 1.0, size, device=x.device, dtype=x.dtype) for size in shape]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (n, N)
        flat = x.flatten(2)  # (B, C, N)
        weights = torch.softmax(flat, dim=-1)
        centroid = torch.einsum("bcn,in->bci", weights, coords)  # (B, C, n)
        offsets = coords[None, None] - centroid[..., None]  # (B, C, n, N)
        pairs = [(i, j) for i in range(self.ndim) for j in range(i, self.ndim)]
        second = torch.stack([(weights * offsets[:, :, i] * offsets[:, :, j]).sum(-1) for i, j in pairs], dim=-1)
        return torch.cat([flat.mean(dim=-1), centroid.flatten(1), second.flatten(1)], dim=1)


def soft_centroids(heatmaps: torch.Tensor) -> torch.Tensor:
    """Spatial-softmax centroid of each channel: ``(B, K, *s)`` -> ``(B, K, ndim)``, normalised
    coordinates in the array's axis order (-1 and +1 at the centres of the end voxels)."""
    shape = heatmaps.shape[2:]
    axes = [torch.linspace(-1.0, 1.0, size, device=heatmaps.device, dtype=heatmaps.dtype) for size in shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (n, N)
    weights = torch.softmax(heatmaps.flatten(2), dim=-1)  # (B, K, N)
    return torch.einsum("bkn,in->bki", weights, coords)


def fit_affine(fixed_points: torch.Tensor, moving_points: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Least-squares affine ``theta`` with ``theta @ [p_fixed, 1] ~ p_moving``, pulled toward the identity.

    Minimises ``sum_k |A p_k + t - q_k|^2 + ridge * K * |[A t] - [I 0]|^2`` in closed form, so two
    identical point sets give the identity and collapsed points stay near it.

    Args:
        fixed_points, moving_points: ``(B, K, ndim)`` corresponding points, normalised coordinates.
        ridge: strength of the pull toward the identity, per point.

    Returns:
        ``(B, ndim, ndim + 1)``, mapping fixed-grid points to moving points (firekit's convention).
    """
    if fixed_points.shape != moving_points.shape or fixed_points.ndim != 3:
        raise ValueError(f"fit_affine needs two (B, K, ndim) point sets, got {tuple(fixed_points.shape)} "
                         f"and {tuple(moving_points.shape)}")
    batch, count, ndim = fixed_points.shape
    dtype = fixed_points.dtype
    fixed_points, moving_points = fixed_points.double(), moving_points.double()
    design = torch.cat([fixed_points, torch.ones_like(fixed_points[..., :1])], dim=-1)  # (B, K, n+1)
    identity = torch.eye(ndim + 1, ndim, dtype=design.dtype, device=design.device)  # [I; 0]: (n+1, n)
    weight = ridge * count
    normal = design.transpose(1, 2) @ design + weight * torch.eye(ndim + 1, dtype=design.dtype, device=design.device)
    rhs = design.transpose(1, 2) @ moving_points + weight * identity
    solution = torch.linalg.solve(normal, rhs)  # (B, n+1, n)
    return solution.transpose(1, 2).to(dtype)


class KeypointAffineHead(nn.Module):
    """T_af as keypoints (not in the paper; in the spirit of KeyMorph): one conv stack finds ``K``
    soft keypoints in each image's features alone, and the affine is their least-squares fit.

    The same stack runs on the moving and on the fixed features (stacked along the batch), each
    of its ``K`` output channels is pooled into its spatial-softmax centroid, and
    :func:`fit_affine` maps the fixed image's points onto the moving image's. Moving the
    anatomy moves the points with it, so the head only has to find the same landmarks in both
    modalities (what G's modality-invariant features are for); the paper's global average pooling
    has to learn to read positions out of pooled strengths. Starts near the identity: untrained
    points of two similar images nearly coincide.

    ``forward(features (B, 2*C, *s)) -> theta (B, ndim, ndim + 1)``: the first ``C`` channels are
    the moving image's features, the last ``C`` the fixed image's.
    """

    def __init__(self, ndim: int, in_channels: int, channels: Sequence[int] = (16, 32, 64), leaky: float = 0.2,
                 keypoints: int = 32, ridge: float = 1e-3):
        super().__init__()
        if in_channels % 2:
            raise ValueError(f"KeypointAffineHead takes moving and fixed features stacked: even channels, got {in_channels}")
        c1, c2, _ = channels
        self.ndim, self.ridge = ndim, ridge
        self.features = nn.Sequential(
            ConvBlock(ndim, in_channels // 2, c1, 7, stride=2, leaky=leaky),
            ConvBlock(ndim, c1, c2, 5, leaky=leaky),
            ConvBlock(ndim, c2, c2, 3, leaky=leaky),
        )
        self.heatmaps = _conv(ndim)(c2, keypoints, 1)

    def keypoints(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(moving, fixed)`` keypoints ``(B, K, ndim)`` from stacked features ``(B, 2*C, *s)``."""
        moving, fixed = features.chunk(2, dim=1)
        points = soft_centroids(self.heatmaps(self.features(torch.cat([moving, fixed], dim=0))).float())
        return points.chunk(2, dim=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        moving_points, fixed_points = self.keypoints(features)
        return fit_affine(fixed_points, moving_points, self.ridge).to(features.dtype)


class FlowHead(nn.Module):
    """T_nr: parallel conv branches on the two features, concatenation, residual block, conv + tanh.

    ``forward(moving (B, C, *s), fixed (B, C, *s)) -> u (B, ndim, *s)``, a displacement in
    normalised coordinates (tanh keeps it in [-1, 1], the whole field of view). The last
    conv starts with tiny weights so the initial field is almost zero but gradients flow.
    """

    def __init__(self, ndim: int, in_channels: int, channels: int = 64, leaky: float = 0.2):
        super().__init__()
        self.moving_branch = ConvBlock(ndim, in_channels, channels, 3, leaky=leaky)
        self.fixed_branch = ConvBlock(ndim, in_channels, channels, 3, leaky=leaky)
        self.res = ResBlock(ndim, 2 * channels, leaky=leaky)
        self.out = _conv(ndim)(2 * channels, ndim, 3, padding=1)
        nn.init.normal_(self.out.weight, std=1e-5)
        nn.init.zeros_(self.out.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.moving_branch(moving), self.fixed_branch(fixed)], dim=1)
        return torch.tanh(self.out(self.res(x)))
