"""``firekit register --pairs``: many pairs in one process, a summary, reruns, shards, bad CSVs.

Tiny 2D pairs (axial slices of the 4 mm demo subjects), registered with the shipped model and a few
refinement steps, through the console script as a user runs it."""

import csv
import shutil

import numpy as np
import pytest

from firekit.batch import parse_shard, shard_items
from firekit.core.errors import FirekitError
from firekit.data import io
from firekit.registration.evaluate import evaluate_files
from firekit.data.protocol import axial_slice
from tests.test_cli import assert_one_line_error, run

OPTIONS = ["--direction", "b2a", "--spacing", 4, "--refine", 3, "--quiet"]
SLICES = (16, 22, 28)
OUTPUTS = ("warped", "labels", "field")
INVERSE = "first_inverse.nii.gz"  # the first pair's inverse field (a column only that row fills)


def write_slices(tiny_demo, folder, k: int) -> dict:
    """Slice ``k`` of test subject T2 (moving, with labels) and of validation subject T1 (fixed,
    with labels) as 2D NIfTI files named ``{moving,fixed}{k}[_labels].nii.gz`` in ``folder``."""
    sources = {f"moving{k}": tiny_demo / "test/subj002/T2.nii.gz", f"fixed{k}": tiny_demo / "val/subj001/T1.nii.gz"}
    paths = {}
    for name, image in sources.items():
        for suffix, path in (("", image), ("_labels", image.parent / "labels.nii.gz")):
            volume = io.load_labels(path) if suffix else io.load_volume(path)
            data, affine = axial_slice(volume, k)
            paths[name + suffix] = io.save_nifti(data, affine, folder / f"{name}{suffix}.nii.gz")
    return paths


def write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(dict.fromkeys(c for row in rows for c in row)))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def pair_rows(folder=None) -> list[dict]:
    """The CSV's rows: paths relative to its folder, or absolute ones in ``folder``."""
    prefix = f"{folder}/" if folder is not None else ""
    return [dict(moving=f"{prefix}moving{k}.nii.gz", fixed=f"{prefix}fixed{k}.nii.gz",
                 labels=f"{prefix}moving{k}_labels.nii.gz", fixed_labels=f"{prefix}fixed{k}_labels.nii.gz")
            for k in SLICES]


def same_image(a, b) -> bool:
    import nibabel as nib

    first, second = nib.load(a), nib.load(b)
    return np.array_equal(first.affine, second.affine) and np.array_equal(np.asanyarray(first.dataobj),
                                                                          np.asanyarray(second.dataobj))


def outputs(out, k: int) -> dict:
    return {kind: out / f"moving{k}_to_fixed{k}_{kind}.nii.gz" for kind in OUTPUTS}


def mtimes(out) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}


@pytest.fixture(scope="module")
def study(tiny_demo, tmp_path_factory):
    """Three pairs, their CSV (inputs relative to it) and one --pairs run into ``out``."""
    root = tmp_path_factory.mktemp("pairs")
    inputs = root / "inputs"
    inputs.mkdir()
    for k in SLICES:
        write_slices(tiny_demo, inputs, k)
    table = inputs / "pairs.csv"
    rows = pair_rows()
    rows[0]["inverse_field"] = INVERSE
    write_csv(table, rows)
    out = root / "out"
    result = run("register", "--pairs", table, "--out", out, *OPTIONS)
    return inputs, table, out, result


