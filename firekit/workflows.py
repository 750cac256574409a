"""End-to-end jobs behind the CLI: train a model from file globs, register files to files.

Each is a plain function so Python users, notebooks and the napari plugin run the same code.
"""

from __future__ import annotations

import os
from pathlib import Path

from firekit.data import io
from firekit.data.pairs import DEFAULT_SPACING, PairDataset, find_pairs, load_subject
from firekit.core.errors import FirekitError
from firekit.fire.model import Fire, FireConfig

__all__ = ["build_dataset", "train_on_files", "register_files", "SHIPPED_RECIPE", "RECIPES", "MOMENTS_RECIPE"]

# The recipe of the shipped 3D model and of the 2D model shipped before issue 18 (bench/training.md):
# moments pre-alignment, the auxiliary loss, a curriculum, small rates, the best checkpoint kept.
MOMENTS_RECIPE = dict(preset="small", prealign="moments", aux_weight=1000.0, curriculum_steps=300,
                      lr_affine=3e-4, lr_nonrigid=3e-4)

# Named recipes for long training (``firekit train --recipe NAME``; flags given beside it win).
# bench/training.md measures why each setting is there.
RECIPES: dict[str, dict] = {
    # 2D, coarse stage: keypoint T_af, the paper's nine terms plus the auxiliary loss on the
    # augmentation's known transform at full strength from the first step, one rate for the
    # three optimisers on a cosine schedule, an EMA of the weights, batch 4, 2.56 mm.
    "learn2d": dict(preset="small", affine_pooling="keypoints", aux_weight=1000.0, lr_affine=1e-3,
                    lr_nonrigid=1e-3, lr_synthesis=1e-3, schedule="cosine", warmup_steps=500, ema_decay=0.999,
                    batch_size=4, spacing=2.56, iterations=20_000, val_every=500, checkpoint_every=250),
    # 2D, fine stage: the same at 1.28 mm, started from the coarse stage's EMA weights (--init), with
    # the synthesis stage's exact-target synthesis and invariance terms, so that it keeps them.
    "learn2d-fine": dict(preset="small", affine_pooling="keypoints", aux_weight=1000.0, synthesis_weight=10.0,
                         invariance_weight=30.0, lr_affine=3e-4, lr_nonrigid=3e-4, lr_synthesis=3e-4,
                         schedule="cosine", warmup_steps=100, ema_decay=0.999, batch_size=4, spacing=1.28,
                         iterations=2_000, val_every=250, checkpoint_every=250),
    # 2D, synthesis stage: the coarse stage's model (--init) keeps its registration terms while the
    # decoders learn against exact aligned targets and G codes both contrasts alike
    # (bench/training.md, "Synthesis and invariance").
    "learn2d-synth": dict(preset="small", affine_pooling="keypoints", aux_weight=1000.0, synthesis_weight=10.0,
                          invariance_weight=30.0, lr_affine=3e-4, lr_nonrigid=3e-4, lr_synthesis=3e-4,
                          schedule="cosine", warmup_steps=100, ema_decay=0.99, batch_size=4, spacing=2.56,
                          iterations=1_500, val_every=250, checkpoint_every=250),
    # 2D, near-alignment stage: the shipped model (--init) keeps every term of the synthesis stage
    # while 30 % of its pairs are drawn at or near alignment, so that it also learns answers at and
    # near the identity (aligned pairs 1.7 -> 1.3 mm; a second pass still does not improve on the
    # first: bench/training.md section 8).
    "learn2d-near": dict(preset="small", affine_pooling="keypoints", aux_weight=1000.0, synthesis_weight=10.0,
                         invariance_weight=30.0, near_fraction=0.3, lr_affine=3e-4, lr_nonrigid=3e-4,
                         lr_synthesis=3e-4, schedule="cosine", warmup_steps=100, ema_decay=0.99, batch_size=4,
                         spacing=2.56, iterations=2_000, val_every=250, checkpoint_every=250),
    # 2D, contrast stage: the shipped model (--init) with every term of the near-alignment stage while half of
    # its pairs pass B through a random intensity curve (firekit.data.contrast), meant to let the network alone
    # meet unseen contrasts. Measured: it did not (FLAIR-like 0.655 -> 0.613, T1 -> T1 0.694 -> 0.644; not
    # shipped, bench/training.md section 9).
    "learn2d-contrast": dict(preset="small", affine_pooling="keypoints", aux_weight=1000.0, synthesis_weight=10.0,
                             invariance_weight=30.0, near_fraction=0.3, contrast_fraction=0.5, lr_affine=3e-4,
                             lr_nonrigid=3e-4, lr_synthesis=3e-4, schedule="cosine", warmup_steps=100, ema_decay=0.99,
                             batch_size=4, spacing=2.56, iterations=4_000, val_every=250, checkpoint_every=250),
    # 3D, the same recipe on volumes at 2.56 mm, batch 2 (plan it for a GPU: bench/gpu_train.py).
    "learn3d": dict(preset="small", affine_pooling="keypoints", aux_weight=1000.0, lr_affine=1e-3,
                    lr_nonrigid=1e-3, lr_synthesis=1e-3, schedule="cosine", warmup_steps=500, ema_decay=0.999,
                    batch_size=2, spacing=2.56, iterations=20_000, val_every=500, checkpoint_every=250),
    # 3D, second stage: the learn3d model (--init) with the 2D synthesis and near-alignment stages'
    # terms (exact-target synthesis, G coding both contrasts alike, 30 % of pairs at or near
    # alignment) on a new, lower cosine. Measured from the shipped model: network alone T1 -> T1
    # +0.045 Dice, T2-like -0.007, FLAIR-like -0.012 (not shipped; bench/training.md section 7).
    "learn3d-near": dict(preset="small", affine_pooling="keypoints", aux_weight=1000.0, synthesis_weight=10.0,
                         invariance_weight=30.0, near_fraction=0.3, lr_affine=3e-4, lr_nonrigid=3e-4,
                         lr_synthesis=3e-4, schedule="cosine", warmup_steps=100, ema_decay=0.99, batch_size=2,
                         spacing=2.56, iterations=1_000, val_every=250, checkpoint_every=125),
}

