"""No gross failures: the start trusts the headers' orientation, and the answer is checked.

Pairs are axial slices of a held-out demo subject at 2 mm (T2-like moving, T1 fixed) whose moving
header is turned and shifted in world space by a known rigid map, so the true answer is known
exactly; a "wrong header" is data turned 180 degrees in the array under an unchanged header.
"""

import json
import math

import numpy as np
import pytest
import torch

from firekit.data import io
from firekit.core import metrics
from firekit.registration.check import AffineBounds, affine_geometry, check, Candidate, default_bounds, implausible
from firekit.core.errors import FirekitError
from firekit.registration.levels import Pyramid
from firekit.registration.moments import moments_search
from firekit.registration.refine import RefineConfig
from firekit.registration.pipeline import register
from firekit.core import spatial

SPACING = 2.0


@pytest.fixture(scope="module")
def subject(demo_data):
    """The test subject of a 2 mm demo dataset: T1, T2 and labels volumes, and the brain's slices."""
    folder = demo_data(spacing=SPACING, shape=(84, 102, 84)) / "test"
    subject = next(folder.iterdir())
    volumes = {name: io.load_volume(subject / f"{name}.nii.gz") for name in ("T1", "T2")}
    volumes["labels"] = io.load_labels(subject / "labels.nii.gz")
    slices = np.nonzero((volumes["labels"].data > 0).any(axis=(0, 1)))[0]
    return volumes, slices


def _slice(volumes, slices, height: float):
    k = int(round(slices.min() + height * (slices.max() - slices.min())))
    out = {}
    for name, volume in volumes.items():
        data = volume.data[:, :, k]
        affine = io.nd_affine(volume.affine, 2)
        out[name] = io.Volume(np.ascontiguousarray(data), affine)
    return out


def _turned(volume: io.Volume, degrees: float, shift_mm=(0.0, 0.0)) -> io.Volume:
    """``volume`` with its world placement turned by ``degrees`` about its centre and shifted."""
    n = 2
    centre = volume.affine[:n, :n] @ ((np.array(volume.shape) - 1) / 2) + volume.affine[:n, n]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    world = np.eye(3)
    world[:2, :2] = [[c, -s], [s, c]]
    world[:2, 2] = centre - world[:2, :2] @ centre + np.asarray(shift_mm)
    return io.Volume(volume.data, world @ volume.affine)


def _mean_dice(warped: np.ndarray, fixed_labels: io.Volume) -> float:
    scores = metrics.dice(torch.as_tensor(warped.astype(np.int64)),
                          torch.as_tensor(fixed_labels.data.astype(np.int64)), (1, 2, 3))
    return float(np.mean(list(scores.values())))


def _dice(result, moving_labels: io.Volume, fixed_labels: io.Volume) -> float:
    return _mean_dice(result.apply(moving_labels).data, fixed_labels)


def _rotation(result) -> float:
    """The turn (degrees, signed, 2D) of the result's world affine (fixed point -> moving point)."""
    linear = result.affine[:2, :2]
    u, _, vh = np.linalg.svd(linear)
    rotation = u @ vh
    return math.degrees(math.atan2(rotation[1, 0], rotation[0, 0]))


def _fixed_points(fixed_labels: io.Volume) -> np.ndarray:
    """``(*S, 2)`` world (RAS mm) points of the fixed voxels."""
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in fixed_labels.shape], indexing="ij"), -1)
    return voxels @ fixed_labels.affine[:2, :2].T + fixed_labels.affine[:2, 2]


def _true_epe(result, moving_labels: io.Volume, fixed_labels: io.Volume) -> float:
    """Mean end-point error (mm) over the fixed brain of ``result`` against the true map of a
    :func:`_pair`: its moving header is the fixed one turned in world space, so a fixed point ``p``
    matches the moving point ``turn @ p``."""
    turn = moving_labels.affine @ np.linalg.inv(fixed_labels.affine)
    points = _fixed_points(fixed_labels)
    true_lps = (points @ turn[:2, :2].T + turn[:2, 2] - points) * io.lps_flip(2)  # the result's signs are ITK/LPS
    error = np.linalg.norm(result.displacement - true_lps, axis=-1)
    return float(error[fixed_labels.data > 0].mean())


