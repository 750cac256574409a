"""The ``firekit`` command line. Thin: every subcommand calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from firekit import __version__
from firekit.core.errors import FirekitError

# firekit.workflows.RECIPES by name (kept here so that --help imports no torch; a test keeps them equal)
RECIPE_NAMES = ("learn2d", "learn2d-fine", "learn2d-synth", "learn2d-near", "learn2d-contrast", "learn3d",
                "learn3d-near")

CONVENTIONS = (
    "Conventions: the displacement u lives on the fixed image's grid, in mm, with ITK/LPS signs "
    "(ANTs and SimpleITK apply it directly), and warped(x) = moving(x + u(x)). A 2D registration writes "
    "a 2-component field of shape (X, Y, 1, 1, 2) in NIfTI (a 2D vector image in .nrrd/.mha), also for 2D images "
    "stored as (X, Y, 1). "
    "--direction a2b: the moving image is modality A and the fixed is B (the model's A->B path); b2a the reverse. "
    "--out-labels is an integer image on the fixed grid."
)


def _data_demo(args: argparse.Namespace) -> None:
    from firekit.data.braindata import build_demo_dataset

    info = build_demo_dataset(Path(args.out), subjects=args.subjects, splits=_splits(args.subjects), seed=args.seed,
                              spacing=args.spacing, shape=tuple(args.shape), progress=not args.quiet,
                              overwrite=args.overwrite)
    print(f"demo data in {args.out}: {json.dumps(info.get('splits', info), default=str)[:300]}")


def _splits(subjects: int) -> tuple[int, int, int]:
    """6/2/2 for 10 subjects; at least one validation and one test subject."""
    if subjects < 3:
        raise FirekitError(f"--subjects {subjects}: need at least 3 (train, validation, test)")
    held = max(1, round(subjects * 0.2))
    return subjects - 2 * held, held, held


def _data_cine_phantom(args: argparse.Namespace) -> None:
    from firekit.data.cinephantom import build_cine_phantom

    patients = build_cine_phantom(args.out, patients=args.patients, phases=args.phases, seed=args.seed,
                                  shape=tuple(args.shape), progress=not args.quiet, overwrite=args.overwrite)
    print(f"{len(patients)} cine phantom patients in {args.out} (ACDC layout: patientNNN/Info.cfg, _4d, "
          f"_frameNN and _frameNN_gt at ED and ES)")


def _apply_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the settings of ``--recipe NAME`` that the command line left at their defaults."""
    if args.recipe is None:
        return
    from firekit.workflows import RECIPES

    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)


def _train(args: argparse.Namespace) -> None:
    # the inputs are checked before the (slow) torch import, so a wrong command line answers at once
    if args.cine and (args.a or args.b):
        raise FirekitError("--cine trains on phases of cine series: give --cine alone, not with --a/--b")
    if not args.cine and not (args.a and args.b):
        raise FirekitError("train needs --a and --b (two modalities), or --cine (phases of cine series)")
    from firekit.workflows import train_on_cine, train_on_files

    _apply_recipe(args, args.train_parser)
    options = {f"lr_{group}": rate for group in ("affine", "nonrigid", "synthesis")
               if (rate := getattr(args, f"lr_{group}")) is not None}
    options.update(schedule=args.schedule, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay)
    # speed settings: they change how fast a step runs, not what it computes (beyond float rounding)
    options.update(amp=not args.no_amp, amp_cpu=args.amp_cpu, compile=args.compile, channels_last=args.channels_last,
                   sync_every=args.sync_every, loader_threads=args.loader_threads)
    if args.cine:
        result = train_on_cine(
            args.cine, args.out, ndim=args.ndim, preset=args.preset, iterations=args.iterations,
            batch_size=args.batch_size, val=args.val_cine, spacing=args.cine_spacing, seed=args.seed,
            resume=args.resume, overwrite=args.overwrite, device=args.device, progress=not args.quiet,
            val_every=args.val_every, checkpoint_every=args.checkpoint_every, **options,
        )
        _trained(args, result)
        return
    result = train_on_files(
        args.a, args.b, args.out, labels=args.labels, ndim=args.ndim, preset=args.preset,
        iterations=args.iterations, batch_size=args.batch_size, val_a=args.val_a, val_b=args.val_b,
        val_labels=args.val_labels, spacing=args.spacing, seed=args.seed, augment=not args.no_augment,
        resume=args.resume, overwrite=args.overwrite, device=args.device, progress=not args.quiet,
        val_every=args.val_every, checkpoint_every=args.checkpoint_every,
        curriculum_steps=args.curriculum_steps, near_fraction=args.near_fraction,
        contrast_fraction=args.contrast_fraction, aux_weight=args.aux_weight,
        prealign=args.prealign,
        residual_bound=args.residual_bound, affine_pooling=args.affine_pooling, init=args.init,
        similarity_weight=args.similarity_weight, distill_weight=args.distill_weight,
        synthesis_weight=args.synthesis_weight, invariance_weight=args.invariance_weight, train_only=args.train_only,
        affine_first_steps=args.affine_first_steps, **options,
    )
    _trained(args, result)


def _trained(args: argparse.Namespace, result) -> None:
    best = getattr(result, "best_val_dice", None)
    print(f"trained {getattr(result, 'steps', '?')} steps -> {Path(args.out) / 'model.pt'}"
          + (f" (best validation Dice {best:.3f})" if best is not None else ""))


