"""Many pairs in one process: ``firekit register --pairs PAIRS.csv`` and ``firekit merge-summaries``.

A pairs CSV has a header row and one row per pair. Columns (``moving`` and ``fixed`` required):

* inputs, relative paths read from the CSV's folder: ``moving``, ``fixed``, ``moving_labels`` (or
  ``labels``), ``fixed_labels`` (the summary then scores Dice against the warped moving labels),
  ``initial_affine``, ``fixed_mask``, ``moving_mask`` (as ``register``'s options of those names);
* outputs, relative paths written under the output folder: ``name`` (default
  ``<moving stem>_to_<fixed stem>``), ``out`` (default ``<name>_warped.nii.gz``), ``out_labels``
  (default ``<name>_labels.nii.gz`` when the row has moving labels), ``field`` (default
  ``<name>_field.nii.gz``), ``inverse_field`` and ``affine`` (an ITK ``.tfm``), written only when named.

An empty cell is an absent input or a default output. The whole CSV is checked before any work.
The model is loaded once; each pair is registered as ``register_files`` registers one, and a row of
the summary CSV (see :data:`BASE_COLUMNS`) is rewritten after every pair, so an interrupted run
keeps what it did. A rerun skips the pairs that some summary in the output folder marks ``ok`` (or
``skipped``) and whose outputs exist. ``shard=(K, N)`` takes the pairs K-1, K-1+N, ... (K is
1-based) into ``summary-K-of-N.csv``; :func:`merge_summaries` joins the N summaries.
"""

from __future__ import annotations

import contextlib
import csv
import io as text_io
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from firekit.data import io
from firekit.data.atomic import atomic_write_text
from firekit.core.errors import FirekitError

__all__ = ["Pair", "BatchPlan", "COLUMNS", "BASE_COLUMNS", "read_pairs", "plan", "run", "read_summary",
           "write_summary", "merge_summaries", "summary_path", "parse_shard", "shard_items"]

# a mask cell that asks for the image's own foreground (firekit.registration.pipeline.FOREGROUND_MASK; not
# imported from there, which would load torch before the CSV is checked)
FOREGROUND_MASK = "foreground"
INPUT_COLUMNS = ("moving", "fixed", "moving_labels", "fixed_labels", "initial_affine", "fixed_mask", "moving_mask")
OUTPUT_COLUMNS = ("out", "out_labels", "field", "inverse_field", "affine")
COLUMNS = (*INPUT_COLUMNS, "name", *OUTPUT_COLUMNS)
ALIASES = {"labels": "moving_labels"}
# The summary's columns; per-label Dice columns (dice_1, dice_2, ...) go between mean_dice and error.
BASE_COLUMNS = ("row", "name", "moving", "fixed", "status", "seconds", "check", "mean_dice", "error", "shard")
DONE = ("ok", "skipped")
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Pair:
    """One row of a pairs CSV, its paths resolved (inputs against the CSV's folder, outputs against
    the output folder); ``row`` is its row number in the CSV (the header is row 1)."""

    row: int
    name: str
    moving: Path
    fixed: Path
    moving_labels: Path | None
    fixed_labels: Path | None
    initial_affine: Path | None
    fixed_mask: Path | str | None  # or FOREGROUND_MASK
    moving_mask: Path | str | None
    out: Path
    out_labels: Path | None
    field: Path
    inverse_field: Path | None
    affine: Path | None
    cells: tuple[str, str]  # moving and fixed as the CSV writes them (the summary's columns)

    @property
    def inputs(self) -> dict[str, Path]:
        """The input files (not a mask given as FOREGROUND_MASK)."""
        return {c: p for c in INPUT_COLUMNS if isinstance(p := getattr(self, c), Path)}

    @property
    def outputs(self) -> dict[str, Path]:
        return {c: p for c in OUTPUT_COLUMNS if (p := getattr(self, c)) is not None}

    def key(self) -> tuple[str, str, str]:
        """What a summary row is matched by on a rerun."""
        return (*self.cells, self.name)


