"""Each FIRE loss term is zero where the paper's definition says so, and positive otherwise."""

import math

import pytest
import torch

from firekit import FireConfig, Fire
from firekit.fire import losses
from firekit.core import spatial

TINY = dict(widths=(4, 6, 8), encoder_blocks=1, decoder_blocks=1, affine_channels=(4, 4, 4), affine_hidden=8,
            flow_channels=4)


def tiny_model(ndim, seed=0):
    torch.manual_seed(seed)
    return Fire(FireConfig.from_preset("small", ndim, **TINY))


def identity_transforms(model):
    """Make both T nets output exactly the identity (the affine head starts there; zero the flow head)."""
    with torch.no_grad():
        for net in (model.transform_ab, model.transform_ba):
            net.nonrigid.out.weight.zero_()
            net.nonrigid.out.bias.zero_()
    return model


def test_rms_value_and_gradient_at_zero():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.5)
    assert math.isclose(float(losses.rms(a, b)), 0.5, rel_tol=1e-6)
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    value = losses.rms(x, x.detach())
    value.backward()
    assert float(value.detach()) < 1e-5 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("term", [losses.syn_acc, losses.syn_fea, losses.syn_cyc, losses.syn_align,
                                  losses.reg_acc, losses.reg_ic, losses.r_syn, losses.r_reg])
def test_each_rms_term_is_zero_on_identical_inputs_and_positive_otherwise(term):
    x = torch.randn(2, 1, 8, 8)
    y = torch.randn(2, 1, 8, 8)
    assert float(term(x, x, y, y)) < 1e-5
    assert float(term(x, y, y, y)) > 0.5


@pytest.mark.parametrize("ndim", [2, 3])
def test_bending_energy_zero_for_affine_and_exact_for_quadratic(ndim):
    shape = (9, 10, 11)[:ndim]
    theta = spatial.affine_matrix(ndim, rotation=[15.0] * (1 if ndim == 2 else 3), scale=1.2, translation=0.1)
    assert float(losses.bending_energy(spatial.affine_to_displacement(theta, shape))) < 1e-8
    grid = spatial.identity_grid(shape)
    field = torch.zeros(1, ndim, *shape)
    a, b = 0.3, 0.2
    field[0, 0] = a * grid[0, 0] ** 2  # d2u0/dx0^2 = 2a
    field[0, 1] = b * grid[0, 0] * grid[0, 1]  # d2u1/dx0dx1 = b, counted twice
    interior = math.prod(s - 2 for s in shape)
    expected = ((2 * a) ** 2 + 2 * b ** 2) * interior
    assert math.isclose(float(losses.bending_energy(field)), expected, rel_tol=1e-4)
    assert math.isclose(float(losses.bending_energy(field, reduction="mean")), expected / interior, rel_tol=1e-4)


def test_smooth_lambda_formula():
    assert losses.smooth_lambda(2, 128 * 160) == pytest.approx(16 / (10 * 128 * 160))
    assert losses.smooth_lambda(3, 64 ** 3) == pytest.approx(64 / (10 * 64 ** 3))


@pytest.mark.parametrize("ndim", [2, 3])
def test_model_level_terms_vanish_with_identity_transforms(ndim):
    """Identity transforms: Eq. 8 and Eq. 10 are zero; identical inputs also zero Eq. 3."""
    model = identity_transforms(tiny_model(ndim))
    x = torch.rand(1, 1, *([32] * ndim)) * 2 - 1
    with torch.no_grad():
        out = model(x, x.clone())
        loss = losses.fire_loss(out, x, x)
    assert float(loss.reg_ic) < 1e-4
    assert float(loss.r_smooth) < 1e-8
    assert float(loss.syn_fea) < 1e-4
    # identical inputs + identity transforms: warped = plain synthesis, so Eq. 2 equals Eq. 11
    assert math.isclose(float(loss.syn_acc), float(loss.r_syn), rel_tol=1e-4)
    # every term is finite and the total is Eq. 1
    assert all(math.isfinite(v) for v in loss.as_floats().values())
    assert math.isclose(float(loss.total), float(loss.syn + loss.reg + loss.regularisation), rel_tol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_terms_respond_to_misalignment(ndim):
    """A shifted pair gives a non-zero feature term; a non-identity flow gives bending energy."""
    model = identity_transforms(tiny_model(ndim))
    x = torch.rand(1, 1, *([32] * ndim)) * 2 - 1
    shifted = torch.roll(x, shifts=5, dims=2)
    with torch.no_grad():
        loss = losses.fire_loss(model(x, shifted), x, shifted)
    assert float(loss.syn_fea) > 1e-3
    flow = 0.05 * torch.randn(1, ndim, *([8] * ndim))
    assert float(losses.r_smooth(flow, flow)) > 1.0