# What ``firekit demo --train`` and notebook 04 run: the learn2d recipe (the shipped 2D model's) on a
# budget of a few hundred steps (a shorter warm-up, a faster EMA); length and logging are the caller's.
SHIPPED_RECIPE = {**{k: v for k, v in RECIPES["learn2d"].items() if k not in ("iterations", "val_every",
                                                                            "checkpoint_every")},
                  "warmup_steps": 50, "ema_decay": 0.99}


def build_dataset(
    a: str,
    b: str,
    labels: str | None,
    ndim: int,
    spacing: float = DEFAULT_SPACING,
    seed: int = 0,
    augment=True,
    pairing: str = "subject",
    progress: bool = True,
    curriculum_steps: int = 0,
    flags: tuple[str, str, str] = ("--a", "--b", "--labels"),
    counterparts: bool = False,
    near_fraction: float = 0.0,
    contrast_fraction: float = 0.0,
) -> PairDataset:
    """Match, load and wrap subjects from globs into a :class:`PairDataset`.

    Args:
        augment: True for the paper's augmentation (``AugmentConfig()``), False for none, or an
            ``AugmentConfig``.
        flags: the command-line names of the three globs, for error messages.
        counterparts: batches also carry each pair's aligned counterparts (``PairDataset``).
        near_fraction: the fraction of pairs drawn at or near alignment (``PairDataset``).
        contrast_fraction: the fraction of pairs whose B image gets a random contrast (``PairDataset``).
    """
    from tqdm.auto import tqdm

    from firekit.data.augment import AugmentConfig

    subjects = find_pairs(a, b, labels, flags=flags)
    # A 2D model on 3D volumes trains on axial slices: keep the native through-plane spacing.
    grid_spacing = (spacing, spacing, None if ndim == 2 else spacing)
    loaded = [load_subject(s, grid_spacing) for s in
              tqdm(subjects, desc="loading subjects", disable=not progress, leave=False)]
    data_ndim = loaded[0].a.ndim - 2
    if ndim > data_ndim:
        raise FirekitError(f"--ndim {ndim} but {subjects[0].a} is {data_ndim}D; use --ndim {data_ndim}")
    config = AugmentConfig() if augment is True else (augment or None)
    info = {"a": a, "b": b, "labels": labels}
    return PairDataset(loaded, ndim, config, seed=seed, pairing=pairing, spacing=spacing, info=info,
                       curriculum_steps=curriculum_steps, counterparts=counterparts, near_fraction=near_fraction,
                       contrast_fraction=contrast_fraction)