def _register(args: argparse.Namespace) -> int | None:
    if args.pairs is not None:
        return _register_pairs(args)
    _one_pair(args)
    from firekit.registration.pipeline import load
    from firekit.workflows import register_files

    model = None if args.no_network else load(args.model)
    result = register_files(
        model, args.moving, args.fixed, args.out, direction=args.direction, moving_labels=args.moving_labels,
        out_labels=args.out_labels, field=args.field, affine=args.affine, affine_only=args.affine_only,
        spacing=args.spacing, device=args.device, refine=args.refine, seed=args.seed,
        similarity=args.similarity, synthesis=args.synthesis, progress=False if args.quiet else "auto",
        symmetric=args.symmetric, orientation=args.init, check=not args.no_check,
        initial_affine=args.initial_affine, inverse_field=args.inverse_field, fixed_mask=args.fixed_mask,
        moving_mask=args.moving_mask,
    )
    written = [p for p in (args.out, args.out_labels, args.field, args.inverse_field, args.affine) if p]
    folding = float((result.jacobian_determinant() <= 0).mean() * 100)
    check = result.check.as_dict() if result.check is not None else None
    inverse = result.inverted.summary() if result.inverted is not None else None
    if args.json:
        print(json.dumps(dict(moving=str(args.moving), fixed=str(args.fixed), written=[str(p) for p in written],
                              folding_percent=folding, check=check, inverse=inverse), indent=1))
        return
    verdict = "" if check is None else f", check: {check['verdict']}" + (
        f" (kept the {check['chosen']} alignment)" if check["verdict"] != "ok" else "")
    residual = "" if inverse is None else (
        f", inverse residual max {inverse['max_residual_mm']:.3g} mm, mean {inverse['mean_residual_mm']:.2g} mm "
        f"over {inverse['inside_percent']:.0f} % of moving, {inverse['iterations']} iterations")
    print(f"wrote {', '.join(map(str, written))} (|J| <= 0: {folding:.3f} %{residual}{verdict})")


# flags of one pair's files: with --pairs they are the CSV's columns
_PAIR_FILES = ("moving", "fixed", "moving_labels", "out_labels", "field", "inverse_field", "affine", "initial_affine",
               "fixed_mask", "moving_mask")
# register_files' options that --pairs applies to every pair -> their argparse names
_PAIR_OPTIONS = dict(direction="direction", affine_only="affine_only", spacing="spacing", device="device",
                     refine="refine", seed="seed", similarity="similarity", synthesis="synthesis",
                     symmetric="symmetric", orientation="init")


def _one_pair(args: argparse.Namespace) -> None:
    """Without --pairs, --moving, --fixed and --out are required (argparse cannot say "unless --pairs")."""
    missing = [f"--{name}" for name in ("moving", "fixed", "out") if getattr(args, name) is None]
    if missing:
        args.register_parser.error(f"the following arguments are required: {', '.join(missing)} "
                                   "(or --pairs PAIRS.csv --out FOLDER)")
    if args.shard is not None:
        args.register_parser.error("--shard K/N splits a --pairs run; give --pairs PAIRS.csv")


def _register_pairs(args: argparse.Namespace) -> int | None:
    given = [f"--{name.replace('_', '-')}" for name in _PAIR_FILES if getattr(args, name, None) is not None]
    if given:
        args.register_parser.error(f"{', '.join(given)}: with --pairs each pair's files are columns of the CSV "
                                   "(see --pairs)")
    if args.out is None:
        args.register_parser.error("--pairs needs --out FOLDER (each pair's outputs and summary.csv go there)")
    import time

    from firekit import batch

    job = batch.plan(args.pairs, args.out, shard=args.shard or (1, 1))  # checked before torch is imported
    from firekit.registration.pipeline import load

    clock = time.perf_counter()
    model = None if args.no_network or not job.todo else load(args.model)
    options = {key: getattr(args, name) for key, name in _PAIR_OPTIONS.items()}
    rows = batch.run(job, model, progress=not args.quiet, check=not args.no_check, **options)
    if args.json:
        print(json.dumps(dict(summary=str(job.summary), pairs=rows), indent=1, default=str))
    return _pairs_done(rows, job.summary, args.json, time.perf_counter() - clock)


def _pairs_done(rows: list[dict], summary, quiet: bool = False, seconds: float | None = None) -> int | None:
    """Counts on stdout, one stderr line per failed pair (and one for pending ones); 1 if any."""
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "skipped", "failed",
                                                                                  "pending")}
    ran = counts["ok"] + counts["failed"]
    timing = "" if seconds is None or not ran else f" in {seconds:.1f} s ({seconds / ran:.2f} s per pair)"
    if not quiet:
        print(f"{len(rows)} pairs: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
              + f"{timing}; summary {summary}")
    for row in rows:
        if row["status"] == "failed":
            print(f"firekit: error: row {row['row']} ({row['moving']} -> {row['fixed']}) failed: {row['error']}",
                  file=sys.stderr)
    if counts["pending"]:
        print(f"firekit: error: {counts['pending']} pairs not registered yet (status pending); rerun their shard",
              file=sys.stderr)
    return 1 if counts["failed"] or counts["pending"] else None


