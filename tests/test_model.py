"""The FIRE model: wiring, gradients, inference path, checkpoints, 2D and 3D."""

import pytest
import torch

from firekit import Fire, FireConfig, FirekitError, TrainConfig, load, make_optimizers, train_step
from firekit.core import spatial
from firekit.fire.checkpoint import save_model
from firekit.fire.losses import fire_loss

TINY = dict(widths=(4, 6, 8), encoder_blocks=1, decoder_blocks=1, affine_channels=(4, 4, 4), affine_hidden=8,
            flow_channels=4)
SUBNETS = ("encoder", "decoder_ab", "decoder_ba", "transform_ab.affine", "transform_ab.nonrigid",
           "transform_ba.affine", "transform_ba.nonrigid")


def tiny(ndim, seed=0):
    torch.manual_seed(seed)
    return Fire(FireConfig.from_preset("small", ndim, **TINY))


def pair(ndim, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 1, *([size] * ndim))
    return torch.rand(shape, generator=generator) * 2 - 1, torch.rand(shape, generator=generator) * 2 - 1


@pytest.mark.parametrize("ndim", [2, 3])
def test_forward_shapes(ndim):
    model = tiny(ndim)
    x_a, x_b = pair(ndim)
    out = model(x_a, x_b)
    image, feat = x_a.shape, (1, 8, *([8] * ndim))
    assert out.feat_a.shape == feat and out.feat_a_warped.shape == feat
    assert out.transform_ab.theta.shape == (1, ndim, ndim + 1)
    assert out.transform_ab.flow.shape == (1, ndim, *([8] * ndim))  # non-rigid field on G's grid
    assert out.disp_ab.shape == (1, ndim, *([32] * ndim))
    for name in ("synth_a", "synth_b", "synth_b_warped", "cycle_a", "reg_b", "reg_a_affine", "warped_a", "cycled_b"):
        assert getattr(out, name).shape == image, name
    assert out.synth_b.abs().max() <= 1.0  # tanh output


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_head_starts_at_identity(ndim):
    model = tiny(ndim)
    x_a, x_b = pair(ndim)
    out = model(x_a, x_b)
    assert torch.allclose(out.transform_ab.theta, spatial.identity_affine(ndim, 1), atol=1e-6)
    assert out.transform_ab.flow.abs().max() < 1e-3


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradients_reach_every_subnetwork(ndim):
    """After one step (the affine head's last layer starts at zero weight), every parameter gets a gradient."""
    model = tiny(ndim)
    x_a, x_b = pair(ndim)
    optimizers = make_optimizers(model, TrainConfig.from_preset("small"))
    train_step(model, optimizers, x_a, x_b)
    for optimizer in optimizers.values():
        optimizer.zero_grad()
    fire_loss(model(x_a, x_b), x_a, x_b).total.backward()
    modules = dict(model.named_modules())
    for name in SUBNETS:
        for pname, param in modules[name].named_parameters():
            assert param.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name}.{pname} has a non-finite gradient"
            assert param.grad.abs().sum() > 0, f"{name}.{pname} has a zero gradient"


def test_param_groups_partition_the_parameters():
    model = tiny(2)
    groups = model.param_groups()
    assert set(groups) == {"affine", "nonrigid", "synthesis"}
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_paper_preset_sizes_and_rates():
    config = FireConfig.from_preset("paper", 2)
    assert config.widths == (64, 128, 256) and config.encoder_blocks == 4 and config.decoder_blocks == 4
    model = Fire(config)
    assert model.encoder.net[0][0].kernel_size == (7, 7)
    assert [model.encoder.net[i][0].stride for i in (1, 2)] == [(2, 2), (2, 2)]
    rates = TrainConfig.from_preset("paper")
    assert (rates.lr_affine, rates.lr_nonrigid, rates.lr_synthesis) == (1e-5, 5e-5, 1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_register_runs_only_the_encoder_and_one_transform_net(ndim):
    model = tiny(ndim).eval()
    called = set()
    for name in ("encoder", "decoder_ab", "decoder_ba", "transform_ab", "transform_ba"):
        getattr(model, name).register_forward_hook(lambda *_, name=name: called.add(name))
    x_a, x_b = pair(ndim)
    with torch.no_grad():
        result = model.register(x_a, x_b, direction="b2a")
    assert called == {"encoder", "transform_ba"}
    assert result.warped.shape == x_a.shape and result.displacement.shape == (1, ndim, *x_a.shape[2:])
    with torch.no_grad():
        affine = model.register(x_a, x_b, affine_only=True)
    expected = spatial.affine_to_displacement(affine.theta, x_a.shape[2:])
    assert torch.allclose(affine.displacement, expected, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_save_and_load_rebuild_the_model(tmp_path, ndim):
    model = tiny(ndim).eval()
    path = save_model(model, tmp_path / "run" / "model.pt", extra={"step": 3})
    loaded = load(path).eval()
    assert loaded.config == model.config
    x_a, x_b = pair(ndim)
    with torch.no_grad():
        assert torch.equal(model.register(x_a, x_b).displacement, loaded.register(x_a, x_b).displacement)
    assert not list(tmp_path.glob("run/*.tmp"))


def test_bad_inputs_raise_one_line_errors(tmp_path):
    model = tiny(2)
    with pytest.raises(FirekitError, match="multiples of 4"):
        model.register(torch.zeros(1, 1, 34, 32), torch.zeros(1, 1, 34, 32))
    with pytest.raises(FirekitError, match="at least 32"):
        model.register(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(FirekitError, match="2 spatial dims"):
        model.register(torch.zeros(1, 1, 32, 32, 32), torch.zeros(1, 1, 32, 32, 32))
    bad = torch.zeros(1, 1, 32, 32)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(FirekitError, match="NaN"):
        model.register(bad, torch.zeros(1, 1, 32, 32))
    with pytest.raises(FirekitError, match="direction"):
        model.register(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), direction="sideways")
    with pytest.raises(FirekitError, match="checkpoint not found"):
        load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FirekitError, match="not a loadable firekit checkpoint") as info:
        load(tmp_path / "junk.pt")
    assert "\n" not in str(info.value)


def test_warmup_ramps_rates_and_leaves_them_alone_when_off():
    model = tiny(2)
    x_a, x_b = pair(2)
    optimizers = make_optimizers(model, TrainConfig.from_preset("small"))
    optimizers["affine"].param_groups[0]["lr"] = 0.5  # a caller's own rate
    train_step(model, optimizers, x_a, x_b)
    assert optimizers["affine"].param_groups[0]["lr"] == 0.5
    optimizers = make_optimizers(model, TrainConfig.from_preset("small"))
    train_step(model, optimizers, x_a, x_b, step=0, warmup_steps=4)
    assert optimizers["synthesis"].param_groups[0]["lr"] == 1e-3 / 4
    train_step(model, optimizers, x_a, x_b, step=9, warmup_steps=4)
    assert optimizers["synthesis"].param_groups[0]["lr"] == 1e-3
