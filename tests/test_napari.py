"""The napari plugin: its library half (firekit.explain.layers, without Qt) and the plugin itself in a real,
rendered viewer (Xvfb + Mesa: make_napari_viewer(show=True))."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from firekit.explain import maps as explain, layers
from firekit.data import io
from firekit.core.errors import FirekitError
from firekit.fire.model import Fire, FireConfig
from firekit.napari._reader import napari_get_reader
from firekit.registration.pipeline import load, register

COARSE = dict(spacing=2.56, shape=(64, 80, 64))  # the demo brains at a quarter of the voxels


def _blob(shape, centre, spacing) -> np.ndarray:
    """A smooth ellipsoid of radii (20, 14, 10) mm at ``centre`` (mm from voxel 0), on a grid of ``spacing``."""
    axes = [np.arange(s) * h for s, h in zip(shape, spacing)]
    grid = np.meshgrid(*axes, indexing="ij")
    radius = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, (20.0, 14.0, 10.0)))
    return (1.0 / (1.0 + np.exp(8 * (radius - 1.0)))).astype(np.float32)


def _save(path: Path, data: np.ndarray, spacing, origin, dtype=np.float32) -> Path:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(data.astype(dtype), affine), str(path))
    return path


# --- library half, no Qt ----------------------------------------------------------------------


def test_reader_places_two_grids_in_the_same_physical_space(tmp_path):
    # the same ellipsoid at (40, 30, 20) mm world, on a 1 mm grid and on a 2 x 2 x 4 mm grid with another origin
    fine = _save(tmp_path / "fine.nii.gz", _blob((80, 64, 48), (50, 40, 30), (1, 1, 1)), (1, 1, 1), (-10, -10, -10))
    coarse = _save(tmp_path / "coarse.nii", _blob((40, 30, 16), (40, 30, 20), (2, 2, 4)), (2, 2, 4), (0, 0, 0))
    labels = _save(tmp_path / "coarse_labels.nii.gz", (_blob((40, 30, 16), (40, 30, 20), (2, 2, 4)) > 0.5),
                   (2, 2, 4), (0, 0, 0), dtype=np.uint8)
    reader = napari_get_reader([str(fine), str(coarse)])
    assert reader is not None and napari_get_reader(str(tmp_path / "x.png")) is None
    assert napari_get_reader([str(fine), str(tmp_path / "x.png")]) is None
    read = reader([str(fine), str(coarse)]) + napari_get_reader(str(labels))(str(labels))
    assert [layer_type for _, _, layer_type in read] == ["image", "image", "labels"]
    centres = []
    for data, meta, _ in read:
        weights = np.asarray(data, dtype=np.float64)
        voxel = np.array([(weights * g).sum() / weights.sum() for g in np.indices(weights.shape)])
        centres.append(meta["affine"][:3, :3] @ voxel + meta["affine"][:3, 3])
    np.testing.assert_allclose(centres[0], [40, 30, 20], atol=0.2)
    np.testing.assert_allclose(centres[1], centres[0], atol=0.5)
    np.testing.assert_allclose(centres[2], centres[0], atol=1.5)
    assert read[0][1]["metadata"]["path"] == str(fine) and read[2][1]["name"] == "coarse_labels"
    # an int16 MRI is an image; only integer maps named like labels are labels layers
    assert not layers.is_label_file("T1.nii.gz", integer=True) and layers.is_label_file("aseg.nii", integer=True)


def test_layer_volume_refuses_what_cannot_be_registered():
    assert layers.layer_volume(np.zeros((5, 6)), np.eye(3)).shape == (5, 6)
    # a 3D layer's 4x4 from napari, given for a 2D array: the trailing block is used
    assert layers.layer_volume(np.zeros((5, 6)), np.diag([3.0, 2.0, 1.0, 1.0])).spacing.tolist() == [2.0, 1.0]
    with pytest.raises(FirekitError, match="layer 'rgb': expected a 2D or 3D image"):
        layers.layer_volume(np.zeros((2, 5, 6, 3)), np.eye(5), "rgb")
    with pytest.raises(FirekitError, match="layer 'bad': NaN/Inf"):
        layers.layer_volume(np.full((5, 6), np.nan), np.eye(3), "bad")


def test_registration_layers_vectors_point_from_fixed_to_moving_in_world_mm():
    fixed = io.Volume(_blob((48, 40), (30, 20), (1.5, 1.5)), np.diag([1.5, 1.5, 1.0]))
    shifted = io.Volume(_blob((48, 40), (36, 17), (1.5, 1.5)), np.diag([1.5, 1.5, 1.0]))  # +6, -3 mm
    result = register(None, shifted, fixed, refine="auto")
    new, report = layers.registration_layers(result, grid_step=4, name="blob")
    kinds = {meta["name"]: kind for _, meta, kind in new}
    assert kinds == {"warped blob": "image", "deformation blob": "vectors", "Jacobian determinant blob": "image",
                     "folded voxels blob": "labels"}
    vectors = next(data for data, meta, kind in new if kind == "vectors")
    inside = fixed.data[tuple(np.rint(((vectors[:, 0] - 0) / 1.5)).astype(int).T)] > 0.5
    np.testing.assert_allclose(vectors[inside, 1].mean(axis=0), [6.0, -3.0], atol=0.6)
    assert report["folding_percent"] == 0 and "dice_after" not in report
    for data, meta, kind in new:
        if kind != "vectors":
            np.testing.assert_array_equal(meta["affine"], fixed.affine)


def test_demo_pair_registration_raises_label_overlap():
    pair = {meta["name"]: layers.layer_volume(data, meta["affine"], meta["name"])
            for data, meta, _ in layers.demo_pair(ndim=2, **COARSE)}
    assert list(pair) == ["fixed T1 (subject 0)", "moving T2-like (subject 1)", "fixed labels", "moving labels"]
    new, report = layers.register_layers(load("default"), pair["moving T2-like (subject 1)"],
                                         pair["fixed T1 (subject 0)"], pair["moving labels"], pair["fixed labels"],
                                         direction="b2a", refine="auto")
    assert report["mean_dice_after"] > report["mean_dice_before"] + 0.05
    warped_labels = next(data for data, meta, kind in new if kind == "labels" and meta["name"].startswith("warped"))
    assert set(np.unique(warped_labels)) <= {0, 1, 2, 3} and "mean Dice" in report["text"]


@pytest.mark.parametrize("ndim", [2, 3])
def test_synthesis_and_grad_cam_layers_on_the_network_grid(ndim):
    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset("small", ndim=2)).eval()  # a 2D model: slice by slice on volumes
    shape = (40, 48) if ndim == 2 else (40, 48, 6)
    image = io.Volume(np.random.default_rng(0).random(shape).astype(np.float32), np.diag([1.28] * ndim + [1.0]))
    new = layers.synthesis_layers(model, image, "a2b", channels=[0, 5], name="x")
    names = [meta["name"] for _, meta, _ in new]
    assert names == ["synthesised B from x", "G(x) channel 0", "G(x) channel 5", "G(x) principal components"]
    synthesised, channel, rgb = new[0][0], new[1][0], new[3][0]
    # the network grid: 1.28 mm in-plane, sizes padded to the model's minimum (32) around the image
    assert synthesised.shape[:2] == shape[:2] and synthesised.shape[2:] == ((32,) if ndim == 3 else ())
    assert channel.shape == (10, 12, *synthesised.shape[2:]) and rgb.shape == (*channel.shape, 3)
    np.testing.assert_allclose(np.diag(new[1][1]["affine"])[:2], [4 * 1.28, 4 * 1.28])  # G's grid: 4x coarser
    with pytest.raises(FirekitError, match="G has channels 0..63"):
        layers.synthesis_layers(model, image, channels=[64])
    (cam,) = layers.grad_cam_layers(model, image, image.with_data(image.data[::-1].copy()), "nonrigid", "a2b")
    assert cam[0].shape == synthesised.shape and 0 <= cam[0].min() and cam[0].max() <= 1 and cam[2] == "image"
    assert cam[1]["name"] == "Grad-CAM nonrigid (a2b) moving" and "nonrigid" in explain.TARGETS
    # a region of interest (a label map in world space) and an affine entry
    roi = image.with_data((np.indices(shape)[0] < 20).astype(np.uint8))
    (in_roi,) = layers.grad_cam_layers(model, image, image.with_data(image.data[::-1].copy()), "decoder", "a2b", roi=roi)
    assert in_roi[1]["name"] == "Grad-CAM decoder (a2b) in ROI moving" and in_roi[0].shape == cam[0].shape
    outside = io.Volume(roi.data, roi.affine @ np.diag([1.0] * ndim + [1.0]) + np.eye(ndim + 1, k=ndim) * 1e4)
    with pytest.raises(FirekitError, match="has no voxel inside"):
        layers.grad_cam_layers(model, image, image, "decoder", roi=outside)
    with pytest.raises(FirekitError, match=r"affine entry \(2, 0\) does not exist"):
        layers.grad_cam_layers(model, image, image, "affine", target=(2, 0))


def test_manifest_validates():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", "firekit"], capture_output=True, text=True)
    assert result.returncode == 0 and "valid" in result.stdout, result.stdout + result.stderr


# --- the plugin in a rendered viewer -------------------------------------------------------------


def _wait(qtbot, widget, timeout=180_000):
    qtbot.waitUntil(lambda: widget.report is not None or widget.status.value.startswith("error"), timeout=timeout)
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=10_000)  # the worker has finished
    assert not widget.status.value.startswith("error"), widget.status.value


def test_register_widget_on_the_sample_renders_and_improves_dice(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("firekit", "demo_pair_2d")
    assert [layer.name for layer in viewer.layers] == ["fixed T1 (subject 0)", "moving T2-like (subject 1)",
                                                       "fixed labels", "moving labels"]
    _, widget = viewer.window.add_plugin_dock_widget("firekit", "Register")
    assert widget.moving.value is viewer.layers[1] and widget.fixed.value is viewer.layers[0]
    widget.moving_labels.value, widget.fixed_labels.value = viewer.layers["moving labels"], viewer.layers["fixed labels"]
    widget.run()
    _wait(qtbot, widget)
    name = "moving T2-like (subject 1)"
    for added in ("warped", "warped labels", "deformation", "Jacobian determinant", "folded voxels"):
        assert f"{added} {name}" in viewer.layers
    fixed_labels = viewer.layers["fixed labels"].data
    warped_labels = viewer.layers[f"warped labels {name}"].data
    after = np.mean([2 * ((warped_labels == k) & (fixed_labels == k)).sum()
                     / ((warped_labels == k).sum() + (fixed_labels == k).sum()) for k in (1, 2, 3)])
    assert after == pytest.approx(widget.report["mean_dice_after"], abs=1e-6)
    assert after > widget.report["mean_dice_before"] + 0.05 and "mean Dice" in widget.status.value
    assert viewer.layers[f"deformation {name}"].data.shape[1:] == (2, 2)
    jacobian = viewer.layers[f"Jacobian determinant {name}"]
    np.testing.assert_array_equal(jacobian.affine.affine_matrix, viewer.layers["fixed T1 (subject 0)"].affine.affine_matrix)
    viewer.reset_view()
    screenshot = viewer.screenshot(canvas_only=True)
    colours = np.unique(screenshot.reshape(-1, screenshot.shape[-1]), axis=0)
    assert len(colours) > 200, f"screenshot has only {len(colours)} colours"
    from PIL import Image

    Image.fromarray(screenshot).save(tmp_path / "register.png")


def test_synthesis_and_grad_cam_widgets_add_their_layers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("firekit", "demo_pair_2d")
    _, synthesis = viewer.window.add_plugin_dock_widget("firekit", "Synthesis & features")
    synthesis.image.value = viewer.layers["moving T2-like (subject 1)"]
    synthesis.channels.value = "1 2, x"
    synthesis.run()
    assert synthesis.status.value.startswith("error: G channels") and synthesis.worker is None
    synthesis.channels.value = "3"
    synthesis.run()
    _wait(qtbot, synthesis)
    synthesised = viewer.layers["synthesised A from moving T2-like (subject 1)"]
    # On the model's own grid (the shipped 2D model runs at 2.56 mm), over the sample's field of view
    sample = viewer.layers["fixed T1 (subject 0)"]
    extent = np.array(synthesised.data.shape) * np.abs(np.diag(synthesised.affine.affine_matrix)[:2])
    sample_extent = np.array(sample.data.shape) * np.abs(np.diag(sample.affine.affine_matrix)[:2])
    np.testing.assert_allclose(extent, sample_extent, atol=2 * np.abs(synthesised.affine.affine_matrix[0, 0]))
    feature_shape = viewer.layers["G(moving T2-like (subject 1)) channel 3"].data.shape
    assert feature_shape == tuple(s // 4 for s in synthesised.data.shape)
    assert viewer.layers["G(moving T2-like (subject 1)) principal components"].rgb
    _, cam = viewer.window.add_plugin_dock_widget("firekit", "Grad-CAM")
    cam.component.value = "affine"
    assert cam.explained.value.startswith("squared deviation")
    cam.affine_entry.value = "0, 9"
    cam.run()  # refused in the worker: one line in the widget, the viewer carries on
    qtbot.waitUntil(lambda: cam.status.value.startswith("error: affine entry (0, 9) does not exist"), timeout=60_000)
    qtbot.waitUntil(lambda: cam.run_button.enabled, timeout=10_000)
    cam.affine_entry.value = "1, 2"
    cam.run()
    _wait(qtbot, cam)
    heat = viewer.layers["Grad-CAM affine (b2a) moving T2-like (subject 1)"]
    assert 0 <= heat.data.min() and heat.data.max() == pytest.approx(1.0)
    cam.component.value, cam.roi.value = "decoder", viewer.layers["fixed labels"]
    cam.run()
    _wait(qtbot, cam)
    assert "Grad-CAM decoder (b2a) in ROI moving T2-like (subject 1)" in viewer.layers


def test_the_cine_sample_has_a_phase_axis_in_physical_space(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("firekit", "cine_phantom")
    series, labels = viewer.layers
    assert series.data.ndim == 4 and series.data.shape == labels.data.shape and viewer.dims.ndim == 4
    np.testing.assert_allclose(np.diag(series.affine.affine_matrix)[:4], [1.5, 1.5, 10.0, 1.0])
    ed, es = series.metadata["ed"], series.metadata["es"]
    lv_ed, lv_es = ((labels.data[..., phase] == 3).sum() for phase in (ed, es))
    assert 0.4 < 1 - lv_es / lv_ed < 0.8  # an ejection fraction, phase by phase on the last axis


def test_the_3d_sample_registers_slice_by_slice_in_the_viewer(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("firekit", "demo_pair_3d")
    assert viewer.layers[0].data.ndim == 3 and viewer.dims.ndim == 3
    _, widget = viewer.window.add_plugin_dock_widget("firekit", "Register")
    widget.refine.value = 0  # the 2D network on every axial slice (3D refinement is tested elsewhere)
    widget.run()
    _wait(qtbot, widget)
    vectors = viewer.layers["deformation moving T2-like (subject 1)"].data
    assert vectors.shape[1:] == (2, 3) and np.abs(vectors[:, 1, 2]).max() == 0  # in-plane: no through-plane motion
    # a reader round trip: the warped volume written and read back lands where it was
    warped = viewer.layers["warped moving T2-like (subject 1)"]
    path = tmp_path / "warped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(warped.data), warped.affine.affine_matrix), str(path))
    (reread,) = viewer.open(str(path), plugin="firekit")
    np.testing.assert_allclose(reread.affine.affine_matrix, warped.affine.affine_matrix, atol=1e-5)
