"""What FIRE learned, as pictures: G's latent features and where they are modality-invariant.

Section 6.3 of the paper reads the model through its components. This module gives the arrays
behind those pictures (drawing stays in ``viz``):

- :func:`latent_features`: G's feature maps of an image, for a channel browser;
- :func:`features_to_rgb`: the three principal components of G's channels as an RGB image;
- :func:`invariance_map`: per location, the RMS difference between G(fixed) and G(moving) warped by
  the model's own transform: low where G maps both modalities to the same code (the property the
  synthesis and registration losses ask of it), high where it does not;
- :func:`grad_cam`: Grad-CAM (captum ``LayerGradCam``, upsampled with
  ``LayerAttribution.interpolate``) of one component for a scalar of the pair (:data:`TARGETS`).

All inputs are normalised network tensors ``(B, 1, *S)`` (``register``'s ``NetworkView`` holds them).
"""

from __future__ import annotations

import torch

from firekit.core import spatial
from firekit.fire.model import Fire
from firekit.registration.network import register_from_start
from firekit.registration.start import network_start

__all__ = ["latent_features", "features_to_rgb", "invariance_map", "grad_cam", "target_scalar", "TARGETS"]

# Registration has no class logits: the scalar each component's Grad-CAM explains.
TARGETS = {
    "encoder": "feature misalignment: mean over the ROI of (G(moving) o phi - G(fixed))^2, phi the model's "
               "registration (held fixed); high = where G's code of moving drives the residual disagreement",
    "affine": "squared deviation from the identity of one entry (i, j) of the affine subnet's own output (the "
              "residual after the moments pre-alignment, if any; default the translation along axis 0): where "
              "the features push the affine correction",
    "nonrigid": "mean magnitude of the non-rigid displacement u_nr inside the ROI",
    "decoder": "mean synthesised intensity F(G(moving)) inside the ROI (the decoder of the direction)",
}
# The layer each component's Grad-CAM is taken at (the component's last spatial feature map).
_LAYERS = {
    "encoder": lambda model, net, decoder: model.encoder,
    "affine": lambda model, net, decoder: net.affine.features,
    "nonrigid": lambda model, net, decoder: net.nonrigid.res,
    "decoder": lambda model, net, decoder: decoder.up2,
}


def latent_features(model: Fire, image: torch.Tensor) -> torch.Tensor:
    """G(image): ``(B, C, *S/4)`` latent features, without gradient."""
    model.check_input(image)
    with torch.no_grad():
        return model.encoder(image)