def train_on_files(
    a: str,
    b: str,
    out: str | os.PathLike,
    labels: str | None = None,
    ndim: int = 2,
    preset: str = "small",
    iterations: int = 1000,
    batch_size: int = 1,
    val_a: str | None = None,
    val_b: str | None = None,
    val_labels: str | None = None,
    val_pairs: int = 8,
    spacing: float = DEFAULT_SPACING,
    seed: int = 0,
    augment=True,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    curriculum_steps: int = 0,
    near_fraction: float = 0.0,
    contrast_fraction: float = 0.0,
    prealign: str = "none",
    residual_bound: float = 0.0,
    affine_pooling: str = "mean",
    init: str | os.PathLike | None = None,
    callback=None,
    **train_options,
):
    """Train a FIRE model on subjects matched from globs; writes the run folder (see ``train``).

    ``near_fraction``: the fraction of training pairs drawn at or near alignment, ``contrast_fraction`` the
    fraction whose B image gets a random contrast (``PairDataset``); validation pairs get neither.
    Validation uses the ``val_*`` globs when given, else fixed augmented pairs of the training
    subjects (only when labels are given). ``prealign``, ``residual_bound`` and ``affine_pooling`` go to the
    model (:class:`FireConfig`), ``train_options`` to :class:`TrainConfig`; ``callback`` to ``train`` (e.g. a
    ``viz.LossPlot``). ``init``: a model.pt whose weights the new model starts from (e.g. a coarser stage).
    """
    counterparts = bool(train_options.get("synthesis_weight") or train_options.get("invariance_weight"))
    dataset = build_dataset(a, b, labels, ndim, spacing, seed, augment, progress=progress,
                            curriculum_steps=curriculum_steps, counterparts=counterparts, near_fraction=near_fraction,
                            contrast_fraction=contrast_fraction)
    validation = None
    if val_a or val_b:
        if not (val_a and val_b):
            raise FirekitError("--val-a and --val-b go together; pass both or neither")
        held_out = build_dataset(val_a, val_b, val_labels, ndim, spacing, seed, augment, progress=progress,
                                 flags=("--val-a", "--val-b", "--val-labels"))
        held_out.shape = dataset.shape
        validation = held_out.validation(val_pairs)
    elif labels is not None:
        validation = dataset.validation(val_pairs)
    if validation is not None and "labels_a" not in validation[0]:
        validation = None
    return _train_new_model(
        dataset, out, preset, ndim, seed, iterations, batch_size, train_options,
        dict(prealign=prealign, residual_bound=residual_bound, affine_pooling=affine_pooling), validation,
        {"modalities": {"a": a, "b": b}, "spacing": spacing}, init=init,
        resume=resume, overwrite=overwrite, device=device, progress=progress, callback=callback,
    )


def _train_new_model(source, out, preset: str, ndim: int, seed: int, iterations: int, batch_size: int,
                     train_options: dict, model_options: dict, validation, extra: dict, init=None, **run):
    """A new ``preset`` model, its weights initialised from ``seed`` (or copied from the model file
    ``init``), trained on ``source`` (``run``: :func:`firekit.training.loop.train`'s resume, overwrite,
    device, progress, callback)."""
    import torch

    from firekit.training.config import TrainConfig
    from firekit.training.loop import train

    config = TrainConfig.from_preset(preset, iterations=iterations, batch_size=batch_size, seed=seed, **train_options)
    torch.manual_seed(seed)  # the weights' initialisation is part of the run's seed
    model = Fire(FireConfig.from_preset(preset, ndim=ndim, **model_options))
    if init is not None and not run.get("resume"):
        _start_from(model, init)
        extra = {**extra, "init": str(init)}
    return train(model, source, config, out, validation=validation, extra=extra, **run)


