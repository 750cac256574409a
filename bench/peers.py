"""Greedy, elastix and ConvexAdam beside firekit and ANTs, each in a subprocess of its own.

``python -m bench.vs_ants`` runs these rows on its pairs (``pip install firekit[bench]``: picsl_greedy,
itk-elastix, convexadam). Each peer registers moving to fixed in a worker process (so a crash costs
that peer its row, not the run: :class:`Worker`) and hands back ONE displacement field in the
convention of the ANTs rows and of ``firekit.registration.fields`` (on fixed's grid, ``(*S, n)``, mm, LPS signs:
the fixed voxel at RAS point ``x`` matches moving's ``x + flip(u(x))``), a field the other way for
the inverse-consistency error, the tool's own nearest-neighbour warp of moving's labels (to check the
conversion on every pair) and its wall/CPU seconds.

Conventions met on the way (each checked on a pair with a known shift by :func:`shift_check` and by
``tests/test_peers.py``):

- Greedy: images and in-memory fields are ITK (LPS mm); its affine matrices are RAS, fixed -> moving
  points. ``-r W A`` applies the warp then the affine to a fixed point; ``-rc`` composes them.
- elastix: transformix's deformation field is ITK's (LPS mm, fixed grid, all maps composed).
- ConvexAdam: voxels of one grid, ``fixed[i] ~ moving[i + d(i)]`` along the array axes; it runs on
  moving resampled onto fixed's grid by Greedy's affine, and the field composes the two.
"""

from __future__ import annotations

import importlib
import io as _io
import multiprocessing
import os
import signal
import tempfile
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Peer:
    """One peer's row: its adapter (``module:function``, run in the worker), dims, parameters."""

    adapter: str
    ndims: tuple[int, ...]
    parameters: str


GREEDY_AFFINE = "-a -dof 12 -m NMI -ia-image-centers -n 100x50x10"
GREEDY_DEFORMABLE = "-m NMI -n 100x50x10 -s 1.732vox 0.7071vox"
CONVEXADAM = dict(mind_r=1, mind_d=2, lambda_weight=1.25, grid_sp=6, disp_hw=4, selected_niter=80,
                  selected_smooth=0, grid_sp_adam=2, ic=True)  # convex_adam_pt's defaults
PEERS = {
    "Greedy (NMI affine + deformable)": Peer(
        "bench.peers:greedy", (2, 3),
        f"picsl_greedy: `greedy {GREEDY_AFFINE}`, then `greedy {GREEDY_DEFORMABLE} -it affine` (greedy's default "
        "smoothing), `-threads N`; inverse: `-r affine,-1 inverse_warp` (`-oinv`)"),
    "elastix (affine + B-spline, Mattes MI)": Peer(
        "bench.peers:elastix", (2, 3),
        "itk-elastix: `GetDefaultParameterMap('affine')` then `('bspline')` (AdvancedMattesMutualInformation, "
        "4 resolutions, 256 iterations each, 2048 random samples, B-spline grid 10 mm + bending energy), "
        "`WriteResultImage false`, `RandomSeed` = the bench's seed, `number_of_threads=N`; "
        "inverse: a registration the other way"),
    "ConvexAdam (after Greedy's affine)": Peer(
        "bench.peers:convexadam", (3,),
        "convexadam `convex_adam_pt` defaults (" + ", ".join(f"{k}={v}" for k, v in CONVEXADAM.items())
        + "; float32 on the CPU) on moving resampled onto fixed's grid by the Greedy affine above (its time "
        "included); inverse: both steps the other way"),
}


class PeerCrashed(RuntimeError):
    """A peer's worker died, timed out or raised: the row is marked, the run goes on."""


# ------------------------------------------------------------------------------------ geometry
def itk_geometry(volume) -> tuple[tuple, tuple, np.ndarray]:
    """``(origin, spacing, direction)`` of a NIfTI volume in ITK's LPS world (mm), for any ITK bridge
    (SimpleITK, itk-elastix, antspyx)."""
    from firekit.data.itk_io import itk_geometry as geometry

    origin, spacing, direction = geometry(volume.affine)
    return origin, spacing, np.reshape(direction, (volume.ndim, volume.ndim))


def to_sitk(volume):
    """A SimpleITK image with the volume's geometry (ITK's LPS world)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume.data, np.float32).T))
    origin, spacing, direction = itk_geometry(volume)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.ravel()))
    return image


def to_itk(volume):
    """An ITK (itk-elastix) image with the volume's geometry."""
    import itk

    image = itk.image_from_array(np.ascontiguousarray(np.asarray(volume.data, np.float32).T))
    origin, spacing, direction = itk_geometry(volume)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return image


