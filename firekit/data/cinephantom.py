"""A synthetic short-axis cardiac cine phantom, written in the ACDC layout (:mod:`firekit.data.acdc`).

Real ACDC data cannot be downloaded here, so this builds look-alike patients: a beating left
ventricle (truncated prolate ellipsoid, base wider than apex) whose cavity shrinks from
end-diastole (ED, phase 0) to end-systole (ES, ~35-40 % of the cycle) by a known ejection fraction
while its myocardium thickens at constant volume; a crescent right ventricle on the septum, also
contracting; atria above the base; chest tissue, fat, lungs, aorta; a bias field and Rician noise.
Everything is analytic in mm and seeded, so every phase's labels are exact and the volume curve is
known. Geometry per patient: in-plane ``(x, y)`` of the grid (world = voxel centre at 0), long axis
along ``z`` (apex at low ``z``, base at high ``z``, as a short-axis stack).

Labels (ACDC): 1 RV cavity, 2 LV myocardium, 3 LV cavity (papillary muscles included).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from firekit.data import acdc, augment
from firekit.data.atomic import atomic_write_text
from firekit.data.dataset_folder import read_index, same_or_refuse
from firekit.core.errors import FirekitError

__all__ = ["VERSION", "INDEX_FILE", "INTENSITY_SCALE", "CinePatient", "cine_patient", "volume_curve",
           "build_cine_phantom"]

VERSION = 1
INDEX_FILE = "cine_phantom.json"
INTENSITY_SCALE = 1000  # frames are int16 round(1000 * intensity); blood is about 0.9
_SUBPLANES = (-1 / 3, 0.0, 1 / 3)  # through-plane samples per slice (partial volume of thick slices)
_PERICARDIUM_MM = 4.0  # tissue and fat around the heart, between it and the lungs


@dataclass
class _Heart:
    """One patient's drawn parameters; lengths in mm (after fitting the grid), angles in radians."""

    ef: float  # LV ejection fraction (model truth), 0..1
    es_fraction: float  # ES time as a fraction of the cycle (on a phase)
    e_fraction: float  # share of diastolic filling in the early (E) wave; the rest is the atrial kick
    e_duration: float  # cycle fractions
    a_start: float
    a_duration: float
    length: float  # epicardial apex -> base plane at ED
    apex_wall: float  # epicardial apex -> endocardial apex
    r_epi: float  # mean in-plane epicardial radius at the base, ED
    r_endo: float
    eccentricity: float  # in-plane semi-axes r (1 +- e)
    theta: float  # in-plane orientation of the ellipse
    twist: float  # apex-to-base rotation difference at ES
    shortening: float  # longitudinal shortening at ES (the base descends)
    centre: tuple  # (x, y) of the LV axis at mid-length
    tilt: tuple  # in-plane shift of the axis per mm along it
    shift: tuple  # (x, y, z) whole-heart translation at ES
    z_apex: float  # z of the epicardial apex at ED
    rv_angle: float  # direction of the RV from the LV axis
    rv_depth: float  # RV cavity depth beyond the septum at ED
    rv_wrap: float  # RV half-width / (LV radius + depth)
    rv_share: float  # RV semi-axis along rv_angle / (LV radius + depth)
    rv_contraction: float  # fractional loss of RV depth at ES
    rv_apex: float  # z offset of the RV apex above the LV's
    rv_wall: float
    papillary: tuple  # (angle 1, angle 2) in the LV ellipse's frame
    papillary_radius: float
    atrium_radius: tuple  # (LA, RA) at ED
    atrium_height: float
    blood: float
    myocardium: float
    height_cm: float
    weight_kg: float
    heart_rate: float  # beats per minute