def features_to_rgb(features: torch.Tensor, percentile: float = 1.0) -> torch.Tensor:
    """The first three principal components of the channels, per sample, as RGB in [0, 1].

    Each sample's channels are centred and projected on the eigenvectors of their covariance over
    all locations (largest variance first = red); each component is stretched between its
    ``percentile`` and ``100 - percentile`` percentiles. The sign of a component is arbitrary (PCA).

    Args:
        features: ``(B, C, *s)`` with C >= 3.

    Returns:
        ``(B, 3, *s)`` float32.
    """
    if features.ndim < 4 or features.shape[1] < 3:
        raise ValueError(f"features must be (B, C >= 3, *spatial), got {tuple(features.shape)}")
    batch, channels = features.shape[:2]
    flat = features.detach().double().flatten(2)  # (B, C, N)
    centred = flat - flat.mean(dim=2, keepdim=True)
    covariance = centred @ centred.transpose(1, 2) / max(flat.shape[2] - 1, 1)  # (B, C, C)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    top = vectors[:, :, -3:].flip(-1)  # (B, C, 3), largest first
    components = top.transpose(1, 2) @ centred  # (B, 3, N)
    q = torch.tensor([percentile / 100, 1 - percentile / 100], dtype=components.dtype)
    low, high = torch.quantile(components, q, dim=2, keepdim=True)  # each (B, 3, 1)
    rgb = ((components - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    return rgb.view(batch, 3, *features.shape[2:]).float()


def invariance_map(model: Fire, moving: torch.Tensor, fixed: torch.Tensor, direction: str = "a2b",
                   displacement: torch.Tensor | None = None) -> torch.Tensor:
    """RMS over channels of ``G(fixed) - G(moving) o phi`` at every feature location.

    Args:
        moving, fixed: ``(B, 1, *S)`` normalised images (moving is modality A for ``"a2b"``).
        displacement: ``(B, n, *S)`` normalised phi (default: the model's own registration).

    Returns:
        ``(B, *S/4)`` float32, in feature units (0 where the warped codes agree exactly).
    """
    model.check_input(moving, "moving")
    model.check_input(fixed, "fixed")
    with torch.no_grad():
        if displacement is None:
            displacement = register_from_start(model, moving, fixed, direction).displacement
        difference = _squared_feature_difference(model.encoder(moving), model.encoder(fixed), displacement)
        return difference.mean(dim=1).sqrt().float()


def _squared_feature_difference(feat_moving: torch.Tensor, feat_fixed: torch.Tensor,
                                displacement: torch.Tensor) -> torch.Tensor:
    """``(G(moving) o phi - G(fixed))^2`` per channel ``(B, C, *s)``; phi ``(B, n, *S)`` normalised,
    resampled to the feature grid."""
    coarse = spatial.resize_displacement(displacement, feat_fixed.shape[2:])
    return (spatial.warp(feat_moving, coarse) - feat_fixed).square()


def _roi_mean(values: torch.Tensor, roi: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(B, C, *s)`` over channels and the ROI (resized to ``s``, nearest) -> ``(B,)``."""
    if roi is None:
        return values.flatten(1).mean(dim=1)
    mask = torch.nn.functional.interpolate(roi.float(), size=values.shape[2:], mode="nearest")
    weights = mask.expand_as(values).flatten(1)
    return (values.flatten(1) * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def target_scalar(model: Fire, component: str, direction: str, fixed: torch.Tensor, target=None, roi=None):
    """The scalar of :data:`TARGETS` for ``component`` as a function of the moving image.

    What :func:`grad_cam` differentiates; usable with any captum attribution (occlusion,
    integrated gradients) or by hand. Args as :func:`grad_cam`.

    Returns:
        ``forward(moving (B, 1, *S)) -> (B,)``; G(fixed) is computed once and held fixed.
    """
    if component not in TARGETS:
        raise ValueError(f"component must be one of {sorted(TARGETS)}, got {component!r}")
    net, decoder = model._transform_net(direction), model._decoder(direction)
    with torch.no_grad():
        feat_fixed = model.encoder(fixed)  # G(fixed) is held fixed: the CAM is about moving's path

    def forward(moving: torch.Tensor) -> torch.Tensor:
        feat_moving = model.encoder(moving)
        if component == "decoder":
            return _roi_mean(decoder(feat_moving), roi)
        theta0 = network_start(model.config, moving, fixed, direction)
        if component == "affine":
            residual = net.affine_residual(feat_moving, feat_fixed, theta0)
            residual = residual - spatial.identity_affine(model.ndim, residual.shape[0], like=residual)
            i, j = target if target is not None else (0, model.ndim)
            return residual[:, i, j].square()
        transform = net(feat_moving, feat_fixed, theta0=theta0)
        if component == "nonrigid":
            return _roi_mean(transform.flow.norm(dim=1, keepdim=True), roi)
        displacement = transform.displacement(moving.shape[2:]).detach()  # phi held fixed
        return _roi_mean(_squared_feature_difference(feat_moving, feat_fixed, displacement), roi)

    return forward


def grad_cam(model: Fire, moving: torch.Tensor, fixed: torch.Tensor, component: str, direction: str = "a2b",
             target: tuple[int, int] | None = None, roi: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM of ``component`` for its scalar (:data:`TARGETS`), upsampled to the image grid.

    Args:
        moving, fixed: ``(B, 1, *S)`` normalised images (moving is modality A for ``"a2b"``).
        component: ``"encoder"``, ``"affine"``, ``"nonrigid"`` or ``"decoder"``.
        target: ``(i, j)`` of the affine entry explained (``"affine"`` only).
        roi: ``(B, 1, *S)`` mask where the scalar is measured (default everywhere).

    Returns:
        ``(B, *S)`` float32 in [0, 1]: ReLU of the gradient-weighted layer activations, each map
        divided by its maximum (all zero where nothing pushes the scalar up).
    """
    from captum.attr import LayerAttribution, LayerGradCam

    if component not in TARGETS:
        raise ValueError(f"component must be one of {sorted(TARGETS)}, got {component!r}")
    model.check_input(moving, "moving")
    model.check_input(fixed, "fixed")
    layer = _LAYERS[component](model, model._transform_net(direction), model._decoder(direction))
    with torch.enable_grad():
        cam = LayerGradCam(target_scalar(model, component, direction, fixed, target, roi), layer).attribute(
            moving.detach().clone().requires_grad_(True), relu_attributions=True)
    # A layer that runs on moving and fixed stacked (the keypoint T_af): moving's rows come first.
    cam = cam[: moving.shape[0]]
    mode = "bilinear" if model.ndim == 2 else "trilinear"
    cam = LayerAttribution.interpolate(cam.detach(), tuple(moving.shape[2:]), interpolate_mode=mode)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-30).view(-1, *[1] * model.ndim)
    return (cam / peak).clamp(0, 1).float()
