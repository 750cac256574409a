"""The benchmark's other peers (Greedy, elastix, ConvexAdam): conversions and crash handling.

Each peer runs in the bench's worker process on a small demo pair with a short schedule. A
conversion is trusted when (1) the peer's field, converted to the ITK convention and applied by
firekit, warps the labels as the tool itself does, and (2) on a pair moved by a known shift
through its header alone, the field is that shift (a sign, axis-order or voxel/mm slip shows as
an error of the shift's size or more).
"""

import os
import signal

import numpy as np
import pytest

from bench import peers, vs_ants
from firekit.data.protocol import make_test_pairs

pytest.importorskip("picsl_greedy")
pytest.importorskip("itk")
pytest.importorskip("convexAdam")

SHORT = {  # schedules cut short: the tests check conventions, not accuracy
    "Greedy (NMI affine + deformable)": {"iterations": "40x20"},
    "elastix (affine + B-spline, Mattes MI)": {"MaximumNumberOfIterations": 64, "NumberOfResolutions": 2},
    "ConvexAdam (after Greedy's affine)": {"greedy": {"iterations": "40x20"}, "convexadam": {"selected_niter": 20}},
}
SHIFT_RAS = (4.0, -3.0, 2.0)


@pytest.fixture(scope="module")
def worker():
    worker = peers.Worker(threads=1, timeout=600)
    yield worker
    worker.close()


def _crash(moving, fixed, moving_labels, threads, seed, settings):
    """An adapter that dies as a crashing native library would (the worker imports it by name)."""
    os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.parametrize("name", list(peers.PEERS))
def test_each_peers_field_warps_as_the_tool_does_and_recovers_a_known_shift(name, worker, tiny_demo, tmp_path):
    peer = peers.PEERS[name]
    ndim = max(peer.ndims) if 2 not in peer.ndims else 2
    pair = make_test_pairs(tiny_demo / "test" / "subj002", tmp_path / "pair", 1, ndim=ndim, seed=4)[0]
    volumes = vs_ants.load_pair(pair)
    out = worker.call(peer.adapter, pair, 0, SHORT[name])
    assert out["field"].shape == (*volumes["fixed"].shape, ndim)
    assert out["backward"].shape == (*volumes["moving"].shape, ndim)
    assert peers.agreement(out["own_labels"], out["field"], volumes["moving_labels"], volumes["fixed"]) > 0.99
    assert out["wall"] > 0 and out["cpu"] > 0

    shift = SHIFT_RAS[:ndim]
    check = peers.shift_check(worker, peer.adapter, pair, shift, 0, tmp_path / "shifted", SHORT[name])
    assert check["agreement"] > 0.99
    expected = [-s if axis < 2 else s for axis, s in enumerate(shift)]  # RAS -> LPS flips x and y
    assert check["shift_lps"] == expected
    assert np.abs(np.asarray(check["median_lps"]) - expected).max() < 1.0, check
    assert check["epe"] < 2.0, check


def test_a_crashed_peer_is_marked_and_the_run_goes_on(worker, tiny_demo, tmp_path, monkeypatch):
    pair = make_test_pairs(tiny_demo / "test" / "subj002", tmp_path / "pair", 1, ndim=2, seed=4)[0]
    with pytest.raises(peers.PeerCrashed, match="SIGSEGV"):
        worker.call("tests.test_peers:_crash", pair, 0)
    assert worker.call("bench.peers:warm", pair, 0) == {}  # a fresh worker answers after the crash

    crashing = "a peer that crashes"
    monkeypatch.setitem(vs_ants.PEERS, crashing, peers.Peer("tests.test_peers:_crash", (2,), "none"))
    methods = ["firekit moments start alone", crashing]
    results = vs_ants.run(tiny_demo, [2], ["t2"], {2: 1}, {2: "default"}, methods, seed=0, work=tmp_path / "run",
                          log=lambda _: None)
    (run,) = results["runs"]
    assert run["rows"][crashing] == [{"error": "the peer's process killed by SIGSEGV"}]
    assert vs_ants.summarise(run["rows"]["firekit moments start alone"])["answered"] == 1
    results["meta"] = dict(date="today", machine="m", torch="t", ants="a", threads=1, transforms={"2": 1}, seed=0,
                           minutes=0.1, command="c", models={}, notes=[], peers=peers.versions())
    text = vs_ants.report(results)
    assert f"| {crashing} | crashed on all 1 pairs: the peer's process killed by SIGSEGV |" in text
    vs_ants.plot(results, tmp_path / "results.png")  # a row with no answer is left out of the plot
    assert (tmp_path / "results.png").stat().st_size > 0


def test_a_diverged_field_counts_in_dice_and_is_named_beside_its_distances():
    rows = [dict(dice={"1": 0.8}, hd95=2.0, epe=1.0, epe95=2.0, folding=0.0, ic=0.1, wall=1.0, cpu=1.0),
            dict(dice={"1": 0.0}, hd95=np.nan, epe=np.nan, epe95=np.nan, folding=0.0, ic=np.nan, wall=1.0, cpu=1.0),
            dict(error="the peer's process killed by SIGSEGV")]
    summary = vs_ants.summarise(rows)
    assert summary["mean"] == pytest.approx(0.4) and summary["epe"] == 1.0 and summary["ic"] == pytest.approx(0.1)
    assert (summary["nonfinite"], summary["crashed"], summary["answered"]) == (1, 1, 2)
    run = dict(rows={"a peer": rows})
    (line,) = [l for l in vs_ants.table(run, {1: "CSF"}) if l.startswith("| a peer")]
    assert "crashed on 1 of 3" in line and "NaN field on 1 of 2" in line
