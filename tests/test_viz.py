"""Pictures and controls: affines read as rotation/scale/shear/translation, orientation, grids,
Jacobian panels, the ipywidgets explorers, the slice viewer, view3d's choice, the live loss plot."""

import base64

import numpy as np
import pytest
import torch

from firekit.core import spatial
from firekit.explain import pictures as viz
from firekit.registration.pipeline import NetworkView
from firekit.explain.pictures import affine_parameters


def rotation_2d(degrees):
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def rotation_3d(x, y, z):
    rx, ry, rz = np.eye(3), np.eye(3), np.eye(3)
    rx[1:, 1:] = rotation_2d(x)
    ry[np.ix_([0, 2], [0, 2])] = rotation_2d(-y)
    rz[:2, :2] = rotation_2d(z)
    return rz @ ry @ rx


def test_2d_affine_comes_apart_into_its_factors():
    linear = rotation_2d(17) @ np.diag([1.3, 0.8]) @ np.array([[1, 0.15], [0, 1]])
    matrix = np.hstack([linear, [[4.0], [-2.5]]])
    p = affine_parameters(matrix)
    np.testing.assert_allclose(p["rotation_deg"], [17], atol=1e-9)
    np.testing.assert_allclose(p["scale"], [1.3, 0.8], atol=1e-9)
    np.testing.assert_allclose(p["shear"], [0.15], atol=1e-9)
    np.testing.assert_allclose(p["translation"], [4.0, -2.5])
    # (n + 1, n + 1) gives the same; the identity is all zeros and ones
    assert affine_parameters(np.vstack([matrix, [0, 0, 1]])) == p
    identity = affine_parameters(np.eye(3))
    assert identity["rotation_deg"] == [0.0] and identity["scale"] == [1.0, 1.0] and identity["shear"] == [0.0]


def test_3d_affine_comes_apart_and_a_reflection_shows_as_a_negative_scale():
    shear = np.array([[1, 0.1, -0.05], [0, 1, 0.2], [0, 0, 1]])
    linear = rotation_3d(10, -20, 30) @ np.diag([1.1, 0.9, 1.4]) @ shear
    p = affine_parameters(np.hstack([linear, [[1.0], [2.0], [3.0]]]))
    np.testing.assert_allclose(p["rotation_deg"], [10, -20, 30], atol=1e-9)
    np.testing.assert_allclose(p["scale"], [1.1, 0.9, 1.4], atol=1e-9)
    np.testing.assert_allclose(p["shear"], [0.1, -0.05, 0.2], atol=1e-9)
    flipped = affine_parameters(np.hstack([np.diag([1.0, 1.0, -2.0]), np.zeros((3, 1))]))
    assert flipped["scale"] == pytest.approx([1.0, 1.0, -2.0])
    with pytest.raises(ValueError, match="n = 2 or 3"):
        affine_parameters(np.eye(5))


# --- pictures and controls -------------------------------------------------------------------


def _png(box) -> bytes:
    (output,) = box.output.outputs
    return base64.b64decode(output["data"]["image/png"])


def _shifted_view(shape=(32, 40), batch=1, ndim=2) -> NetworkView:
    """A synthetic registration: a blob moved by a known shift."""
    torch.manual_seed(0)
    image = torch.rand(batch, 1, *shape)
    theta = spatial.affine_matrix(ndim, translation=[0.1] + [0.0] * (ndim - 1)).expand(batch, -1, -1)
    displacement = spatial.affine_to_displacement(theta, shape)
    return NetworkView(image, image.roll(2, dims=2), spatial.warp(image, displacement), displacement, theta, np.eye(ndim + 1))


def test_show_image_draws_axis_0_across_and_axis_1_up():
    import matplotlib.pyplot as plt

    image = np.zeros((6, 4))
    image[5, 0] = 1.0  # last along axis 0, first along axis 1: bottom right
    fig, ax = plt.subplots()
    shown = viz.show_image(ax, image)
    drawn = shown.get_array()
    assert drawn.shape == (4, 6) and drawn[0, 5] == 1.0 and shown.origin == "lower"
    rgb = viz.show_image(ax, np.zeros((6, 4, 3))).get_array()
    assert rgb.shape == (4, 6, 3)
    plt.close(fig)


