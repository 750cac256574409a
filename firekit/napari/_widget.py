"""Dock widgets: Register, Synthesis & features, Grad-CAM. Thin: they read layers, call one function of
:mod:`firekit.explain.layers` in a worker thread (the viewer stays responsive, with a progress indicator) and
add its layers; errors show as one line in the widget and as a notification."""

from __future__ import annotations

from typing import Optional

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, LineEdit, PushButton, create_widget
from napari.layers import Image, Labels, Layer
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from napari.utils.transforms import Affine

from firekit.explain import maps as explain, layers
from firekit.core.errors import FirekitError

DIRECTIONS = [("b2a: moving is modality B (e.g. T2-like onto T1)", "b2a"),
              ("a2b: moving is modality A (e.g. T1 onto T2-like)", "a2b")]


def world_affine(layer: Layer) -> np.ndarray:
    """A layer's full data-to-world affine: its ``affine`` after scale, translate, rotate and shear."""
    physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear,
                      ndim=layer.ndim)
    return layer.affine.affine_matrix @ physical.affine_matrix


def layer_volume(layer: Layer):
    return layers.layer_volume(np.asarray(layer.data), world_affine(layer), layer.name)


def _guarded(function, **kwargs):
    """Run in the worker: ``(True, output)`` or ``(False, exception)``. Exceptions must not leave the
    worker: napari 0.9's task-status handler of ``errored`` takes the wrong number of arguments."""
    try:
        return True, function(**kwargs)
    except Exception as exc:  # shown as one line by the widget
        return False, exc


def _load_model(path) -> "object":
    from firekit.registration.pipeline import load

    path = str(path or "").strip()
    return load(path if path and path != "." else "default")


class _Worker(Container):
    """A dock widget with a Run button that computes layers in a worker thread and adds them."""

    title = ""

    def __init__(self, viewer: napari.viewer.Viewer, widgets: list):
        self.viewer = viewer
        self.run_button = PushButton(text=self.title)
        self.status = Label(value="")
        super().__init__(widgets=[*widgets, self.run_button, self.status])
        self.run_button.changed.connect(self.run)
        self.worker = None
        self.report: dict | None = None
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(lambda _event: self.reset_choices())
        self.reset_choices()

    def compute(self):
        """(function, kwargs) to run in the worker; raises FirekitError for bad choices."""
        raise NotImplementedError

    def run(self, *_args) -> None:
        try:
            function, kwargs = self.compute()
        except FirekitError as exc:
            self._failed(exc)
            return
        self.status.value = "running ..."
        self.run_button.enabled = False
        self.worker = create_worker(_guarded, function, _progress={"total": 0, "desc": f"firekit: {self.title}"},
                                    **kwargs)
        self.worker.returned.connect(self._add)
        self.worker.finished.connect(lambda: setattr(self.run_button, "enabled", True))
        self.worker.start()

    def _add(self, outcome) -> None:
        succeeded, output = outcome
        if not succeeded:
            self._failed(output)
            return
        new_layers, report = output if isinstance(output, tuple) else (output, {})
        for data, meta, layer_type in new_layers:
            if meta["name"] in self.viewer.layers:
                self.viewer.layers.remove(meta["name"])
            self.viewer.add_layer(Layer.create(data, meta, layer_type))
        self.report = report
        self.status.value = report.get("text", f"added {len(new_layers)} layers")

    def _failed(self, exc: BaseException) -> None:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.status.value = f"error: {message}"
        show_error(f"firekit: {message}")


class RegisterWidget(_Worker):
    """Register a moving image layer onto a fixed one; adds warped image and labels, deformation
    vectors, Jacobian determinant and folded voxels, and shows Dice when both label layers are set."""

    title = "Register"

    def __init__(self, viewer: napari.viewer.Viewer):
        self.moving = create_widget(annotation=Image, label="moving")
        self.fixed = create_widget(annotation=Image, label="fixed")
        self.moving_labels = create_widget(annotation=Optional[Labels], label="moving labels")
        self.fixed_labels = create_widget(annotation=Optional[Labels], label="fixed labels")
        self.checkpoint = FileEdit(mode="r", filter="*.pt", label="model (.pt; empty: shipped)", value="")
        self.direction = ComboBox(choices=DIRECTIONS, value="b2a", label="direction")
        self.affine_only = CheckBox(value=False, text="affine only (network)")
        self.refine = ComboBox(choices=list(layers.REFINE_CHOICES.items()), value="auto", label="refinement")
        super().__init__(viewer, [self.moving, self.fixed, self.moving_labels, self.fixed_labels, self.checkpoint,
                                  self.direction, self.affine_only, self.refine])
        self._default_choices()

    def _default_choices(self) -> None:
        """Pick the demo sample's layers when present (moving = the second image)."""
        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        if len(images) >= 2 and self.moving.value is images[0]:
            self.moving.value = images[1]
            self.fixed.value = images[0]

    def compute(self):
        if self.moving.value is None or self.fixed.value is None:
            raise FirekitError("choose a moving and a fixed image layer")
        labels = {}
        for key, widget in (("moving_labels", self.moving_labels), ("fixed_labels", self.fixed_labels)):
            labels[key] = None if widget.value is None else layer_volume(widget.value)
        kwargs = dict(model=_load_model(self.checkpoint.value), moving=layer_volume(self.moving.value), fixed=layer_volume(self.fixed.value),
                      direction=self.direction.value, affine_only=self.affine_only.value, refine=self.refine.value,
                      name=self.moving.value.name, **labels)
        return layers.register_layers, kwargs