class CinePatient(NamedTuple):
    """One phantom patient in memory.

    Attributes:
        series: ``(X, Y, Z, T)`` int16 frames (``INTENSITY_SCALE`` x intensity).
        labels: ``(X, Y, Z, T)`` uint8 labels of every phase (ACDC keeps only ED and ES).
        affine: ``(4, 4)`` voxel -> RAS mm, ``diag(spacing)`` centred on the grid.
        ed, es: 0-based phases (ED is 0; ES has the smallest LV volume).
        info: extra ``Info.cfg`` values: Group, Height (cm), Weight (kg), EF (%, model truth).
        truth: the model's volumes (mL): ``EF``, ``EDV``, ``ESV``, ``myocardium``, ``lv_curve``
            (per phase), and the label volumes ``lv_labels``, ``myo_labels``, ``rv_labels`` (per
            phase), ``time_step`` (s), ``es_fraction``, ``fit`` (scale applied to fit the grid).
    """

    series: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    ed: int
    es: int
    info: dict
    truth: dict


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def volume_curve(tau, es_fraction: float = 0.37, e_fraction: float = 0.75, e_duration: float = 0.18,
                 a_start: float = 0.8, a_duration: float = 0.13) -> np.ndarray:
    """Contraction ``c(tau)`` over one cycle: 0 at ED, 1 at ES; the LV volume is ``EDV (1 - EF c)``.

    Smooth (C1) and periodic: ejection to ``es_fraction``, early rapid filling, diastasis, then the
    atrial kick ending at ``a_start + a_duration <= 1``.

    Args:
        tau: cycle fractions in [0, 1).
    """
    tau = np.asarray(tau, dtype=np.float64) % 1.0
    systole = _smoothstep(tau / es_fraction)
    filling = e_fraction * _smoothstep((tau - es_fraction) / e_duration) \
        + (1.0 - e_fraction) * _smoothstep((tau - a_start) / a_duration)
    return np.where(tau <= es_fraction, systole, 1.0 - filling)