def test_grid_lines_follow_the_displacement():
    import matplotlib.pyplot as plt

    shape = (16, 20)
    shift = spatial.voxel_to_normalised(torch.tensor([3.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, *shape).clone())
    fig, ax = plt.subplots()
    viz.show_image(ax, np.zeros(shape))
    limits = ax.get_xlim(), ax.get_ylim()
    viz.draw_grid(ax, shift, step=4)
    first = ax.lines[0]  # the line of axis-0 index 0, along axis 1
    np.testing.assert_allclose(first.get_xdata(), 3.0, atol=1e-5)
    np.testing.assert_allclose(first.get_ydata(), np.arange(20), atol=1e-5)
    assert (ax.get_xlim(), ax.get_ylim()) == limits  # the frame stays the image's
    plt.close(fig)


def test_overlay_difference_and_jacobian_panel():
    import matplotlib.pyplot as plt

    a = np.linspace(0, 1, 100).reshape(10, 10)
    rgb = viz.overlay(a, a)
    assert rgb.shape == (10, 10, 3) and np.allclose(rgb[..., 0], rgb[..., 1])  # grey where they agree
    assert np.abs(viz.difference(a, 5 * a + 2)).max() < 1e-9  # contrast-stretched before subtracting
    with pytest.raises(ValueError, match="equal shapes"):
        viz.overlay(a, a[:5])
    folded = np.ones((12, 12))
    folded[3:6, 3:6] = -1
    fig, ax = plt.subplots()
    assert viz.draw_jacobian(ax, folded) == pytest.approx(9 / 144)
    assert "6.25% folded" in ax.get_title() and ax.collections  # the folded voxels are outlined
    plt.close(fig)


def test_network_slice_of_2d_slice_stacks_and_3d_views():
    view = _shifted_view()
    part = viz.network_slice(view)
    assert part["count"] == 1 and part["moving"].shape == (32, 40) and part["displacement"].shape == (1, 2, 32, 40)
    stack = _shifted_view(batch=5)
    assert viz.network_slice(stack)["index"] == 2 and viz.network_slice(stack, 4)["count"] == 5
    volume = _shifted_view(shape=(12, 14, 10), ndim=3)
    part = viz.network_slice(volume, 3)
    assert part["count"] == 10 and part["fixed"].shape == (12, 14) and part["displacement"].shape == (1, 2, 12, 14)
    np.testing.assert_allclose(part["jacobian"], 1.0, atol=1e-4)  # a translation keeps volume
    with pytest.raises(ValueError, match="outside"):
        viz.network_slice(volume, 10)


def test_interactive_figure_redraws_on_every_control_change():
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    calls = []

    def draw(level, colour):
        calls.append((level, colour))
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.imshow(np.full((4, 4), level), cmap=colour, vmin=0, vmax=9)
        return fig

    box = viz.interactive_figure(draw, {"level": widgets.IntSlider(value=1, max=9),
                                        "colour": widgets.Dropdown(options=["gray", "viridis"])})
    first = _png(box)
    assert first.startswith(b"\x89PNG") and calls == [(1, "gray")]
    box.controls["level"].value = 7
    second = _png(box)
    box.controls["colour"].value = "viridis"
    assert calls == [(1, "gray"), (7, "gray"), (7, "viridis")] and len({first, second, _png(box)}) == 3
    assert box.children[1] is box.output and len(box.output.outputs) == 1  # replaced, not appended


def test_explorers_draw_each_choice():
    from firekit.fire.model import Fire, FireConfig

    box = viz.explore_registration(_shifted_view(batch=3))
    assert set(box.controls) == {"view", "index"}
    pictures = {_png(box)}
    for view in ("checkerboard", "difference", "grid", "jacobian"):
        box.controls["view"].value = view
        pictures.add(_png(box))
    box.controls["index"].value = 0
    pictures.add(_png(box))
    assert len(pictures) == 6
    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset("small", ndim=2)).eval()
    a, b = torch.rand(1, 1, 32, 32) * 2 - 1, torch.rand(1, 1, 32, 32) * 2 - 1
    features = viz.explore_features(model, a, b)
    pictures = {_png(features)}
    for mode in ("PCA RGB", "invariance"):
        features.controls["mode"].value = mode
        pictures.add(_png(features))
    features.controls["mode"].value = "channel"
    features.controls["channel"].value = 5
    pictures.add(_png(features))
    assert len(pictures) == 4 and features.controls["channel"].max == model.config.widths[2] - 1
    cams = viz.explore_grad_cam(model, a, b, components=["encoder", "nonrigid"])
    pictures = {_png(cams)}
    cams.controls["direction"].value = "b2a"
    pictures.add(_png(cams))
    cams.controls["component"].value = "nonrigid"
    pictures.add(_png(cams))
    assert len(pictures) == 3