def _unaligned_dice(moving_labels: io.Volume, fixed_labels: io.Volume) -> float:
    """Mean Dice of the pair as the headers place it (moving labels read at the fixed voxels' world points)."""
    from scipy.ndimage import map_coordinates

    to_moving = np.linalg.inv(moving_labels.affine)
    points = _fixed_points(fixed_labels) @ to_moving[:2, :2].T + to_moving[:2, 2]
    warped = map_coordinates(moving_labels.data, np.moveaxis(points, -1, 0), order=0, mode="constant")
    return _mean_dice(warped, fixed_labels)


def _pair(subject, height, degrees, shift=(6.0, -4.0)):
    volumes, slices = subject
    slab = _slice(volumes, slices, height)
    moving = _turned(slab["T2"], degrees, shift)
    moving_labels = _turned(slab["labels"], degrees, shift)
    return moving, slab["T1"], moving_labels, slab["labels"]


def test_bounds_name_what_is_implausible():
    shape = (40, 50)
    identity = spatial.identity_affine(2, 1)
    assert implausible(identity, shape, default_bounds(2)) == [None]
    # In normalised units on a non-square grid a turn is not a rotation matrix: go through voxels.
    def voxel_theta(linear):
        matrix = torch.zeros(1, 2, 3, dtype=torch.float64)
        matrix[0, :, :2] = torch.as_tensor(linear, dtype=torch.float64)
        centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
        matrix[0, :, 2] = centre - matrix[0, :, :2] @ centre
        return spatial.voxel_affine_to_normalised(matrix, shape)

    turn = lambda a: [[math.cos(math.radians(a)), -math.sin(math.radians(a))],
                      [math.sin(math.radians(a)), math.cos(math.radians(a))]]
    geometry = affine_geometry(voxel_theta(turn(30)), shape)
    assert geometry["rotation_deg"].item() == pytest.approx(30, abs=1e-6)
    assert implausible(voxel_theta(turn(30)), shape, default_bounds(2)) == [None]
    assert "180 deg rotation" in implausible(voxel_theta(turn(180)), shape, default_bounds(2))[0]
    assert implausible(voxel_theta(turn(180)), shape, default_bounds(2, "search-axes")) == [None]
    assert "reflection" in implausible(voxel_theta([[-1, 0], [0, 1]]), shape, default_bounds(2, "search-axes"))[0]
    assert "scale of 4.00" in implausible(voxel_theta([[4, 0], [0, 1]]), shape, default_bounds(2))[0]
    with pytest.raises(FirekitError, match="orientation"):
        default_bounds(2, "any")
    with pytest.raises(FirekitError, match="scale_range"):
        AffineBounds(scale_range=(2.0, 3.0))


def test_header_start_never_proposes_a_turn_beyond_the_bound(subject):
    moving, fixed, _, _ = _pair(subject, 0.93, 10.0)
    from firekit.data.pairs import network_grid, to_network

    shape, grid = network_grid(fixed, SPACING, 16, 32)
    x_moving, x_fixed = to_network(moving, shape, grid), to_network(fixed, shape, grid)
    for orientation, largest in (("header", 45.0), ("search-axes", 180.0)):
        config = RefineConfig.preset(2, orientation=orientation, starts=200)
        candidates, _ = moments_search(Pyramid(x_moving), Pyramid(x_fixed), config, keep=200)
        angles = affine_geometry(candidates[0], shape)["rotation_deg"]
        assert float(angles.max()) <= largest + 1e-6
        if orientation == "search-axes":
            assert float(angles.max()) > 170  # the 180-degree turns are back in the search