def _merge_summaries(args: argparse.Namespace) -> int | None:
    from firekit.batch import merge_summaries

    return _pairs_done(merge_summaries(args.summaries, args.out), args.out)


def _shard(value: str) -> tuple[int, int]:
    from firekit.batch import parse_shard

    try:
        return parse_shard(value)
    except FirekitError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--shard ")) from None


def _apply(args: argparse.Namespace) -> None:
    from firekit.registration.apply import apply_files

    out = apply_files(args.input, args.reference, args.transform, args.out, interpolation=args.interpolation)
    print(f"wrote {out}")


def _register_cine(args: argparse.Namespace) -> None:
    from firekit.registration import cine
    from firekit.data import io
    from firekit.data.atomic import atomic_write_text
    from firekit.registration.pipeline import load

    out = Path(args.out)
    inputs = [args.series, args.labels]
    outputs = [out / name for name in ("warped_4d.nii.gz", "field_4d.nii.gz", "labels_4d.nii.gz", "cine.json")]
    io.check_output_folder(out, inputs)
    for path in outputs:
        io.check_output_file(path, inputs)
    series = cine.load_series(args.series)
    ed, es = _cine_phases(args, series)
    model = None if args.model.lower() == "none" else load(args.model)
    labels, labels_phase = None, None
    if args.labels:
        labels = io.load_labels(args.labels, "label map", allow_empty=False)
        if labels.shape != series.shape:
            raise FirekitError(f"{args.labels}: shape {labels.shape} differs from the frames of {args.series} "
                               f"{series.shape}; pass labels drawn on a frame of this series")
        if args.labels_phase is not None:
            labels_phase = cine.reference_phase(args.labels_phase, series.phases, ed, es)
    cine.reference_phase(args.reference, series.phases, ed, es)  # refuse a bad --reference before the work
    result = cine.register_cine(model, series, reference=args.reference, ed=ed, es=es, refine=args.refine,
                                spacing=args.spacing, seed=args.seed, device=args.device, progress=not args.quiet)
    if labels is not None and labels_phase is not None:
        labels = result.apply(labels, labels_phase)
    folding = (result.jacobian_determinant() <= 0).mean(axis=tuple(range(series.ndim))) * 100
    with io.all_or_nothing(outputs):
        written = result.save(out, labels=labels, protect=[args.labels])
        summary = {"series": str(args.series), "phases": series.phases, "reference": result.reference, "ed": ed,
                   "es": es, "seconds": result.seconds, "folding_percent": [float(f) for f in folding],
                   "outputs": {k: str(v) for k, v in written.items()}}
        atomic_write_text(out / "cine.json", json.dumps(summary, indent=1))
    print(f"registered {series.phases} phases to phase {result.reference} in {result.seconds:.1f} s "
          f"(|J| <= 0: max {folding.max():.3f} %); wrote {', '.join(str(v) for v in written.values())}")


def _evaluate_cine(args: argparse.Namespace) -> None:
    import numpy as np

    from firekit.data import acdc
    from firekit.registration import cine
    from firekit.registration.pipeline import load

    model = None if args.model.lower() == "none" else load(args.model)
    rows = {}
    for patient in acdc.find_patients(args.data):
        rows[patient.name] = cine.evaluate_ed_es(model, patient, refine=args.refine, seed=args.seed)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    names = list(acdc.LABEL_NAMES.values())[::-1]
    print(f"{'patient':<12}{'':>11}" + "".join(f"{n:>12}" for n in names) + "  HD95 mm  |J|<=0 %  s/series")
    for name, row in rows.items():
        for stage in ("unaligned", "registered"):
            scores = row[stage]
            hd = np.nanmean(list(scores["hd95"].values()))
            tail = f"{hd:9.2f}{scores['folding_percent']:9.3f}" + (f"{row['seconds']:10.1f}" if stage == "registered" else "")
            print(f"{name if stage == 'unaligned' else '':<12}{stage:>11}" + "".join(f"{scores['dice'][n]:12.3f}" for n in names) + tail)
    mean = {n: float(np.mean([r["registered"]["dice"][n] for r in rows.values()])) for n in names}
    print("mean Dice ED -> ES: " + ", ".join(f"{n} {v:.3f}" for n, v in mean.items()))


def _cine_phases(args: argparse.Namespace, series) -> tuple[int | None, int | None]:
    """0-based ED/ES: --ed/--es (1-based frame numbers, as ACDC), else an Info.cfg beside the series."""
    ed, es = args.ed, args.es
    info_path = Path(args.series).parent / "Info.cfg"
    if (ed is None or es is None) and info_path.is_file():
        from firekit.data.acdc import read_info

        info = read_info(info_path)
        ed = info["ED"] if ed is None else ed
        es = info["ES"] if es is None else es
    for name, value in (("ED", ed), ("ES", es)):
        if value is not None and not 1 <= value <= series.phases:
            raise FirekitError(f"{args.series}: {name} frame {value} is outside 1..{series.phases} (frames are 1-based)")
    return (None if ed is None else ed - 1), (None if es is None else es - 1)


def _refine_steps(value: str):
    if value == "auto":
        return value
    try:
        steps = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--refine takes 'auto' or a number of steps, got {value!r}") from None
    if steps < 0:
        raise argparse.ArgumentTypeError(f"--refine must be >= 0, got {steps}")
    return steps