def field_array(array: np.ndarray) -> np.ndarray:
    """An ITK vector image's array (``(*reversed S, n)``, as sitk/itk hand it) in voxel order ``(*S, n)``."""
    n = array.ndim - 1
    return np.ascontiguousarray(np.transpose(array, (*range(n - 1, -1, -1), n)), dtype=np.float32)


def image_array(array: np.ndarray) -> np.ndarray:
    """An ITK scalar image's array in voxel order."""
    return np.ascontiguousarray(array.T)


def timed(function):
    """``(function(), wall seconds, process CPU seconds)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = function()
    return value, time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------------------------ adapters
def _greedy_class(ndim: int):
    import picsl_greedy

    return getattr(picsl_greedy, f"Greedy{ndim}D")


def _greedy_run(greedy, command: str, **images) -> None:
    """One greedy command; its chatter goes to a buffer (it prints even at ``-V 0``)."""
    sink = _io.StringIO()
    greedy.execute(command + " -V 0", out=sink, err=sink, **images)


def greedy_affine(moving, fixed, threads: int, seed: int, settings: dict | None = None):
    """Greedy's NMI affine from images centred: ``(greedy, 4x4 RAS matrix fixed -> moving points)``."""
    settings = settings or {}
    greedy = _greedy_class(fixed.ndim)()
    iterations = settings.get("iterations", "100x50x10")
    _greedy_run(greedy, f"-i F M {GREEDY_AFFINE.replace('100x50x10', iterations)} -o A -threads {threads} "
                        f"-seed {seed + 1}", F=to_sitk(fixed), M=to_sitk(moving), A=None)
    return greedy, np.asarray(greedy["A"], np.float64)


def greedy(moving, fixed, moving_labels, threads: int, seed: int, settings: dict | None = None) -> dict:
    """Greedy: NMI affine (image centres), then NMI deformable; the warp and affine composed by ``-rc``."""
    settings = settings or {}
    iterations = settings.get("iterations", "100x50x10")

    def solve():
        g, _ = greedy_affine(moving, fixed, threads, seed, settings)
        _greedy_run(g, f"-i F M -it A {GREEDY_DEFORMABLE.replace('100x50x10', iterations)} -o W -oinv Winv "
                       f"-threads {threads}", W=None, Winv=None)
        _greedy_run(g, f"-rf F -r W A -rc C -threads {threads}", C=None)
        return g

    g, wall, cpu = timed(solve)
    import SimpleITK as sitk

    g["L"] = to_sitk(moving_labels)
    g["M2"] = to_sitk(moving)
    _greedy_run(g, f"-rf M2 -r A,-1 Winv -rc B -threads {threads}", B=None)
    _greedy_run(g, f"-rf F -ri NN -rm L Lw -r W A -threads {threads}", Lw=None)
    return dict(field=field_array(sitk.GetArrayFromImage(g["C"])),
                backward=field_array(sitk.GetArrayFromImage(g["B"])),
                own_labels=np.rint(image_array(sitk.GetArrayFromImage(g["Lw"]))), wall=wall, cpu=cpu)


def _elastix_parameters(seed: int, settings: dict):
    import itk

    parameters = itk.ParameterObject.New()
    for kind in ("affine", "bspline"):
        maps = parameters.GetDefaultParameterMap(kind)
        maps["WriteResultImage"] = ["false"]
        maps["RandomSeed"] = [str(seed + 1)]
        for key, value in settings.items():  # the tests' shorter schedules
            maps[key] = [str(value)]
        parameters.AddParameterMap(maps)
    return parameters


def _elastix_solve(moving, fixed, threads: int, seed: int, settings: dict):
    import itk

    fixed_image, moving_image = to_itk(fixed), to_itk(moving)
    _, transform = itk.elastix_registration_method(fixed_image, moving_image,
                                                   parameter_object=_elastix_parameters(seed, settings),
                                                   number_of_threads=threads, log_to_console=False)
    with tempfile.TemporaryDirectory() as scratch:  # transformix writes deformationField.nii there, not in the cwd
        field = itk.transformix_deformation_field(moving_image, transform, output_directory=scratch)
        return transform, field_array(itk.array_from_image(field))