def test_three_pairs_write_a_summary_and_the_outputs_of_single_registers(study, tmp_path):
    inputs, table, out, result = study
    assert result.returncode == 0, result.stderr
    assert "3 pairs: 3 ok" in result.stdout
    rows = read_csv(out / "summary.csv")
    assert [r["row"] for r in rows] == ["2", "3", "4"] and {r["status"] for r in rows} == {"ok"}
    assert [r["name"] for r in rows] == [f"moving{k}_to_fixed{k}" for k in SLICES]
    for k, row in zip(SLICES, rows):
        assert float(row["seconds"]) > 0 and row["check"].split()[0] in ("ok", "fallback") and row["error"] == ""
        # Dice scores the written labels against the fixed labels, as firekit evaluate does
        scores = evaluate_files(inputs / f"fixed{k}_labels.nii.gz", outputs(out, k)["labels"])
        assert float(row["mean_dice"]) == pytest.approx(scores["mean_dice"], abs=1e-4)
        assert {c: float(v) for c, v in row.items() if c.startswith("dice_")} == pytest.approx(
            {f"dice_{label}": d for label, d in scores["dice"].items()}, abs=1e-4)
        single = {kind: tmp_path / f"{k}_{kind}.nii.gz" for kind in OUTPUTS}
        inverse = ["--inverse-field", tmp_path / INVERSE] if k == SLICES[0] else []
        alone = run("register", "--moving", inputs / f"moving{k}.nii.gz", "--fixed", inputs / f"fixed{k}.nii.gz",
                    "--moving-labels", inputs / f"moving{k}_labels.nii.gz", "--out", single["warped"],
                    "--out-labels", single["labels"], "--field", single["field"], *inverse, *OPTIONS)
        assert alone.returncode == 0, alone.stderr
        assert all(same_image(single[kind], outputs(out, k)[kind]) for kind in OUTPUTS), k
    assert same_image(tmp_path / INVERSE, out / INVERSE) and len(list(out.glob("*inverse*"))) == 1


def test_rerun_skips_done_pairs_and_redoes_a_pair_whose_output_is_gone(study, tmp_path):
    inputs, table, out, _ = study
    again = tmp_path / "out"
    shutil.copytree(out, again)  # copy2: the modification times come along
    before = mtimes(again)
    outputs(again, SLICES[1])["field"].unlink()
    result = run("register", "--pairs", table, "--out", again, *OPTIONS)
    assert result.returncode == 0, result.stderr
    assert "1 ok, 2 skipped" in result.stdout
    rows, earlier = read_csv(again / "summary.csv"), read_csv(out / "summary.csv")
    assert [r["status"] for r in rows] == ["skipped", "ok", "skipped"]
    # skipped rows keep the figures of the run that registered them; the redone pair scores the same
    assert [r["mean_dice"] for r in rows] == [r["mean_dice"] for r in earlier]
    after = mtimes(again)
    redone = {p.name for p in outputs(again, SLICES[1]).values()}
    assert set(after) == set(before)
    assert all(after[name] == before[name] for name in before if name not in redone)
    assert all(after[name] > before[name] for name in redone - {outputs(again, SLICES[1])["field"].name})


def test_a_corrupt_pair_fails_alone_and_a_rerun_retries_only_it(tiny_demo, tmp_path):
    for k in SLICES:
        write_slices(tiny_demo, tmp_path, k)
    good = (tmp_path / f"moving{SLICES[1]}.nii.gz").read_bytes()
    (tmp_path / f"moving{SLICES[1]}.nii.gz").write_bytes(b"not an image at all")
    table = tmp_path / "pairs.csv"
    write_csv(table, pair_rows())
    out = tmp_path / "out"
    result = run("register", "--pairs", table, "--out", out, *OPTIONS)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("firekit: error: row 3 (") and "cannot read" in lines[0], lines
    assert "Traceback" not in result.stderr and "2 ok, 1 failed" in result.stdout
    rows = read_csv(out / "summary.csv")
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "cannot read" in rows[1]["error"] and rows[0]["error"] == rows[2]["error"] == ""
    assert not any(p.exists() for p in outputs(out, SLICES[1]).values())
    assert all(p.exists() for k in (SLICES[0], SLICES[2]) for p in outputs(out, k).values())
    (tmp_path / f"moving{SLICES[1]}.nii.gz").write_bytes(good)
    result = run("register", "--pairs", table, "--out", out, *OPTIONS)
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in read_csv(out / "summary.csv")] == ["skipped", "ok", "skipped"]


