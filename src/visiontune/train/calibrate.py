"""After training: calibrate the kept weights' probabilities and fit the prediction sets,
on the validation split's outputs of those weights (tasks/calibration.py,
tasks/conformal.py).

Why the validation split and not cv's out-of-fold outputs: the temperature belongs to the
model that ships, and out-of-fold outputs are of other models (each fold's), trained on less
data, whose confidence differs from the final model's. The validation split also chose the
epoch, which leaves its outputs slightly optimistic; one temperature (one per label) fitted
by likelihood has too little freedom to learn that choice, and the prediction sets'
coverage is measured on test splits no choice looked at (bench/uncertainty.py).

A run without a validation split (a class with a single image) is the probe, validated by
its cross-validation: those held-out outputs stand in when there are at least MIN_HELD_OUT
of them (the fold probes are the final probe fitted on a little less data), less the images
of a class that no other image has: their fold trained without that class, so their output
(near 0 for their class) would flatten every probability of the model kept.

The fitted layer goes into the weights (model.calibration), the held-out scores of the
sets into model.safetensors' metadata (model.uncertainty), the figures into
RUN/calibration.json and the reliability diagram into RUN/reliability.png.

`fit_ood` then gives the model its out-of-distribution score (models/novelty.py): feature
passes of the kept weights (the run's eval transform; the feature cache's rows when no
phase trained the backbone) over the validation images, then over a stratified, seeded
sample of at most BANK training images, which become the bank inside the model; the
validation images' distances and energies (of the calibrated logits: calibrate runs first) set each measure's
scale, and whose scores set the threshold that PASS_SHARE (95%) of them pass
(model.uncertainty["ood"]). Under a time budget the bank holds what can be read before the
deadline (the clock keeps time for the whole bank: Clock.finish_s).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontune.data.items import TRAIN, VALID
from visiontune.data.splits import stratified_sample
from visiontune.models.novelty import BANK, PASS_SHARE, Novelty, neighbour_k, spread, threshold
from visiontune.plots import save_reliability
from visiontune.rundir import RunDir
from visiontune.runtime.inference import EvalOutput
from visiontune.tasks.base import Task, known_rows
from visiontune.tasks.calibration import Fit
from visiontune.train.rundata import RunData

log = logging.getLogger(__name__)

FITTED_ON = "the validation split (outputs of the weights the run keeps)"
FITTED_ON_CV = ("the converged probe's cross-validation (each image's output from the fold probe that held it out; "
                "no validation split could be held out)")
MIN_HELD_OUT = 10  # images: under this, a temperature and sets would be noise (the probe's CV on 1 image a class)


def calibrate(model: Any, task: Task, valid_out: EvalOutput | None, run_dir: Path,
              write: bool = True, by_cv: bool = False) -> EvalOutput | None:
    """Fit `model.calibration` and the prediction sets on `valid_out`; return the validation
    outputs as calibrated (what tuned thresholds are chosen on), or `valid_out` as it is when
    there is nothing to fit on. `write`: this process writes the run's files. `by_cv`: the
    outputs are the probe's cross-validation's, and a row whose class no other row has is
    left out of the fit (its fold trained without that class)."""
    known = known_rows(valid_out.targets) if valid_out is not None else None
    rows = known.copy() if known is not None else None
    if by_cv and rows is not None and rows.any():
        rows[np.flatnonzero(rows)[task.calibrator.unseen_rows(valid_out.targets[rows])]] = False
    if valid_out is None or rows.sum() < MIN_HELD_OUT:
        log.info("%d held-out outputs (under %d): probabilities are not calibrated, and predict --coverage needs a "
                 "run whose validation split holds %d images or more (a larger --valid-pct, or a valid/ folder)",
                 0 if rows is None else int(rows.sum()), MIN_HELD_OUT, MIN_HELD_OUT)
        return valid_out
    targets, probs = valid_out.targets[rows], valid_out.probs[rows]
    fit = task.calibrator.fit(targets, probs)
    out = EvalOutput(valid_out.loss, valid_out.targets, valid_out.probs.copy(), valid_out.ids)
    if fit is not None:
        model.calibration.set(fit.scale, fit.bias)
        out.probs[known] = task.calibrator.probabilities(task.calibrator.raw(out.probs[known]), fit.scale,
                                                         fit.bias).astype(out.probs.dtype)
        log.info("calibrated on %d %s images (%s): ECE %.3f -> %.3f, NLL %.3f -> %.3f", fit.images,
                 "cross-validated" if by_cv else "validation", task.calibrator.kind, fit.before["ece"],
                 fit.after["ece"], fit.before["nll"], fit.after["nll"])
    calibrated, conformal = out.probs[rows], task.conformal
    model.uncertainty = {"calibration": fit.record(task.calibrator.kind, FITTED_ON_CV if by_cv else FITTED_ON)
                         if fit else None, "sets": conformal.fit(targets, calibrated) if conformal is not None else None}
    if write:
        _write(model, task, targets, probs, calibrated, fit, run_dir)
    return out


def _write(model: Any, task: Task, targets: np.ndarray, raw: np.ndarray, calibrated: np.ndarray,
           fit: Fit | None, run_dir: Path) -> None:
    """calibration.json and reliability.png (the weights are written by the caller)."""
    run = RunDir(run_dir)
    sets = model.uncertainty["sets"]
    run.write_calibration({**(model.uncertainty["calibration"] or {"kind": task.calibrator.kind}),
                           "sets": {"kind": sets["kind"], "held_out_images": sets["n"]} if sets else None})
    if fit is None:
        return
    save_reliability(run.reliability, {"before": task.calibrator.reliability(targets, raw),
                                       "after": task.calibrator.reliability(targets, calibrated)},
                     {"before": fit.before["ece"], "after": fit.after["ece"]}, task.calibrator.outcome)


def fit_ood(model: Any, data: RunData, seed: int, bank_size: int = BANK,
            deadline: float | None = None) -> dict[str, Any] | None:
    """Give `model` its bank of training features and set its OOD threshold on the validation
    split (see the module docstring); the record kept in model.uncertainty["ood"], or None
    (and no bank) when the run has no validation images or too few training images.
    `deadline` (time.perf_counter(); a time budget's): the bank holds what can be read by
    then, at the validation images' pass's speed (at least one image a class)."""
    train, valid = data.source.split(TRAIN), data.source.split(VALID)
    if not valid or len(train) < 2:
        log.info("no out-of-distribution score: it needs validation images (to set its threshold) and training "
                 "images (its bank); predict gives no 'unknown'")
        return None
    started = time.perf_counter()
    frozen = all(data.uses_features(i) for i in range(len(data.plan.phases)))  # the cache holds these features
    extractor = data.extractor(cached=frozen and data.cfg.runtime.feature_cache)
    valid_features = extractor.features([it.path for it in valid])
    size = _bank_size(min(bank_size, len(train)), (time.perf_counter() - started) / len(valid), deadline)
    chosen = stratified_sample(data.task.strata([it.label for it in train]), size, seed, at_least=1)
    bank_items = train if chosen is None else [train[i] for i in chosen]
    bank = torch.from_numpy(np.ascontiguousarray(extractor.features([it.path for it in bank_items])))
    device = next(model.parameters()).device
    kind = data.task.calibrator.energy
    novelty = Novelty(bank, neighbour_k(len(bank)), kind).to(device)
    with torch.inference_mode():
        held = torch.from_numpy(np.ascontiguousarray(valid_features)).to(device)
        logits = model.outputs(held)  # calibrated: calibrate ran first
        parts = novelty.parts(held, logits).cpu().numpy()
        novelty.scale.copy_(torch.tensor([spread(parts[:, 0]), spread(parts[:, 1]) if kind != "none" else (0.0, 1.0)]))
        scores = novelty(held, logits).cpu().numpy()  # as predict scores them: the threshold is of these
    model.novelty = novelty
    record = _ood_record(novelty, kind, threshold(scores), len(valid), time.perf_counter() - started)
    model.uncertainty = {**(model.uncertainty or {}), "ood": record}
    log.info("out-of-distribution score: %s; bank of %d training images (%.1f MB); threshold %.4f lets %.0f%% of "
             "%d validation images pass (%.1f s)", record["score"], record["bank"], record["bank_mb"],
             record["threshold"], 100 * PASS_SHARE, len(valid), record["seconds"])
    return record


def _bank_size(wanted: int, per_image: float, deadline: float | None) -> int:
    """`wanted`, or as many images as can be read before `deadline` at `per_image` seconds
    each (said in the log when that is fewer)."""
    if deadline is None:
        return wanted
    fits = max(1, int((deadline - time.perf_counter()) / max(per_image, 1e-9)))
    if fits < wanted:
        log.warning("time budget: the out-of-distribution score's bank holds about %d of %d training images, what "
                    "can be read before the deadline (a smaller bank scores less surely)", fits, wanted)
    return min(wanted, fits)


def _ood_record(novelty: Novelty, kind: str, cut: float, valid_images: int, seconds: float) -> dict[str, Any]:
    """model.uncertainty["ood"]: what the score is, its threshold, and what it was fitted on."""
    what = f"distance to the {novelty.neighbour}-th nearest training image"
    return {"score": f"the larger of the {what} and the {kind} energy of the logits, each in units of its "
                     "validation spread (0: median, 1: 95th percentile)" if kind != "none" else
                     f"the {what}, in units of its validation spread (0: median, 1: 95th percentile)",
            "energy": kind, "k": novelty.neighbour, "threshold": round(cut, 6),
            "scale": [[round(float(v), 6) for v in row] for row in novelty.scale.tolist()],
            "bank": len(novelty.bank), "features": int(novelty.bank.shape[1]), "pass_share": PASS_SHARE,
            "valid_images": valid_images, "bank_mb": round(novelty.size_bytes() / 1e6, 3),
            "fitted_on": "training images (the bank) and the validation split (the scale and the threshold)",
            "seconds": round(seconds, 3)}