def _start_from(model: Fire, path) -> None:
    """Copy the weights of the model file ``path`` into ``model``; one line when they do not fit."""
    from firekit.fire.checkpoint import load_checkpoint
    from firekit.fire.model import architecture_differences

    source, _ = load_checkpoint(path)
    differ = architecture_differences(model.config, source.config)
    if differ:
        raise FirekitError(f"{path}: --init model differs from the one to train ({', '.join(differ)}); "
                           "train with the same model options")
    model.load_state_dict(source.state_dict())


def load_cine_series(pattern: str, flag: str = "--cine") -> tuple[list, list[dict], list[str]]:
    """Series matched by a glob of 4D NIfTI files, with the labelled phases of ACDC-layout patients
    (an ``Info.cfg`` beside the series): (series, [{phase: labels}], names)."""
    import glob as globbing

    from firekit.data import acdc
    from firekit.registration import cine

    paths = sorted(Path(p) for p in globbing.glob(pattern, recursive=True))
    if not paths:
        raise FirekitError(f"{flag} {pattern!r} matches no file; quote the glob, e.g. 'data/cine/*/*_4d.nii.gz'")
    series, labels, names = [], [], []
    for path in paths:
        series.append(cine.load_series(path))
        known = {}
        if (path.parent / "Info.cfg").is_file():
            patient = acdc.read_patient(path.parent)
            known = {phase: patient.labels(phase) for phase, (_, gt) in patient.frames.items() if gt is not None}
        labels.append(known)
        names.append(path.parent.name if known else path.name)
    return series, labels, names


def train_on_cine(
    pattern: str,
    out: str | os.PathLike,
    ndim: int = 2,
    preset: str = "small",
    iterations: int = 1000,
    batch_size: int = 1,
    val: str | None = None,
    val_pairs: int = 8,
    spacing: float | None = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    callback=None,
    **train_options,
):
    """Train a FIRE model intra-modality on the phases of cine series (``firekit train --cine``).

    Pairs are two phases of one series across the whole cycle (:class:`cine.CinePairs`); validation
    Dice is ED <-> ES on the labelled phases of ``val`` (or of the training series when ``val`` is
    None and they have labels). ``spacing`` None keeps each series' own voxel size.
    """
    from firekit.registration.cine import CinePairs

    series, labels, names = load_cine_series(pattern)
    pairs = CinePairs(series, ndim, spacing, seed, labels, names=names)
    if val is not None:
        val_series, val_labels, val_names = load_cine_series(val, "--val-cine")
        held_out = CinePairs(val_series, ndim, spacing, seed, val_labels, names=val_names)
        validation = held_out.validation(val_pairs)
        if validation:
            validation = [{k: _pad_batch(v, pairs.shape, k) for k, v in b.items()} for b in validation]
    else:
        validation = pairs.validation(val_pairs)
    return _train_new_model(
        pairs, out, preset, ndim, seed, iterations, batch_size, train_options, {}, validation or None,
        {"modalities": {"a": pattern, "b": pattern}, "cine": True, "spacing": spacing},
        resume=resume, overwrite=overwrite, device=device, progress=progress, callback=callback,
    )


def _pad_batch(x, shape, key: str):
    from firekit.data.pairs import _pad_to

    return _pad_to(x.float(), shape, 0.0 if key.startswith("labels") else -1.0).to(x.dtype)


def _check_outputs(outputs: list, affine, inputs: list) -> None:
    """register_files' output paths: none an input, no two alike, the --affine file writable."""
    for path in outputs:
        io.check_output_path(path, inputs)
    resolved = [Path(p).resolve() for p in outputs + ([affine] if affine else [])]
    if len(set(resolved)) != len(resolved):
        raise FirekitError("two outputs share one path; give --out, --out-labels, --field, --inverse-field and "
                           "--affine distinct names")
    if affine is not None:
        if Path(affine).resolve() in {Path(p).resolve() for p in inputs if p}:
            raise FirekitError(f"{affine}: would overwrite an input; choose another --affine path")
        io.check_output_file(affine, inputs)


