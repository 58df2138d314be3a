"""What training costs on this machine, measured: a few real steps, not a guess.

`measure_costs` times the backbone's eval forward (feature extraction, decoding included,
on the engine that will extract: runtime/engine.py)
and a full fine-tuning step (decode, augment, forward, backward, optimizer) on real batches
of the data, the converged probe's fit on features of this width and number of classes
(frozen/probe.estimate_seconds), and counts the features already cached. The advisor quotes these numbers and
the time budget (planning/budget.py) plans with them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from visiontune.config import RunConfig
from visiontune.data.items import TRAIN, VALID, DataSource
from visiontune.frozen.features import FeatureCache, cache_for
from visiontune.frozen.probe import estimate_seconds
from visiontune.models.classifier import create_classifier
from visiontune.models.novelty import BANK
from visiontune.runtime.device import to_device
from visiontune.runtime.engine import frozen_engine
from visiontune.train.setup import RunSetup, prepare_run
from visiontune.train.trainer import Trainer

log = logging.getLogger(__name__)

MEASURE_BATCH = 16
WARMUP = 2  # batches
MIN_TIMED_S, MAX_TIMED = 2.0, 12  # time batches until this many seconds have passed (at most this many batches)


@dataclass(frozen=True)
class Costs:
    extract_per_image: float  # s: decoding and the backbone's eval forward, per image
    step_per_image: float  # s: decoding, augmenting and one fine-tuning step, per image
    images_to_extract: int  # train + valid images whose features (at input_size) are not cached yet
    train_images: int
    valid_images: int
    input_size: int
    probe_fit_s: float  # s: the converged probe's C search and fit on the training features (measured)
    read_per_image: float = 0.0  # s of the above spent reading a file (decoding, resizing): not the model's

    def _per_image(self, total: float, size: int | None) -> float:
        """A per-image cost at `size` px: reading the file costs the same at any size, the
        model's part grows with the pixels."""
        scale = ((size or self.input_size) / self.input_size) ** 2
        read = min(self.read_per_image, total)
        return read + (total - read) * scale

    def probe_seconds(self, size: int | None = None) -> float:
        """Features of the images not cached yet at `size` px (another size than the cached
        one: all of them), then the converged probe."""
        todo = self.images_to_extract if size in (None, self.input_size) else self.train_images + self.valid_images
        return todo * self._per_image(self.extract_per_image, size) + self.probe_fit_s

    def epoch_seconds(self, size: int | None = None) -> float:
        """One fine-tuning epoch and its validation at `size` px."""
        return (self.train_images * self._per_image(self.step_per_image, size)
                + self.valid_images * self._per_image(self.extract_per_image, size))

    def finish_seconds(self, size: int | None = None) -> float:
        """What the end of a fine-tuning run reads at `size` px: the OOD score's bank of
        training images and the validation images (train/calibrate.fit_ood)."""
        return (min(BANK, self.train_images) + self.valid_images) * self._per_image(self.extract_per_image, size)

    def describe(self) -> str:
        return (f"here: features {self.extract_per_image * 1000:.0f} ms per image ({self.images_to_extract} not cached "
                f"yet), converged probe ~{self.probe_seconds():.0f} s, one fine-tuning epoch ~{self.epoch_seconds():.0f} s")

def measure_costs(cfg: RunConfig, source: DataSource) -> Costs:
    """Time two fine-tuning steps and two feature batches of `MEASURE_BATCH` real images
    (after one warm-up each) with `cfg`'s backbone, size, precision and device."""
    probe_cfg = RunConfig.create(cfg, strategy="finetune", epochs=1, batch_size=MEASURE_BATCH, probe="sgd",
                                 patience=0, compile=False)
    setup = prepare_run(probe_cfg, source)
    try:
        trainer = Trainer(setup, [])
        trainer.enter_phase(0)
        trainer.train_mode()
        step, _ = _seconds_per_image(setup.data.images().train, setup,
                                     lambda x, y: trainer.train_step(setup.model, x, y))
        backbone = setup.model.backbone
        missing = _uncached(setup.data.feature_cache(), source)
        r = setup.cfg.runtime
        engine = frozen_engine(backbone, setup.preprocess.input_size, setup.device, r.engine, r.cache_dir, missing)
        with torch.inference_mode():
            backbone.eval()
            extract, read = _seconds_per_image(setup.data.images().valid or setup.data.images().train, setup,
                                               lambda x, y: engine(x))
    finally:
        setup.data.release()  # the loaders' kept workers end here
    fit = estimate_seconds(len(source.split(TRAIN)), setup.model.num_features, setup.task.num_outputs)
    costs = Costs(extract, step, missing, len(source.split(TRAIN)), len(source.split(VALID)),
                  setup.preprocess.input_size, fit, read)
    log.info("costs %s", costs.describe())
    return costs


def _seconds_per_image(loader: DataLoader, setup: RunSetup,
                       work: Callable[[torch.Tensor, torch.Tensor], Any]) -> tuple[float, float]:
    """(seconds per image of reading a batch (decoding and transforming its files) and `work`
    on it, of which reading): WARMUP batches first, then batches timed until MIN_TIMED_S
    have passed (at most MAX_TIMED; small data: at least one batch is timed)."""
    warm = min(WARMUP, len(loader) - 1)
    total = read = 0.0
    counted = 0
    for i, batch in enumerate(_timed_reads(loader)):
        seconds_to_read, (x, y) = batch
        started = time.perf_counter()
        work(to_device(x, setup.device, setup.cfg.runtime.channels_last), y.to(setup.device))
        if i >= warm:
            total += seconds_to_read + time.perf_counter() - started
            read += seconds_to_read
            counted += len(y)
        if i >= warm + MAX_TIMED - 1 or (i >= warm and total >= MIN_TIMED_S):
            break
    return total / max(1, counted), read / max(1, counted)


def _timed_reads(loader: DataLoader) -> Any:
    """(seconds it took to read, (images, targets)) of each batch of `loader`."""
    reader = iter(loader)
    while True:
        started = time.perf_counter()
        try:
            x, y, *_ = next(reader)
        except StopIteration:
            return
        yield time.perf_counter() - started, (x, y)


def uncached_images(cfg: RunConfig, source: DataSource) -> int:
    """Train + valid images of `source` whose features for `cfg`'s backbone and size are not
    in the feature cache (the model is built to know its fingerprint)."""
    model, pre = create_classifier(cfg.model, len(source.classes))
    return _uncached(cache_for(cfg.model.backbone, model.backbone, pre, cfg.runtime.cache_dir), source)


def _uncached(cache: FeatureCache, source: DataSource) -> int:
    pool = [it.path for it in source.items if it.split in (TRAIN, VALID)]
    return len(pool) - cache.count_known(cache.digests(pool))
