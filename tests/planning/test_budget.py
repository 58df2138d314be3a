"""--time-budget: the plan for each situation, a run that ends on time, and advice that
weighs what fine-tuning costs here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import visiontune as vt
from visiontune.bundle import load_bundle
from visiontune.planning.advice import weigh_cost
from visiontune.planning.budget import MAX_EPOCHS, decide_plan
from visiontune.planning.costs import Costs
from visiontune.tasks.single_label import SingleLabel
from visiontune.train.callbacks import Callback
from visiontune.train.clock import Clock
from visiontune.train.trainer import Trainer

# the runs here race a real clock: under pytest-xdist they take one worker, one after another
pytestmark = pytest.mark.xdist_group("deadlines")

# 400 train + 100 valid images at 224 px: 20 ms per image to extract, 100 ms per training step image
COSTS = Costs(extract_per_image=0.02, step_per_image=0.1, images_to_extract=500, train_images=400,
              valid_images=100, input_size=224, probe_fit_s=2.8)


def test_the_plan_fits_fine_tuning_epochs_after_the_probe() -> None:
    probe, epoch = COSTS.probe_seconds(), COSTS.epoch_seconds()
    assert probe == pytest.approx(500 * 0.02 + 2.8) and epoch == pytest.approx(42.0)
    plan = decide_plan(COSTS, "gradual", "why", budget_s=600, spent=20)
    finish = COSTS.finish_seconds()  # the OOD score's pass after training: 400 bank + 100 validation images
    assert finish == pytest.approx(500 * 0.02) and plan.finish_s == pytest.approx(finish)
    expected = int((600 * 0.97 - 20 - probe - finish) // epoch)
    # as many epochs as the clock holds (at most MAX_EPOCHS): warmup-stable-decay decides the length late
    assert (plan.strategy, plan.epochs, plan.image_size, plan.schedule) == ("gradual", MAX_EPOCHS + 1, 224, "wsd")
    assert plan.overrides()["schedule"] == "wsd"
    assert plan.expected_s <= 600 and any(f"about {expected} fine-tuning epochs" in r for r in plan.reasons)


def test_a_tight_budget_shrinks_the_image_then_falls_back_to_the_probe() -> None:
    small = decide_plan(COSTS, "gradual", "why", budget_s=120, spent=5)  # 3 epochs at 224 px do not fit
    assert small.strategy == "gradual" and small.image_size < 224 and small.epochs >= 4
    probe_only = decide_plan(COSTS, "gradual", "why", budget_s=40, spent=5)
    assert (probe_only.strategy, probe_only.epochs) == ("feature-extract", 1)
    assert "the converged probe alone" in probe_only.reasons[-1]
    small_probe = decide_plan(COSTS, "gradual", "why", budget_s=12, spent=2)  # the probe at 224 px does not fit
    assert (small_probe.strategy, small_probe.image_size) == ("feature-extract", 160)
    assert small_probe.expected_s <= 12 * 0.97 and "features at 160 px" in small_probe.reasons[-1]
    with pytest.raises(vt.ConfigError, match="too short"):
        decide_plan(COSTS, "gradual", "why", budget_s=6, spent=5)
    generous = decide_plan(COSTS, "finetune", "why", budget_s=10**6, spent=5)
    assert generous.epochs == MAX_EPOCHS + 1
    assert decide_plan(COSTS, "feature-extract", "why", 600, 5).strategy == "feature-extract"


def test_advice_prefers_the_probe_when_fine_tuning_cannot_gain_enough() -> None:
    strategy, reason = weigh_cost("gradual", "similar, data enough", probe=0.985, costs=COSTS)
    assert strategy == "feature-extract" and "42 s per epoch" in reason and "1.5 points" in reason
    assert weigh_cost("gradual", "r", probe=0.90, costs=COSTS) == ("gradual", "r")


def _slow_machine_that_wants_fine_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow machine (0.15 s per training step), an advisor that asks for fine-tuning (the
    red/green probe is perfect) and an optimistic epoch estimate (a quarter of the measured):
    the budget must hold anyway. The clock, the plan and the trainer are the real ones."""
    from visiontune.planning import budget

    real = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, net, x, y, **kw: time.sleep(0.15) or real(self, net, x, y,
                                                                                                       **kw))
    real_advice = budget.advise_source

    def fine_tune_please(cfg, source, costs=None):
        advice = real_advice(cfg, source, costs)
        advice.strategy = "gradual"
        return advice

    monkeypatch.setattr(budget, "advise_source", fine_tune_please)
    real_epoch = Costs.epoch_seconds
    monkeypatch.setattr(Costs, "epoch_seconds", lambda self, size=None: real_epoch(self, size) / 4)