def test_slice_viewer_has_a_phase_slider_for_a_series_and_checks_labels():
    series = np.random.default_rng(0).random((10, 12, 8, 4))
    box = viz.view_slices(series)
    assert set(box.controls) == {"x", "y", "z", "phase"} and box.controls["phase"].max == 3
    first = _png(box)
    box.controls["phase"].value = 2
    assert _png(box) != first
    with pytest.raises(ValueError, match="labels shape"):
        viz.view_slices(series[..., 0], labels=np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="3D volume or a 4D series"):
        viz.view_slices(np.zeros((4, 4)))


def test_view3d_falls_back_to_slices_offline_and_uses_itkwidgets_when_it_can(monkeypatch):
    import importlib.util
    import sys
    import types

    volume = np.random.default_rng(1).random((10, 12, 8)).astype(np.float32)
    labels = (volume > 0.5).astype(np.int32)
    calls = []
    fake = types.ModuleType("itkwidgets")
    fake.view = lambda **kwargs: calls.append(kwargs) or "itk viewer"
    monkeypatch.setitem(sys.modules, "itkwidgets", fake)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "itkwidgets" else real_find_spec(name, *a))
    monkeypatch.delenv("FIREKIT_VIEW3D", raising=False)

    def offline(address, timeout=None):
        raise OSError("unreachable")

    monkeypatch.setattr(viz.socket, "create_connection", offline)
    assert set(viz.view3d(volume, labels).controls) == {"x", "y", "z"} and not calls  # no network: slices

    class Connection:
        def close(self):
            pass

    probed = []
    monkeypatch.setattr(viz.socket, "create_connection", lambda address, timeout=None: probed.append(address) or Connection())
    assert viz.view3d(volume, labels) == "itk viewer"
    assert sorted(host for host, port in probed) == sorted(viz.ITKWIDGETS_HOSTS)
    np.testing.assert_array_equal(calls[0]["image"], volume.T)  # itkwidgets reads (z, y, x)
    np.testing.assert_array_equal(calls[0]["label_image"], labels.T)
    monkeypatch.setenv("FIREKIT_VIEW3D", "slices")
    assert hasattr(viz.view3d(volume), "controls")
    monkeypatch.delenv("FIREKIT_VIEW3D")
    from firekit.data import io

    anisotropic = io.Volume(volume, np.diag([1.0, 1.0, 5.0, 1.0]))
    assert hasattr(viz.view3d(anisotropic), "controls")  # drawn at its aspect by the slice viewer
    with pytest.raises(ValueError, match="backend"):
        viz.view3d(volume, backend="vtk")


def test_loss_plot_collects_every_step_and_validation_from_training(tmp_path):
    from firekit.fire.model import Fire, FireConfig
    from firekit.training.config import TrainConfig
    from firekit.training.loop import train

    class Pairs:
        ndim = 2

        def sample(self, step, batch_size):
            generator = torch.Generator().manual_seed(step)
            x = torch.rand(batch_size, 1, 32, 32, generator=generator) * 2 - 1
            return {"x_a": x, "x_b": x.roll(1, dims=2)}

    labels = (torch.rand(1, 1, 32, 32) > 0.5).long()
    validation = [{"x_a": torch.rand(1, 1, 32, 32), "x_b": torch.rand(1, 1, 32, 32), "labels_a": labels,
                   "labels_b": labels}]
    plot = viz.LossPlot(every=2)
    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset("small", ndim=2))
    train(model, Pairs(), TrainConfig.from_preset("small", iterations=4, val_every=2), tmp_path / "run",
          validation=validation, progress=False, callback=plot)
    assert plot.steps == [1, 2, 3, 4] and [step for step, _ in plot.validation] == [2, 4]
    assert all(len(values) == 4 and all(np.isfinite(values)) for values in plot.values.values())
    assert len(plot.widget.outputs) == 1  # drawn at steps 2 and 4, replacing