# Vertex slices (94 % and 96 % of the brain's height) whose outline is nearly round: before the
# bound, the moments start turned these by -159, 179 and 86 degrees (Dice 0.49, 0.31, 0.23).
# Judged as bench/gross_failures.py judges (end-point error against the true map <= 10 mm, Dice
# above the unaligned pair's), refinement alone held to 5 mm. Measured 2026-12-02: refinement
# alone 1.2-1.4 mm on all three (now 2.5, 4.4 and 1.5 mm, below); with the shipped network's start, the 96 %, 20-degree pair
# 6.1 mm (Dice 0.57; the previous model 2.2 mm, 0.75): the start leads refinement to a shrunk
# brain that MIND scores better than the right answer. Not a turn, but a known weakness
# (bench/training.md, section 4). With the network-start schedule (one moments start beside the
# network's, RefineConfig.preset(2, start="network"); 2026-12-06) the default path gives 1.6, 4.8
# and 4.2 mm (Dice 0.90, 0.72, 0.62): held to 6 mm. Refinement alone on the 96 %, 0-degree pair: 1.2 mm before the
# moments' foreground was opened (RefineConfig.foreground_opening, which took --no-network from 10
# to 0 gross failures in 504 protocol pairs), 4.4 mm (Dice 0.93 -> 0.72) after: on this slice T1's
# foreground above the threshold is smaller than T2's (dark CSF), and the opened moments see a
# 1.3x scale that is not there; the specks of noise had hidden it. Held to 5 mm.
@pytest.mark.parametrize("height, degrees", [(0.94, 20.0), (0.96, 0.0), (0.96, 20.0)])
@pytest.mark.parametrize("network", [False, True], ids=["no-network", "default"])
def test_a_near_symmetric_vertex_slice_is_not_turned(subject, network, height, degrees):
    from firekit.registration.pipeline import load

    moving, fixed, moving_labels, fixed_labels = _pair(subject, height, degrees)
    result = register(load() if network else None, moving, fixed, direction="b2a", refine="auto", spacing=SPACING)
    assert abs(_rotation(result) - degrees) < 10.0, _rotation(result)
    assert _dice(result, moving_labels, fixed_labels) > _unaligned_dice(moving_labels, fixed_labels)
    assert _true_epe(result, moving_labels, fixed_labels) < (5.0 if not network else 6.0)


def test_refinement_from_the_network_matches_the_whole_schedule_from_moments(subject, monkeypatch):
    # The network earns its place: from its start, the shorter schedule (RefineConfig.preset(2,
    # start="network")) reaches the Dice of the whole schedule from moments on mid-brain pairs.
    from firekit.registration import refine as refine_module
    from firekit.registration.pipeline import load

    model = load()
    calls = []
    original = refine_module.refine
    monkeypatch.setattr(refine_module, "refine", lambda *a, **k: calls.append(k["config"]) or original(*a, **k))
    for height, degrees in ((0.45, 12.0), (0.6, -15.0)):
        moving, fixed, moving_labels, fixed_labels = _pair(subject, height, degrees)
        from_network = register(model, moving, fixed, direction="b2a", refine="auto", spacing=SPACING)
        from_moments = register(None, moving, fixed, direction="b2a", refine="auto", spacing=SPACING)
        assert _dice(from_network, moving_labels, fixed_labels) > _dice(from_moments, moving_labels, fixed_labels) - 0.02
        assert _true_epe(from_network, moving_labels, fixed_labels) < 3.0
    # 2D registers both ways by default (symmetric="auto"): two refinements per register call
    assert calls[:4] == [RefineConfig.preset(2, start="network")] * 2 + [RefineConfig.preset(2)] * 2, calls[:4]


def test_a_pair_turned_by_25_degrees_is_recovered(subject):
    moving, fixed, moving_labels, fixed_labels = _pair(subject, 0.55, 25.0)
    result = register(None, moving, fixed, direction="b2a", refine="auto", spacing=SPACING)
    assert abs(_rotation(result) - 25.0) < 3.0, _rotation(result)
    assert _dice(result, moving_labels, fixed_labels) > 0.75
    unaligned = register(None, moving, fixed, refine="moments", spacing=SPACING, check=False)
    assert _dice(result, moving_labels, fixed_labels) > _dice(unaligned, moving_labels, fixed_labels)


def test_a_wrong_header_registers_with_search_axes_and_not_without(subject):
    volumes, slices = subject
    slab = _slice(volumes, slices, 0.55)
    # The array turned 180 degrees in plane under an unchanged header: the file says the head
    # points the other way. Only a search over the axes' turns can undo it.
    moving = io.Volume(np.ascontiguousarray(slab["T2"].data[::-1, ::-1]), slab["T2"].affine)
    moving_labels = io.Volume(np.ascontiguousarray(slab["labels"].data[::-1, ::-1]), slab["labels"].affine)
    trusted = register(None, moving, slab["T1"], refine="auto", spacing=SPACING)
    searched = register(None, moving, slab["T1"], refine="auto", spacing=SPACING, orientation="search-axes")
    assert abs(_rotation(trusted)) <= 45.0 + 1e-6
    assert abs(abs(_rotation(searched)) - 180.0) < 10.0, _rotation(searched)
    assert _dice(searched, moving_labels, slab["labels"]) > 0.75
    assert _dice(trusted, moving_labels, slab["labels"]) < _dice(searched, moving_labels, slab["labels"]) - 0.2


