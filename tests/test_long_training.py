"""Long training as a normal thing: keypoint T_af, cosine schedule, EMA weights, recipes, resume;
and a short recipe run that learns at full augmentation strength (tiny demo brains, CPU)."""

import argparse

import pytest
import torch

import firekit
from firekit import Fire, FireConfig, FirekitError
from firekit.core import metrics, spatial
from firekit.fire.checkpoint import save_model
from firekit.fire.losses import transform_supervision
from firekit.registration.start import prealign
from firekit.fire.nets import KeypointAffineHead, fit_affine, soft_centroids
from firekit.training.config import TrainConfig
from firekit.training.loop import train
from firekit.training.optim import make_optimizers, make_schedulers
from firekit.workflows import RECIPES


@pytest.mark.parametrize("ndim", [2, 3])
def test_fit_affine_recovers_a_known_affine_and_identical_points_give_the_identity(ndim):
    generator = torch.Generator().manual_seed(ndim)
    theta = spatial.affine_matrix(ndim, rotation=[0.3] * (1 if ndim == 2 else 3), scale=[1.2] + [0.9] * (ndim - 1),
                                  translation=[0.1] * ndim)
    points = torch.rand(2, 12, ndim, generator=generator) * 2 - 1
    moved = points @ theta[0, :, :ndim].T + theta[0, :, ndim]
    fitted = fit_affine(points, moved, ridge=1e-8)
    torch.testing.assert_close(fitted, theta.expand(2, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(fit_affine(points, points), spatial.identity_affine(ndim, 2), atol=1e-6, rtol=0)
    # Collapsed points (all at one place) cannot say anything about A: the ridge keeps it the identity.
    collapsed = torch.zeros(1, 8, ndim)
    torch.testing.assert_close(fit_affine(collapsed, collapsed + 0.2)[0, :, :ndim], torch.eye(ndim), atol=1e-6, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_soft_centroids_find_a_spot_in_array_axis_order(ndim):
    shape = (9, 11, 7)[:ndim]
    index = (2, 8, 5)[:ndim]
    heat = torch.full((1, 2, *shape), -40.0)
    heat[(0, slice(None), *index)] = 40.0
    expected = torch.tensor([-1 + 2 * i / (s - 1) for i, s in zip(index, shape)])
    torch.testing.assert_close(soft_centroids(heat)[0], expected.expand(2, ndim), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_keypoint_head_is_translation_equivariant_on_features(ndim):
    """Shifting the moving features shifts the predicted affine's translation the same way
    (what lets this head learn where GAP has to learn to read positions)."""
    torch.manual_seed(0)
    head = KeypointAffineHead(ndim, 2 * 4, (8, 8, 8), keypoints=6)
    size = 24 if ndim == 2 else 16
    blob = torch.zeros(1, 4, *(size,) * ndim)
    centre = (slice(None), slice(None), *[slice(size // 2 - 3, size // 2 + 3)] * ndim)
    blob[centre] = torch.randn(1, 4, *(6,) * ndim)
    shifted = torch.roll(blob, shifts=4, dims=2)  # 4 feature voxels along axis 0
    with torch.no_grad():
        for layer in head.heatmaps.parameters():
            layer.mul_(20.0)  # sharp heatmaps: the centroids sit on the blob, not the background
        moving_points, fixed_points = head.keypoints(torch.cat([shifted, blob], dim=1))
        theta = head(torch.cat([blob, blob], dim=1))
    expected = 2 * 4 / (size - 1)  # normalised
    moved = (moving_points - fixed_points)[0]  # (K, ndim)
    assert moved[:, 0].mean() == pytest.approx(expected, abs=0.25 * expected)
    # most points move along axis 0 only (a point whose heatmap has two peaks may jump)
    assert moved[:, 1:].abs().amax(dim=1).median() < 0.1 * expected
    torch.testing.assert_close(theta, spatial.identity_affine(ndim), atol=1e-5, rtol=0)  # same image: identity


def test_keypoint_pooling_is_a_model_option_saved_with_the_checkpoint(tmp_path):
    model = Fire(FireConfig.from_preset("small", 2, affine_pooling="keypoints"))
    assert isinstance(model.transform_ab.affine, KeypointAffineHead)
    loaded = firekit.load(save_model(model, tmp_path / "m.pt"))
    assert loaded.config.affine_pooling == "keypoints"
    x = torch.rand(1, 1, 48, 48) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.register(x, x).theta, model.register(x, x).theta)
    with pytest.raises(FirekitError, match="affine_pooling"):
        FireConfig(affine_pooling="max")


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    model = Fire(FireConfig.from_preset("small", 2))
    config = TrainConfig(lr_affine=1e-3, schedule="cosine", warmup_steps=4, iterations=20, min_lr_fraction=0.1)
    optimizers = make_optimizers(model, config)
    schedulers = make_schedulers(optimizers, config)
    rates = []
    for _ in range(20):
        rates.append(optimizers["affine"].param_groups[0]["lr"])
        optimizers["affine"].step()
        for scheduler in schedulers.values():
            scheduler.step()
    import math

    def expected(k):
        return 1e-3 * min(1.0, (k + 1) / 4) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 20)))

    assert rates == pytest.approx([expected(k) for k in range(20)], rel=1e-6)
    assert rates[0] == pytest.approx(1e-3 / 4 * (0.1 + 0.9))
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))  # non-increasing after the warm-up
    assert rates[-1] < 0.12e-3  # near the floor at the end
    assert make_schedulers(optimizers, TrainConfig()) == {}
    with pytest.raises(FirekitError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(FirekitError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


class TinyPairs:
    """Two-image pairs that change with the step, for resume checks (no known answer)."""

    ndim = 2

    def sample(self, step, batch_size):
        generator = torch.Generator().manual_seed(step)
        x = torch.rand(batch_size, 1, 32, 32, generator=generator) * 2 - 1
        return {"x_a": x, "x_b": torch.roll(x, 2, dims=3)}


def _tiny_run(out, iterations, resume=False, stop_at=None):
    """A tiny run; ``stop_at``: interrupted (Ctrl-C) after that step, as a killed session would be."""
    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset("small", 2, affine_pooling="keypoints"))
    config = TrainConfig(lr_affine=1e-3, lr_nonrigid=1e-3, lr_synthesis=1e-3, iterations=iterations, schedule="cosine",
                         warmup_steps=2, ema_decay=0.5, checkpoint_every=0, val_every=0)

    def interrupt(step, terms):
        if step == stop_at:
            raise KeyboardInterrupt

    try:
        train(model, TinyPairs(), config, out, resume=resume, progress=False, callback=interrupt)
    except KeyboardInterrupt:
        pass
    return model


def test_ema_weights_and_schedule_resume_as_an_uninterrupted_run_and_load_anywhere(tmp_path):
    straight = _tiny_run(tmp_path / "straight", 4)
    _tiny_run(tmp_path / "split", 4, stop_at=2)
    resumed = _tiny_run(tmp_path / "split", 4, resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    ema_straight = firekit.load(tmp_path / "straight" / "model_ema.pt")
    ema_resumed = firekit.load(tmp_path / "split" / "model_ema.pt")
    for key, value in ema_straight.state_dict().items():
        assert torch.equal(value, ema_resumed.state_dict()[key]), key
    # The EMA is an average of the weights seen, not the last weights.
    differs = [k for k, v in ema_straight.state_dict().items() if not torch.equal(v, straight.state_dict()[k])]
    assert differs
    assert ema_straight.config == straight.config


def test_recipe_fills_what_the_command_line_left_and_flags_win():
    from firekit import cli

    assert set(cli.RECIPE_NAMES) == set(RECIPES)
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--a", "a", "--b", "b", "--out", "o", "--recipe", "learn2d",
                              "--iterations", "30"])
    cli._apply_recipe(args, args.train_parser)
    assert args.iterations == 30  # given: kept
    recipe = RECIPES["learn2d"]
    for key in ("affine_pooling", "aux_weight", "schedule", "ema_decay", "batch_size", "spacing", "lr_synthesis"):
        assert getattr(args, key) == recipe[key], key
    assert isinstance(args, argparse.Namespace)


# ------------------------------------------------------------------ a short recipe run that learns
class WarpedPhantoms:
    """T1 -> T2 phantom heads (48 x 48) whose B is A's anatomy under a random affine (rotation
    +-8 deg, scale +-6 %, shift +-3 px) and a smooth elastic warp (up to 5 px), with the known answer;
    each draw a new anatomy. The moments start can undo the affine part only."""

    ndim = 2

    def __init__(self, seed):
        self.seed = seed

    def pair(self, index):
        from firekit.data.augment import AugmentConfig, random_transform
        from firekit.data.phantom import contrast, head_labels

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        config = AugmentConfig(scale_change=(0.0, 0.06), scale_jitter=0.03, rotation_deg=8.0, shear=0.02,
                               translation_mm=3.0, elastic_mm=5.0, elastic_spacing_mm=16.0)
        moved = random_transform((48, 48), 1.0, generator, config).displacement  # B(x) = A(x + u(x))
        labels_a = head_labels((48, 48), seed=index)[None, None]
        labels_b = spatial.warp_labels(labels_a, moved)
        noise = self.seed * 7919 + index
        x_a = contrast(labels_a[0, 0], "t1", seed=noise)[None, None] * 2 - 1
        x_b = contrast(labels_b[0, 0], "t2", seed=noise + 1)[None, None] * 2 - 1
        return {"x_a": x_a, "x_b": x_b, "labels_a": labels_a, "labels_b": labels_b,
                "u_a2b": moved, "u_b2a": spatial.invert_displacement(moved)}

    def sample(self, step, batch_size):
        pairs = [self.pair(step * batch_size + j) for j in range(batch_size)]
        return {key: torch.cat([p[key] for p in pairs]) for key in pairs[0]}


def _recipe_config(iterations, **overrides):
    settings = {k: v for k, v in RECIPES["learn2d"].items()
                if k not in ("preset", "spacing", "affine_pooling", "batch_size")}
    settings.update(iterations=iterations, warmup_steps=20, ema_decay=0.9, val_every=0, checkpoint_every=0,
                    batch_size=4, **overrides)
    return TrainConfig.from_preset("small", **settings)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """The learn2d recipe (keypoint T_af, paper terms + auxiliary loss at full strength, cosine,
    EMA) for a short run on warped phantoms; returns the run folder."""
    out = tmp_path_factory.mktemp("learn") / "run"
    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset("small", 2, affine_pooling="keypoints"))
    train(model, WarpedPhantoms(seed=0), _recipe_config(350), out, progress=False)
    return out


