"""The ANTs benchmark's machinery: the ANTs bridge, scoring, goals and the report (not its timings)."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import ants_runs, vs_ants
from firekit.registration import fields
from firekit.core import metrics
from firekit.data.protocol import make_test_pairs

ants = pytest.importorskip("ants")


@pytest.fixture(scope="module")
def data(tiny_demo):
    return tiny_demo


def test_ants_fields_reproduce_ants_own_resampling(data, tmp_path):
    """Composed ANTs transforms, read as an ITK field and applied by firekit, warp as ANTs does."""
    pair = make_test_pairs(data / "test" / "subj002", tmp_path, 1, ndim=2, seed=4)[0]
    volumes = vs_ants.load_pair(pair)
    fixed, moving = ants_runs.to_ants(volumes["fixed"]), ants_runs.to_ants(volumes["moving"])
    reg = ants.registration(fixed, moving, "SyN", aff_metric="mattes")
    field, backward = ants_runs.ants_fields(reg, moving, fixed)
    ours = fields.apply_field(volumes["moving_labels"], field, volumes["fixed"], labels=True)
    moving_labels = ants_runs.to_ants(volumes["moving_labels"].with_data(volumes["moving_labels"].data.astype(np.float32)))
    theirs = ants.apply_transforms(fixed, moving_labels, reg["fwdtransforms"], interpolator="nearestNeighbor").numpy()
    assert (ours == np.rint(theirs)).mean() > 0.995
    # forward o its own inverse: small, but measured (not zero by construction)
    ic = fields.inverse_consistency(field, backward, volumes["fixed"], volumes["moving"])
    assert 0 < ic[volumes["fixed_labels"].data > 0].mean() < 0.5


def test_ants_rows_repeat_with_the_bench_seed(data, tmp_path):
    """ANTs samples its metric at random: the bench seeds it, so a row is the same run to run (a seed
    of 0 reaches antsRegistration as 1, since it reads 0 as a clock seed), and the seed matters. With
    several ITK threads the samples' order follows the scheduler, so, as the bench does (--threads 1),
    ANTs runs on one thread here: in a process of its own, since ITK reads the count once."""
    import json
    import os
    import subprocess
    import sys

    pair = make_test_pairs(data / "test" / "subj002", tmp_path, 1, ndim=2, seed=6)[0]
    code = ("import json, sys, numpy as np\n"
            "from bench import ants_runs, vs_ants\n"
            "v = vs_ants.load_pair(json.loads(sys.argv[1]))\n"
            "first, again, other = (ants_runs.run_ants('Affine', v['moving'], v['fixed'], s)['field'] for s in (0, 0, 3))\n"
            "import ants\n"
            "print(json.dumps([float(np.abs(first - again).max()), float(np.abs(first - other).max()),\n"
            "                  ants.config._random_seed]))\n")
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(pair)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    same, other, left = json.loads(done.stdout.strip().splitlines()[-1])
    assert same < 1e-3  # the same to float rounding
    assert other > 0.05  # another seed moves it by far more
    assert left is None  # the global setting is put back


def test_scores_of_the_reference_rows(data, tmp_path):
    pair = make_test_pairs(data / "test" / "subj002", tmp_path, 1, ndim=2, seed=5)[0]
    volumes = vs_ants.load_pair(pair)
    oracle = vs_ants.score(volumes["true_field"], None, pair, volumes, [1, 2, 3])
    unaligned = vs_ants.score(np.zeros_like(volumes["true_field"]), None, pair, volumes, [1, 2, 3])
    assert oracle["epe"] == 0 and oracle["ic"] is None
    assert np.mean(list(oracle["dice"].values())) > np.mean(list(unaligned["dice"].values())) + 0.2
    warped = fields.apply_field(volumes["moving_labels"], volumes["true_field"], volumes["fixed"], labels=True)
    expected = metrics.dice(torch.as_tensor(warped.astype(np.int64)),
                            torch.as_tensor(volumes["fixed_labels"].data.astype(np.int64)), [1, 2, 3])
    assert oracle["dice"] == {str(k): v for k, v in expected.items()}


def test_one_run_end_to_end_reports_every_row_and_goal(data, tmp_path):
    methods = ["firekit refinement alone", "ANTs Affine (Mattes MI)", "ANTs SyN"]
    results = vs_ants.run(data, [2], ["t2"], {2: 1}, {2: "default"}, methods, seed=0, work=tmp_path, log=lambda _: None)
    (run,) = results["runs"]
    assert run["pairs"] == 1 and set(run["rows"]) == {*vs_ants.REFERENCE, *methods}
    refined = vs_ants.summarise(run["rows"]["firekit refinement alone"])
    unaligned = vs_ants.summarise(run["rows"]["unaligned"])
    assert refined["mean"] > unaligned["mean"] + 0.1
    assert refined["ic"] is not None and refined["wall"] > 0
    results["meta"] = dict(date="today", machine="m", torch="t", ants="a", threads=1, transforms={"2": 1}, seed=0,
                           minutes=0.1, command="c", models={}, notes=["a note"])
    text = vs_ants.report(results, "plot.png")
    for name in [*vs_ants.REFERENCE, *methods]:
        assert f"| {name} |" in text
    assert "## Goals" in text and "a note" in text and "![firekit vs ANTs](plot.png)" in text
    summary = vs_ants.summary_table(results).splitlines()
    assert summary[2].startswith("| 2D T2-like → T1 | 1 |") and "refinement alone" in summary[0]
    vs_ants.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def fake_run(ndim, refined_dice, syn_dice, refined_s, syn_s, network_s, folding=0.0, ic=0.2):
    def row(dice, wall=None, ic=None):
        out = dict(dice={"1": dice[0], "2": dice[1], "3": dice[2]}, hd95=1.0, epe=1.0, epe95=2.0,
                   folding=folding, ic=ic)
        return out if wall is None else {**out, "wall": wall, "cpu": wall}

    rows = {
        "unaligned": [row((0.2, 0.3, 0.4))],
        "firekit network": [row((0.3, 0.4, 0.5), network_s, ic)],
        "firekit network + refinement": [row(refined_dice, refined_s, ic)],
        "ANTs SyN": [row(syn_dice, syn_s, 0.05)],
    }
    return dict(ndim=ndim, case="t2", label="T2-like → T1", pairs=1, rows=rows)


def test_goals_say_met_or_missed_and_by_how_much():
    met = {goal: (ok, by) for goal, ok, by in vs_ants.goals(fake_run(2, (0.8, 0.9, 0.95), (0.6, 0.7, 0.8), 0.2, 0.5, 0.01))}
    assert all(ok for ok, _ in met.values()), met
    assert any("+0.183" in by for _, by in met.values())  # 0.883 - 0.700
    missed = vs_ants.goals(fake_run(3, (0.5, 0.9, 0.95), (0.6, 0.7, 0.8), 2.0, 1.0, 0.1, folding=0.5, ic=0.9))
    verdict = {goal.split(" (")[0]: (ok, by) for goal, ok, by in missed}
    assert verdict["firekit + refinement Dice ≥ ANTs SyN on every label"] == (False, "worst label 1: -0.100")
    assert not verdict["firekit + refinement faster than ANTs SyN"][0]
    assert not verdict["firekit + refinement % |J| ≤ 0 below 0.1"][0]
    assert not verdict["firekit + refinement inverse-consistency error below 0.5 voxel"][0]
    assert verdict["network alone ≥ 20× faster than ANTs SyN"] == (False, "10.0×")
    # best firekit 0.783 vs SyN 0.700: +0.083 < 0.05 is met in 3D
    assert verdict["best firekit"][0]
    summary = vs_ants.summarise(copy.deepcopy(fake_run(2, (0.8, 0.9, 1.0), (0, 0, 0), 1, 1, 1)["rows"]["firekit network + refinement"]))
    assert summary["mean"] == pytest.approx(0.9)


# ------------------------------------------------------------------------------ bench/throughput
def test_throughput_measures_a_step_and_says_how_many_syncs():
    from bench import throughput

    row = throughput.measure("2d-tiny", "cpu", steps=1, amp=False, channels_last=False, compile_model=False, batch=1)
    assert row["shape"] == [32, 32] and row["it_per_s"] > 0 and row["train_peak_mb"] > 0
    assert row["syncs_per_step"] is None  # counted on CUDA only
    assert row["hours_144k"] == pytest.approx(144_000 / row["it_per_s"] / 3600)
    assert "| 2d-tiny | small | 32x32 | 1 |" in "\n".join(throughput.table([row]))


def test_throughput_tables_compare_each_change_and_the_goals():
    from bench import throughput

    def run(it_per_s, syncs=None):
        return {"it_per_s": it_per_s, "hours_144k": 1.0, "train_peak_mb": 100.0, "syncs_per_step": syncs}

    rows = [("2d", change, run(rate, syncs)) for (change, _), rate, syncs in
            zip(throughput.CHANGES, (1.0, 2.0, 3.0, 1.5, 6.0), (3, 0, 0, 0, 0))]
    lines = throughput.changes_table(rows)
    assert lines[2].startswith("| 2d | fp32, loss read back each step | 1.00 |  |  |") and lines[2].endswith("| 3 |")
    assert "| 2.00x | 2.00x |" in lines[3] and "| 0.50x | 1.50x |" in lines[5] and "| 4.00x | 6.00x |" in lines[6]
    goals = throughput.inference_table([
        {"kind": "2d", "pair": "p2", "goal_ms": 50.0, "median_ms": 40.0, "peak_mb": 500.0, "syn_ms": 800.0,
         "batched_ms": 45.0, "full_grid_ms": 60.0},
        {"kind": "3d", "pair": "p3", "goal_ms": 2000.0, "median_ms": 1500.0, "peak_mb": 5000.0},
    ])
    assert goals[2] == "| p2 | 40.0 | 45.0 | 60.0 | 500 | 800.0 | 20x | < 50 ms: met |"
    assert goals[3].endswith("| — | — | < 2000 ms, < 4096 MB: **missed** |")  # over 4 GB; no SyN timing


def test_throughput_pairs_are_real_brains_on_the_stated_grids():
    from bench import throughput

    moving, fixed = throughput.demo_pair("2d")
    assert moving.shape == fixed.shape == (256, 256)
    for image in (moving, fixed):  # the brain centred, with background all round
        inside = image.data > image.data.min()
        rows, cols = np.nonzero(inside)
        assert 80 < rows.mean() < 176 and 80 < cols.mean() < 176 and not inside[0].any() and not inside[:, 0].any()
    assert np.corrcoef(moving.data.ravel(), fixed.data.ravel())[0, 1] < 0.99  # two subjects, two contrasts


def test_results_md_carries_the_speed_goals_beside_syn(tmp_path, monkeypatch):
    import json

    results = {"runs": [{**fake_run(2, (0.8, 0.9, 0.95), (0.6, 0.7, 0.8), 0.2, 0.5, 0.01), "subjects": ["subj008"]}],
               "meta": dict(date="d", machine="m", torch="t", ants="a", threads=1, transforms={"2": 1}, seed=0,
                            minutes=0.1, command="c", models={})}
    monkeypatch.setattr(vs_ants, "HERE", tmp_path)
    assert "## Speed" not in vs_ants.report(results)
    (tmp_path / "throughput.json").write_text(json.dumps({"date": "d", "machine": "m", "torch": "t", "pairs": [
        {"kind": "3d", "pair": "3D demo pair", "goal_ms": 2000.0, "median_ms": 1400.0, "peak_mb": 1300.0,
         "syn_ms": 21000.0}]}))
    text = vs_ants.report(results)
    assert "## Speed" in text and "| 3D demo pair | 1400.0 |" in text and "| 21000.0 | 15x | < 2000 ms, < 4096 MB: met |" in text


def test_the_demos_ants_reference_is_the_bench_run_of_record():
    # firekit demo prints ANTs' figures from bench/results.md; they must be that file's, not an older run's.
    import json

    from bench.vs_ants import summarise
    from firekit.demo import ANTS_REFERENCE

    results = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results.json").read_text())
    run = next(r for r in results["runs"] if r["ndim"] == 2 and r["case"] == "t2")
    rows = {"unaligned": "unaligned", "ANTs Affine": "ANTs Affine (Mattes MI)", "ANTs SyN": "ANTs SyN",
            "ANTs SyNRA": "ANTs SyNRA"}
    assert {key: round(summarise(run["rows"][row])["mean"], 3) for key, row in rows.items()} == ANTS_REFERENCE


def test_identity_pairs_are_untransformed_and_scored_on_the_bench_path(data, tmp_path):
    from bench import identity

    subject = data / "test" / "subj002"
    pair = make_test_pairs(subject, tmp_path / "pairs", 1, ndim=2, moving="T2", seed=0, config=identity.identity_config())[0]
    volumes = vs_ants.load_pair(pair)
    assert np.abs(volumes["true_field"]).max() == 0  # the right answer moves nothing
    assert np.array_equal(volumes["moving_labels"].data, volumes["fixed_labels"].data)
    moving = make_test_pairs(subject, tmp_path / "t2", 1, ndim=2, moving="T2", seed=0)[0]
    assert not np.array_equal(vs_ants.load_pair(moving)["moving"].data, volumes["moving"].data)  # a real move there
    results = identity.run(data, [2], ["t2"], 1, ["firekit refinement alone", "ANTs SyN"], 0, tmp_path / "run", 1,
                           log=lambda _: None)
    (run,) = results["runs"]
    assert set(run["rows"]) == {*vs_ants.REFERENCE, "firekit refinement alone", "ANTs SyN"}
    unaligned = vs_ants.summarise(run["rows"]["unaligned"])
    assert unaligned["mean"] == 1.0 and unaligned["epe"] == 0.0
    assert vs_ants.summarise(run["rows"]["oracle (true mapping)"])["mean"] == 1.0  # the oracle is the identity
    refined = vs_ants.summarise(run["rows"]["firekit refinement alone"])
    assert 0.5 < refined["mean"] <= 1.0 and refined["wall"] > 0
    results["meta"] = dict(date="today", machine="m", threads=1, minutes=0.1, command="c", notes=["a note"])
    text = identity.report(results)
    assert "| firekit refinement alone |" in text and "| ANTs SyN |" in text and "a note" in text


def test_rotation_bench_scores_both_paths_on_the_same_turned_pairs(data, tmp_path):
    from bench import rotations

    rows = rotations.run(data, [180], 1, ["T2"], tmp_path, subjects=("subj002",), log=lambda line: None)
    assert [row["path"] for row in rows] == list(rotations.PATHS)
    assert all(row["pairs"] == len(row["dice"]) == 1 and 0 <= row["mean"] <= 1 for row in rows)
    assert rows[0]["unaligned"] == rows[1]["unaligned"]  # the same turned pair for both paths
    meta = dict(command="python -m bench.rotations", date="today", machine="here", minutes=0.1, model="m.pt")
    text = rotations.report(dict(meta=meta, rows=rows))
    assert "| ±180° | T2-like | --init search-axes | 1 |" in text


def test_merging_runs_joins_cases_and_replaces_rerun_rows():
    first = dict(runs=[dict(ndim=2, case="t2", pairs=40, rows={"a": [1], "b": [2]}),
                       dict(ndim=3, case="t2", pairs=2, rows={"a": [3]})])
    rerun = dict(runs=[dict(ndim=2, case="t2", pairs=40, rows={"b": [20], "c": [30]}),
                       dict(ndim=2, case="t2", pairs=8, rows={"a": [9]}),  # other pairs: another run
                       dict(ndim=3, case="mono", pairs=2, rows={"a": [4]})])
    runs = vs_ants.merge_runs([first, rerun])
    assert [(r["ndim"], r["case"], r["pairs"]) for r in runs] == [(2, "t2", 40), (3, "t2", 2), (2, "t2", 8),
                                                                  (3, "mono", 2)]
    assert runs[0]["rows"] == {"a": [1], "b": [20], "c": [30]}
    assert first["runs"][0]["rows"] == {"a": [1], "b": [2]}  # the inputs are left as they were


@pytest.mark.parametrize("ndim, preset_variant", [(2, "mind-mi 0.3"), (3, "mind-mi 0.1")])
def test_the_field_similarity_variants_are_valid_settings(ndim, preset_variant):
    from bench.field_similarity import VARIANTS
    from firekit.registration.refine import RefineConfig

    three_levels = ("field_levels", "field_iterations")  # the 3D schedule's variants: 3D only
    configs = {name: RefineConfig.preset(ndim, **overrides) for name, overrides in VARIANTS.items()
               if ndim == 3 or not any(key in overrides for key in three_levels)}
    assert configs["default"] == RefineConfig.preset(ndim) == configs[preset_variant]  # the preset's own weight
    assert configs["field ngf"].field_similarity == "ngf" and configs["field ngf"].similarity == "mind"
    assert configs["mind alone"].similarity_fn("field").features(torch.zeros(1, 1, *[8] * ndim)).shape[1] == \
        2 * ndim * (ndim - 1)  # MIND's channels alone, as before the mutual information
    others = [repr(c) for name, c in configs.items() if name != preset_variant]
    assert len(set(others)) == len(others)  # every other variant changes something