def test_the_check_falls_back_when_the_refinement_makes_it_worse(subject, capfd):
    moving, fixed, moving_labels, fixed_labels = _pair(subject, 0.55, 8.0)
    # A refinement that runs away: a learning rate 100 times too large sends the affine far off.
    wild = RefineConfig.preset(2, affine_lr=1.0, field_lr=1.0)
    result = register(None, moving, fixed, refine=wild, spacing=SPACING)
    assert result.check.verdict == "fallback", result.check
    assert result.check.chosen in ("start", "header")
    assert result.check.scores["result"] is None or result.check.scores["result"] > min(
        v for k, v in result.check.scores.items() if k != "result" and v is not None)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "check: the registration was rejected" in err[0] and "kept the" in err[0]
    unchecked = register(None, moving, fixed, refine=wild, spacing=SPACING, check=False)
    assert unchecked.check is None
    assert _dice(result, moving_labels, fixed_labels) > _dice(unchecked, moving_labels, fixed_labels) + 0.1
    # A sound refinement keeps its answer.
    sound = register(None, moving, fixed, refine="auto", spacing=SPACING)
    assert sound.check.verdict == "ok" and sound.check.chosen == "result"


def test_check_keeps_the_answer_on_a_tie_and_refuses_an_implausible_one():
    fixed = torch.rand(2, 1, 32, 40) * 2 - 1
    moving = fixed.clone()
    identity = spatial.identity_affine(2, 2)
    zero = torch.zeros(2, 2, 32, 40)
    mirrored = identity.clone()
    mirrored[1, 0, 0] = -1.0  # a reflection for the second pair
    theta, _, reports = check(moving, fixed, [Candidate("result", mirrored, zero), Candidate("header", identity, zero)],
                              default_bounds(2))
    assert reports[0].verdict == "ok"
    assert reports[1].verdict == "fallback" and "reflection" in reports[1].reason
    assert torch.equal(theta[1], identity[1])


def test_an_answer_may_drift_a_little_past_the_rotation_bound_and_a_start_may_not():
    # A 3D head turned 43.8 deg came back turned 46 deg and was thrown away for its start (EPE 14 mm);
    # the answer, optimised from a start within the bound, is kept up to DRIFT_DEG past it.
    from firekit.registration.check import DRIFT_DEG

    shape = (36, 36)  # square: a normalised turn is a voxel turn
    fixed = torch.rand(1, 1, *shape) * 2 - 1
    zero = torch.zeros(1, 2, *shape)
    identity = spatial.identity_affine(2, 1)
    bound = default_bounds(2).max_rotation_deg

    def turned(degrees):
        return spatial.affine_matrix(2, rotation=degrees)

    verdicts = {}
    for degrees in (bound + DRIFT_DEG / 2, bound + 2 * DRIFT_DEG):
        _, _, reports = check(fixed, fixed, [Candidate("result", turned(degrees), zero),
                                             Candidate("header", identity, zero)], default_bounds(2))
        verdicts[degrees] = reports[0].verdict
    assert verdicts == {bound + DRIFT_DEG / 2: "ok", bound + 2 * DRIFT_DEG: "fallback"}
    near = turned(bound + DRIFT_DEG / 2)
    assert implausible(near, shape, default_bounds(2)) != [None]  # as a start it stays out
    assert implausible(near, shape, default_bounds(2).drifted()) == [None]
    assert default_bounds(2, "search-axes").drifted().max_rotation_deg is None