def _held_out():
    return [WarpedPhantoms(seed=1).sample(i, 4) for i in range(3)]


def test_the_supervised_error_falls_at_full_augmentation_strength(learned):
    batches = _held_out()
    torch.manual_seed(0)
    untrained = Fire(FireConfig.from_preset("small", 2, affine_pooling="keypoints")).eval()
    trained = firekit.load(learned / "model_ema.pt").eval()

    def error(model):
        with torch.no_grad():
            return sum(float(transform_supervision(model.register(b["x_a"], b["x_b"]).displacement, b["u_a2b"]))
                       for b in batches) / len(batches)

    before, after = error(untrained), error(trained)
    assert after < 0.5 * before, f"held-out supervised error {before:.5f} -> {after:.5f}"


def test_a_short_run_registers_held_out_phantoms_better_than_the_moments_start(learned):
    batches = _held_out()
    trained = firekit.load(learned / "model_ema.pt").eval()
    moments = Fire(FireConfig.from_preset("small", 2, prealign="moments")).eval()  # untrained: its start alone

    def dice(model, affine_only):
        scores = []
        with torch.no_grad():
            for b in batches:
                start = prealign(model.config, b["x_a"], b["x_b"])
                moved = spatial.warp_labels(b["labels_a"], model.register(b["x_a"], b["x_b"], affine_only=affine_only,
                                                                          theta0=start).displacement)
                scores += [sum(d.values()) / 4 for d in (metrics.dice(m, f, [1, 2, 3, 4])
                                                          for m, f in zip(moved, b["labels_b"]))]
        return sum(scores) / len(scores)

    unaligned = sum(sum(metrics.dice(a, f, [1, 2, 3, 4]).values()) / 4
                    for b in batches for a, f in zip(b["labels_a"], b["labels_b"])) / (4 * len(batches))
    start, network = dice(moments, True), dice(trained, False)
    assert start > unaligned  # the start is a real competitor
    assert network > start + 0.02, f"network alone {network:.3f} vs moments start {start:.3f} (unaligned {unaligned:.3f})"


