"""A small 2D FIRE model learns a known affine on the CPU (small preset's rates)."""

import torch

from firekit import Fire, FireConfig, TrainConfig, make_optimizers, train_step
from firekit.core import metrics, spatial
from firekit.data.phantom import phantom_pair

STEPS = 100


def brain_dice(labels_warped, labels_fixed):
    """Dice of the brain mask (CSF + GM + WM, labels 1-3)."""
    warped = (labels_warped >= 1) & (labels_warped <= 3)
    fixed = (labels_fixed >= 1) & (labels_fixed <= 3)
    return metrics.dice(warped.long(), fixed.long(), labels=[1])[1]


def test_small_model_recovers_a_known_affine_between_two_contrasts():
    torch.manual_seed(0)
    theta = spatial.affine_matrix(2, rotation=25.0, scale=(1.3, 0.85), translation=(0.15, -0.1))
    pair = phantom_pair((64, 64), theta, seed=1, contrasts=("t1", "t2"))
    before = brain_dice(pair.labels_a, pair.labels_b)
    assert before < 0.82  # the test must be able to fail

    model = Fire(FireConfig.from_preset("small", 2))
    config = TrainConfig.from_preset("small")
    optimizers = make_optimizers(model, config)
    totals = [float(train_step(model, optimizers, pair.x_a, pair.x_b, config.grad_clip).total) for _ in range(STEPS)]

    model.eval()
    with torch.no_grad():
        result = model.register(pair.x_a, pair.x_b, direction="a2b")
    after = brain_dice(spatial.warp_labels(pair.labels_a, result.displacement), pair.labels_b)
    assert after >= 0.9, f"brain Dice {before:.3f} -> {after:.3f} after {STEPS} steps"
    assert sum(totals[-10:]) / 10 < 0.7 * sum(totals[:10]) / 10, "the loss did not fall"
    assert metrics.folding_fraction(result.displacement) < 0.01