def test_cli_init_search_axes_and_the_check_in_its_json(subject, tmp_path, capsys):
    from firekit.cli import main

    volumes, slices = subject
    slab = _slice(volumes, slices, 0.55)
    io.save_nifti(np.ascontiguousarray(slab["T2"].data[::-1, ::-1]), slab["T2"].affine, tmp_path / "moving.nii.gz")
    io.save_nifti(slab["T1"].data, slab["T1"].affine, tmp_path / "fixed.nii.gz")
    io.save_nifti(np.ascontiguousarray(slab["labels"].data[::-1, ::-1]).astype(np.int16), slab["labels"].affine,
                  tmp_path / "moving_labels.nii.gz")
    dice = {}
    for init in ("header", "search-axes"):
        out = tmp_path / init
        assert main(["register", "--no-network", "--moving", str(tmp_path / "moving.nii.gz"), "--fixed",
                     str(tmp_path / "fixed.nii.gz"), "--out", str(out / "warped.nii.gz"), "--moving-labels",
                     str(tmp_path / "moving_labels.nii.gz"), "--out-labels", str(out / "labels.nii.gz"),
                     "--init", init, "--spacing", str(SPACING), "--json"]) in (0, None)
        summary = json.loads(capsys.readouterr().out)
        assert summary["check"]["verdict"] in ("ok", "fallback") and "scores" in summary["check"]
        warped = io.load_labels(out / "labels.nii.gz").data
        scores = metrics.dice(torch.as_tensor(warped.astype(np.int64)),
                              torch.as_tensor(slab["labels"].data.astype(np.int64)), (1, 2, 3))
        dice[init] = float(np.mean(list(scores.values())))
    assert dice["search-axes"] > 0.75 and dice["header"] < dice["search-axes"] - 0.2, dice


def test_the_fft_shift_search_finds_a_known_shift():
    """``RefineConfig.shift_reach`` (off by default): a candidate off by a known shift is moved back,
    and its score is the plain similarity at the moved candidate up to the features at the border
    (the padded grid gives MIND its context there)."""
    from firekit.registration.moments import _best_shifts, _score_affines
    from firekit.core.similarity import get_similarity

    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 40), indexing="ij"))
    blob = torch.exp(-((grid[0] - 0.1) ** 2 / 0.1 + (grid[1] + 0.2) ** 2 / 0.05))
    fixed = (blob * 2 - 1)[None, None].float()
    moving = fixed.clone()
    similarity = get_similarity("mind")
    features = similarity.features(fixed)
    off = spatial.identity_affine(2, 1)[:, None].clone()  # (1, 1, 2, 3)
    off[0, 0, :, 2] = torch.tensor([4 * 2 / 31, -3 * 2 / 39])  # 4 and -3 voxels
    moved, scores = _best_shifts(off, moving, features, similarity, reach=0.25)
    assert torch.allclose(moved[0, 0, :, 2], torch.zeros(2), atol=1e-5)
    plain = _score_affines(moving, features, moved, similarity)
    assert float(scores[0, 0]) == pytest.approx(float(plain[0, 0]), abs=5e-3)
    assert float(plain[0, 0]) < float(_score_affines(moving, features, off, similarity)[0, 0])



def test_the_moments_ignore_specks_of_background_noise():
    """``RefineConfig.foreground_opening``: noise above the foreground threshold, spread over the
    field of view, no longer pulls the centre of mass to the grid's centre nor swells the
    covariance (it made a 50 x 60 voxel vertex slice look 126 x 152)."""
    from firekit.registration.moments import _foreground_moments

    generator = torch.Generator().manual_seed(0)
    image = torch.full((1, 1, 96, 120), -1.0)
    image[0, 0, 10:40, 15:55] = 0.5  # a 30 x 40 voxel "brain" off the grid's centre
    specks = torch.rand(1, 1, 96, 120, generator=generator) < 0.15
    noisy = torch.where(specks, torch.full_like(image, -0.8), image)
    centre, cov = _foreground_moments(noisy, -0.9, opening=1)
    assert torch.allclose(centre[0], torch.tensor([24.5, 34.5], dtype=centre.dtype), atol=0.5), centre
    assert torch.allclose(cov[0].diagonal(), torch.tensor([(30 ** 2 - 1) / 12, (40 ** 2 - 1) / 12],
                                                          dtype=cov.dtype), rtol=0.05), cov
    raw_centre, raw_cov = _foreground_moments(noisy, -0.9, opening=0)
    assert float((raw_centre[0] - centre[0]).norm()) > 10 and float(raw_cov[0, 1, 1]) > 3 * float(cov[0, 1, 1])
    # A foreground thinner than the opening everywhere keeps its mask rather than vanishing.
    line = torch.full((1, 1, 32, 32), -1.0)
    line[0, 0, 16, 4:28] = 1.0
    assert torch.allclose(_foreground_moments(line, -0.9, opening=1)[0], _foreground_moments(line, -0.9)[0])