def test_init_copies_weights_and_refuses_another_model(learned):
    from firekit.workflows import _start_from

    model = Fire(FireConfig.from_preset("small", 2, affine_pooling="keypoints"))
    _start_from(model, learned / "model_ema.pt")
    source = firekit.load(learned / "model_ema.pt")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(FirekitError, match="--init model differs"):
        _start_from(Fire(FireConfig.from_preset("small", 2)), learned / "model_ema.pt")


def test_gpu_training_script_fills_its_budget_and_writes_every_output_on_the_cpu(demo_data, tmp_path):
    """bench/gpu_train.py with a budget of seconds on the CPU: the same path a GPU session runs."""
    import json

    from bench import gpu_train

    out = tmp_path / "gpu"
    assert gpu_train.main(["--out", str(out), "--minutes", "0.05", "--configs", "2d", "--data", str(demo_data()),
                           "--device", "cpu", "--probe-steps", "3"]) == 0
    for name in ("model.pt", "model_ema.pt", "losses.csv", "validation.csv", "config.yaml"):
        assert (out / "2d" / name).is_file(), name
    (row,) = json.loads((out / "throughput.json").read_text())
    assert row["iterations"] >= 2 and row["it_per_s"] > 0 and row["peak_memory_mb"] > 0
    assert row["projected_hours_144k"] == pytest.approx(144_000 / row["it_per_s"] / 3600)
    assert firekit.load(out / "2d" / "model_ema.pt").config.affine_pooling == "keypoints"
    assert not list(out.glob(".probe_*"))


def test_grad_cam_explains_the_keypoint_affine_head():
    from firekit.explain.maps import grad_cam

    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset("small", 2, affine_pooling="keypoints")).eval()
    batch = WarpedPhantoms(seed=2).sample(0, 2)
    cam = grad_cam(model, batch["x_a"], batch["x_b"], "affine")
    assert cam.shape == (2, 48, 48) and torch.isfinite(cam).all()
    assert float(cam.amax()) == pytest.approx(1.0)  # something pushes the affine: a map, not zeros


def test_the_paper_preset_stays_the_papers():
    paper = TrainConfig.from_preset("paper")
    assert (paper.schedule, paper.ema_decay, paper.aux_weight) == ("constant", 0.0, 0.0)
    assert (paper.lr_affine, paper.lr_nonrigid, paper.lr_synthesis) == (1e-5, 5e-5, 1e-4)
    assert FireConfig.from_preset("paper").affine_pooling == "mean"
    model = Fire(FireConfig.from_preset("paper", 2))
    assert type(model.transform_ab.affine).__name__ == "AffineHead"
