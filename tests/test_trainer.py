"""train(): the run folder, its logs and checkpoints, and exact resume (tiny 2D phantoms, CPU)."""

import csv
import math
import signal

import pytest
import torch
import yaml

import firekit
from firekit import Fire, FireConfig, FireLoss, FirekitError
from firekit.core import spatial
from firekit.training import loop as loop_module
from firekit.training import step as step_module
from firekit.fire.checkpoint import load_checkpoint
from firekit.data.phantom import phantom_pair
from firekit.training.checkpoints import RUN_FILES
from firekit.training.config import TrainConfig
from firekit.training.loop import TrainResult, train
from firekit.training.step import train_step

SIZE = 32


class PhantomSource:
    """Pairs of phantom heads moved by a random affine; a pure function of (seed, step)."""

    def __init__(self, ndim=2, size=SIZE, seed=0):
        self.ndim, self.size, self.seed = ndim, size, seed

    def pair(self, index):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        angles = (torch.rand(1 if self.ndim == 2 else 3, generator=generator) * 30 - 15).tolist()
        shift = (torch.rand(self.ndim, generator=generator) * 0.2 - 0.1).tolist()
        theta = spatial.affine_matrix(self.ndim, rotation=angles, translation=shift)
        return phantom_pair((self.size,) * self.ndim, theta, seed=index % 5)

    def sample(self, step, batch_size):
        pairs = [self.pair(step * batch_size + j) for j in range(batch_size)]
        return {key: torch.cat([getattr(p, key) for p in pairs]) for key in ("x_a", "x_b", "labels_a", "labels_b")}

    def describe(self):
        return {"kind": "phantom", "shape": [self.size] * self.ndim, "seed": self.seed}


class FailingSource(PhantomSource):
    """Raises ``error`` when asked for the batch of 0-based step ``at``."""

    def __init__(self, at, error, **kwargs):
        super().__init__(**kwargs)
        self.at, self.error = at, error

    def sample(self, step, batch_size):
        if step == self.at:
            raise self.error
        return super().sample(step, batch_size)


def small_model(ndim=2, seed=0, **overrides):
    torch.manual_seed(seed)
    return Fire(FireConfig.from_preset("small", ndim, **overrides))


def small_config(**overrides):
    settings = dict(iterations=3, val_every=100, checkpoint_every=100, warmup_steps=4)
    return TrainConfig.from_preset("small", **{**settings, **overrides})


def read_csv(path):
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def loss_rows(path):
    _, rows = read_csv(path)
    return {int(r["step"]): [float(r[f]) for f in FireLoss._fields] for r in rows}


def validation_batches(n=2):
    source = PhantomSource(seed=7)
    return [source.sample(i, 1) for i in range(n)]


# ------------------------------------------------------------------------------------- config
def test_train_config_round_trips_and_rejects_bad_values():
    config = small_config(seed=3, batch_size=2)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    with pytest.raises(FirekitError, match="unknown fields"):
        TrainConfig.from_dict({**config.to_dict(), "lr": 1.0})
    with pytest.raises(FirekitError, match="batch_size"):
        TrainConfig(batch_size=0)
    assert TrainConfig.from_preset("paper").iterations == 144_000


# ------------------------------------------------------------------------------------- run folder
def test_out_dir_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FirekitError, match="is not empty; pass --resume to continue or --overwrite") as error:
        train(small_model(), PhantomSource(), small_config(), run, progress=False)
    assert "\n" not in str(error.value)

    train(small_model(), PhantomSource(), small_config(), run, overwrite=True, progress=False)
    assert {p.name for p in run.iterdir()} == {"notes.txt", "checkpoint.pt", "model.pt", "config.yaml", "losses.csv"}

    # Starting again removes firekit's files only, and the new log starts from step 1.
    (run / "validation.csv").write_text("stale")
    train(small_model(), PhantomSource(), small_config(iterations=2), run, overwrite=True, progress=False)
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "validation.csv").exists()
    assert sorted(loss_rows(run / "losses.csv")) == [1, 2]

    with pytest.raises(FirekitError, match="not both"):
        train(small_model(), PhantomSource(), small_config(), run, resume=True, overwrite=True, progress=False)
    with pytest.raises(FirekitError, match="checkpoint.pt not found") as error:
        train(small_model(), PhantomSource(), small_config(), tmp_path / "empty", resume=True, progress=False)
    assert "\n" not in str(error.value)