def elastix(moving, fixed, moving_labels, threads: int, seed: int, settings: dict | None = None) -> dict:
    """elastix: its default affine then B-spline maps (Mattes MI); transformix's composed field."""
    import itk

    settings = settings or {}
    (transform, field), wall, cpu = timed(lambda: _elastix_solve(moving, fixed, threads, seed, settings))
    _, backward = _elastix_solve(fixed, moving, threads, seed, settings)
    for index in range(transform.GetNumberOfParameterMaps()):
        transform.SetParameter(index, "FinalBSplineInterpolationOrder", "0")  # nearest neighbour
        transform.SetParameter(index, "ResultImagePixelType", "float")
    with tempfile.TemporaryDirectory() as scratch:
        labels = itk.transformix_filter(to_itk(moving_labels), transform, log_to_console=False,
                                        output_directory=scratch)
        own = np.rint(image_array(itk.array_from_image(labels)))
    return dict(field=field, backward=backward, own_labels=own, wall=wall, cpu=cpu)


def _convexadam_solve(moving, fixed, threads: int, seed: int, settings: dict):
    """Greedy's affine, moving resampled by it onto fixed's grid, ConvexAdam there; the composed field."""
    import SimpleITK as sitk
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    from firekit.data import io

    g, matrix = greedy_affine(moving, fixed, threads, seed, settings.get("greedy"))
    _greedy_run(g, f"-rf F -rm M R -r A -threads {threads}", R=None)
    resampled = image_array(sitk.GetArrayFromImage(g["R"])).astype(np.float32)
    torch.manual_seed(seed)
    options = {**CONVEXADAM, **settings.get("convexadam", {})}
    voxels = convex_adam_pt(np.asarray(fixed.data, np.float32), resampled, dtype=torch.float32,
                            device=torch.device("cpu"), **options)
    n = fixed.ndim
    index = np.stack(np.meshgrid(*[np.arange(s) for s in fixed.shape], indexing="ij"), -1).astype(np.float64)
    points = (index + voxels) @ fixed.affine[:n, :n].T + fixed.affine[:n, n]  # RAS on fixed's grid
    matched = points @ matrix[:n, :n].T + matrix[:n, n]  # moving's RAS
    world = index @ fixed.affine[:n, :n].T + fixed.affine[:n, n]
    return g, voxels, ((matched - world) * io.lps_flip(n)).astype(np.float32)


def convexadam(moving, fixed, moving_labels, threads: int, seed: int, settings: dict | None = None) -> dict:
    """ConvexAdam (MIND, convex discrete search, Adam) after Greedy's NMI affine; 3D only."""
    import SimpleITK as sitk
    from scipy.ndimage import map_coordinates

    if fixed.ndim != 3:
        raise ValueError(f"ConvexAdam registers 3D images; got {fixed.ndim}D")
    settings = settings or {}
    (g, voxels, field), wall, cpu = timed(lambda: _convexadam_solve(moving, fixed, threads, seed, settings))
    _, _, backward = _convexadam_solve(fixed, moving, threads, seed, settings)
    # Its own label warp: Greedy's nearest-neighbour reslice by the affine, then apply_convex's sampling
    # (map_coordinates at i + d) at order 0.
    g["L"] = to_sitk(moving_labels)
    _greedy_run(g, f"-rf F -ri NN -rm L Lr -r A -threads {threads}", Lr=None)
    affine_labels = image_array(sitk.GetArrayFromImage(g["Lr"]))
    index = np.indices(fixed.shape, dtype=np.float64)
    own = map_coordinates(affine_labels, index + np.moveaxis(voxels, -1, 0), order=0, mode="constant")
    return dict(field=field, backward=backward, own_labels=np.rint(own), wall=wall, cpu=cpu)


def warm(moving, fixed, moving_labels, threads: int, seed: int, settings: dict | None = None) -> dict:
    """The peers' imports (ITK's lazy loading included), so that no peer's first row pays for them."""
    import itk
    import picsl_greedy  # noqa: F401
    from convexAdam.convex_adam_MIND import convex_adam_pt  # noqa: F401

    itk.ParameterObject.New()
    itk.elastix_registration_method, itk.transformix_deformation_field  # noqa: B018 - ITK loads on access
    return {}