def _check(shape, spacing, phases, ef_range) -> tuple[tuple[int, ...], tuple[float, ...], int, tuple]:
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape[:2]) < 16 or shape[2] < 3:
        raise FirekitError(f"shape must be (X, Y, Z) with X, Y >= 16 and Z >= 3 slices, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise FirekitError(f"spacing must be 3 positive voxel sizes in mm (x, y, slice), got {spacing}")
    if int(phases) < 6:
        raise FirekitError(f"phases must be at least 6 (one cardiac cycle), got {phases}")
    ef_range = tuple(float(v) for v in ef_range)
    if len(ef_range) != 2 or not 0.1 <= ef_range[0] <= ef_range[1] <= 0.8:
        raise FirekitError(f"ef_range must be (low, high) ejection fractions within 0.1..0.8, got {ef_range}")
    return shape, spacing, int(phases), ef_range


def _generators(seed: int, index: int) -> tuple[np.random.Generator, torch.Generator]:
    """Independent numpy and torch streams for patient ``index`` of a phantom built with ``seed``."""
    sequence = np.random.SeedSequence([int(seed), int(index), 0xC1E])
    rng = np.random.default_rng(sequence)
    state = int(sequence.generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)
    return rng, torch.Generator().manual_seed(state)


def _draw(rng: np.random.Generator, shape, spacing, phases: int, ef_range) -> tuple[_Heart, float]:
    """Draw a heart, scaled by ``fit`` (<= 1) so that it lies inside the grid."""
    u = rng.uniform
    ef = u(*ef_range)
    es = int(np.clip(round(u(0.34, 0.40) * phases), 1, phases - 2))
    length, r_epi, wall, apex_wall = u(78, 92), u(31, 37), u(7.0, 10.0), u(5.0, 8.0)
    depth = u(12, 20)
    fov = np.array(shape[:2]) * spacing[:2]
    slices, thickness = shape[2], spacing[2]
    # The short-axis stack covers apex to base with a slice of atria above; a grid too small for an
    # adult heart gets a proportionally smaller heart.
    fit = min(1.0, (slices - 1.3) * thickness / length, 0.4 * fov.min() / (r_epi + depth + 6.0))
    length *= fit
    # The base plane lies on a slice boundary at ED and (when the shortening allows) one slice lower at
    # ES, so the labelled slices hold the whole cavity at both: label volumes match the model's.
    top = min(slices - 1, math.ceil(length / thickness + u(0.2, 0.7)))
    z_apex = (top - slices / 2) * thickness - length
    angle = u(0, 2 * math.pi)
    tilt = u(0, 0.15) * np.array([math.cos(angle), math.sin(angle)])
    angle = u(0, 2 * math.pi)
    shift = (*(u(1.0, 3.0) * fit * np.array([math.cos(angle), math.sin(angle)])), u(0.0, 2.0) * fit)
    shortening = u(0.10, 0.17)
    if 0.08 <= (thickness + shift[2]) / length <= 0.2:
        shortening = (thickness + shift[2]) / length
    heart = _Heart(
        ef=ef, es_fraction=es / phases, e_fraction=u(0.65, 0.8), e_duration=u(0.15, 0.22),
        a_start=u(0.76, 0.82), a_duration=u(0.11, 0.14),
        length=length, apex_wall=apex_wall * fit, r_epi=r_epi * fit, r_endo=(r_epi - wall) * fit,
        eccentricity=u(0.0, 0.12), theta=u(0, math.pi), twist=math.radians(u(6, 14)), shortening=shortening,
        centre=tuple(u(-0.04, 0.04, 2) * fov), tilt=tuple(tilt), shift=shift,
        z_apex=z_apex,
        rv_angle=math.radians(u(25, 70)), rv_depth=depth * fit, rv_wrap=u(0.95, 1.15), rv_share=u(0.62, 0.72),
        rv_contraction=u(0.2, 0.35), rv_apex=u(0.25, 0.4) * length, rv_wall=3.0 * fit,
        papillary=(u(-0.3, 0.3) + math.radians(200), u(-0.3, 0.3) + math.radians(300)),
        papillary_radius=u(2.5, 3.5) * fit, atrium_radius=(u(0.75, 0.95) * fit, u(0.6, 0.8) * fit),
        atrium_height=u(35, 45) * fit, blood=u(0.82, 0.95), myocardium=u(0.2, 0.3),
        height_cm=round(u(155, 195), 1), weight_kg=round(u(55, 100), 1), heart_rate=u(55, 80),
    )
    return heart, fit


def _ellipsoid(x, y, u, a, b, c):
    """Signed distance (mm, first order; negative inside) to the ellipsoid ``x/a, y/b, u/c``."""
    qx, qy, qu = x / a, y / b, u / c
    level = qx * qx + qy * qy + qu * qu
    gradient = 2.0 * np.sqrt((qx / a) ** 2 + (qy / b) ** 2 + (qu / c) ** 2)
    return (level - 1.0) / np.maximum(gradient, 1e-6)


def _rotate(x, y, angle):
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * x + sin * y, -sin * x + cos * y


def _geometry(h: _Heart, x, y, z, c: float) -> dict:
    """Signed distances (mm) of the heart's parts at contraction ``c`` on points ``x, y, z``."""
    lam = 1.0 - h.shortening * c
    base_ed, base = h.length, h.length * lam
    volume = 1.0 - h.ef * c  # LV cavity volume / EDV
    rho = math.sqrt(volume * (base_ed - h.apex_wall) / (base - h.apex_wall))
    # Myocardial volume is conserved: epicardial volume = myocardium + cavity.
    sigma = math.sqrt((h.r_epi ** 2 * base_ed - (1 - volume) * h.r_endo ** 2 * (base_ed - h.apex_wall))
                      / (h.r_epi ** 2 * base))
    u = z - (h.z_apex + h.shift[2] * c)
    below = base - u  # distance below the base plane
    cut = -below  # > 0 above the base plane
    cx = h.centre[0] + h.tilt[0] * (u - base_ed / 2) + h.shift[0] * c
    cy = h.centre[1] + h.tilt[1] * (u - base_ed / 2) + h.shift[1] * c
    ex, ey = x - cx, y - cy
    xr, yr = _rotate(ex, ey, h.theta + h.twist * c * (0.5 - u / base_ed))
    e = h.eccentricity
    endo_a, endo_b = h.r_endo * rho * (1 + e), h.r_endo * rho * (1 - e)
    out = {"endo": np.maximum(_ellipsoid(xr, yr, below, endo_a, endo_b, base - h.apex_wall), cut),
           "epi": np.maximum(_ellipsoid(xr, yr, below, h.r_epi * sigma * (1 + e), h.r_epi * sigma * (1 - e), base), cut)}
    # Papillary muscles: columns in the cavity's mid/apical part, thickening as the cavity shrinks.
    length = base - h.apex_wall
    radius = h.papillary_radius / math.sqrt(rho)
    span = np.maximum(h.apex_wall + 0.15 * length - u, u - (h.apex_wall + 0.65 * length))
    papillary = []
    for angle in h.papillary:
        px, py = 0.62 * endo_a * math.cos(angle), 0.62 * endo_b * math.sin(angle)
        papillary.append(np.maximum(np.hypot(xr - px, yr - py) - radius, span))
    out["papillary"] = np.minimum(*papillary)
    # RV: per slice an ellipse beside the LV axis reaching ``depth`` beyond the septum; its part outside
    # the LV is the crescent. The depth tapers to 0 at the RV apex, where the ellipse hides in the LV.
    xv, yv = _rotate(ex, ey, h.rv_angle)
    depth = h.rv_depth * (1.0 - h.rv_contraction * c)
    lv_radius = h.r_epi * sigma * (1 - e) * np.sqrt(np.clip(1.0 - (below / base) ** 2, 0.0, 1.0))
    profile = np.sqrt(np.clip(1.0 - (below / (base - h.rv_apex)) ** 2, 0.0, 1.0))
    reach = np.maximum(lv_radius + depth * profile, 1e-3)
    xo = xv - (1.0 - h.rv_share) * reach
    a, b, w = h.rv_share * reach, h.rv_wrap * reach, h.rv_wall * np.sqrt(profile)
    out["rv"] = np.maximum(_ellipsoid(xo, yv, 0.0, a, b, 1.0), cut)
    out["rv_wall"] = np.maximum(_ellipsoid(xo, yv, 0.0, a + w, b + w, 1.0), cut)
    # Atria above the base plane, widest there; they fill while the ventricles empty.
    fill = 1.0 + 0.3 * c
    la_x, la_y = _rotate(ex + 0.35 * h.r_epi * math.cos(h.rv_angle), ey + 0.35 * h.r_epi * math.sin(h.rv_angle),
                         h.rv_angle)
    ra_x = xv - (h.r_epi + 0.6 * h.rv_depth)
    for name, (ax, ay), radius in (("la", (la_x, la_y), h.atrium_radius[0]), ("ra", (ra_x, yv), h.atrium_radius[1])):
        r = radius * h.r_endo * fill
        out[name] = np.maximum(_ellipsoid(ax, ay, u - base, r, 0.85 * r, h.atrium_height), -cut)
        out[name + "_wall"] = np.maximum(_ellipsoid(ax, ay, u - base, r + 2, 0.85 * r + 2, h.atrium_height + 2), -cut)
    out["heart"] = np.minimum.reduce([out["epi"], out["rv_wall"], out["la_wall"], out["ra_wall"]])
    return out


def _soft(distance: np.ndarray, width: float) -> np.ndarray:
    """Inside fraction of a blurred edge: 1 deep inside, 0.5 on the surface."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / width, -30.0, 30.0)))


def _layer(image: np.ndarray, mask: np.ndarray, value) -> np.ndarray:
    return image + mask * (value - image)


def _context(rng: np.random.Generator, generator: torch.Generator, x, y, shape, spacing, fit: float,
             h: _Heart) -> tuple[dict, np.ndarray]:
    """Static chest around the heart: ``(masks, values)`` layers on ``(X, Y, Z)`` and a bias field."""
    u = rng.uniform
    fields = augment.smooth_random_field(shape, spacing, 12.0 * max(fit, 0.5), 3, generator)[0].numpy()
    bias = augment.smooth_random_field(shape, spacing, 120.0, 1, generator)[0, 0].numpy()
    bias = 1.0 + u(0.08, 0.2) * bias / max(float(np.abs(bias).max()), 1e-6)
    bias = bias * (1.0 + u(0.0, 0.25) * y / (shape[1] * spacing[1]))  # surface coil on the chest: anterior brighter
    texture, patches, lung_texture = fields
    # Body: an ellipse with a wavy outline; the heart sits left-anterior in it (+x is right, +y anterior).
    half = np.array([u(130, 160), u(95, 115)]) * fit
    body_centre = np.array(h.centre) + np.array([u(15, 30), -u(30, 45)]) * fit
    bx, by = x - body_centre[0], y - body_centre[1]
    phase = np.arctan2(by / half[1], bx / half[0])
    wave = 1.0 + sum(u(0.0, 0.025) * np.cos(k * phase + u(0, 2 * math.pi)) for k in range(2, 6))
    scale = np.sqrt((bx / half[0]) ** 2 + (by / half[1]) ** 2)
    body = (scale - wave) * half.mean()
    fat, muscle = u(5, 12) * fit, u(6, 12) * fit
    edge = 0.35 * min(spacing[:2])
    tissue = 0.42 * (1.0 + 0.12 * texture)
    layers = [(_soft(body, edge), 0.85 * (1.0 + 0.08 * texture)),  # subcutaneous fat
              (_soft(body + fat, edge), 0.28 * (1.0 + 0.1 * texture)),  # chest-wall muscle
              (_soft(body + fat + muscle, edge), tissue)]
    for side, (lx, ly) in ((1, (70, 0)), (-1, (-85, -10))):
        cx, cy = body_centre[0] + lx * fit, body_centre[1] + ly * fit
        lung = _ellipsoid(x - cx, y - cy, 0.0, u(45, 58) * fit, u(70, 85) * fit, 1.0)
        layers.append((_soft(lung, edge), 0.05 * (1.0 + 0.6 * lung_texture)))
    for (ox, oy), radius, value in ((( -25, -60), u(10, 13), h.blood),  # descending aorta
                                     ((0, -88), 17.0, 0.5), ((0, -112), 6.0, 0.9)):  # vertebra, spinal canal
        disc = np.hypot(x - body_centre[0] - ox * fit, y - body_centre[1] - oy * fit) - radius * fit
        layers.append((_soft(disc, edge), value))
    pericardial = 0.45 + 0.4 * _soft(-(patches - u(0.0, 0.6)), 0.15)  # patchy epicardial fat
    return {"layers": layers, "pericardial": pericardial, "tissue": tissue}, bias


def cine_patient(index: int, shape: Sequence[int] = (128, 128, 10), spacing: Sequence[float] = (1.5, 1.5, 10.0),
                 phases: int = 25, seed: int = 0, ef_range: Sequence[float] = (0.5, 0.7)) -> CinePatient:
    """Patient ``index`` of a phantom built with ``seed``, in memory (as :func:`build_cine_phantom` writes it).

    Args:
        index: 0-based patient number (``patient{index + 1:03d}`` on disk); patients are independent.
        shape: grid ``(X, Y, Z)``: in-plane size and number of short-axis slices.
        spacing: voxel size in mm ``(x, y, slice)``; slices are contiguous (thickness = spacing).
        phases: frames over one cardiac cycle.
        seed: seeds every patient's anatomy, motion, texture and noise.
        ef_range: the LV ejection fraction is drawn uniformly in it (0..1).
    """
    shape, spacing, phases, ef_range = _check(shape, spacing, phases, ef_range)
    rng, generator = _generators(seed, index)
    h, fit = _draw(rng, shape, spacing, phases, ef_range)
    axes = [(np.arange(n) - (n - 1) / 2.0) * d for n, d in zip(shape, spacing)]
    x = axes[0][:, None, None].astype(np.float32)
    y = axes[1][None, :, None].astype(np.float32)
    offsets = np.array(_SUBPLANES) * spacing[2]
    z = (axes[2][:, None] + offsets[None, :]).reshape(1, 1, -1).astype(np.float32)
    context, bias = _context(rng, generator, x, y, shape, spacing, fit, h)
    sub = len(_SUBPLANES)

    def planes(a):
        return np.repeat(np.broadcast_to(a, shape), sub, axis=2) if np.ndim(a) else a

    static = np.zeros((*shape[:2], shape[2] * sub), np.float32)
    for mask, value in context["layers"]:
        static = _layer(static, planes(mask), planes(value))
    pericardial, tissue = planes(context["pericardial"]), planes(context["tissue"])
    edge = 0.35 * min(spacing[:2])
    blood, myo = h.blood, h.myocardium

    curve = volume_curve(np.arange(phases) / phases, h.es_fraction, h.e_fraction, h.e_duration, h.a_start,
                         h.a_duration)
    images = np.empty((*shape, phases), np.float32)
    labels = np.zeros((*shape, phases), np.uint8)
    centre = sub // 2
    for t, c in enumerate(curve):
        d = _geometry(h, x, y, z, float(c))
        image = _layer(static, _soft(d["heart"] - _PERICARDIUM_MM * fit, edge), pericardial)
        image = _layer(image, _soft(d["heart"] - 1.0 * fit, edge), tissue)  # pericardium: a thin grey line
        for wall, cavity in (("ra_wall", "ra"), ("la_wall", "la"), ("rv_wall", "rv"), ("epi", "endo")):
            image = _layer(image, _soft(d[wall], edge), myo)
            image = _layer(image, _soft(d[cavity], edge), blood)
        image = _layer(image, _soft(d["papillary"], edge) * _soft(d["endo"], edge), 1.1 * myo)
        images[..., t] = image.reshape(*shape, sub).mean(axis=3)
        mid = {k: d[k][..., centre::sub] for k in ("endo", "epi", "rv")}
        frame = np.where(mid["rv"] < 0, 1, 0)
        frame = np.where(mid["epi"] < 0, 2, frame)
        labels[..., t] = np.where(mid["endo"] < 0, 3, frame)

    sigma = rng.uniform(0.015, 0.035)
    noise = rng.standard_normal((2, *images.shape), dtype=np.float32) * sigma
    images = np.sqrt((images * bias[..., None] + noise[0]) ** 2 + noise[1] ** 2)
    series = np.clip(np.rint(images * INTENSITY_SCALE), 0, np.iinfo(np.int16).max).astype(np.int16)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2.0 * np.array(spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    k = 2.0 / 3.0 * math.pi * (1 - h.eccentricity ** 2) / 1000.0
    edv = k * h.r_endo ** 2 * (h.length - h.apex_wall)
    myocardium = k * h.r_epi ** 2 * h.length - edv
    es = int(np.argmax(curve))
    counts = {name: [round(float((labels[..., t] == value).sum()) * voxel_ml, 3) for t in range(phases)]
              for name, value in (("lv_labels", 3), ("myo_labels", 2), ("rv_labels", 1))}
    truth = {"EF": h.ef, "EDV": edv, "ESV": edv * (1 - h.ef), "myocardium": myocardium,
             "lv_curve": [edv * (1 - h.ef * float(c)) for c in curve], **counts,
             "time_step": 60.0 / h.heart_rate / phases, "es_fraction": h.es_fraction, "fit": fit,
             "parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(h).items()}}
    info = {"Group": "NOR" if h.ef >= 0.5 else "SYN", "Height": h.height_cm, "Weight": h.weight_kg,
            "EF": round(100 * h.ef, 2)}
    return CinePatient(series, labels, affine, 0, es, info, truth)


def _readme(index: dict) -> str:
    p = index["parameters"]
    low, high = (100 * v for v in p["ef_range"])
    return f"""# firekit synthetic cardiac cine phantom (ACDC layout)

Built by `firekit.data.cinephantom.build_cine_phantom` (version {p['version']}, seed {p['seed']}): {p['patients']}
patients, {p['phases']} phases over one cardiac cycle, {' x '.join(map(str, p['shape']))} voxels of
{' x '.join(f'{s:g}' for s in p['spacing'])} mm (short-axis slices, contiguous).

## Everything here is synthetic
No scan or person is behind these files. Each patient is an analytic, seeded model written in the
layout of the ACDC challenge (Bernard et al., IEEE TMI 2018) so that ACDC readers load it:
`patientNNN/Info.cfg`, `patientNNN_4d.nii.gz` (X, Y, Z, T, int16), and `patientNNN_frameNN.nii.gz` with
`patientNNN_frameNN_gt.nii.gz` for ED and ES (frame numbers 1-based; labels 1 RV cavity,
2 LV myocardium, 3 LV cavity with the papillary muscles).

- Left ventricle: truncated prolate ellipsoid (base wider than apex), per-patient size, in-plane
  eccentricity and orientation, axis tilt. Its cavity shrinks by the patient's ejection fraction
  (drawn in {low:.0f}-{high:.0f} %; `EF` in Info.cfg, in %) from ED (frame01) to ES (34-40 % of the
  cycle): radial contraction, longitudinal shortening (the base descends by about one slice, from
  one slice boundary to the next, so the labels hold the whole cavity at ED and ES) and a twist.
  The myocardium keeps its volume, so it thickens at systole.
- Right ventricle: a crescent on the septum (RV EF about 45-65 %); atria above the base that fill in systole.
- Labels of every phase are exact samples of the model at the slice centres; `{INDEX_FILE}` lists
  their volumes. The frames average three planes per slice (partial volume of thick slices).
- Volume curve: smooth and periodic: ejection, early rapid filling, diastasis, atrial kick.
- Surroundings: chest outline, subcutaneous fat, chest-wall muscle, lungs, pericardial fat, descending
  aorta, vertebra; smooth random textures, a smooth bias field (brighter anteriorly), Rician noise.
  Contrast is bSSFP-like (blood bright, myocardium dark grey), not simulated MR physics.
- Group in Info.cfg is `NOR` (normal EF, normal walls) for EF >= 50 %, else `SYN`; Height and Weight
  are random numbers.
- `{INDEX_FILE}` holds, per patient, the model's true EDV, ESV and myocardial volume (mL), its LV volume
  curve, and the label volumes of every phase.
"""


_PARAMETERS = ("version", "patients", "phases", "shape", "spacing", "seed", "ef_range")


def _complete(out: Path, index: dict) -> list[acdc.Patient] | None:
    try:
        patients = [acdc.read_patient(out / name) for name in index["names"]]
    except (FirekitError, KeyError, TypeError):
        return None
    return patients if all(p.ed in p.frames and p.es in p.frames for p in patients) else None


def build_cine_phantom(
    out: str | os.PathLike,
    patients: int = 5,
    phases: int = 25,
    seed: int = 0,
    shape: Sequence[int] = (128, 128, 10),
    spacing: Sequence[float] = (1.5, 1.5, 10.0),
    ef_range: Sequence[float] = (0.5, 0.7),
    progress: bool = False,
    overwrite: bool = False,
) -> list[acdc.Patient]:
    """Write a synthetic cardiac cine dataset in the ACDC layout (``out/patientNNN/...``, README.md).

    Idempotent: a folder holding a complete phantom with the same parameters is left as it is.
    Deterministic given ``seed``; patient ``i`` does not depend on how many are built. Files are
    written atomically, ``cine_phantom.json`` last.

    Args:
        out: output folder; empty, absent, or holding a phantom with the same parameters (or
            ``overwrite``: rebuild over it, removing the patient folders it listed).
        patients: number of patients (``patient001`` ...).
        phases: frames per cardiac cycle (ACDC: 12-35).
        seed: seeds every patient.
        shape: grid ``(X, Y, Z)``; a grid too small for an adult heart gets a proportionally smaller one.
        spacing: voxel size in mm ``(x, y, slice)``.
        ef_range: LV ejection fractions are drawn uniformly in it (0..1).
        progress: show a tqdm progress bar.
        overwrite: rebuild into a non-empty folder.

    Returns:
        The patients, read back with :func:`firekit.data.acdc.read_patient`.
    """
    shape, spacing, phases, ef_range = _check(shape, spacing, phases, ef_range)
    if int(patients) < 1:
        raise FirekitError(f"patients must be at least 1, got {patients}")
    out = Path(out)
    parameters = {"version": VERSION, "patients": int(patients), "phases": phases, "shape": list(shape),
                  "spacing": list(spacing), "seed": int(seed), "ef_range": list(ef_range)}
    old = read_index(out / INDEX_FILE)
    old_parameters = None if old is None else old.get("parameters", {})
    same = same_or_refuse(out, "cine phantom", old_parameters, parameters, _PARAMETERS, overwrite)
    if same and not overwrite:
        done = _complete(out, old)
        if done is not None:
            return done
    names = [f"patient{i + 1:03d}" for i in range(int(patients))]
    index = {"name": "firekit synthetic cardiac cine phantom (ACDC layout)", "parameters": parameters,
             "names": names, "labels": {str(k): v for k, v in acdc.LABEL_NAMES.items()}, "patients": {}}
    out.mkdir(parents=True, exist_ok=True)
    if old is not None:
        (out / INDEX_FILE).unlink()  # incomplete until the new index is written
        _remove_stale(out, old, names)
    atomic_write_text(out / "README.md", _readme(index))

    from tqdm.auto import tqdm

    written = []
    for i, name in enumerate(tqdm(names, desc="cine phantom", disable=not progress)):
        patient = cine_patient(i, shape, spacing, phases, seed, ef_range)
        labels = patient.labels
        written.append(acdc.write_patient(out, name, patient.series, patient.affine, patient.ed, patient.es,
                                          labels[..., patient.ed], labels[..., patient.es], patient.info,
                                          time_step=patient.truth["time_step"]))
        index["patients"][name] = {"ED": patient.ed, "ES": patient.es, **patient.truth}
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    return written


def _remove_stale(out: Path, old: dict, names: list[str]) -> None:
    """Delete the files of patients an earlier build wrote that this build does not write."""
    for name in old.get("names") or []:
        folder = out / str(name)
        if name in names or not acdc._NAME.fullmatch(str(name)) or not folder.is_dir():
            continue
        for path in [folder / "Info.cfg", folder / f"{name}_4d.nii.gz", *folder.glob(f"{name}_frame*.nii.gz")]:
            path.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()