# Two protocol pairs of bench/gross_failures.py (T2-like -> T1, held-out subject 11, pairs 2 and
# 19) that --no-network got grossly wrong (EPE 28.1 and 14.5 mm, Dice 0.45, 0.49) before the moments'
# foreground was opened and the FFT shifts became a family of their own. The right affine scored
# best at every scale, but the search never came near it: the moving brain is stretched about 1.5x
# and cut by the field of view, and background specks above the threshold swelled the moments.
# After: 3.9 and 1.9 mm (Dice 0.72, 0.78).
def test_protocol_pairs_whose_start_the_centres_of_mass_misplace(tmp_path):
    from bench.gross_failures import SLICE_BAND, _score
    from bench.vs_ants import load_pair
    from firekit.data.braindata import demo_subject
    from firekit.data.protocol import make_test_pairs

    subject_dir = tmp_path / "subj011"
    for name, volume in demo_subject(11).items():
        if name in ("T1", "T2", "labels"):
            io.save_nifti(volume.data, volume.affine, subject_dir / f"{name}.nii.gz")
    # The bench's seed for this case: 1000 * subject + 17 * ndim + the 126 pairs built before it.
    pairs = make_test_pairs(subject_dir, tmp_path / "pairs", 20, ndim=2, moving="T2", fixed="T1",
                            seed=1000 * 11 + 17 * 2 + 126, slice_band=SLICE_BAND)
    for index in (2, 19):
        volumes = load_pair(pairs[index])
        result = register(None, volumes["moving"], volumes["fixed"], direction="b2a", refine="auto")
        scores = _score(result.displacement, volumes)
        assert scores["epe"] < 6.0 and scores["dice"] > 0.65, (index, scores)


def test_large_images_are_checked_on_a_coarser_grid_with_the_same_choice(monkeypatch):
    from firekit.data.phantom import phantom_pair
    from firekit.registration import check as check_module

    assert check_module.coarsening((128, 160, 128)) == 2 and check_module.coarsening((256, 320, 256)) == 4
    assert check_module.coarsening((64, 80, 64)) == 1 and check_module.coarsening((1024, 1024)) == 1
    shape = (104, 112, 96)  # 1.1 M voxels: scored on a grid twice as coarse
    identity = spatial.identity_affine(3, 1)
    pair = phantom_pair(shape, identity, seed=3)
    candidates = []
    for name, shift in (("result", 0.25), ("start", 0.04), ("header", 0.0)):
        theta = identity.clone()
        theta[0, 0, 3] = shift
        candidates.append(Candidate(name, theta, spatial.affine_to_displacement(theta, shape)))
    coarse = check(pair.x_b, pair.x_a, candidates, default_bounds(3))[2][0]
    monkeypatch.setattr(check_module, "_MAX_VOXELS", 10 ** 9)  # every voxel
    full = check(pair.x_b, pair.x_a, candidates, default_bounds(3))[2][0]
    assert coarse.verdict == full.verdict == "fallback" and coarse.chosen == full.chosen == "header"
    rank = lambda report: sorted(report.scores, key=report.scores.get)  # noqa: E731
    assert rank(coarse) == rank(full) == ["header", "start", "result"]


def test_search_axes_keeps_the_answer_within_the_bound_where_its_own_fits_worse(subject, monkeypatch):
    # A wider search can lead refinement to a worse optimum (bench/rotations.md): here the searched
    # refinement is made to answer a 90-degree turn; the answer within the header bound is a
    # candidate of the check, which keeps it.
    from firekit.registration import refine as refine_module

    moving, fixed, moving_labels, fixed_labels = _pair(subject, 0.55, 12.0)
    original = refine_module.refine

    def astray(*args, **kwargs):
        result = original(*args, **kwargs)
        if kwargs["config"].orientation != "search-axes":
            return result
        quarter = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]).expand_as(result.theta)
        shape = result.displacement.shape[2:]
        displacement = spatial.affine_to_displacement(quarter, shape)
        return result._replace(theta=quarter, displacement=displacement, nonrigid=torch.zeros_like(displacement),
                               warped=spatial.warp(args[0], displacement))

    monkeypatch.setattr(refine_module, "refine", astray)
    bounded = register(None, moving, fixed, refine="auto", spacing=SPACING, symmetric=False)
    searched = register(None, moving, fixed, refine="auto", spacing=SPACING, symmetric=False,
                        orientation="search-axes")
    assert searched.check.chosen == "header-bound", searched.check
    assert searched.check.scores["header-bound"] < searched.check.scores["result"]
    assert _dice(searched, moving_labels, fixed_labels) == pytest.approx(_dice(bounded, moving_labels, fixed_labels))