def test_a_run_with_a_time_budget_ends_on_time(flat_data: Path, tmp_path: Path, tiny: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_machine_that_wants_fine_tuning(monkeypatch)
    started = time.perf_counter()
    r = vt.fit(flat_data, **dict(tiny, time_budget="15s", trainable_bn="eval", output=str(tmp_path / "r")))
    took = time.perf_counter() - started
    plan = json.loads((Path(r.run_dir) / "time_budget.json").read_text())
    assert plan["strategy"] == "gradual" and plan["epochs"] >= 4 and plan["reasons"]
    assert len(r.history) < plan["epochs"]  # the plan was too optimistic: the deadline stopped the run
    assert 0.9 * 15 <= took <= 15 * 1.05  # it used the budget, and ended on time
    assert plan["budget_s"] == 15
    assert vt.RunConfig.create(None, time_budget="1h30m").budget.time_budget == 5400.0


def test_a_pessimistic_plan_still_spends_the_budget_and_ends_decayed(flat_data: Path, tmp_path: Path, tiny: dict,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Epochs cost half of what the plan expects (the estimate twice too high): a schedule
    fixed up front would end after the few epochs it planned, with most of the budget unused.
    Warmup-stable-decay by the clock runs on, and its decay ends at the deadline."""
    from visiontune.train.callbacks import Callback

    _slow_machine_that_wants_fine_tuning(monkeypatch)
    real_epoch = Costs.epoch_seconds
    monkeypatch.setattr(Costs, "epoch_seconds", lambda self, size=None: real_epoch(self, size) * 8)  # twice too high

    class LearningRates(Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_step_end(self, trainer) -> None:
            self.lrs.append(trainer.optimizer.param_groups[-1]["lr"] / trainer.optimizer.param_groups[-1]["peak_lr"])

    lrs = LearningRates()
    started = time.perf_counter()
    r = vt.fit(flat_data, callbacks=[lrs], **dict(tiny, time_budget="15s", trainable_bn="eval",
                                                  output=str(tmp_path / "r")))
    took = time.perf_counter() - started
    plan = json.loads((Path(r.run_dir) / "time_budget.json").read_text())
    assert plan["strategy"] == "gradual" and plan["schedule"] == "wsd"
    assert 0.85 * 15 <= took <= 15 * 1.05  # the time was used, and the run ended on time
    assert max(lrs.lrs) == pytest.approx(1.0) and lrs.lrs[-1] < 0.05  # it reached the peak, then decayed by the end


def test_when_fine_tuning_cannot_beat_the_probe_the_decay_begins_early_and_the_run_ends_early(
        flat_data: Path, tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 23: "when the probe is expected to win, stop early and say so". A peak LR far
    too high (fine-tuning only ever makes the probe worse; a few red images filed as green,
    so the probe's loss is not zero and the gradients move the weights): validation stalls
    at the peak, the decay begins after 2 x patience epochs, the run ends after it with the
    probe's weights, long before the budget (it used to hold the peak until the time left
    equalled the decay, and end at the deadline)."""
    import logging
    import shutil

    for i in range(3):
        shutil.move(str(flat_data / "red" / f"red_{i:03d}.png"), str(flat_data / "green" / f"moved_{i}.png"))
    _slow_machine_that_wants_fine_tuning(monkeypatch)
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        r = vt.fit(flat_data, **dict(tiny, time_budget="40s", trainable_bn="eval", patience=2, lr=30.0,
                                     output=str(tmp_path / "r")))
    took = time.perf_counter() - started
    assert "at the peak learning rate (best" in caplog.text and "the converged probe's); the decay begins now" \
        in caplog.text
    assert "fine-tuning did not beat it on validation" in caplog.text
    assert r.best_epoch == 1  # the probe's epoch (1-based)
    assert len(r.history) <= 12 and took < 0.6 * 40  # ended early (it ran all 31 planned epochs before), said why


def test_measured_costs_include_decoding(flat_data: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a batch is part of what an epoch costs: a slow decoder (50 ms an image) shows."""
    from visiontune.config import RunConfig
    from visiontune.data import loaders
    from visiontune.data.sources import load_items
    from visiontune.planning.costs import measure_costs

    real = loaders.load_rgb

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)

    cfg = RunConfig.create(None, path=str(flat_data), **tiny)
    source = load_items(cfg.data)
    quick = measure_costs(cfg, source)
    monkeypatch.setattr(loaders, "load_rgb", slow)
    slowed = measure_costs(cfg, source)
    assert slowed.extract_per_image >= quick.extract_per_image + 0.04
    assert slowed.step_per_image >= quick.step_per_image + 0.04


def test_the_probes_cost_grows_with_classes_and_feature_width() -> None:
    from visiontune.frozen.probe import estimate_seconds

    small, wide = estimate_seconds(2000, 64, 2), estimate_seconds(2000, 1280, 50)
    assert wide > 3 * small > 0
    # 10x the rows: more than 2x the time (the per-fit fixed cost of the 10 C values x 5 folds weighs in at 2,000)
    assert estimate_seconds(20000, 256, 5) > 2 * estimate_seconds(2000, 256, 5)


def test_feature_extraction_and_the_c_search_stop_at_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import torch

    from conftest import make_class_folders
    from visiontune.config import RunConfig
    from visiontune.data import loaders
    from visiontune.frozen import probe
    from visiontune.frozen.features import FeatureExtractor
    from visiontune.models.classifier import create_classifier

    data = make_class_folders(tmp_path / "d", {"red": 20, "green": 20})
    paths = sorted(str(p) for p in data.rglob("*.png"))
    cfg = RunConfig.create(None, path=str(data), backbone="timm:test_efficientnet", weights="none", image_size=32)
    model, pre = create_classifier(cfg.model, 2)
    real = loaders.load_rgb
    monkeypatch.setattr(loaders, "load_rgb", lambda *a, **k: time.sleep(0.05) or real(*a, **k))  # 50 ms an image
    started = time.perf_counter()
    extractor = FeatureExtractor(model.backbone, pre, torch.device("cpu"), None, batch_size=4, num_workers=0)
    feats, stats = extractor.extract(paths, deadline=started + 0.8)
    assert time.perf_counter() - started < 1.4
    assert 0 < len(stats.left_out) < 40 and stats.misses == 40 - len(stats.left_out)
    assert stats.left_out != list(range(40 - len(stats.left_out), 40))  # a random sample is left out, not the tail
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = (rng.normal(size=(300, 16)) + 2.0 * np.eye(2, 16)[y]).astype(np.float32)
    fit = probe.fit_probe(x, y, SingleLabel(["0", "1"]), deadline=time.perf_counter() - 1)  # already past
    assert fit.c == probe.SEARCH_ORDER[0] and fit.folds == 5  # no C tried: the middle of the grid
    assert ((x @ fit.weight.T + fit.bias).argmax(1) == y).mean() > 0.9  # a short fit still, not the zero head


def test_a_resumed_run_keeps_what_is_left_of_its_time_budget(flat_data: Path, tmp_path: Path, tiny: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import StopAfter

    _slow_machine_that_wants_fine_tuning(monkeypatch)
    part = vt.fit(flat_data, **dict(tiny, time_budget="15s", trainable_bn="eval", output=str(tmp_path / "r")),
                  callbacks=[StopAfter(2)])
    used = part.seconds
    assert (Path(part.run_dir) / "time_budget.json").is_file()  # written when training started
    started = time.perf_counter()
    resumed = vt.fit(resume=part.run_dir)
    took = time.perf_counter() - started
    assert len(resumed.history) > 2 and took <= (15 - used) * 1.05 + 1.0  # the rest of the budget, not a new one
    assert resumed.seconds <= 15 * 1.05 + 1.0
    plan = json.loads((Path(part.run_dir) / "time_budget.json").read_text())
    assert plan["resumed"] and plan["actual_s"] == pytest.approx(resumed.seconds)


def test_the_advisor_looks_at_what_the_budget_allows_and_the_plan_counts_what_it_cached(
        flat_data: Path, tiny: dict) -> None:
    from dataclasses import replace

    from visiontune.config import RunConfig
    from visiontune.data.items import DataSource, Item
    from visiontune.data.sources import load_items
    from visiontune.planning.budget import advisor_sample, plan_budget

    items = [Item(f"{i}.png", "rare" if i < 5 else f"c{i % 4}", "train") for i in range(10_000)]
    big = DataSource("root", ["c0", "c1", "c2", "c3", "rare"], items)
    costs = replace(COSTS, images_to_extract=10_000, train_images=10_000, valid_images=0)
    sample = advisor_sample(big, costs, left_s=100, seed=0)  # 0.02 s x 1.25 an image: 1,000 fit in 25 s
    assert 900 <= len(sample.items) <= 1100 and {it.label for it in sample.items} == set(big.classes)
    assert advisor_sample(big, replace(costs, images_to_extract=0), left_s=10_000, seed=0) is big
    import timm
    import torch

    weights = flat_data.parent / "backbone.pth"  # weights of our own: the advisor then uses this backbone
    torch.save(timm.create_model("test_efficientnet").state_dict(), weights)
    cfg = RunConfig.create(None, path=str(flat_data), **dict(tiny, weights=str(weights)))
    plan = plan_budget(cfg, load_items(cfg.data), 600, time.perf_counter())
    assert "(0 not cached yet)" in plan.reasons[0]  # the advisor extracted them all: the probe needs none
    # one figure for what is cached: before, the advisor's reason repeated its own cost note,
    # measured before it cached them ("24 not cached yet" beside "0 not cached yet")
    assert sum(r.count("not cached yet") for r in plan.reasons) == 1, plan.reasons


def test_when_no_image_size_fits_every_feature_the_probe_fits_the_sample_extracted_in_time() -> None:
    from dataclasses import replace

    many = replace(COSTS, images_to_extract=100_000, train_images=90_000, valid_images=10_000)
    plan = decide_plan(many, "feature-extract", "why", budget_s=300, spent=10)
    assert (plan.strategy, plan.image_size) == ("feature-extract", 128)  # the smallest size tried
    import re

    fit = int(re.search(r"features of about (\d+) of 100000 images fit", plan.reasons[-1]).group(1))
    per_image, fit_per_image = 0.02 * (128 / 224) ** 2, 2.8 / 100_000  # extraction, and the fit's share
    assert fit == pytest.approx((300 * 0.97 - 10 - 5.0) / (per_image + fit_per_image), rel=0.01)
    assert plan.reserve_s == pytest.approx(fit * fit_per_image + 5.0)
    with pytest.raises(vt.ConfigError, match="too short"):
        decide_plan(many, "feature-extract", "why", budget_s=15, spent=10)


def test_a_time_budget_under_torchrun_with_several_processes_is_refused(flat_data: Path, tiny: dict,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process would judge the deadline by its own clock and could stop at another step
    than the others (a collective then waits forever): refused before anything starts."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(vt.ConfigError, match="torchrun"):
        vt.fit(flat_data, **dict(tiny, time_budget="30s"))


# -- deadlines at any moment: the run ends with its files and its best weights ----------------

class _HoldUntilTheDeadline(Callback):
    """At one moment of epoch `epoch` (its start, after its first step, or after its last
    step: the deadline then falls before a step, between steps, during validation), sleeps
    until `before` seconds ahead of the deadline, as a machine slowed by another job would."""

    def __init__(self, epoch: int, moment: str, before: float = 0.5) -> None:
        self.epoch, self.moment, self.before = epoch, moment, before
        self.steps = self.done = 0
        self.fired = False
        self.deadline = float("inf")

    def on_epoch_start(self, trainer) -> None:
        self.done = 0
        self.steps = len(trainer.data.for_phase(trainer.plan.phase_index(trainer.state.epoch)).train)
        if self.moment == "epoch start":
            self._hold(trainer)

    def on_step_end(self, trainer) -> None:
        self.done += 1
        if (self.moment, self.done) in (("after a step", 1), ("after the last step", self.steps)):
            self._hold(trainer)

    def _hold(self, trainer) -> None:
        if trainer.state.epoch == self.epoch and not self.fired:
            self.fired, self.deadline = True, trainer.clock.deadline
            time.sleep(max(0.0, self.deadline - self.before - time.perf_counter()))


def _slow_decoding(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.03) -> None:
    """Each image takes `seconds` to decode: with 30 validation images validating takes at
    least 0.9 s, longer than the 0.5 s the hold leaves, while a training batch of 8 takes
    0.24 s: the first step's check comes before the deadline."""
    from visiontune.data import loaders

    real = loaders.load_rgb
    monkeypatch.setattr(loaders, "load_rgb", lambda *a, **k: time.sleep(seconds) or real(*a, **k))


def _fine_tuning_in_time(data: Path, out: Path, tiny: dict, budget: float, callbacks: list):
    """Fine-tuning as a time budget runs it (warmup-stable-decay by the clock, more epochs
    than the time holds: the deadline ends it) under a real clock of `budget` seconds;
    without the planner and the probe, whose times vary with the machine's load."""
    from visiontune.data.sources import load_items
    from visiontune.train.session import train_run

    cfg = vt.RunConfig.create(None, path=str(data), **dict(tiny, strategy="finetune", epochs=30, schedule="wsd",
                                                           time_budget=budget, trainable_bn="eval", valid_pct=0.5,
                                                           image_cache=False, output=str(out)))
    return train_run(cfg, load_items(cfg.data), callbacks=callbacks, clock=Clock(budget))


@pytest.mark.parametrize("moment", ["epoch start", "after a step", "after the last step"])
def test_a_deadline_at_any_moment_ends_the_run_with_its_files_and_best_weights(
        tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, moment: str) -> None:
    """Issue 34, item 13: the deadline falling before the first step of an epoch made the
    empty-data guard fail the run ("epoch 2 read no training image... the training data
    yielded nothing", no metrics.json); falling between steps or during validation, the
    clock-driven schedule went on validating epochs of no step past the deadline. Each
    ends now at the deadline, with metrics.json and the best epoch's weights."""
    from safetensors.torch import load_file

    from conftest import make_class_folders

    data = make_class_folders(tmp_path / "d", {"red": 30, "green": 30})
    _slow_decoding(monkeypatch)
    hold = _HoldUntilTheDeadline(epoch=1, moment=moment)  # validating epoch 1 took >= 0.9 s: so will epoch 2's
    r = _fine_tuning_in_time(data, tmp_path / "r", tiny, 12.0, [hold])
    ended = time.perf_counter()
    assert hold.fired, "the run did not reach epoch 2 in time: the scenario did not happen"
    assert ended <= hold.deadline + 3.0  # at the deadline: one validation (>= 0.9 s) may end past it, no more
    assert len(r.history) == (1 if moment == "epoch start" else 2)  # no epoch without a step is recorded
    assert all(row["train_loss"] > 0 for row in r.history)
    run = Path(r.run_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == r.best_epoch == metrics["epoch"] >= 1
    assert metrics["val_loss"] == pytest.approx(r.history[r.best_epoch - 1]["val_loss"])
    saved, held = load_file(str(run / "model.safetensors")), r.model.state_dict()
    assert all(torch.equal(saved[k], held[k].cpu()) for k in saved)  # the model holds the best epoch's weights


_KILLABLE = """
import logging, sys, time
import visiontune as vt
from visiontune.data.sources import load_items
from visiontune.train.callbacks import Callback
from visiontune.train.clock import Clock
from visiontune.train.session import train_run

class Slow(Callback):  # a slower machine: every step takes 0.3 s more (30 epochs of 3 steps: more than the budget)
    def on_step_end(self, trainer):
        time.sleep(0.3)

class Hold(Callback):  # waits at the start of epoch `epoch` (its checkpoint not written), to be killed there
    def __init__(self, epoch):
        self.epoch = epoch
    def on_epoch_start(self, trainer):
        if trainer.state.epoch == self.epoch:
            print("holding", flush=True)
            time.sleep(600)

logging.basicConfig(level=logging.INFO, format="%(message)s")
what, where, hold = sys.argv[1], sys.argv[2], int(sys.argv[3])
if what == "resume":
    vt.fit(resume=where, callbacks=[Slow(), Hold(hold)])
else:  # fine-tuning as a budget runs it (wsd by the clock, more epochs than fit); no planner, no probe: their
    # times vary too much with the machine's load for a test
    cfg = vt.RunConfig.create(None, path=what, output=where, backbone="timm:test_efficientnet", weights="none",
                              image_size=32, batch_size=8, num_workers=0, progress=False, patience=0,
                              strategy="finetune", epochs=30, schedule="wsd", time_budget=BUDGET, trainable_bn="eval")
    train_run(cfg, load_items(cfg.data), callbacks=[Slow(), Hold(hold)], clock=Clock(BUDGET))
"""


def _kill_when_holding(args: list[str], log: Path, hold_s: float) -> float:
    """Run _KILLABLE with `args`, SIGKILL it `hold_s` seconds after it holds; return how
    long it held (its log in `log`)."""
    import os
    import signal
    import subprocess
    import sys

    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _KILLABLE.replace("BUDGET", str(_BUDGET)), *args],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ))
        try:
            line = proc.stdout.readline()
            assert line.strip() == "holding", f"it ended without holding: {log.read_text()[-2000:]}"
            held = time.perf_counter()
            time.sleep(hold_s)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return time.perf_counter() - held


_BUDGET = 25.0


def test_a_budgeted_run_killed_before_its_first_checkpoint_and_after_its_last_keeps_its_budget(
        flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    """Issue 34, item 1 and "time after the last checkpoint is not charged": a budgeted run
    SIGKILLed before its first checkpoint (here at the start of its first epoch; in real
    life often during feature extraction) was resumed with no deadline at all and trained
    every one of its planned epochs; one killed some time after a checkpoint lost that
    time from the budget. The clock's record (clock.json, kept up to date while the run
    goes) charges both: each resumed session has what is left of the budget counted from
    the first start, and the run ends within it."""
    from visiontune.rundir import CLOCK_FILE, load_checkpoint
    from visiontune.train.clock import HEARTBEAT_S

    out = tmp_path / "runs"
    first_hold = _kill_when_holding([str(flat_data), str(out), "0"], tmp_path / "first.log", 3.0)
    (run,) = out.iterdir()
    assert not (run / "checkpoints" / "last.pt").exists()  # killed before its first checkpoint
    used = json.loads((run / CLOCK_FILE).read_text())["used_s"]
    assert used >= first_hold - HEARTBEAT_S - 0.5  # the time it held is charged

    second_hold = _kill_when_holding(["resume", str(run), "2"], tmp_path / "second.log", 3.0)
    said = (tmp_path / "second.log").read_text()
    assert f"s of {_BUDGET:.0f} s left after resuming ({used:.0f} s used before)" in said, said[-3000:]
    at_checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")["elapsed_s"]  # epoch 2 ended here
    used_now = json.loads((run / CLOCK_FILE).read_text())["used_s"]
    assert used_now >= at_checkpoint + second_hold - HEARTBEAT_S - 0.5  # the time after the checkpoint counts
    assert used_now >= first_hold + second_hold - 2 * (HEARTBEAT_S + 0.5)

    started = time.perf_counter()
    resumed = vt.fit(resume=str(run), callbacks=[_Slow()])
    took = time.perf_counter() - started
    assert took <= (_BUDGET - used_now) * 1.05 + 1.0  # what was left, not a new budget nor no budget
    assert 2 < len(resumed.history) < 30 and (run / "metrics.json").is_file()
    assert used_now <= resumed.seconds <= _BUDGET * 1.05 + 1.0
    assert json.loads((run / CLOCK_FILE).read_text())["used_s"] == pytest.approx(resumed.seconds, abs=0.5)


class _Slow(Callback):
    """A slower machine: every step takes 0.3 s more (30 epochs of 3 steps take longer
    than the budget: the deadline ends the run, not its epochs)."""

    def on_step_end(self, trainer) -> None:
        time.sleep(0.3)


def test_cv_and_compare_refuse_a_time_budget_instead_of_ignoring_it(flat_data: Path, tmp_path: Path, tiny: dict,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Issue 34: `cv` and `compare` took --time-budget and trained by --epochs, as if it were
    not there. They measure configurations; a budget chooses the configuration and cuts it by
    the clock: refused, before any training, saying why and what to set instead."""
    from visiontune.cli import main
    from visiontune.selection.compare import compare
    from visiontune.selection.cv import cross_validate

    options = ["--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "32",
               "--output", str(tmp_path / "runs")]
    for command in (["cv", str(flat_data), "--folds", "2"], ["compare", str(flat_data)], ["advise", str(flat_data)],
                    ["lr-find", str(flat_data)]):  # advise and lr-find: the audit found them ignoring it too
        assert main([*command, *options, "--time-budget", "1m"]) == 2
        err = capsys.readouterr().err
        assert f"error: {command[0]} does not take --time-budget (60 s)" in err and "set --epochs" in err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
    config = vt.RunConfig.create(None, **dict(tiny, time_budget="2m"))  # e.g. a budgeted run's config.yaml
    with pytest.raises(vt.ConfigError, match="cv does not take --time-budget .* the time_budget key of --config"):
        cross_validate(flat_data, folds=2, config=config)
    with pytest.raises(vt.ConfigError, match="compare does not take --time-budget"):
        compare(flat_data, config=config)


def test_a_run_that_used_its_whole_budget_before_its_first_checkpoint_is_refused_and_can_be_given_more(
        flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    """Nothing to keep and no time left: resuming says so and how to go on; --time-budget on
    resume sets the whole run's budget, the time used still counted."""
    from visiontune.data.sources import load_items
    from visiontune.train.session import train_run

    class Crash(Callback):
        def on_epoch_start(self, trainer) -> None:
            raise KeyboardInterrupt  # Ctrl-C before the first checkpoint

    cfg = vt.RunConfig.create(None, path=str(flat_data), **dict(tiny, strategy="finetune", epochs=2, schedule="wsd",
                                                                time_budget=3.0, output=str(tmp_path / "r")))
    with pytest.raises(KeyboardInterrupt):  # 5 s of planning already: past the budget of 3 s
        train_run(cfg, load_items(cfg.data), callbacks=[Crash()], clock=Clock(3.0, time.perf_counter() - 5.0))
    (run,) = (tmp_path / "r").iterdir()
    with pytest.raises(vt.ConfigError, match=r"used its whole time budget \([5-9] s of 3 s\) before its first "
                                             r"checkpoint.*--time-budget"):
        vt.fit(resume=str(run))
    resumed = vt.fit(resume=str(run), time_budget="1m")
    assert len(resumed.history) == 2 and 5.0 < resumed.seconds < 60.0
    record = json.loads((run / "time_budget.json").read_text())  # the budget it ended under (audit: no record)
    assert record["budget_s"] == 60 and record["resumed"] and record["actual_s"] == pytest.approx(resumed.seconds)


def test_a_budget_that_ends_before_the_first_step_is_an_error_not_a_run_without_a_model(tmp_path: Path) -> None:
    """Audit of issue 34: with too few labels to plan (no validation split), a budget
    shorter than the start-up ended before the first step, and the run exited 0 with an
    empty history and no model.safetensors (DESIGN rule 5: never succeed with zero steps)."""
    from conftest import TINY, make_class_folders
    from visiontune.data.sources import resolve_inputs
    from visiontune.errors import ConfigError
    from visiontune.train.session import train_run

    data = make_class_folders(tmp_path / "d", {"red": 3, "green": 1})
    cfg, source = resolve_inputs(data, None, None, dict(TINY, strategy="finetune", epochs=3, time_budget=60,
                                                        output=str(tmp_path / "runs")))
    assert source.no_validation
    spent = Clock(60.0, started=time.perf_counter() - 120)  # the budget is gone before training starts
    with pytest.raises(ConfigError, match="ended before the first training step"):
        train_run(cfg, source, clock=spent)
    (run,) = (tmp_path / "runs").iterdir()
    assert not (run / "model.safetensors").exists() and not (run / "metrics.json").exists()


def test_a_budget_that_ends_before_any_features_is_a_clear_error(tmp_path: Path) -> None:
    """Audit of issue 34: few labels and a short budget: 'features of 0 of 5 images were
    computed before the deadline', then DataLoader's 'num_samples=0' traceback."""
    from conftest import TINY, make_class_folders
    from visiontune.data.sources import resolve_inputs
    from visiontune.errors import ConfigError
    from visiontune.train.session import train_run

    data = make_class_folders(tmp_path / "d", {"red": 3, "green": 1})
    cfg, source = resolve_inputs(data, None, None, dict(TINY, strategy="feature-extract", time_budget=30,
                                                        trainable_bn="eval", feature_cache=False,
                                                        output=str(tmp_path / "runs")))
    almost = Clock(30.0, started=time.perf_counter() - 29.99)  # the deadline falls during extraction
    with pytest.raises(ConfigError, match=r"features of [01] of 4 training images were computed: too few"):
        train_run(cfg, source, clock=almost)


class _FitEnd(Callback):
    """When training ended (before calibration and the OOD score's pass)."""

    at = 0.0

    def on_fit_end(self, trainer) -> None:
        self.at = time.perf_counter()


def test_the_ood_bank_is_what_can_be_read_before_the_deadline(tmp_path: Path, tiny: dict,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """After the last epoch a run gives its model the OOD score: a feature pass over a bank of
    training images and the validation images (train/calibrate.fit_ood). Under a budget that
    pass ran whatever the time left: a run that trained to its deadline then read its 240
    training images again, 6 s past it here. The bank now holds what can be read by the
    deadline (at least an image a class), and says so."""
    from conftest import make_class_folders

    data = tmp_path / "d"
    make_class_folders(data / "train", {"red": 120, "green": 120})
    make_class_folders(data / "valid", {"red": 6, "green": 6}, start_seed=500)
    _slow_decoding(monkeypatch, 0.025)  # the whole bank's pass: >= 6 s
    fit_end = _FitEnd()
    r = _fine_tuning_in_time(data, tmp_path / "r", tiny, 12.0, [fit_end])
    finishing = time.perf_counter() - fit_end.at
    ood = load_bundle(r.run_dir).uncertainty["ood"]
    assert 2 <= ood["bank"] < 240  # an image a class at least, not the whole training split
    # the whole bank alone takes >= 6 s to read; what is left is the validation pass and fixed costs (load-sensitive)
    assert finishing < 5.5, f"calibration and the OOD score took {finishing:.1f} s after the deadline"


def test_training_under_a_budget_keeps_time_for_the_ood_score() -> None:
    """A fine-tuning plan keeps the OOD score's pass (Costs.finish_seconds) from its epochs,
    and its clock ends training that long before the deadline, so that the bank is whole."""
    plan = decide_plan(COSTS, "gradual", "why", budget_s=600, spent=20)
    assert plan.finish_s == pytest.approx(10.0) and "~10 s kept for the out-of-distribution" in plan.reasons[-1]
    assert decide_plan(COSTS, "feature-extract", "why", 600, 5).finish_s == 0.0  # its bank is in the feature cache
    now = time.perf_counter()
    assert Clock(60.0, now - 51.0, finish_s=10.0).out_of_time() and not Clock(60.0, now - 49.0, finish_s=10.0).out_of_time()
    assert not Clock(60.0, now - 51.0).out_of_time()