def versions() -> dict:
    """The installed peers' versions, for the report (``—`` where one is missing)."""
    from importlib import metadata

    found = {}
    for package in ("picsl_greedy", "itk-elastix", "convexAdam"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "—"
    return found


# ------------------------------------------------------------------------------------ worker
def _resolve(adapter: str):
    module, _, function = adapter.partition(":")
    return getattr(importlib.import_module(module), function)


def _load(pair: dict) -> dict:
    from firekit.data import io

    return dict(moving=io.load_volume(pair["moving"]), fixed=io.load_volume(pair["fixed"]),
                moving_labels=io.load_labels(pair["moving_labels"]))


def _serve(connection, threads: int) -> None:
    """The worker's loop: (adapter, pair paths, seed, settings) in, the adapter's dict or an error out."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            task = connection.recv()
        except EOFError:
            return
        if task is None:
            return
        adapter, pair, seed, settings = task
        try:
            volumes = _load(pair)
            out = _resolve(adapter)(volumes["moving"], volumes["fixed"], volumes["moving_labels"], threads, seed,
                                    settings)
            connection.send(("ok", out))
        except Exception as exc:  # noqa: BLE001 - a peer's error is reported as its row's failure
            message = str(exc).strip().splitlines()
            connection.send(("error", f"{type(exc).__name__}: {message[0] if message else ''}"[:300]))


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Worker:
    """A subprocess that runs peers' adapters; restarted after a crash or a timeout."""

    def __init__(self, threads: int, timeout: float = 3600.0):
        self.threads, self.timeout = threads, timeout
        self.process = self.connection = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, self.threads), daemon=True)
        self.process.start()
        child.close()

    def call(self, adapter: str, pair: dict, seed: int, settings: dict | None = None) -> dict:
        """Run ``adapter`` on the pair's files; raises :class:`PeerCrashed` (one line) if it fails."""
        if self.process is None or not self.process.is_alive():
            self._start()
        try:
            self.connection.send((adapter, {k: str(v) for k, v in pair.items()}, seed, settings or {}))
            if not self.connection.poll(self.timeout):
                self.process.kill()
                self.process.join()
                self.process = None
                raise PeerCrashed(f"no answer within {self.timeout:.0f} s (killed)")
            status, value = self.connection.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.process.join(10)
            reason = _exit_reason(self.process.exitcode)
            self.process = None
            raise PeerCrashed(f"the peer's process {reason}") from None
        if status != "ok":
            raise PeerCrashed(value)
        return value

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.connection.send(None)
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()
        self.process = None


# ------------------------------------------------------------------------------------ checks
def shifted_pair(pair: dict, shift_ras, out_dir) -> dict:
    """The pair's fixed image (and labels) as moving, moved by ``shift_ras`` mm through its header alone
    (no resampling): the exact answer is ``u = flip(shift)`` everywhere. Returns the new pair's paths."""
    from pathlib import Path

    from firekit.data import io

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fixed, labels = io.load_volume(pair["fixed"]), io.load_labels(pair["fixed_labels"])
    n = fixed.ndim
    moved = fixed.affine.copy()
    moved[:n, n] += np.asarray(shift_ras, np.float64)
    paths = dict(moving=out_dir / "moving.nii.gz", moving_labels=out_dir / "moving_labels.nii.gz",
                 fixed=pair["fixed"], fixed_labels=pair["fixed_labels"])
    io.save_nifti(fixed.data, moved, paths["moving"], header=fixed.header)
    io.save_nifti(labels.data.astype(np.int16), moved, paths["moving_labels"], header=labels.header)
    return {k: str(v) for k, v in paths.items()}


def agreement(own_labels: np.ndarray, field: np.ndarray, moving_labels, fixed) -> float:
    """Fraction of fixed voxels where firekit's nearest-neighbour warp by ``field`` equals the tool's own."""
    from firekit.registration import fields

    ours = fields.apply_field(moving_labels, field, fixed, labels=True)
    return float((ours == own_labels).mean())


def shift_check(worker: Worker, adapter: str, pair: dict, shift_ras, seed: int, out_dir,
                settings: dict | None = None) -> dict:
    """One peer on the pair's fixed image moved by a known shift: field error against it and the
    field's median vector (LPS mm) beside the expected one, and the label-warp agreement."""
    from firekit.data import io

    shifted = shifted_pair(pair, shift_ras, out_dir)
    out = worker.call(adapter, shifted, seed, settings)
    fixed, labels = io.load_volume(shifted["fixed"]), io.load_labels(shifted["fixed_labels"])
    moving_labels = io.load_labels(shifted["moving_labels"])
    expected = np.asarray(shift_ras, np.float64) * io.lps_flip(fixed.ndim)
    brain = labels.data > 0
    error = np.linalg.norm(out["field"] - expected, axis=-1)[brain]
    return dict(shift_lps=expected.tolist(), median_lps=np.median(out["field"][brain], axis=0).tolist(),
                epe=float(error.mean()), agreement=agreement(out["own_labels"], out["field"], moving_labels, fixed))