def _evaluate(args: argparse.Namespace) -> None:
    from firekit.registration.evaluate import evaluate_files, format_scores

    scores = evaluate_files(args.fixed_labels, args.warped_labels, args.field)
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))


def _demo(args: argparse.Namespace) -> None:
    from firekit.demo import run_demo

    run_demo(Path(args.data), Path(args.out), retrain=args.train, iterations=args.iterations,
             pairs=args.pairs, seed=args.seed)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (like every other firekit error), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_build_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--seed, --overwrite and --quiet of a `data` subcommand that builds a ``what``."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The firekit command line: one builder per subcommand, in --help's order."""
    parser = _Parser(
        prog="firekit",
        description="FIRE image registration: affine + non-rigid, 2D/3D, one network for both directions.",
        epilog=CONVENTIONS,
    )
    parser.add_argument("--version", action="version", version=f"firekit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_data_parser(commands)
    _add_train_parser(commands)
    _add_register_parser(commands)
    _add_merge_parser(commands)
    _add_apply_parser(commands)
    _add_register_cine_parser(commands)
    _add_evaluate_cine_parser(commands)
    _add_evaluate_parser(commands)
    _add_demo_parser(commands)
    return parser


def _add_data_parser(commands: argparse._SubParsersAction) -> None:
    """firekit data demo | cine-phantom."""
    data = commands.add_parser("data", help="build datasets (demo brain data, cine phantom)")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATASET", required=True)
    demo_data = data_commands.add_parser(
        "demo",
        help="multi-modal brain set from the MNI152 template shipped in nilearn (offline)",
        description=(
            "Build T1 (the real MNI ICBM152 2009 template), T2-like and FLAIR-like contrasts (synthesised from "
            "its GM/WM maps), CSF/GM/WM labels and per-subject deformations with the exact mapping to template "
            "space, in train/val/test folders with one subfolder per subject."
        ),
    )
    demo_data.add_argument("--out", required=True, help="output folder (created)")
    demo_data.add_argument("--subjects", type=int, default=10, help="number of subjects (default 10: 6/2/2 split)")
    demo_data.add_argument("--spacing", type=float, default=1.28, help="voxel size in mm (default 1.28)")
    demo_data.add_argument("--shape", type=int, nargs=3, default=[128, 160, 128], metavar=("X", "Y", "Z"),
                           help="grid size in voxels (default 128 160 128; the brain must fit at --spacing)")
    _add_build_options(demo_data, "dataset")
    demo_data.set_defaults(func=_data_demo)
    phantom = data_commands.add_parser(
        "cine-phantom",
        help="cardiac cine phantom patients in the ACDC layout (offline stand-in for ACDC)",
        description=(
            "Write synthetic short-axis cine patients exactly in the ACDC layout (patientNNN/Info.cfg, "
            "patientNNN_4d.nii.gz, patientNNN_frameNN.nii.gz and _gt at ED and ES; labels 1 RV, 2 myocardium, "
            "3 LV cavity): a beating LV with realistic ejection fraction and myocardial thickening, an RV, "
            "textured surroundings, 1.5 x 1.5 x 10 mm voxels, noise; random shapes per patient."
        ),
    )
    phantom.add_argument("--out", required=True, help="output folder (created)")
    phantom.add_argument("--patients", type=int, default=5, help="number of patients (default 5)")
    phantom.add_argument("--phases", type=int, default=25, help="phases per cardiac cycle (default 25)")
    phantom.add_argument("--shape", type=int, nargs=3, default=[128, 128, 10], metavar=("X", "Y", "Z"),
                         help="frame size in voxels (default 128 128 10)")
    _add_build_options(phantom, "phantom")
    phantom.set_defaults(func=_data_cine_phantom)


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    """firekit train."""
    train = commands.add_parser(
        "train",
        help="train a FIRE model on paired images matched per subject",
        description=(
            "Train FIRE on subjects matched from two globs (one folder per subject, or names that differ only "
            "by the modality), or with --cine on the phases of cine series (intra-modality). Writes RUN_DIR/model.pt, checkpoint.pt, config.yaml, losses.csv and "
            "validation.csv. An existing non-empty RUN_DIR needs --resume or --overwrite."
        ),
    )
    _add_train_inputs(train)
    _add_train_model_options(train)
    _add_train_loss_options(train)
    _add_train_run_options(train)
    train.set_defaults(func=_train, train_parser=train)


def _add_train_inputs(train: argparse.ArgumentParser) -> None:
    """train's images: --a/--b or --cine, labels, held-out sets."""
    train.add_argument("--a", help="glob of modality A images, e.g. 'data/train/*/T1.nii.gz'")
    train.add_argument("--b", help="glob of modality B images, e.g. 'data/train/*/T2.nii.gz'")
    train.add_argument("--cine", help="instead of --a/--b: glob of 4D cine series, e.g. 'data/cine/*/*_4d.nii.gz'; "
                       "trains intra-modality on pairs of phases across the cycle (ACDC folders: ED/ES labels validate)")
    train.add_argument("--val-cine", help="glob of held-out cine series (ED <-> ES Dice) with --cine")
    train.add_argument("--cine-spacing", type=float, default=None,
                       help="with --cine: resample to this voxel size in mm (default: each series' own)")
    train.add_argument("--labels", help="glob of label maps (one per subject, valid for A and B) for validation Dice")
    train.add_argument("--val-a", help="glob of held-out modality A images for validation")
    train.add_argument("--val-b", help="glob of held-out modality B images")
    train.add_argument("--val-labels", help="glob of held-out label maps")


def _add_train_model_options(train: argparse.ArgumentParser) -> None:
    """train's model, length, optimisers, grid and seed."""
    train.add_argument("--ndim", type=int, choices=[2, 3], default=2,
                       help="2: the model trains on axial slices; 3: on volumes (default 2)")
    train.add_argument("--iterations", type=int, default=1000, help="training steps (default 1000)")
    train.add_argument("--preset", choices=["small", "paper"], default="small",
                       help="model widths and learning rates (default small; paper = Section 3)")
    train.add_argument("--batch-size", type=int, default=1, help="pairs per step (default 1)")
    for group, subnet in (("affine", "the affine subnets T_af"), ("nonrigid", "the non-rigid subnets T_nr"),
                          ("synthesis", "G and the decoders F")):
        train.add_argument(f"--lr-{group}", type=float,
                           help=f"learning rate of the Adam optimiser of {subnet} (default: the preset's)")
    train.add_argument("--spacing", type=float, default=1.28, help="resample to this voxel size in mm (default 1.28)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_train_loss_options(train: argparse.ArgumentParser) -> None:
    """train's augmentation, extra losses, stages and schedule."""
    train.add_argument("--no-augment", action="store_true", help="turn off the paper's random affine + elastic augmentation")
    train.add_argument("--aux-weight", type=float, default=0.0,
                       help="weight of the auxiliary loss on the augmentation's known transform (not in the paper; "
                       "default 0 = off)")
    train.add_argument("--curriculum-steps", type=int, default=0,
                       help="ramp the augmentation from 25%% to full strength over N steps (default 0 = off)")
    train.add_argument("--near-fraction", type=float, default=0.0,
                       help="draw this fraction of the pairs at or near alignment (B under A's transform, then "
                       "nothing or a small one; not in the paper; default 0 = off)")
    train.add_argument("--contrast-fraction", type=float, default=0.0,
                       help="pass this fraction of the pairs' B images through a random intensity curve, so the "
                       "network meets other contrasts of the same anatomy (not in the paper; default 0 = off)")
    train.add_argument("--prealign", choices=["none", "moments"], default="none",
                       help="moments: the model starts each registration from the moments affine and learns the "
                       "rest (not in the paper; default none)")
    train.add_argument("--residual-bound", type=float, default=0.0,
                       help="with --prealign: bound each entry of the learned residual affine to +-B (default 0 = off)")
    train.add_argument("--similarity-weight", type=float, default=0.0,
                       help="weight of a MIND similarity between each warped image and the other input (not in the "
                       "paper; default 0 = off)")
    train.add_argument("--synthesis-weight", type=float, default=0.0,
                       help="weight of each synthesis against the other contrast aligned with its input (pairs "
                       "of one subject; not in the paper; default 0 = off)")
    train.add_argument("--invariance-weight", type=float, default=0.0,
                       help="weight of G's codes of the two contrasts of an aligned pair matching (not in the "
                       "paper; default 0 = off)")
    train.add_argument("--train-only", choices=["all", "decoders"], default="all",
                       help="decoders: only F_AB and F_BA learn, G and both T frozen (a synthesis stage that "
                       "leaves registration as it is; default all)")
    train.add_argument("--distill-weight", type=float, default=0.0,
                       help="weight of supervision by per-pair refinement's result (distillation; slower steps; "
                       "default 0 = off)")
    train.add_argument("--affine-first-steps", type=int, default=0,
                       help="train only the affine subnets, at half resolution, for the first N steps (default 0)")
    train.add_argument("--affine-pooling", choices=["mean", "moments", "keypoints"], default="mean",
                       help="how T_af reads its features: mean (the paper's global average pooling), moments, or "
                       "keypoints (landmarks in each image + least-squares affine; not in the paper; default mean)")
    train.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                       help="learning rates: constant (the paper) or cosine decay after --warmup-steps (default constant)")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps (default 0)")
    train.add_argument("--ema-decay", type=float, default=0.0,
                       help="keep an EMA of the weights (model_ema.pt; validation uses it), e.g. 0.999 (default 0 = off)")
    train.add_argument("--init", metavar="MODEL",
                       help="start from this model.pt's weights (same model options), e.g. a coarser stage")
    train.add_argument("--recipe", choices=sorted(RECIPE_NAMES),
                       help="a documented long-training recipe (README, bench/training.md); flags given beside it win")


def _add_train_run_options(train: argparse.ArgumentParser) -> None:
    """train's validation, checkpoints, device, speed and run folder."""
    train.add_argument("--val-every", type=int, default=100, help="validation every N steps (default 100)")
    train.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    train.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    train.add_argument("--no-amp", action="store_true", help="on a GPU, train in float32 (default: bf16 autocast)")
    train.add_argument("--amp-cpu", action="store_true", help="bf16 autocast on the CPU too (1.5x faster on "
                       "CPUs with AVX512-BF16/AMX, slower without; bench/throughput.md)")
    train.add_argument("--compile", action="store_true", help="torch.compile the network (for GPUs; the first "
                       "step compiles, minutes; slower on the CPU: bench/throughput.md)")
    train.add_argument("--channels-last", action="store_true",
                       help="channels-last memory order of weights and batches (for GPUs)")
    train.add_argument("--sync-every", type=int, default=0,
                       help="read the losses back from the device every N steps (default 0: every step on the CPU, "
                       "every 25 on a GPU)")
    train.add_argument("--loader-threads", type=int, default=0,
                       help="threads drawing batches ahead of the step (default 0: none on the CPU, up to 8 on a GPU)")
    train.add_argument("--out", required=True, help="run folder (created)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--overwrite", action="store_true", help="start again in a non-empty --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_register_parser(commands: argparse._SubParsersAction) -> None:
    """firekit register."""
    register = commands.add_parser(
        "register",
        help="register a moving image onto a fixed image with a trained model",
        description="Register --moving onto --fixed and write the warped image on the fixed grid. " + CONVENTIONS
        + " 2D models register 3D volumes slice by slice (axial). --pairs PAIRS.csv registers many pairs in one "
        "process.",
    )
    _add_register_files(register)
    _add_register_method_options(register)
    _add_register_batch_options(register)
    register.set_defaults(func=_register, register_parser=register)


def _add_register_files(register: argparse.ArgumentParser) -> None:
    """register's model, inputs and outputs."""
    register.add_argument("--model", default="default",
                          help="model.pt from firekit train (default: the shipped 2D T1 <-> T2-like model)")
    register.add_argument("--moving",
                          help="moving image: .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd (SimpleITK: pip install "
                          "'firekit[itk]') or a folder holding one DICOM series")
    register.add_argument("--fixed", help="fixed image (the formats of --moving); outputs use its grid")
    register.add_argument("--direction", choices=["a2b", "b2a"], default="a2b",
                          help="a2b: moving is modality A, fixed is B (default); b2a the reverse")
    register.add_argument("--out",
                          help="warped image (.nii.gz, or .nrrd/.nhdr/.mha/.mhd: written in that format), never an "
                          "input path; with --pairs, the output folder (created)")
    register.add_argument("--moving-labels", help="label map on the moving grid to warp along")
    register.add_argument("--out-labels", help="warped labels (integer image on the fixed grid)")
    register.add_argument("--field", help="write the ITK displacement field (mm, LPS) here (.nii.gz, or .nrrd/.mha: "
                          "a vector image)")
    register.add_argument("--inverse-field", metavar="FILE",
                          help="write the inverse field (fixed <- moving) here, as --field writes: on the MOVING grid, "
                          "a moving point y maps to the fixed point y + v(y), so firekit apply --reference MOVING "
                          "--transform FILE carries labels drawn on the fixed image onto the moving one; found by "
                          "fixed-point iteration until every point is within 0.01 mm (at most 100 iterations), its "
                          "residual |u(y + v(y)) + v(y)| reported over the points that land inside the fixed image")
    register.add_argument("--affine", help="write the affine part as an ITK transform file (.tfm/.txt) here")


def _add_register_method_options(register: argparse.ArgumentParser) -> None:
    """register's network, refinement, start, masks and check."""
    register.add_argument("--affine-only", action="store_true", help="use only the affine subnet (network alone)")
    register.add_argument("--refine", type=_refine_steps, default="auto", metavar="K",
                          help="per-pair refinement after the network: 'auto' (default, the tuned schedule), "
                          "K Adam steps per pyramid level, or 0 for the network alone")
    register.add_argument("--no-network", action="store_true",
                          help="classical mode: refinement alone from a moments initialisation (no weights needed)")
    register.add_argument("--seed", type=int, default=0, help="refinement seed (default 0; results are deterministic)")
    register.add_argument("--quiet", action="store_true", help="no refinement progress lines (shown for 3D images)")
    register.add_argument("--similarity", choices=["mind", "ngf", "lncc", "mse", "mi", "mind-mi"],
                          help="refinement's similarity in every stage (default: MIND, modality independent, plus "
                          "normalised mutual information in the non-rigid stage; mi and mind-mi turn the 2D start's "
                          "shift search off)")
    register.add_argument("--synthesis", action="store_true",
                          help="refine FIRE's synthesis of moving in the fixed contrast against fixed (use with "
                          "--similarity lncc or mse across modalities)")
    register.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default="auto",
                          help="register both ways and average: inverse-consistent with the reverse registration "
                          "(twice the time); default: on for 2D images with refinement, off in 3D")
    register.add_argument("--init", choices=["header", "search-axes"], default="header",
                          help="header (default): trust the files' orientation, so no start turns by more than 45 deg "
                          "(no answer by more than 55), reflects, or scales an axis by more than 3x; search-axes: also "
                          "try every 90/180-degree turn and axis permutation, for files whose headers are wrong")
    register.add_argument("--initial-affine", metavar="FILE",
                          help="start the refinement from this affine (ITK .tfm/.txt, e.g. firekit register --affine, "
                          "or ANTs' *GenericAffine.mat; fixed -> moving points) instead of the moments search; with a "
                          "model it starts beside the network's affine. The start is trusted: the 45-deg bound of "
                          "--init header is lifted. Needs refinement (not --refine 0)")
    register.add_argument("--fixed-mask", metavar="FILE",
                          help="a mask on the fixed grid (nonzero = inside; as ANTs' -x and elastix's -fMask): the "
                          "similarity of the moments search, the refinement and the check counts only inside it "
                          "(and inside --moving-mask where the transform takes it); 'foreground': the fixed image's "
                          "own voxels above its background (a skull-stripped fixed image against a whole-head "
                          "moving one). Needs refinement")
    register.add_argument("--moving-mask", metavar="FILE",
                          help="a mask on the moving grid (nonzero = inside): leave out a lesion, a cropped part, a "
                          "skull; 'foreground': the moving image's own voxels above its background (a skull-stripped "
                          "moving image against a whole-head fixed one). Needs refinement")
    register.add_argument("--no-check", action="store_true",
                          help="keep the registration's answer even when its start or the headers' alignment matches "
                          "better (by default the better one is kept and a line on stderr says so)")


def _add_register_batch_options(register: argparse.ArgumentParser) -> None:
    """register's report, grid, device and many pairs (--pairs, --shard)."""
    register.add_argument("--json", action="store_true",
                          help="print a JSON summary (outputs, folding, the check's verdict) instead of one line")
    register.add_argument("--spacing", type=float, default=1.28, help="network voxel size in mm (default 1.28)")
    register.add_argument("--device", help="cpu, cuda ... (default cpu)")
    register.add_argument("--pairs", metavar="PAIRS.csv",
                          help="register many pairs in one process (the model loaded once): a CSV with a header row, "
                          "columns moving, fixed (required), moving_labels (or labels), fixed_labels (the summary "
                          "then has Dice), initial_affine, fixed_mask, moving_mask, name, out, out_labels, field, "
                          "inverse_field, affine (one row per pair; inputs relative to the CSV's folder, outputs to "
                          "--out; empty cells: none, or the default NAME_warped.nii.gz, NAME_labels.nii.gz, "
                          "NAME_field.nii.gz with NAME = MOVING_to_FIXED stems; inverse_field and affine only where "
                          "named). The whole CSV is checked first. Writes --out/summary.csv after every pair (row, "
                          "status ok/failed/skipped/pending, seconds, check, mean_dice, dice_LABEL, error); a rerun "
                          "skips the pairs a summary in --out marks done whose outputs exist; a failed pair is "
                          "reported and the others go on (exit 1). The other options apply to every pair")
    register.add_argument("--shard", type=_shard, metavar="K/N",
                          help="with --pairs: take the K-th pair and every N-th after it (K = 1..N, e.g. "
                          "$SLURM_ARRAY_TASK_ID/N), summary in --out/summary-K-of-N.csv; join the N summaries with "
                          "firekit merge-summaries")


def _add_merge_parser(commands: argparse._SubParsersAction) -> None:
    """firekit merge-summaries."""
    merge = commands.add_parser(
        "merge-summaries",
        help="join the summary CSVs of a register --pairs run split by --shard K/N",
        description="Join the summaries of the N shards of one firekit register --pairs --shard K/N run "
        "(OUT/summary-K-of-N.csv) into one CSV, rows in the pairs CSV's order. Every shard must be given exactly once. "
        "Exit status 1 when a pair failed or is still pending (one line each on stderr), 2 for bad input.",
    )
    merge.add_argument("summaries", nargs="+", metavar="SUMMARY", help="the shards' summary CSVs")
    merge.add_argument("--out", required=True, help="the merged summary CSV (e.g. OUT/summary.csv), never an input")
    merge.set_defaults(func=_merge_summaries)


def _add_apply_parser(commands: argparse._SubParsersAction) -> None:
    """firekit apply."""
    apply = commands.add_parser(
        "apply",
        help="apply saved transforms (firekit's, ANTs', ITK's) to an image or label map, like antsApplyTransforms",
        description="Resample --input onto --reference's grid through one or more --transform files, composed as "
        "antsApplyTransforms' -t list: the LAST --transform is applied to the image first, i.e. the FIRST maps the "
        "reference points first (input point = Tk(...T2(T1(x)))), so ANTs' fwdtransforms [Warp.nii.gz, "
        "GenericAffine.mat] go in that order. Each transform maps reference (fixed) points to input (moving) points in "
        "physical space (ITK, LPS mm). Outside the input is 0.",
    )
    apply.add_argument("--input", required=True, help="image or label map to resample (.nii/.nii.gz, .nrrd, .mha, "
                       "a DICOM folder), on the moving grid")
    apply.add_argument("--reference", required=True, help="image whose grid the output takes (the fixed image)")
    apply.add_argument("--transform", action="append", required=True, metavar="T",
                       help="a transform, repeatable, in antsApplyTransforms' -t order (the last listed is applied to the "
                       "image first, the first to the reference points first): a displacement "
                       "field (firekit register --field, ANTs' *Warp.nii.gz; .nii.gz/.nrrd/.mha ITK vector image) or "
                       "an affine (firekit register --affine or ITK .tfm/.txt, ANTs' *GenericAffine.mat)")
    apply.add_argument("--out", required=True, help="output image on the reference grid (.nii.gz, or .nrrd/.mha), "
                       "never an input path")
    apply.add_argument("--interpolation", choices=["linear", "nearest", "label"], default="linear",
                       help="linear (default, float32 output); nearest (integer images stay integer: label maps); "
                       "label (label-aware: each label's indicator linearly, then the argmax, background 0 included)")
    apply.set_defaults(func=_apply)


def _add_register_cine_parser(commands: argparse._SubParsersAction) -> None:
    """firekit register-cine."""
    register_cine = commands.add_parser(
        "register-cine",
        help="register every phase of a 2D+t or 3D+t cine series to a reference phase",
        description=(
            "Register each phase of a 4D NIfTI (X, Y, Z, T) to the reference phase (end-diastole by default), "
            "phases batched, and write OUT/warped_4d.nii.gz (every phase on the reference), OUT/field_4d.nii.gz "
            "((X, Y, Z, T, n) ITK displacement per phase), with --labels OUT/labels_4d.nii.gz (the reference "
            "labels carried to every phase) and OUT/cine.json. ED/ES come from --ed/--es or an ACDC Info.cfg "
            "beside the series."
        ),
    )
    register_cine.add_argument("--model", required=True,
                               help="model.pt (e.g. from firekit train --cine), 'default', or 'none' for refinement alone")
    register_cine.add_argument("--series", required=True, help="4D NIfTI cine series, e.g. patient001_4d.nii.gz")
    register_cine.add_argument("--reference", default="ED", help="ED, ES or a 0-based phase index (default ED)")
    register_cine.add_argument("--ed", type=int, help="end-diastolic frame, 1-based as in ACDC (default: Info.cfg, else 1)")
    register_cine.add_argument("--es", type=int, help="end-systolic frame, 1-based (default: Info.cfg)")
    register_cine.add_argument("--labels", help="label map drawn on the reference phase (or --labels-phase), propagated")
    register_cine.add_argument("--labels-phase", help="the phase --labels is drawn on: ED, ES or a 0-based index "
                               "(default: the reference)")
    register_cine.add_argument("--refine", type=_refine_steps, default="auto",
                               help="per-series refinement: auto (default), 0 (network only) or steps per level")
    register_cine.add_argument("--spacing", type=float, default=None,
                               help="registration voxel size in mm (default: the series' own)")
    register_cine.add_argument("--seed", type=int, default=0, help="refinement seed (default 0)")
    register_cine.add_argument("--device", help="cpu, cuda ... (default: the model's, else cpu)")
    register_cine.add_argument("--out", required=True, help="output folder (created)")
    register_cine.add_argument("--quiet", action="store_true", help="no per-level progress lines")
    register_cine.set_defaults(func=_register_cine)


def _add_evaluate_cine_parser(commands: argparse._SubParsersAction) -> None:
    """firekit evaluate-cine."""
    evaluate_cine = commands.add_parser(
        "evaluate-cine",
        help="ED -> ES on ACDC-layout patients: Dice LV / myocardium / RV, HD95, folding (the paper's Table 3)",
        description="For every patient under --data (ACDC layout: the real ACDC or firekit data cine-phantom), "
        "register the series to end-systole and score the end-diastolic labels warped onto the end-systolic ones.",
    )
    evaluate_cine.add_argument("--data", required=True, help="folder of patientNNN folders (or training/patientNNN)")
    evaluate_cine.add_argument("--model", default="none", help="model.pt, 'default', or 'none' for refinement alone "
                               "(default none)")
    evaluate_cine.add_argument("--refine", type=_refine_steps, default="auto",
                               help="auto (default), 0 (network only) or steps per level")
    evaluate_cine.add_argument("--seed", type=int, default=0, help="refinement seed (default 0)")
    evaluate_cine.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate_cine.set_defaults(func=_evaluate_cine)


def _add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    """firekit evaluate."""
    evaluate = commands.add_parser(
        "evaluate",
        help="Dice and HD95 per label, and folding of a displacement field",
        description="Score warped labels against fixed labels (same grid): Dice and HD95 (mm) per label, "
        "and the % of voxels with Jacobian determinant <= 0 of --field.",
    )
    evaluate.add_argument("--fixed-labels", required=True, help="label map of the fixed image")
    evaluate.add_argument("--warped-labels", required=True, help="moving labels warped onto the fixed grid")
    evaluate.add_argument("--field", help="ITK displacement field written by firekit register")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.set_defaults(func=_evaluate)


def _add_demo_parser(commands: argparse._SubParsersAction) -> None:
    """firekit demo."""
    demo = commands.add_parser(
        "demo",
        help="register held-out demo brain pairs with the shipped model; write NIfTI outputs and figures",
        description=(
            "Build the demo brain data if missing, make held-out test pairs (T2-like moving, T1 fixed, the "
            "moving one randomly transformed as in the paper's test protocol), register them with the shipped "
            "2D model (or one retrained with --train), print Dice before/after per label and write NIfTI "
            "outputs and PNG figures to --out."
        ),
    )
    demo.add_argument("--data", default="data/demo", help="demo data folder (built if missing; default data/demo)")
    demo.add_argument("--out", default="results", help="output folder (default results)")
    demo.add_argument("--train", action="store_true", help="retrain the 2D model from scratch first")
    demo.add_argument("--iterations", type=int, default=600, help="training steps with --train (default 600)")
    demo.add_argument("--pairs", type=int, default=8, help="test pairs to register (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status = args.func(args)
    except FirekitError as exc:
        if args.debug:
            raise
        print("\n".join(f"firekit: error: {line}" for line in str(exc).splitlines()), file=sys.stderr)
        return 2
    except OSError as exc:  # the environment rather than the input: a full disk, a permission, a vanished file
        if args.debug:
            raise
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"firekit: error: {text}; check the path, its permissions and the free disk space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("firekit: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
