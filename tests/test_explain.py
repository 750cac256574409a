"""Latent features, their principal components as RGB, and the modality-invariance map."""

import pytest
import torch

from firekit.explain import maps as explain
from firekit.core import spatial
from firekit.fire.model import Fire, FireConfig


def small_model(ndim: int = 2) -> Fire:
    torch.manual_seed(0)
    return Fire(FireConfig.from_preset("small", ndim=ndim)).eval()


@pytest.mark.parametrize("ndim", [2, 3])
def test_latent_features_are_g_of_the_image(ndim):
    model = small_model(ndim)
    image = torch.rand(1, 1, *([32] * ndim)) * 2 - 1
    features = explain.latent_features(model, image)
    assert features.shape == (1, model.config.widths[2], *([8] * ndim))
    torch.testing.assert_close(features, model.encoder(image).detach())


def test_rgb_components_follow_the_strongest_pattern_first():
    torch.manual_seed(1)
    ramp = torch.linspace(-1, 1, 20).view(20, 1).expand(20, 24)
    stripes = torch.sin(torch.arange(24.0)).view(1, 24).expand(20, 24)
    channels = [3.0 * ramp * w + 0.5 * stripes * v for w, v in zip(torch.randn(6), torch.randn(6))]
    features = torch.stack(channels)[None] + 0.01 * torch.randn(1, 6, 20, 24)
    rgb = explain.features_to_rgb(features)
    assert rgb.shape == (1, 3, 20, 24) and rgb.min() >= 0 and rgb.max() <= 1
    red = rgb[0, 0].flatten() - rgb[0, 0].mean()
    correlation = (red @ (ramp.flatten() - ramp.mean())) / (red.norm() * (ramp - ramp.mean()).norm())
    assert abs(correlation) > 0.97  # the ramp carries the most variance: first component (1 % clipped)
    with pytest.raises(ValueError, match="C >= 3"):
        explain.features_to_rgb(torch.zeros(1, 2, 4, 4))


def test_invariance_map_is_zero_for_one_image_and_follows_a_given_transform():
    model = small_model(2)
    torch.manual_seed(2)
    image = torch.rand(1, 1, 48, 48) * 2 - 1
    zero = torch.zeros(1, 2, 48, 48)
    same = explain.invariance_map(model, image, image, displacement=zero)
    assert same.shape == (1, 12, 12) and float(same.max()) < 1e-4
    other = torch.rand(1, 1, 48, 48) * 2 - 1
    assert float(explain.invariance_map(model, other, image, displacement=zero).mean()) > 0.01
    # the model's own transform is used when none is given
    default = explain.invariance_map(model, other, image)
    own = explain.invariance_map(model, other, image, displacement=model.register(other, image).displacement.detach())
    torch.testing.assert_close(default, own)
    # a smooth image shifted by 8 pixels (2 feature voxels), warped back by that shift, agrees inside
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij"))
    smooth = (torch.exp(-((grid - torch.tensor([0.2, -0.1]).view(2, 1, 1)) ** 2).sum(0) / 0.1)
              - torch.exp(-((grid + torch.tensor([0.3, 0.2]).view(2, 1, 1)) ** 2).sum(0) / 0.05))[None, None]
    theta = spatial.affine_matrix(2, translation=(16 / 47, 0.0))  # 8 voxels with align_corners=True
    shift = spatial.affine_to_displacement(theta, (48, 48))
    moved = spatial.warp(smooth, spatial.affine_to_displacement(spatial.invert_affine(theta), (48, 48)))
    aligned = explain.invariance_map(model, moved, smooth, displacement=shift)
    unaligned = explain.invariance_map(model, moved, smooth, displacement=zero)
    inner = (slice(None), slice(3, -3), slice(3, -3))
    assert float(aligned[inner].mean()) < 0.5 * float(unaligned[inner].mean())


@pytest.fixture(scope="module")
def shipped_pair():
    from firekit.data.phantom import phantom_pair
    from firekit.registration.pipeline import load

    pair = phantom_pair((64, 64), spatial.affine_matrix(2, rotation=10, translation=(0.1, 0.0)), seed=1,
                        contrasts=("t1", "t2"))
    return load("default"), pair.x_b, pair.x_a  # T2-like moving, T1 fixed: direction b2a


@pytest.mark.parametrize("component", sorted(explain.TARGETS))
def test_grad_cam_of_every_component_is_a_map_on_the_image_grid(component, shipped_pair):
    model, moving, fixed = shipped_pair
    cam = explain.grad_cam(model, moving, fixed, component, direction="b2a")
    assert cam.shape == (1, 64, 64) and torch.isfinite(cam).all()
    assert float(cam.min()) >= 0 and float(cam.max()) == pytest.approx(1.0)
    # the region the scalar is measured in changes the explanation (not the affine: it has no region)
    if component != "affine":
        left = torch.zeros(1, 1, 64, 64)
        left[..., :24] = 1
        assert not torch.allclose(explain.grad_cam(model, moving, fixed, component, direction="b2a", roi=left), cam)


def test_grad_cam_of_an_affine_subnet_that_ignores_its_input_is_zero():
    """A fresh model's affine output layer has zero weights: nothing in the image moves theta."""
    model = small_model(2)
    moving, fixed = torch.rand(2, 1, 1, 48, 40) * 2 - 1
    assert float(explain.grad_cam(model, moving, fixed, "affine").max()) == 0.0


def test_grad_cam_in_3d_and_bad_component():
    model = small_model(3)
    moving, fixed = torch.rand(2, 1, 1, 32, 32, 32) * 2 - 1
    cam = explain.grad_cam(model, moving, fixed, "decoder")
    assert cam.shape == (1, 32, 32, 32) and torch.isfinite(cam).all()
    with pytest.raises(ValueError, match="component must be one of"):
        explain.grad_cam(model, moving, fixed, "everything")