@dataclass
class BatchPlan:
    """A checked pairs run: the shard's pairs, its summary file, and the rows a rerun keeps."""

    pairs: list[Pair]
    summary: Path
    shard: tuple[int, int]
    rows: list[dict]  # one per pair: "pending", or "skipped" (done by an earlier run) with that run's figures

    @property
    def todo(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row["status"] == "pending"]


def _stem(path: str) -> str:
    name = Path(path.rstrip("/\\")).name
    for suffix in io.IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _problems_error(problems: list[str]) -> FirekitError:
    """One line per problem (the first :data:`MAX_PROBLEMS`)."""
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more problems; nothing was run")
    return FirekitError("\n".join(shown))


def _read_table(path: Path, what: str, fix: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header (stripped, lower-case) and the other non-blank rows of a CSV file with their row
    numbers (the header's is 1, as a spreadsheet counts); one-line errors."""
    if not path.exists():
        raise FirekitError(f"{path}: {what} not found; check the path")
    if not path.is_file():
        raise FirekitError(f"{path}: is not a file; {fix}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            table = [(number, row) for number, row in enumerate(csv.reader(handle), start=1)
                     if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FirekitError(f"{path}: cannot read as CSV ({exc}); {fix}") from None
    if not table:
        raise FirekitError(f"{path}: empty; {fix}")
    return [cell.strip().lower() for cell in table[0][1]], table[1:]


def read_pairs(csv_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Pair]:
    """The pairs of a pairs CSV, every problem found before any work.

    Checks: the columns (required, known, not repeated), empty required cells, inputs that do not
    exist, labels columns without moving labels, output names (suffix, folder, writable), outputs
    shared by two rows or landing on an input of any row.

    Raises:
        FirekitError: one line per problem (``PAIRS.csv row N: ...``).
    """
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    fix = "give a CSV with a header row naming its columns: moving,fixed[,moving_labels,fixed_labels,name,out,...]"
    header, body = _read_table(csv_path, "pairs CSV", fix)
    names = [ALIASES.get(c, c) for c in header]
    unknown = [c for c in header if ALIASES.get(c, c) not in COLUMNS]
    if unknown:
        raise FirekitError(f"{csv_path}: unknown column{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                           f"the columns are {', '.join(COLUMNS)} (labels = moving_labels)")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise FirekitError(f"{csv_path}: column {', '.join(repeated)} given twice; keep one")
    missing = [c for c in ("moving", "fixed") if c not in names]
    if missing:
        raise FirekitError(f"{csv_path}: no {' or '.join(missing)} column; {fix}")
    if not body:
        raise FirekitError(f"{csv_path}: no pairs below the header; add one row per pair")
    base = csv_path.parent
    pairs, problems = [], []
    for number, cells in body:
        values = {c: (cells[k].strip() if k < len(cells) else "") for k, c in enumerate(names)}
        where = f"{csv_path} row {number}"
        if len(cells) > len(names):
            problems.append(f"{where}: {len(cells)} cells but {len(names)} columns; quote paths that hold commas")
            continue
        empty = [c for c in ("moving", "fixed") if not values[c]]
        if empty:
            problems.append(f"{where}: no {' and no '.join(empty)} path; every pair needs both")
            continue
        inputs = {c: (base / Path(values[c]).expanduser() if values.get(c) else None) for c in INPUT_COLUMNS}
        for column in ("fixed_mask", "moving_mask"):  # the keyword for the image's own foreground, not a file
            if values.get(column) == FOREGROUND_MASK:
                inputs[column] = FOREGROUND_MASK
        for column, path in inputs.items():
            if isinstance(path, Path) and not path.exists():
                problems.append(f"{where}: {column} {path} not found; fix the path (relative paths are read from "
                                f"the CSV's folder, {base})")
        for column in ("fixed_labels", "out_labels"):
            if values.get(column) and inputs["moving_labels"] is None:
                problems.append(f"{where}: {column} needs moving_labels (the labels warped onto the fixed image)")
        name = values.get("name") or f"{_stem(values['moving'])}_to_{_stem(values['fixed'])}"
        defaults = dict(out=f"{name}_warped.nii.gz", out_labels=f"{name}_labels.nii.gz" if inputs["moving_labels"]
                        else None, field=f"{name}_field.nii.gz", inverse_field=None, affine=None)
        outputs = {c: (out_dir / Path(cell).expanduser() if (cell := values.get(c) or defaults[c]) else None)
                   for c in OUTPUT_COLUMNS}
        pairs.append(Pair(row=number, name=name, **inputs, **outputs, cells=(values["moving"], values["fixed"])))
    problems += _output_problems(pairs, csv_path)
    if problems:
        raise _problems_error(problems)
    return pairs


def _output_problems(pairs: list[Pair], csv_path: Path) -> list[str]:
    """Outputs that two rows share, that land on an input of any row, or that cannot be written."""
    inputs = {p.resolve(): (pair.row, column) for pair in pairs for column, p in pair.inputs.items()}
    inputs[csv_path.resolve()] = (None, "pairs CSV")
    written: dict[Path, tuple[int, str]] = {}
    problems = []
    for pair in pairs:
        where = f"{csv_path} row {pair.row}"
        for column, path in pair.outputs.items():
            target = path.resolve()
            if target in inputs:
                row, what = inputs[target]
                problems.append(f"{where}: {column} {path} would overwrite "
                                + (f"row {row}'s {what}" if row is not None else f"the {what}")
                                + "; choose another name (name or out columns)")
                continue
            if target in written:
                row, what = written[target]
                problems.append(f"{where}: {column} {path} is also row {row}'s {what}; give the rows distinct names "
                                "(a name column)")
                continue
            written[target] = (pair.row, column)
            try:
                check = io.check_output_file if column == "affine" else io.check_output_path
                check(path)
            except FirekitError as exc:
                problems.append(f"{where}: {exc}")
    return problems


def summary_path(out_dir: str | os.PathLike, shard: tuple[int, int] = (1, 1)) -> Path:
    """``OUT/summary.csv``, or ``OUT/summary-K-of-N.csv`` for shard K of N."""
    k, n = shard
    return Path(out_dir) / ("summary.csv" if n == 1 else f"summary-{k}-of-{n}.csv")


def read_summary(path: str | os.PathLike) -> list[dict]:
    """The rows of a summary CSV written by :func:`run` (or :func:`merge_summaries`)."""
    path = Path(path)
    fix = "pass a summary written by firekit register --pairs"
    header, body = _read_table(path, "summary", fix)
    lacking = [c for c in BASE_COLUMNS if c not in header]
    if lacking:
        raise FirekitError(f"{path}: not a firekit summary (no {', '.join(lacking)} column); {fix}")
    rows = [dict(zip(header, cells)) for _, cells in body]
    for row in rows:
        if not row.get("row", "").isdigit() or "/" not in row.get("shard", ""):
            raise FirekitError(f"{path}: a row without a row number or shard ({row}); {fix}")
    return rows


def write_summary(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write summary rows atomically; the columns are :data:`BASE_COLUMNS` with every ``dice_*``
    column of the rows (by label) before ``error``."""
    dice = sorted({c for row in rows for c in row if c.startswith("dice_")},
                  key=lambda c: (len(c), c))  # dice_2 before dice_10
    at = BASE_COLUMNS.index("error")
    columns = [*BASE_COLUMNS[:at], *dice, *BASE_COLUMNS[at:]]
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def parse_shard(value: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``: shard K of N, 1-based (``"2/8"``: the second of 8). FirekitError otherwise."""
    try:
        k, n = (int(v) for v in str(value).split("/"))
    except ValueError:
        raise FirekitError(f"--shard takes K/N (e.g. 2/8: the second of 8 shards), got {value!r}") from None
    if not 1 <= k <= n:
        raise FirekitError(f"--shard {value}: K must be within 1..N (shards are 1-based)")
    return k, n


def shard_items(items: list, shard: tuple[int, int]) -> list:
    """The items of shard K of N (1-based): items K-1, K-1+N, K-1+2N, ..."""
    k, n = shard
    if not 1 <= k <= n:
        raise FirekitError(f"--shard {k}/{n}: K must be within 1..N (shards are 1-based)")
    return items[k - 1::n]


def plan(csv_path: str | os.PathLike, out_dir: str | os.PathLike, shard: tuple[int, int] = (1, 1)) -> BatchPlan:
    """Read and check the CSV, take the shard's pairs and mark those an earlier run finished.

    Nothing is written. A pair counts as done when a summary in ``out_dir`` (``summary.csv`` or any
    ``summary-K-of-N.csv``) holds its row (same moving, fixed and name) as ``ok`` or ``skipped`` and
    every output of the pair exists.
    """
    shard_items([], shard)  # a bad shard fails before anything is read
    out_dir = Path(out_dir)
    io.check_output_folder(out_dir, [csv_path])
    pairs = shard_items(read_pairs(csv_path, out_dir), shard)
    summary = summary_path(out_dir, shard)
    if Path(csv_path).resolve() == summary.resolve():
        raise FirekitError(f"{csv_path}: the summary would overwrite the pairs CSV; keep the CSV out of --out")
    done = {}
    earlier = [p for p in sorted(out_dir.glob("summary*.csv")) if re.fullmatch(r"summary(-\d+-of-\d+)?\.csv", p.name)]
    for path in earlier:
        for row in read_summary(path):
            if row["status"] in DONE:
                done[(row["moving"], row["fixed"], row["name"])] = row
    rows = []
    for pair in pairs:
        old = done.get(pair.key())
        if old is not None and all(p.exists() for p in pair.outputs.values()):
            rows.append({**old, "row": pair.row, "status": "skipped", "shard": f"{shard[0]}/{shard[1]}"})
        else:
            rows.append(_row(pair, "pending", shard))
    return BatchPlan(pairs, summary, shard, rows)


def _row(pair: Pair, status: str, shard: tuple[int, int]) -> dict:
    return dict(row=pair.row, name=pair.name, moving=pair.cells[0], fixed=pair.cells[1], status=status,
                shard=f"{shard[0]}/{shard[1]}")


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if isinstance(exc, FirekitError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _dice(warped_labels: Path, fixed_labels: Path) -> dict[int, float]:
    """Dice per label (every label > 0 of either map) of the written warped labels against the fixed ones."""
    import torch

    from firekit.core.metrics import dice

    warped = io.load_labels(warped_labels, "warped label map")
    fixed = io.load_labels(fixed_labels, "fixed label map")
    if fixed.shape != warped.shape:
        raise FirekitError(f"{fixed_labels}: shape {fixed.shape} differs from the fixed image's {warped.shape}; "
                           "pass labels drawn on the fixed image")
    return dice(torch.as_tensor(warped.data), torch.as_tensor(fixed.data))


def register_pair(model, pair: Pair, shard: tuple[int, int] = (1, 1), say: Callable[[str], None] = print,
                  **options) -> dict:
    """Register one pair as ``register_files`` does and return its summary row (``ok`` or ``failed``
    with the error's one line); its outputs are written together or not at all. Lines the
    registration prints on stderr (a check's fallback) go to ``say``."""
    from firekit.workflows import register_files

    row = _row(pair, "failed", shard)
    captured = text_io.StringIO()
    clock = time.perf_counter()
    try:
        with contextlib.redirect_stderr(captured), io.all_or_nothing(pair.outputs.values()):
            result = register_files(model, pair.moving, pair.fixed, pair.out, moving_labels=pair.moving_labels,
                                    out_labels=pair.out_labels, field=pair.field, affine=pair.affine,
                                    inverse_field=pair.inverse_field, initial_affine=pair.initial_affine,
                                    fixed_mask=pair.fixed_mask, moving_mask=pair.moving_mask, progress=False,
                                    **options)
            scores = _dice(pair.out_labels, pair.fixed_labels) if pair.fixed_labels is not None else {}
        report = result.check
        row.update(status="ok", check="off" if report is None else report.verdict + (
            f" ({report.chosen})" if report.verdict != "ok" else ""))
        if scores:
            row["mean_dice"] = round(sum(scores.values()) / len(scores), 4)
            row.update({f"dice_{label}": round(value, 4) for label, value in scores.items()})
    except Exception as exc:  # one pair's failure is its row's; the others go on
        row["error"] = _first_line(exc)
    row["seconds"] = round(time.perf_counter() - clock, 3)
    for line in captured.getvalue().splitlines():
        say(line)
    return row


def run(job: BatchPlan, model, progress: bool = True, **options) -> list[dict]:
    """Register the plan's pending pairs with one model, rewriting the summary after each.

    Args:
        model: a :class:`~firekit.fire.model.Fire` or None (refinement alone), loaded once for all pairs.
        progress: a tqdm bar on stderr.
        options: ``register_files``' registration options (direction, refine, seed, ...).

    Returns:
        the summary rows, one per pair of the plan, in the CSV's order.
    """
    from tqdm.auto import tqdm

    rows = job.rows
    write_summary(job.summary, rows)
    todo = job.todo
    bar = tqdm(todo, desc="pairs", unit="pair", disable=not (progress and todo), file=sys.stderr, dynamic_ncols=True)
    failed = 0

    def say(line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    for index in bar:
        rows[index] = register_pair(model, job.pairs[index], job.shard, say=say, **options)
        failed += rows[index]["status"] == "failed"
        if failed:
            bar.set_postfix(failed=failed)
        write_summary(job.summary, rows)
    bar.close()
    return rows


def merge_summaries(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> list[dict]:
    """Join the summaries of the N shards of one run into ``out``, rows in the CSV's order.

    Every shard 1..N must be there exactly once (one-line errors otherwise), no pair twice; ``out``
    may not be one of ``paths``. Returns the merged rows.
    """
    paths = [Path(p) for p in paths]
    io.check_output_file(out, paths)
    seen: dict[str, Path] = {}
    rows: dict[int, tuple[dict, Path]] = {}
    for path in paths:
        shards = set()
        for row in read_summary(path):
            shards.add(row["shard"])
            number = int(row["row"])
            if number in rows and rows[number][1] != path:
                raise FirekitError(f"{path}: row {number} ({row['moving']}) is also in {rows[number][1]}; "
                                   "merge the summaries of one run's shards")
            rows[number] = (row, path)
        for shard in shards:
            if shard in seen and seen[shard] != path:
                raise FirekitError(f"{path}: shard {shard} is also in {seen[shard]}; pass each shard's summary once")
            seen[shard] = path
    counts = {int(s.split("/")[1]) for s in seen}
    if len(counts) != 1:
        raise FirekitError(f"{', '.join(map(str, paths))}: shards of different runs ({', '.join(sorted(seen))}); "
                           "merge the N summaries of one --shard K/N run")
    total = counts.pop()
    absent = [k for k in range(1, total + 1) if f"{k}/{total}" not in seen]
    if absent:
        raise FirekitError(f"shard {', '.join(f'{k}/{total}' for k in absent)} missing; pass "
                           + ", ".join(f"summary-{k}-of-{total}.csv" for k in absent) + " too")
    merged = [row for _, (row, _) in sorted(rows.items())]
    write_summary(out, merged)
    return merged