def test_logs_config_and_model_files(tmp_path):
    run = tmp_path / "run"
    model, source = small_model(), PhantomSource()
    config = small_config(iterations=3, val_every=2)
    result = train(model, source, config, run, validation=validation_batches(), progress=True, extra={"note": "hi"})

    assert isinstance(result, TrainResult) and result.out_dir == run and result.steps == 3
    assert set(result.losses) == set(FireLoss._fields) and result.seconds > 0

    fields, rows = read_csv(run / "losses.csv")
    assert fields == ["step", *FireLoss._fields, "seconds"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r[f])) for r in rows for f in fields)
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds)
    assert {k: float(v) for k, v in rows[-1].items() if k in FireLoss._fields} == result.losses

    fields, rows = read_csv(run / "validation.csv")
    assert fields == ["step", "dice_a2b", "dice_b2a", "dice_mean"]
    assert [int(r["step"]) for r in rows] == [2, 3]  # every val_every and at the end
    dice = [[float(r[k]) for k in fields[1:]] for r in rows]
    assert all(0.0 <= d <= 1.0 for row in dice for d in row)
    assert result.best_val_dice == max(row[2] for row in dice)
    assert result.best_step in (2, 3) and (run / "model_best.pt").is_file()

    document = yaml.safe_load((run / "config.yaml").read_text())
    assert FireConfig.from_dict(document["model"]) == model.config
    assert TrainConfig.from_dict(document["train"]) == config
    assert document["data"] == source.describe()
    assert document["firekit_version"] == firekit.__version__

    loaded = firekit.load(run / "model.pt")
    assert loaded.config == model.config
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    _, extra = load_checkpoint(run / "model.pt")
    assert extra == {"train": config.to_dict(), "step": 3, "data": source.describe(), "note": "hi"}

    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    assert payload["extra"]["step"] == 3 and set(payload["extra"]["optimizers"]) == {"affine", "nonrigid", "synthesis"}


# ------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Run A: 6 steps without a break (the warm-up of 4 steps spans the breaks below)."""
    run = tmp_path_factory.mktemp("straight")
    model = small_model()
    train(model, PhantomSource(), small_config(iterations=6), run, progress=False)
    return loss_rows(run / "losses.csv"), {k: v.clone() for k, v in model.state_dict().items()}


def assert_matches_straight_run(run, model, straight_run):
    rows_a, weights_a = straight_run
    rows_b = loss_rows(run / "losses.csv")
    assert sorted(rows_b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert torch.allclose(torch.tensor(rows_b[step]), torch.tensor(rows_a[step]), rtol=1e-5, atol=0), step
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, weights_a[name], rtol=1e-5, atol=1e-7), name


def test_resume_continues_exactly(tmp_path, straight_run):
    run = tmp_path / "run"
    train(small_model(), PhantomSource(), small_config(iterations=3, checkpoint_every=3), run, progress=False)
    # A freshly initialised model: the weights must come from the checkpoint.
    model = small_model(seed=123)
    result = train(model, PhantomSource(), small_config(iterations=6, checkpoint_every=3), run, resume=True,
                   progress=False)
    assert result.steps == 6
    assert_matches_straight_run(run, model, straight_run)


def test_resume_after_a_crash_drops_the_rows_past_the_checkpoint(tmp_path, straight_run):
    run = tmp_path / "run"
    crashing = FailingSource(at=4, error=RuntimeError("disk gone"))
    with pytest.raises(RuntimeError, match="disk gone"):
        train(small_model(), crashing, small_config(iterations=6, checkpoint_every=3), run, progress=False)
    assert sorted(loss_rows(run / "losses.csv")) == [1, 2, 3, 4]  # step 4 is past the checkpoint
    model = small_model(seed=123)
    train(model, PhantomSource(), small_config(iterations=6, checkpoint_every=3), run, resume=True, progress=False)
    assert_matches_straight_run(run, model, straight_run)