def test_shards_take_every_pair_once_and_their_summaries_merge(study, tmp_path):
    inputs, table, whole, _ = study
    out = tmp_path / "out"
    for k in (1, 2):
        result = run("register", "--pairs", table, "--out", out, "--shard", f"{k}/2", *OPTIONS)
        assert result.returncode == 0, result.stderr
    first, second = read_csv(out / "summary-1-of-2.csv"), read_csv(out / "summary-2-of-2.csv")
    assert [r["row"] for r in first] == ["2", "4"] and [r["row"] for r in second] == ["3"]
    assert {r["shard"] for r in first} == {"1/2"} and {r["shard"] for r in second} == {"2/2"}
    result = run("merge-summaries", out / "summary-2-of-2.csv", out / "summary-1-of-2.csv", "--out",
                 out / "summary.csv")
    assert result.returncode == 0, result.stderr
    merged, unsharded = read_csv(out / "summary.csv"), read_csv(whole / "summary.csv")
    assert [r["row"] for r in merged] == ["2", "3", "4"] and {r["status"] for r in merged} == {"ok"}
    assert [r["mean_dice"] for r in merged] == [r["mean_dice"] for r in unsharded]
    assert all(same_image(path, outputs(whole, k)[kind]) for k in SLICES for kind, path in outputs(out, k).items())
    # an unsharded rerun in the same folder finds every pair done in the shards' summaries
    result = run("register", "--pairs", table, "--out", out, *OPTIONS)
    assert result.returncode == 0 and "3 pairs: 3 skipped" in result.stdout, result.stdout + result.stderr
    assert_one_line_error(run("merge-summaries", out / "summary-1-of-2.csv", "--out", tmp_path / "m.csv"),
                          "shard 2/2 missing", "summary-2-of-2.csv")
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("count, shards", [(7, 2), (3, 5), (10, 3), (1, 1)])
def test_shards_split_any_list_into_disjoint_parts_in_order(count, shards):
    # the rule firekit register --shard and bench/gross_failures --shard share (1-based K of N)
    items = list(range(count))
    parts = [shard_items(items, parse_shard(f"{k}/{shards}")) for k in range(1, shards + 1)]
    assert sorted(i for part in parts for i in part) == items
    assert all(part == sorted(part) for part in parts) and parts[0][:1] == [0]
    for bad in ("0/2", "3/2", "2", "a/b"):
        with pytest.raises(FirekitError, match="--shard"):
            parse_shard(bad)


@pytest.mark.parametrize("case", ["no_fixed_column", "unknown_column", "missing_file", "two_missing_files",
                                  "missing_mask", "shared_output", "output_is_input", "labels_without_moving_labels",
                                  "header_only", "no_csv", "shard_zero", "pairs_and_moving"])
def test_bad_pairs_refused_before_any_work(study, tmp_path, case):
    inputs = study[0]
    rows = pair_rows(inputs)
    lines = 1
    expected = {"no_fixed_column": "no fixed column", "unknown_column": "unknown column subject",
                "missing_file": "row 3: moving", "two_missing_files": "not found", "missing_mask": "row 4: fixed_mask",
                "shared_output": "also row 2's out", "output_is_input": "would overwrite row 2's moving",
                "labels_without_moving_labels": "fixed_labels needs moving_labels",
                "header_only": "no pairs", "no_csv": "not found", "shard_zero": "--shard",
                "pairs_and_moving": "--moving"}[case]
    extra = []
    if case == "no_fixed_column":
        rows = [{k: v for k, v in r.items() if k != "fixed"} for r in rows]
    elif case == "unknown_column":
        rows = [{**r, "subject": "s"} for r in rows]
    elif case == "missing_file":
        rows[1]["moving"] = "nowhere.nii.gz"
    elif case == "missing_mask":
        rows[2]["fixed_mask"] = "nowhere_mask.nii.gz"
    elif case == "two_missing_files":
        rows[0]["fixed"], rows[2]["labels"] = "nowhere.nii.gz", "nothing.nii.gz"
        lines = 2
    elif case == "shared_output":
        rows = [{**r, "name": "same"} for r in rows]
        lines = 2 * len(OUTPUTS)  # rows 3 and 4 each clash with row 2 on every output
    elif case == "output_is_input":
        rows[2]["out"] = rows[0]["moving"]
    elif case == "labels_without_moving_labels":
        rows = [{**r, "labels": ""} for r in rows]
        lines = len(rows)
    elif case == "shard_zero":
        extra = ["--shard", "0/2"]
    elif case == "pairs_and_moving":
        extra = ["--moving", rows[0]["moving"]]
    table = tmp_path / "pairs.csv"
    if case == "header_only":
        table.write_text("moving,fixed\n")
    elif case != "no_csv":
        write_csv(table, rows)
    out = tmp_path / "out"
    result = run("register", "--pairs", table, "--out", out, *extra, *OPTIONS)
    assert result.returncode == 2, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == lines and all(e.startswith(("firekit: error: ", "firekit register: error: "))
                                        for e in errors), errors
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