class SynthesisWidget(_Worker):
    """F's synthesis of an image in the other modality, and chosen channels of G, as layers."""

    title = "Synthesise"

    def __init__(self, viewer: napari.viewer.Viewer):
        self.image = create_widget(annotation=Image, label="image")
        self.checkpoint = FileEdit(mode="r", filter="*.pt", label="model (.pt; empty: shipped)", value="")
        self.direction = ComboBox(choices=[("a2b: image is modality A", "a2b"), ("b2a: image is modality B", "b2a")],
                                  value="b2a", label="direction")
        self.channels = LineEdit(value="0, 1, 2", label="G channels")
        self.pca = CheckBox(value=True, text="G's principal components as RGB")
        super().__init__(viewer, [self.image, self.checkpoint, self.direction, self.channels, self.pca])

    def compute(self):
        if self.image.value is None:
            raise FirekitError("choose an image layer")
        try:
            channels = [int(c) for c in self.channels.value.replace(",", " ").split()]
        except ValueError:
            raise FirekitError(f"G channels: {self.channels.value!r} is not a list of integers, e.g. '0, 1, 2'") from None
        kwargs = dict(model=_load_model(self.checkpoint.value), image=layer_volume(self.image.value),
                      direction=self.direction.value, channels=channels, pca=self.pca.value,
                      name=self.image.value.name)
        return layers.synthesis_layers, kwargs


class GradCamWidget(_Worker):
    """Grad-CAM of one FIRE component for a pair, as a heat-map layer (``explain.TARGETS``)."""

    title = "Grad-CAM"

    def __init__(self, viewer: napari.viewer.Viewer):
        self.moving = create_widget(annotation=Image, label="moving")
        self.fixed = create_widget(annotation=Image, label="fixed")
        self.checkpoint = FileEdit(mode="r", filter="*.pt", label="model (.pt; empty: shipped)", value="")
        self.component = ComboBox(choices=list(explain.TARGETS), value="encoder", label="component")
        self.direction = ComboBox(choices=DIRECTIONS, value="b2a", label="direction")
        self.roi = create_widget(annotation=Optional[Labels], label="ROI (labels > 0)")
        self.affine_entry = LineEdit(value="", label="affine entry i, j (empty: translation 0)")
        self.explained = Label(value="")
        super().__init__(viewer, [self.moving, self.fixed, self.checkpoint, self.component, self.direction,
                                  self.roi, self.affine_entry, self.explained])
        self.component.changed.connect(self._explain)
        self._explain()
        RegisterWidget._default_choices(self)

    def _explain(self, *_args) -> None:
        self.explained.value = explain.TARGETS[self.component.value].split(":")[0]
        self.explained.tooltip = explain.TARGETS[self.component.value]

    def compute(self):
        if self.moving.value is None or self.fixed.value is None:
            raise FirekitError("choose a moving and a fixed image layer")
        target = None
        if self.affine_entry.value.strip():
            try:
                target = tuple(int(v) for v in self.affine_entry.value.replace(",", " ").split())
            except ValueError:
                target = ()
            if len(target) != 2:
                raise FirekitError(f"affine entry: {self.affine_entry.value!r} is not two integers 'i, j'")
        kwargs = dict(model=_load_model(self.checkpoint.value), moving=layer_volume(self.moving.value),
                      fixed=layer_volume(self.fixed.value), component=self.component.value,
                      direction=self.direction.value, name=self.moving.value.name, target=target,
                      roi=None if self.roi.value is None else layer_volume(self.roi.value))
        return layers.grad_cam_layers, kwargs