def _moving_labels(path, moving, moving_volume):
    """The moving label map (not empty), on the moving image's grid."""
    labels_volume = io.load_labels(path, "moving label map", allow_empty=False)
    if labels_volume.shape != moving_volume.shape:
        raise FirekitError(
            f"{path}: shape {labels_volume.shape} differs from {moving} {moving_volume.shape}; "
            "pass labels drawn on the moving image"
        )
    return labels_volume


def register_files(
    model: Fire | None,
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    out: str | os.PathLike,
    direction: str = "a2b",
    moving_labels: str | os.PathLike | None = None,
    out_labels: str | os.PathLike | None = None,
    field: str | os.PathLike | None = None,
    affine: str | os.PathLike | None = None,
    affine_only: bool = False,
    spacing: float | None = DEFAULT_SPACING,
    device: str | None = None,
    refine=0,
    seed: int = 0,
    similarity: str | None = None,
    synthesis: bool = False,
    progress: bool | str = False,
    symmetric: bool | str = "auto",
    orientation: str = "header",
    check: bool = True,
    initial_affine: str | os.PathLike | None = None,
    inverse_field: str | os.PathLike | None = None,
    fixed_mask: str | os.PathLike | None = None,
    moving_mask: str | os.PathLike | None = None,
):
    """Register ``moving`` onto ``fixed`` and write the outputs; returns the ``RegistrationResult``.

    ``model`` None with ``refine`` on registers by refinement alone (see ``register.register``).
    ``inverse_field``: also write the inverse field on the moving grid (its residual is then in the
    result's ``inverted``). ``fixed_mask``, ``moving_mask``: regions the similarity counts in (see
    ``register.register``).

    Every output path and every input is checked before any work (none may be an input or another
    output; an empty label map is refused), and the outputs are written together or not at all.
    """
    from firekit.registration.pipeline import as_mask, refine_config, register

    inputs = [moving, fixed, moving_labels, initial_affine, fixed_mask, moving_mask]
    outputs = [p for p in (out, out_labels, field, inverse_field) if p is not None]
    if (out_labels is None) != (moving_labels is None):
        raise FirekitError("--moving-labels and --out-labels go together; pass both or neither")
    _check_outputs(outputs, affine, inputs)
    # Every input is read and checked before any work, so a bad one costs no registration (register()
    # itself refuses images of different ndim and a model of the wrong ndim before it works).
    moving_volume = io.load_volume(moving, "moving image")
    fixed_volume = io.load_volume(fixed, "fixed image")
    n = fixed_volume.ndim
    if affine is not None and model is not None and model.ndim < n and refine_config(refine, n) is None:
        raise FirekitError(f"{affine}: a {model.ndim}D model without refinement registers {fixed} slice by slice, so "
                           "there is no single affine; drop --affine or turn refinement on")
    labels_volume = None if moving_labels is None else _moving_labels(moving_labels, moving, moving_volume)
    # read and checked before any work; register() refuses masks without refinement
    masks = [None if path is None else as_mask(path, image, name) for path, image, name in
             ((fixed_mask, fixed_volume, "fixed mask"), (moving_mask, moving_volume, "moving mask"))]
    result = register(model, moving_volume, fixed_volume, direction=direction, affine_only=affine_only,
                      spacing=spacing, device=device, refine=refine, seed=seed, similarity=similarity,
                      synthesis=synthesis, progress=progress, symmetric=symmetric, orientation=orientation,
                      check=check, initial_affine=initial_affine, fixed_mask=masks[0], moving_mask=masks[1])
    warped_labels = result.apply(labels_volume, labels=True) if labels_volume is not None else None
    if inverse_field is not None:
        result.inverse()
    with io.all_or_nothing([*outputs, affine]):
        result.save(out, field=field, affine_path=affine, protect=inputs, inverse_field=inverse_field)
        if warped_labels is not None:
            io.save_nifti(warped_labels.data, result.fixed.affine, out_labels, header=result.fixed.header,
                          dtype="int16" if warped_labels.data.max() < 32768 else "int32", protect=inputs)
    return result