def test_interrupt_checkpoints_the_last_step(tmp_path, straight_run):
    run = tmp_path / "run"
    interrupted = FailingSource(at=4, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train(small_model(), interrupted, small_config(iterations=6, checkpoint_every=100), run, progress=False)
    assert load_checkpoint(run / "checkpoint.pt")[1]["step"] == 4
    model = small_model(seed=123)
    train(model, PhantomSource(), small_config(iterations=6), run, resume=True, progress=False)
    assert_matches_straight_run(run, model, straight_run)


def test_ctrl_c_lets_the_running_step_finish(tmp_path):
    class CtrlC(PhantomSource):
        def sample(self, step, batch_size):
            if step == 1:
                signal.raise_signal(signal.SIGINT)  # arrives while step 2 is being fetched
            return super().sample(step, batch_size)

    run = tmp_path / "run"
    # Python's own handler, whatever pytest was started under (a background job ignores SIGINT,
    # and train() then rightly leaves it ignored).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(small_model(), CtrlC(), small_config(iterations=5), run, progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
    assert load_checkpoint(run / "checkpoint.pt")[1]["step"] == 2
    assert sorted(loss_rows(run / "losses.csv")) == [1, 2]


def test_resume_refuses_a_different_model(tmp_path):
    run = tmp_path / "run"
    train(small_model(), PhantomSource(), small_config(iterations=2), run, progress=False)
    with pytest.raises(FirekitError, match="different model") as error:
        train(small_model(flow_channels=16), PhantomSource(), small_config(iterations=3), run, resume=True,
              progress=False)
    assert "\n" not in str(error.value) and "flow_channels" in str(error.value)
    with pytest.raises(FirekitError, match="past iterations"):
        train(small_model(), PhantomSource(), small_config(iterations=1), run, resume=True, progress=False)


# ------------------------------------------------------------------------------------- failures
def test_non_finite_loss_is_a_one_line_error(tmp_path, monkeypatch):
    fire_loss = step_module.fire_loss

    def exploding(out, x_a, x_b):
        loss = fire_loss(out, x_a, x_b)
        return loss._replace(total=loss.total * math.inf)

    run = tmp_path / "run"
    train(small_model(), PhantomSource(), small_config(iterations=2), run, progress=False)
    monkeypatch.setattr(step_module, "fire_loss", exploding)
    with pytest.raises(FirekitError, match="step 3: loss became inf.*holds step 2") as error:
        train(small_model(), PhantomSource(), small_config(iterations=4), run, resume=True, progress=False)
    assert "\n" not in str(error.value)


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(FirekitError, match="3D but the model is 2D"):
        train(small_model(), PhantomSource(ndim=3), small_config(), tmp_path / "a", progress=False)
    batches = validation_batches(1)
    del batches[0]["labels_b"]
    with pytest.raises(FirekitError, match="labels_b"):
        train(small_model(), PhantomSource(), small_config(), tmp_path / "b", validation=batches, progress=False)


def test_train_step_autocast_keeps_float32_losses():
    pair = PhantomSource().pair(0)
    model = small_model()
    optimizers = firekit.make_optimizers(model, small_config())
    loss = train_step(model, optimizers, pair.x_a, pair.x_b, autocast=True)
    assert loss.total.dtype == torch.float32 and math.isfinite(float(loss.total))


def test_3d_smoke(tmp_path):
    run = tmp_path / "run"
    result = train(small_model(ndim=3), PhantomSource(ndim=3), small_config(iterations=2), run, progress=False)
    assert result.steps == 2 and sorted(loss_rows(run / "losses.csv")) == [1, 2]
    assert firekit.load(run / "model.pt").config.ndim == 3
    assert set(RUN_FILES) >= {p.name for p in run.iterdir()}


def test_auxiliary_loss_enters_the_total_only_when_weighted():
    from firekit.training.optim import make_optimizers

    batch = PhantomSource().sample(0, 1)
    x_a, x_b = batch["x_a"], batch["x_b"]
    field = torch.full((1, 2, *x_a.shape[2:]), 0.1)
    model = small_model()
    off = train_step(model, make_optimizers(model, small_config()), x_a, x_b, targets=(field, field))
    assert off.aux == 0.0
    model = small_model()
    on = train_step(model, make_optimizers(model, small_config()), x_a, x_b, targets=(field, field), aux_weight=2.0)
    assert float(on.aux) > 0.01
    fire_total = on.syn + on.reg + on.regularisation
    assert float(on.total) == pytest.approx(float(fire_total + 2.0 * on.aux), rel=1e-5)


# ------------------------------------------------------------------------------------- host syncs
@pytest.mark.parametrize("ndim", [2, 3])
def test_a_step_reads_nothing_back_from_the_device(ndim):
    """Meta tensors have no values: any read (``.item()``, ``if tensor``, a NaN check, a nonzero)
    raises, so a whole step running on them makes no host sync on a GPU either."""
    model = small_model(ndim=ndim).to("meta")
    optimizers = firekit.make_optimizers(model, small_config(grad_clip=1.0))
    x = torch.empty(2, 1, *(SIZE,) * ndim, device="meta")
    loss = train_step(model, optimizers, x, x, grad_clip=1.0, step=0, warmup_steps=3, check_finite=False)
    assert loss.total.device.type == "meta"
    with pytest.raises(Exception):  # the check this step leaves to the caller reads the loss
        train_step(model, optimizers, x, x, check_finite=True)


def test_reading_losses_every_few_steps_logs_the_same_rows(tmp_path, monkeypatch):
    reads = []
    read_losses = loop_module.read_losses
    monkeypatch.setattr(loop_module, "read_losses", lambda pending, world: reads.append(
        [p.step for p in pending]) or read_losses(pending, world))
    seen = []
    every_step = train(small_model(), PhantomSource(), small_config(iterations=7, checkpoint_every=100),
                       tmp_path / "a", progress=False)
    assert reads == [[k] for k in range(1, 8)]  # on the CPU: every step
    reads.clear()
    grouped = train(small_model(), PhantomSource(), small_config(iterations=7, sync_every=3, val_every=5),
                    tmp_path / "b", validation=validation_batches(1), progress=False,
                    callback=lambda step, terms: seen.append((step, "val_dice" in terms)))
    # every 3 steps, at the validation (step 5) and at the end
    assert reads == [[1, 2, 3], [4, 5], [6, 7]]
    assert loss_rows(tmp_path / "a" / "losses.csv") == loss_rows(tmp_path / "b" / "losses.csv")
    assert every_step.losses == grouped.losses
    assert seen == [(1, False), (2, False), (3, False), (4, False), (5, True), (6, False), (7, True)]


def test_a_non_finite_loss_found_late_keeps_the_checkpoint_before_it(tmp_path, monkeypatch):
    fire_loss = step_module.fire_loss

    def exploding_from_step_3(out, x_a, x_b):
        loss = fire_loss(out, x_a, x_b)
        return loss._replace(total=loss.total * (math.inf if calls.append(1) or len(calls) >= 3 else 1.0))

    calls = []
    monkeypatch.setattr(step_module, "fire_loss", exploding_from_step_3)
    run = tmp_path / "run"
    with pytest.raises(FirekitError, match="step 3: loss became inf.*holds step 2") as error:
        train(small_model(), PhantomSource(), small_config(iterations=8, sync_every=4, checkpoint_every=2), run,
              progress=False)
    assert "\n" not in str(error.value)
    assert len(calls) == 4  # found when steps 3 and 4 were read back
    assert load_checkpoint(run / "checkpoint.pt")[1]["step"] == 2
    assert sorted(loss_rows(run / "losses.csv")) == [1, 2]


def test_a_nan_batch_is_refused_before_the_step(tmp_path):
    class NaNSource(PhantomSource):
        def sample(self, step, batch_size):
            batch = super().sample(step, batch_size)
            if step == 1:
                batch["x_b"][0, 0, 3, 3] = math.nan
            return batch

    with pytest.raises(FirekitError, match=r"step 2: source.sample\(1\)\['x_b'\] contains NaN.*holds step 1"):
        train(small_model(), NaNSource(), small_config(iterations=3, checkpoint_every=1), tmp_path / "run",
              progress=False)


def test_channels_last_and_compile_train_the_same_model(tmp_path, monkeypatch):
    compiled, compile_ = [], torch.compile

    def compile_eagerly(module, **options):  # the wiring; inductor itself is measured in bench/throughput
        compiled.append(module)
        return compile_(module, backend="eager", **options)

    plain = train(small_model(), PhantomSource(), small_config(iterations=3), tmp_path / "plain", progress=False)
    monkeypatch.setattr(loop_module.torch, "compile", compile_eagerly)
    model = small_model()
    fast = train(model, PhantomSource(), small_config(iterations=3, channels_last=True, compile=True),
                 tmp_path / "fast", progress=False)
    assert compiled == [model]
    conv = next(p for p in model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    # Step 1 starts from the same weights; later steps drift apart as float sums reorder.
    first_plain, first_fast = (loss_rows(tmp_path / name / "losses.csv")[1] for name in ("plain", "fast"))
    assert first_fast == pytest.approx(first_plain, rel=1e-4, abs=1e-7)
    assert fast.losses["total"] == pytest.approx(plain.losses["total"], rel=0.05)
    assert firekit.load(tmp_path / "fast" / "model.pt").config == model.config


def test_amp_cpu_runs_the_forward_in_bf16_on_the_cpu(tmp_path):
    plain = train(small_model(), PhantomSource(), small_config(iterations=1), tmp_path / "fp32", progress=False)
    bf16 = train(small_model(), PhantomSource(), small_config(iterations=1, amp_cpu=True), tmp_path / "bf16",
                 progress=False)
    assert bf16.losses["total"] != plain.losses["total"]  # bf16 rounding: the autocast ran
    assert bf16.losses["total"] == pytest.approx(plain.losses["total"], rel=0.05)
    # config.amp alone is for CUDA: on the CPU it changes nothing
    again = train(small_model(), PhantomSource(), small_config(iterations=1, amp=True), tmp_path / "amp",
                  progress=False)
    assert again.losses == plain.losses


# ------------------------------------------------------------------------ non-finite gradients
def poison_gradients(model, when):
    """A hook that makes one weight's gradient NaN whenever ``when()`` is true (the loss stays finite)."""
    weight = model.transform_ab.affine.heatmaps.weight if hasattr(model.transform_ab.affine, "heatmaps") \
        else next(model.transform_ab.parameters())
    weight.register_hook(lambda grad: grad * math.nan if when() else grad)


@pytest.mark.parametrize("check_finite", [True, False])
def test_a_non_finite_gradient_leaves_the_weights_finite(check_finite):
    model = small_model()
    optimizers = firekit.make_optimizers(model, small_config())
    source, poisoned = PhantomSource(), [True]
    poison_gradients(model, lambda: poisoned[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = source.sample(0, 2)
    loss = train_step(model, optimizers, batch["x_a"], batch["x_b"], check_finite=check_finite)
    assert torch.isfinite(loss.total) and float(loss.skipped) == 1.0
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    if check_finite:  # no optimiser stepped: every weight as it was
        assert all(torch.equal(before[k], after[k]) for k in before)
    poisoned[0] = False
    loss = train_step(model, optimizers, batch["x_a"], batch["x_b"], check_finite=check_finite)
    assert float(loss.skipped) == 0.0
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_a_run_weathers_a_bad_gradient_and_logs_it(tmp_path):
    model, calls = small_model(), []
    poison_gradients(model, lambda: calls.append(1) or len(calls) == 2)  # step 2's backward only
    result = train(model, PhantomSource(), small_config(iterations=4), tmp_path / "run", progress=False)
    rows = {int(r["step"]): float(r["skipped"]) for r in read_csv(tmp_path / "run" / "losses.csv")[1]}
    assert rows == {1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0} and result.losses["skipped"] == 0.0
    saved, _ = load_checkpoint(tmp_path / "run" / "model.pt")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_gradients_non_finite_step_after_step_stop_the_run(tmp_path):
    model = small_model()
    poison_gradients(model, lambda: True)
    steps = loop_module.MAX_SKIPPED_IN_A_ROW
    with pytest.raises(FirekitError, match=f"step {steps}: the gradients were non-finite at {steps} steps in a row"
                       ) as error:
        train(model, PhantomSource(), small_config(iterations=steps + 5, checkpoint_every=5), tmp_path / "run",
              progress=False)
    assert "\n" not in str(error.value) and "holds step" in str(error.value)
    saved, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.isfinite(p).all() for p in saved.parameters())
